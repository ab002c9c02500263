"""
popd: a POP3 server built on Twisted.
"""

__version__ = "0.1.0"
