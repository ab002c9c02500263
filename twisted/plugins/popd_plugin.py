"""
The twistd dropin: C{twistd popd} runs the POP3 server.

It imports popd lazily (through L{ServiceMaker}), so listing plugins never
pays for popd or breaks when popd cannot be imported.
"""

from twisted.application.service import ServiceMaker

popd = ServiceMaker(
    "popd",
    "popd.tap",
    "A POP3 server (STLS, POP3S, passwd-file users, Maildir).",
    "popd",
)
