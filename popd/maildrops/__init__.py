"""
Maildrop stores: one module per storage format, plus what they share
(L{popd.maildrops.locking}, L{popd.maildrops.paths}).
"""
