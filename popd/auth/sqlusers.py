"""
Users in an SQL database, SQLite or PostgreSQL, as a Twisted Cred checker.

The database is named by a DSN exactly like the SQL maildrop store's
(C{sqlite:///path/users.db}, C{postgresql://popd@db.example/mail}, or a
libpq keyword string), and asked with one configurable query that gets the
user name as the named parameter C{:user} (also C{:local} and C{:domain},
the parts around its last C{@}) and returns one row::

    SELECT password FROM users WHERE username = :user

The first column is the stored password in Dovecot's C{{SCHEME}hash} form
(see L{popd.auth.schemes}); an optional second column is the avatar ID (the
maildrop's name) when it differs from the name the client typed, e.g.
C{SELECT password, lower(username) FROM users WHERE lower(username) =
lower(:user)}.  No row, a NULL or empty password, or more than one row
refuses the login.

The query runs in C{twisted.enterprise.adbapi}'s threads and the hash is
verified in the reactor's thread pool, never on the reactor thread.  An
unknown user costs a verification against L{dummy_hash}, so it takes as
long as a wrong password; every refusal is the same L{UnauthorizedLogin}.
A database that cannot be reached fails with L{AuthUnavailable}.  SQLite
databases are opened read-only: popd never creates or changes the users.

Only this module's L{SQLUsersChecker} touches the database; importing the
module is cheap (the plug-in list imports it).
"""

from __future__ import annotations

import os
import re
from urllib.parse import quote

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from popd.auth.errors import AuthUnavailable

__all__ = [
    "DEFAULT_QUERY",
    "SQLUsersChecker",
    "check_query",
    "split_argument",
]

DEFAULT_QUERY = "SELECT password FROM users WHERE username = :user"

#: The named parameters a query may use.
PARAMETERS = ("user", "local", "domain")

_PLACEHOLDER = re.compile(r"(?<![:\w]):(user|local|domain)\b")
# Where a query starts inside "DSN QUERY": whitespace, then SELECT or WITH.
_QUERY_START = re.compile(r"\s+(?=(?:select|with)\b)", re.IGNORECASE)

_log = Logger()
_REFUSED = "Authentication failed"


def check_query(query: str) -> str:
    """
    @return: C{query} unchanged.
    @raise ValueError: it uses none of C{:user}, C{:local}, C{:domain}, so
        it would find the same row for everyone.
    """
    if not query.strip():
        raise ValueError("the query is empty")
    if not _PLACEHOLDER.search(query):
        raise ValueError("the query must use :user (or :local and :domain)")
    return query


def split_argument(argument: str) -> tuple[str, str]:
    """
    Split the C{sql:} argument string, C{DSN} or C{DSN QUERY}: the query
    starts at the first whitespace followed by C{SELECT} or C{WITH}.

    @return: the DSN and the query, either C{""} when not given.
    """
    parts = _QUERY_START.split(argument.strip(), maxsplit=1)
    dsn = parts[0].strip()
    if dsn.lower().startswith(("select ", "with ")):
        return "", dsn
    return dsn, parts[1].strip() if len(parts) > 1 else ""


def _paramstyle_query(query: str, sqlite: bool) -> str:
    """
    The query with its C{:name} parameters as the driver wants them:
    SQLite takes them as they are, psycopg wants C{%(name)s} (and C{%%}
    for a literal C{%}).
    """
    if sqlite:
        return query
    return _PLACEHOLDER.sub(r"%(\1)s", query.replace("%", "%%"))


def _parameters(username: str) -> dict[str, str]:
    local, at, domain = username.rpartition("@")
    if not at:
        local, domain = username, ""
    return {"user": username, "local": local, "domain": domain}


def _text(value: object) -> str | None:
    if isinstance(value, memoryview):
        value = value.tobytes()
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return value
    return None


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


def _connection_pool(dsn: str, reactor, max_connections: int):
    """
    An adbapi pool for C{dsn}; SQLite read-only, PostgreSQL as the DSN says.
    """
    from twisted.enterprise import adbapi

    from popd.maildrops.sql.dialects import parse_dsn

    target = parse_dsn(dsn)
    args, kwargs = target.args, dict(target.kwargs)
    if target.is_sqlite:
        path = "/" + target.path.lstrip("/")  # sqlite:////abs keeps a "//"
        args = (f"file:{quote(path)}?mode=ro",)
        kwargs["uri"] = True
    pool = adbapi.ConnectionPool(
        target.module,
        *args,
        cp_min=1,
        cp_max=max_connections,
        cp_reconnect=True,
        cp_noisy=False,
        cp_reactor=reactor,
        **kwargs,
    )
    return pool, target


@implementer(ICredentialsChecker)
class SQLUsersChecker:
    """
    Checks USER/PASS, SASL PLAIN (L{IUsernamePassword}) and APOP
    (L{IUsernameHashedPassword}, users stored as C{{PLAIN}} only) against
    an SQL users table.

    @param dsn: the database, as for the SQL maildrop store.
    @param query: the query (see the module documentation).
    @param reactor: the reactor for results; the global one by default.
    @param threadpool: where hashes are verified; the reactor's by default.
    @param pool: an C{adbapi.ConnectionPool} to use instead of making one.
    """

    credentialInterfaces = (IUsernamePassword, IUsernameHashedPassword)

    def __init__(
        self,
        dsn: str,
        query: str = DEFAULT_QUERY,
        *,
        reactor=None,
        threadpool=None,
        pool=None,
        max_connections: int = 5,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._threadpool = threadpool
        check_query(query)
        self.query = query
        if pool is None:
            pool, target = _connection_pool(dsn, reactor, max_connections)
            self.display = target.display
            sqlite = target.is_sqlite
        else:
            self.display = dsn
            sqlite = pool.dbapiName == "sqlite3"
        self.pool = pool
        self._sql = _paramstyle_query(query, sqlite)

    def requestAvatarId(self, credentials) -> defer.Deferred[str]:
        """
        @return: a L{Deferred} firing with the avatar ID (C{str}), or failing
            with L{UnauthorizedLogin} or L{AuthUnavailable}.
        """
        try:
            username = credentials.username
            if isinstance(username, bytes):
                username = username.decode("utf-8")
        except (AttributeError, UnicodeDecodeError):
            return defer.fail(UnauthorizedLogin(_REFUSED))
        if not username or "\0" in username:
            return defer.fail(UnauthorizedLogin(_REFUSED))
        d = self.pool.runInteraction(self._fetch, _parameters(username))
        d.addErrback(self._unavailable)
        d.addCallback(self._verify_in_thread, username, credentials)
        d.addCallback(self._avatar_or_refusal)
        return d

    def _fetch(self, cursor, parameters: dict[str, str]) -> list:
        """
        Runs in adbapi's thread: at most two rows (two is one too many).
        """
        cursor.execute(self._sql, parameters)
        return list(cursor.fetchmany(2))

    def _unavailable(self, failure):
        if failure.check(UnauthorizedLogin, AuthUnavailable):
            return failure
        raise AuthUnavailable(
            f"SQL users {self.display}: {failure.type.__name__}: "
            f"{failure.getErrorMessage()}"
        )

    def _verify_in_thread(self, rows: list, username: str, credentials):
        from twisted.internet.threads import deferToThreadPool

        threadpool = self._threadpool or self._reactor.getThreadPool()
        return deferToThreadPool(
            self._reactor, threadpool, self._verify, rows, username, credentials
        )

    def _verify(self, rows: list, username: str, credentials) -> str | None:
        """
        Runs in the thread pool: the avatar ID, or C{None} to refuse.
        """
        from popd.auth.schemes import dummy_hash, plaintext_of, verify_password

        stored, avatar_id = None, username
        if len(rows) > 1:
            _log.warn(
                "SQL users {dsn}: the query found several rows for {user!r}; "
                "login refused",
                dsn=self.display,
                user=username,
            )
        elif rows and rows[0]:
            row = rows[0]
            stored = _text(row[0]) or None
            if len(row) > 1:
                avatar_id = _text(row[1]) or None
        if IUsernamePassword.providedBy(credentials):
            matched = verify_password(
                stored or dummy_hash(), _as_bytes(credentials.password)
            )
        else:
            plaintext = plaintext_of(stored) if stored else None
            matched = (
                credentials.checkPassword(plaintext or os.urandom(16)) is True
                and plaintext is not None
            )
        if matched and stored is not None and avatar_id:
            return avatar_id
        return None

    @staticmethod
    def _avatar_or_refusal(avatar_id: str | None) -> str:
        if avatar_id is None:
            raise UnauthorizedLogin(_REFUSED)
        return avatar_id

    def close(self) -> None:
        """
        Close the connection pool (twistd does it at shut-down).
        """
        self.pool.close()
