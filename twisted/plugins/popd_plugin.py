"""
The twistd dropin: C{twistd popd} runs the POP3 server, and popd's user
databases are Cred checker plug-ins (C{--auth passwd-file:PATH},
C{sql:DSN}, C{pam:SERVICE}, C{checkpassword:PROGRAM}).

Listing plugins imports this file, for twistd and for every other program
that looks for plug-ins, so it stays cheap and can never fail: the service
maker imports popd only when used (L{ServiceMaker}), and the checker
factories come from L{popd.auth.factories}, which imports nothing heavier
than Twisted Cred until a checker is made.  If popd cannot be imported the
factories are simply missing, and C{twistd popd} reports why.
"""

from twisted.application.service import ServiceMaker

popd = ServiceMaker(
    "popd",
    "popd.tap",
    "A POP3 server (STLS, POP3S, passwd-file users, Maildir).",
    "popd",
)

try:
    from popd.auth.factories import (  # noqa: F401 - found by plug-in discovery
        checkpassword_checker_factory,
        pam_checker_factory,
        passwd_file_checker_factory,
        sql_checker_factory,
    )
except Exception:  # plug-in discovery must never break, whatever popd's state
    # A plug-in cache written while popd worked still names these: None is
    # skipped quietly by discovery, a missing name would be logged as an error.
    checkpassword_checker_factory = None
    pam_checker_factory = None
    passwd_file_checker_factory = None
    sql_checker_factory = None
