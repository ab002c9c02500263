"""
Support code for the end-to-end tests: a real twistd popd, its admin
command, test certificates, the messages they deliver and what clients
must download.
"""
