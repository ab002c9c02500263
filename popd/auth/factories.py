"""
popd's user databases as Twisted Cred checker-factory plug-ins
(L{twisted.cred.strcred.ICheckerFactory}), usable as C{twistd popd --auth
KIND:ARGUMENTS} and as C{[auth] checkers} in the configuration:

  - C{passwd-file:PATH}: a Dovecot passwd-file (L{popd.auth.passwdfile});
  - C{sql:DSN [QUERY]}: an SQL users table (L{popd.auth.sqlusers});
  - C{pam:SERVICE}: PAM (L{popd.auth.pam});
  - C{checkpassword:PROGRAM [ARGUMENTS]}: the qmail checkpassword
    interface (L{popd.auth.checkpassword}).

Any other installed ICheckerFactory plug-in works the same way, Twisted's
C{memory:} and C{file:} and a site's own included.

The dropin C{twisted/plugins/popd_plugin.py} imports this module whenever
plug-ins are listed, so it imports nothing but Twisted Cred and zope here;
each factory imports its checker when asked for one.
"""

from __future__ import annotations

import os
import re

from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.strcred import ICheckerFactory
from twisted.plugin import IPlugin
from zope.interface import implementer

__all__ = [
    "CheckpasswordCheckerFactory",
    "PAMCheckerFactory",
    "PasswdFileCheckerFactory",
    "SQLCheckerFactory",
    "build_checkers",
    "checkpassword_checker_factory",
    "pam_checker_factory",
    "passwd_file_checker_factory",
    "sql_checker_factory",
]


@implementer(IPlugin, ICheckerFactory)
class PasswdFileCheckerFactory:
    authType = "passwd-file"
    authHelp = """
Users in a Dovecot-compatible passwd-file, one a line:
user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields.  Names match
case-insensitively; the file is re-read when it changes; hashes are
verified in a thread.  APOP works for {PLAIN} passwords.  Manage it with
`popd adduser` and `popd passwd`.
"""
    argStringFormat = "The path of the passwd-file."
    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def generateChecker(self, argstring: str = ""):
        from popd.auth.passwdfile import PasswdFile, PasswdFileChecker

        if not argstring:
            raise ValueError("passwd-file needs a path: passwd-file:/etc/popd/passwd")
        path = os.path.abspath(os.path.expanduser(argstring))
        return PasswdFileChecker(PasswdFile(path))


@implementer(IPlugin, ICheckerFactory)
class SQLCheckerFactory:
    authType = "sql"
    authHelp = """
Users in an SQLite or PostgreSQL table.  The argument is the database DSN
(sqlite:///path/users.db, postgresql://user@host/db or a libpq keyword
string), optionally followed by the query, which gets :user (and :local,
:domain) and returns the stored {SCHEME}hash, and optionally the avatar
name as a second column.  Default query:
SELECT password FROM users WHERE username = :user
"""
    argStringFormat = "DSN, optionally followed by a SELECT query."
    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def generateChecker(self, argstring: str = ""):
        from popd.auth.sqlusers import DEFAULT_QUERY, SQLUsersChecker, split_argument

        dsn, query = split_argument(argstring)
        if not dsn:
            raise ValueError(
                "sql needs a DSN: sql:sqlite:///path/users.db or "
                "sql:postgresql://user@host/dbname, optionally followed by a query"
            )
        return SQLUsersChecker(dsn, query or DEFAULT_QUERY)


@implementer(IPlugin, ICheckerFactory)
class PAMCheckerFactory:
    authType = "pam"
    authHelp = """
System users through PAM: the argument is the PAM service, whose stack is
/etc/pam.d/SERVICE (default popd).  Runs the auth and account stacks in a
thread.  With pam_unix the process must be able to read /etc/shadow.
Needs the pamela package.
"""
    argStringFormat = "The PAM service name (default popd)."
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str = ""):
        from popd.auth.pam import PAMChecker

        return PAMChecker(argstring or "popd")


@implementer(IPlugin, ICheckerFactory)
class CheckpasswordCheckerFactory:
    authType = "checkpassword"
    authHelp = """
The qmail checkpassword interface: runs PROGRAM [ARGUMENTS] with
user\\0password\\0timestamp\\0 on descriptor 3 for each login.  Exit 0
accepts, 1 refuses, 111 is a temporary failure.  `true` is appended as the
subprogram unless the argument names one.
"""
    argStringFormat = "The program and its arguments (shell words)."
    credentialInterfaces = (IUsernamePassword,)

    def generateChecker(self, argstring: str = ""):
        from popd.auth.checkpassword import CheckpasswordChecker, parse_command

        return CheckpasswordChecker(parse_command(argstring))


passwd_file_checker_factory = PasswdFileCheckerFactory()
sql_checker_factory = SQLCheckerFactory()
pam_checker_factory = PAMCheckerFactory()
checkpassword_checker_factory = CheckpasswordCheckerFactory()


def _shown(description: str) -> str:
    """
    A description fit for an error message: no password of a DSN in it.
    """
    shown = re.sub(r"(://[^/:@\s]*):[^@/\s]*@", r"\1:***@", description)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", shown)


def _bytes(value) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _twisted_compatible(checker):
    """
    Twisted's C{memory:} checker keeps the names and passwords it was given
    as C{str}, while a POP3 login brings C{bytes}: key them as bytes too.
    """
    from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

    if isinstance(checker, InMemoryUsernamePasswordDatabaseDontUse):
        checker.users = {
            _bytes(name): _bytes(password) for name, password in checker.users.items()
        }
    return checker


def build_checkers(descriptions, sql_dsn: str = "", sql_query: str = "") -> list:
    """
    One checker per C{KIND:ARGUMENTS} description, by way of the installed
    ICheckerFactory plug-ins.  An C{sql} description without a DSN or a
    query takes C{sql_dsn} and C{sql_query} (the configuration's).

    @raise ValueError: naming the description that cannot be used.
    """
    from twisted.cred import strcred

    checkers = []
    for description in descriptions:
        kind, _, argument = description.partition(":")
        if kind == "sql":
            from popd.auth.sqlusers import split_argument

            dsn, query = split_argument(argument)
            argument = f"{dsn or sql_dsn} {query or sql_query}".strip()
        try:
            factory = strcred.findCheckerFactory(kind)
        except strcred.InvalidAuthType:
            known = sorted(f.authType for f in strcred.findCheckerFactories())
            raise ValueError(
                f"{_shown(description)!r}: no checker plug-in named {kind!r} "
                f"(installed: {', '.join(known)})"
            ) from None
        if IUsernamePassword not in factory.credentialInterfaces:
            raise ValueError(
                f"{_shown(description)!r}: {kind} does not check passwords"
            )
        try:
            checker = factory.generateChecker(argument)
        except Exception as error:
            raise ValueError(f"{_shown(description)!r}: {error}") from None
        checkers.append(_twisted_compatible(checker))
    return checkers
