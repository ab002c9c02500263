"""
Dovecot's passwd-file as a Twisted Cred checker, and the edits the admin
command makes to it.

The format, one user a line::

    user:{SCHEME}hash:uid:gid:gecos:home:shell:extra_fields

Only the first two fields are required.  Blank lines and lines starting with
C{#} are ignored; lines may end in CRLF; the file is UTF-8.  C{extra_fields}
is a space-separated list of C{key=value} (or bare C{key}) items and may
itself contain colons, as in Dovecot.  User names match case-insensitively
(Dovecot's C{auth_username_format = %Lu}): the lower-cased name from the file
is the avatar ID.

What popd does with the unusual entries, failing closed:

  - a malformed line (no password field, a bad user name, a non-numeric
    uid or gid that is not a local user or group, invalid UTF-8) is skipped
    with a warning naming the file and line; a repeated user keeps its first
    line, as in Dovecot;
  - an empty password field never matches: there is no password to know;
  - C{nologin} refuses the login exactly like a wrong password (the
    password is still verified, so timing does not tell them apart);
  - C{nopassword}, which in Dovecot accepts I{any} password, is not
    honoured: the login is refused and loading the file warns about it.

A flag counts as set unless its value is C{n}, C{no}, C{false} or C{0}.

Besides passwords (USER/PASS, PLAIN, LOGIN), the checker serves the
challenge-response mechanisms from what the file stores: APOP needs
C{{PLAIN}}; CRAM-MD5 takes C{{PLAIN}} or C{{CRAM-MD5}}; SCRAM-SHA-1 and
SCRAM-SHA-256 take C{{PLAIN}} (keys derived with a salt that is stable while
the process runs) or Dovecot's C{{SCRAM-SHA-1}}/C{{SCRAM-SHA-256}} secrets.
It tells the protocol which of them some user of the file can use now
(L{IUsableCredentials}), so CAPA only offers those.  SASL EXTERNAL only
needs the user to exist and be allowed to log in.
"""

from __future__ import annotations

import enum
import grp
import os
import pwd
import stat
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernameHashedPassword, IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from popd.auth import scram
from popd.auth.credentials import (
    SCRAM_INTERFACES,
    ICertificateCredentials,
    ICramMD5Credentials,
    IScramCredentials,
    IScramSecretSource,
    IScramSHA1Credentials,
    IScramSHA256Credentials,
    IUsableCredentials,
)
from popd.auth.schemes import (
    UnknownScheme,
    cram_md5_context_of,
    dummy_hash,
    is_cheap,
    parse_stored,
    plaintext_of,
    scram_secret_of,
    secret_kinds,
    verify_password,
)

__all__ = [
    "PasswdEntry",
    "PasswdFile",
    "PasswdFileChecker",
    "STALE",
    "delete_user",
    "set_password",
    "validate_username",
]

_log = Logger()

_FALSE_FLAG_VALUES = frozenset({"n", "no", "false", "0"})

# The one message for every refusal, so a client cannot tell them apart.
_REFUSED = "Authentication failed"

# How old the checker's idea of what the file can serve (for CAPA) may get
# before a CAPA has it read the file again, in a thread, in seconds.
KINDS_MAX_AGE = 2.0

# How recently the file must have been looked at for a login to trust the
# cached entry on the reactor thread, in seconds.  Edits to the file take
# effect within this time; an older (or never-read) cache sends the login to
# the thread pool, which reads the file again.
LOOKUP_MAX_AGE = 1.0


class _Stale(enum.Enum):
    """
    The type of L{STALE}.
    """

    STALE = "stale"


#: What L{PasswdFile.cached_lookup} answers when the cache is too old (or
#: busy being refreshed) to say anything, as opposed to C{None}: no such user.
STALE = _Stale.STALE


@dataclass(frozen=True, slots=True)
class PasswdEntry:
    """
    One user of a passwd-file.

    @ivar name: the user name lower-cased: the key and the avatar ID.
    @ivar password: the stored password (C{{SCHEME}data}), C{""} when none.
    @ivar uid: the numeric user ID, or C{None} when the field is empty.
    @ivar gid: the numeric group ID, or C{None} when the field is empty.
    @ivar gecos: the free-text user information field.
    @ivar home: the home directory, or C{None} when the field is empty.
    @ivar shell: the shell field (unused by popd).
    @ivar extra: the extra fields, C{key -> value} (C{""} for a bare key).
    """

    name: str
    password: str
    uid: int | None = None
    gid: int | None = None
    gecos: str = ""
    home: str | None = None
    shell: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def flag(self, key: str) -> bool:
        """
        Is the boolean extra field C{key} (C{nologin}, C{nopassword}) set?
        """
        value = self.extra.get(key)
        return value is not None and value.lower() not in _FALSE_FLAG_VALUES

    @property
    def may_log_in(self) -> bool:
        """
        Can a correct password log this user in?  Not with an empty password
        field, nor with C{nologin} or C{nopassword} set.
        """
        return bool(self.password) and not (
            self.flag("nologin") or self.flag("nopassword")
        )


def validate_username(name: str) -> str:
    """
    Check that C{name} can be a passwd-file user name and a maildrop's name.

    Refused: the empty name, C{.} and C{..}; a name starting with C{#} (it
    would read as a comment); a name containing C{:} (the field separator),
    C{/} or C{\\} (avatar IDs become file names), whitespace, NUL or any
    other control or format character.  Any other UTF-8 is allowed.

    @return: C{name} unchanged.
    @raise ValueError: with a message saying what is wrong.
    """
    if not name:
        raise ValueError("a user name cannot be empty")
    if name in (".", ".."):
        raise ValueError(f"{name!r} cannot be a user name")
    if name.startswith("#"):
        raise ValueError(f"user name {name!r} cannot start with '#'")
    for char in name:
        if char in ":/\\":
            raise ValueError(f"user name {name!r} cannot contain {char!r}")
        if char.isspace():
            raise ValueError(f"user name {name!r} cannot contain whitespace")
        category = unicodedata.category(char)
        if category in ("Cc", "Cf", "Cs", "Co", "Cn"):
            raise ValueError(
                f"user name {name!r} cannot contain control character U+{ord(char):04X}"
            )
    return name


class _MalformedLineError(ValueError):
    """
    A passwd-file line that cannot be read; the message says why.
    """


def _parse_id(text: str, kind: str) -> int | None:
    if not text:
        return None
    if text.isdigit():
        return int(text)
    try:
        if kind == "uid":
            return pwd.getpwnam(text).pw_uid
        return grp.getgrnam(text).gr_gid
    except KeyError:
        problem = f"{kind} {text!r} is neither a number nor a known name"
        raise _MalformedLineError(problem) from None


def _parse_extra(fields: list[str]) -> dict[str, str]:
    """
    The extra fields: everything after the shell field, colons included.
    """
    if not fields:
        return {}
    if fields[0] == "" and len(fields) > 1:
        # Dovecot's old format: an empty field, then the mail location.
        return {"userdb_mail": ":".join(fields[1:])} if fields[1] else {}
    extra: dict[str, str] = {}
    for item in ":".join(fields).split():
        key, _, value = item.partition("=")
        extra.setdefault(key, value)
    return extra


def _parse_line(text: str) -> PasswdEntry:
    """
    One non-blank, non-comment line (without its line ending) as an entry.

    @raise _MalformedLineError: the line cannot be read.
    """
    fields = text.split(":")
    if len(fields) < 2:
        raise _MalformedLineError("no password field (expected user:password)")
    name, password = fields[0], fields[1]
    try:
        validate_username(name)
    except ValueError as e:
        raise _MalformedLineError(str(e)) from None
    fields += [""] * (7 - len(fields))
    return PasswdEntry(
        name=name.lower(),
        password=password,
        uid=_parse_id(fields[2], "uid"),
        gid=_parse_id(fields[3], "gid"),
        gecos=fields[4],
        home=fields[5] or None,
        shell=fields[6],
        extra=_parse_extra(fields[7:]),
    )


def _split_lines(data: bytes) -> list[bytes]:
    """
    The file's lines, each with its line ending (the last may have none).
    """
    lines = data.split(b"\n")
    last = lines.pop()
    result = [line + b"\n" for line in lines]
    if last:
        result.append(last)
    return result


def _content(line: bytes) -> bytes:
    """
    A line without its LF or CRLF ending.
    """
    line = line.removesuffix(b"\n")
    return line.removesuffix(b"\r")


def _is_blank_or_comment(content: bytes) -> bool:
    return not content.strip() or content.startswith(b"#")


class PasswdFile:
    """
    A passwd-file's users, read when first needed and again whenever the
    file changes (its inode, size or modification time), so edits and
    C{popd adduser} take effect without a restart.  Safe to use from several
    threads.

    A missing or unreadable file means no users; that is logged once each
    time it happens, not on every lookup.

    @ivar clock: what tells the time, C{time.monotonic} unless a test
        injects a fake one; L{checked_at} is on its scale.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = os.fspath(path)
        self.clock = clock
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int, int] | None = None
        self._users: dict[str, PasswdEntry] = {}
        self._problem: str | None = None
        self._kinds: frozenset[str] | None = None
        self._checked_at: float | None = None

    def lookup(self, name: str) -> PasswdEntry | None:
        """
        The entry of user C{name} (any letter case), or C{None}.
        """
        with self._lock:
            self._refresh()
            return self._users.get(name.lower())

    def cached_lookup(self, name: str) -> PasswdEntry | None | _Stale:
        """
        The entry of user C{name} as the file was last read, without ever
        touching the filesystem or waiting, for use on the reactor thread.

        @return: the entry, C{None} for no such user, or L{STALE} when the
            file was never looked at, was looked at L{LOOKUP_MAX_AGE}
            seconds ago or more, or another thread is reading it: only
            L{lookup} (in a thread) can answer then.
        """
        if not self._lock.acquire(blocking=False):
            return STALE
        try:
            checked_at = self._checked_at
            if checked_at is None or self.clock() - checked_at >= LOOKUP_MAX_AGE:
                return STALE
            return self._users.get(name.lower())
        finally:
            self._lock.release()

    def refresh(self) -> None:
        """
        Read the file again if it changed (blocking: call it in a thread).
        """
        with self._lock:
            self._refresh()

    def secret_kinds(self) -> frozenset[str] | None:
        """
        Which challenge-response mechanisms at least one user who may log
        in can use (L{popd.auth.schemes.secret_kinds}), as of the last time
        the file was looked at; C{None} before the first.  Never blocks.
        """
        return self._kinds

    @property
    def checked_at(self) -> float:
        """
        When (by L{clock}) the file was last looked at; 0 before the first.
        """
        return self._checked_at or 0.0

    def _refresh(self) -> None:
        self._checked_at = self.clock()
        try:
            st = os.stat(self.path)
        except OSError as e:
            self._unavailable(e)
            return
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp == self._stamp:
            return
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            self._unavailable(e)
            return
        self._users = self._parse(data)
        self._stamp = stamp
        self._problem = None
        kinds: set[str] = set()
        for entry in self._users.values():
            if entry.may_log_in:
                kinds |= secret_kinds(entry.password)
        self._kinds = frozenset(kinds)

    def _unavailable(self, error: OSError) -> None:
        self._users = {}
        self._stamp = None
        self._kinds = frozenset()
        problem = "missing" if isinstance(error, FileNotFoundError) else str(error)
        if problem != self._problem:
            self._problem = problem
            if isinstance(error, FileNotFoundError):
                _log.warn("passwd-file {path}: missing; no users", path=self.path)
            else:
                _log.error(
                    "passwd-file {path}: cannot read ({error}); no users",
                    path=self.path,
                    error=error,
                )

    def _parse(self, data: bytes) -> dict[str, PasswdEntry]:
        users: dict[str, PasswdEntry] = {}
        for number, line in enumerate(_split_lines(data), start=1):
            content = _content(line)
            if _is_blank_or_comment(content):
                continue
            try:
                entry = _parse_line(content.decode("utf-8"))
            except UnicodeDecodeError:
                self._warn(number, "not valid UTF-8; line skipped")
                continue
            except _MalformedLineError as e:
                self._warn(number, f"{e}; line skipped")
                continue
            if entry.name in users:
                self._warn(number, f"user {entry.name!r} repeated; line skipped")
                continue
            self._check_entry(number, entry)
            users[entry.name] = entry
        return users

    def _check_entry(self, number: int, entry: PasswdEntry) -> None:
        """
        Warn about entries that load but can never log in.
        """
        if entry.flag("nopassword"):
            self._warn(
                number,
                f"user {entry.name!r} has nopassword, which popd does not"
                " honour; logins are refused",
            )
        if not entry.password:
            return
        try:
            parse_stored(entry.password)
        except UnknownScheme as e:
            self._warn(number, f"user {entry.name!r}: {e}; logins will fail")

    def _warn(self, number: int, problem: str) -> None:
        _log.warn(
            "passwd-file {path}, line {line}: {problem}",
            path=self.path,
            line=number,
            problem=problem,
        )


def _as_bytes(value: bytes | str) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else value


@implementer(ICredentialsChecker, IScramSecretSource, IUsableCredentials)
class PasswdFileChecker:
    """
    Checks credentials against a L{PasswdFile}: USER/PASS, SASL PLAIN and
    LOGIN (L{IUsernamePassword}), APOP (L{IUsernameHashedPassword}),
    CRAM-MD5 (L{ICramMD5Credentials}), SCRAM-SHA-1 and SCRAM-SHA-256
    (L{IScramCredentials}, with L{scram_secret} for the mechanism) and SASL
    EXTERNAL (L{ICertificateCredentials}).

    The lookup and the hash verification run in a thread pool, not on the
    reactor thread, with one exception: a password login for a user whose
    entry was read less than L{LOOKUP_MAX_AGE} seconds ago, who may log in
    and whose stored scheme is cheap (L{is_cheap}: one digest or compare)
    is verified at once, sparing two thread hand-offs; the result is the
    same either way.  An unknown user costs a verification against
    L{dummy_hash}, so a failed login takes about as long either way; every
    refusal is the same L{UnauthorizedLogin}.  APOP needs the plaintext, so
    it only succeeds for users stored with PLAIN or CLEAR; CRAM-MD5 and
    SCRAM also work from Dovecot's CRAM-MD5 and SCRAM-SHA-* values.

    @param reactor: the reactor to deliver results on; the global one by
        default.
    @param threadpool: the pool to verify in; C{reactor.getThreadPool()} by
        default.
    """

    credentialInterfaces = (
        IUsernamePassword,
        IUsernameHashedPassword,
        ICramMD5Credentials,
        IScramSHA256Credentials,
        IScramSHA1Credentials,
        ICertificateCredentials,
    )

    def __init__(self, passwd_file: PasswdFile, reactor=None, threadpool=None) -> None:
        self.passwd_file = passwd_file
        self._reactor = reactor
        self._threadpool = threadpool
        self._refreshing = False

    def _in_thread(self, function, *args) -> defer.Deferred:
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        threadpool = self._threadpool
        if threadpool is None:
            threadpool = reactor.getThreadPool()
        return deferToThreadPool(reactor, threadpool, function, *args)

    def requestAvatarId(self, credentials) -> defer.Deferred[str]:
        """
        @return: a L{Deferred} firing with the user's lower-case name from
            the file, or failing with L{UnauthorizedLogin}.
        """
        try:
            username = _as_text(credentials.username)
        except (AttributeError, UnicodeDecodeError):
            return defer.fail(UnauthorizedLogin(_REFUSED))
        entry = self._cheap_entry(username, credentials)
        if entry is not None:
            d = defer.maybeDeferred(self._check_password, entry, credentials)
        else:
            d = self._in_thread(self._check, username, credentials)
        d.addCallback(self._avatar_or_refusal)
        return d

    def _cheap_entry(self, username: str, credentials) -> PasswdEntry | None:
        """
        The entry to verify C{credentials} against on the reactor thread, or
        C{None} to go to the thread pool: unless these are password
        credentials for a user of the freshly read file who may log in and
        whose stored password is cheap to verify.  Unknown users always go
        to the pool, where they cost a verification against L{dummy_hash}.
        """
        if not IUsernamePassword.providedBy(credentials):
            return None
        entry = self.passwd_file.cached_lookup(username)
        if entry is STALE or entry is None:
            return None
        if not entry.may_log_in or not is_cheap(entry.password):
            return None
        return entry

    @staticmethod
    def _check_password(entry: PasswdEntry, credentials) -> str | None:
        """
        On the reactor thread, for an entry L{_cheap_entry} chose: the
        avatar ID, or C{None} to refuse; what L{_check} would answer.
        """
        if verify_password(entry.password, _as_bytes(credentials.password)):
            return entry.name
        return None

    def _check(self, username: str, credentials) -> str | None:
        """
        Runs in the thread pool: the avatar ID, or C{None} to refuse.
        """
        entry = self.passwd_file.lookup(username)
        if IUsernamePassword.providedBy(credentials):
            stored = entry.password if entry and entry.password else dummy_hash()
            matched = verify_password(stored, _as_bytes(credentials.password))
        elif ICertificateCredentials.providedBy(credentials):
            # The TLS layer verified the certificate that names the user.
            matched = True
        elif IScramCredentials.providedBy(credentials):
            secret = _scram_secret(entry, credentials.algorithm)
            matched = secret is not None and credentials.checkSecret(secret) is True
        elif IUsernameHashedPassword.providedBy(credentials):
            matched = self._check_hashed(entry, credentials)
        else:
            matched = False
        if matched and entry is not None and entry.may_log_in:
            return entry.name
        return None

    @staticmethod
    def _check_hashed(entry: PasswdEntry | None, credentials) -> bool:
        """
        APOP and CRAM-MD5: with the plaintext, or for CRAM-MD5 with a
        stored HMAC-MD5 context.  A C{Deferred} (or anything but C{True})
        from the credentials counts as "no": this runs in a thread.
        """
        stored = entry.password if entry else ""
        plaintext = plaintext_of(stored) if stored else None
        context = cram_md5_context_of(stored) if stored and not plaintext else None
        if context is not None and ICramMD5Credentials.providedBy(credentials):
            return credentials.checkHMACMD5Context(context) is True
        # Check even without a plaintext, so timing is alike.
        return (
            credentials.checkPassword(plaintext or os.urandom(16)) is True
            and plaintext is not None
        )

    @staticmethod
    def _avatar_or_refusal(avatar_id: str | None) -> str:
        if avatar_id is None:
            raise UnauthorizedLogin(_REFUSED)
        return avatar_id

    # IScramSecretSource

    def scram_secret(self, username, algorithm: str) -> defer.Deferred:
        """
        The user's SCRAM secret: a stored C{{SCRAM-*}} value for
        C{algorithm}, or keys derived from a C{{PLAIN}} password (in the
        thread pool: PBKDF2 costs CPU) with a salt that stays the same
        while the process runs.  C{None} for anyone else, including users
        who may not log in only because of C{nologin}: their salt is real,
        and the login fails later like any wrong password.
        """
        if algorithm not in scram.ALGORITHMS:
            return defer.succeed(None)
        try:
            name = _as_text(username)
        except UnicodeDecodeError:
            return defer.succeed(None)
        return self._in_thread(
            lambda: _scram_secret(self.passwd_file.lookup(name), algorithm)
        )

    # IUsableCredentials

    def usableCredentialInterfaces(self) -> frozenset:
        """
        Passwords and certificates always; APOP, CRAM-MD5 and each SCRAM
        only while some user who may log in has a stored value that serves
        it.  Answers from the file as last read: the first call reads it
        (once, blocking), later ones have it read again in a thread when
        their answer is older than L{KINDS_MAX_AGE} seconds.
        """
        kinds = self.passwd_file.secret_kinds()
        if kinds is None:
            self.passwd_file.refresh()
            kinds = self.passwd_file.secret_kinds() or frozenset()
        elif self.passwd_file.clock() - self.passwd_file.checked_at > KINDS_MAX_AGE:
            self._refresh_in_thread()
        usable = {IUsernamePassword, ICertificateCredentials}
        if "PLAIN" in kinds:
            usable.add(IUsernameHashedPassword)
        if "CRAM-MD5" in kinds:
            usable.add(ICramMD5Credentials)
        for algorithm, interface in SCRAM_INTERFACES.items():
            if "SCRAM-" + algorithm in kinds:
                usable.add(interface)
        return frozenset(usable)

    def _refresh_in_thread(self) -> None:
        if self._refreshing:
            return
        self._refreshing = True

        def done(result):
            self._refreshing = False
            if isinstance(result, Failure):
                _log.failure("re-reading {path}", result, path=self.passwd_file.path)

        self._in_thread(self.passwd_file.refresh).addBoth(done)


def _scram_secret(entry: PasswdEntry | None, algorithm: str):
    """
    C{entry}'s SCRAM secret for C{algorithm} (see
    L{PasswdFileChecker.scram_secret}), or C{None}.
    """
    if entry is None or not entry.password:
        return None
    secret = scram_secret_of(entry.password, algorithm)
    if secret is not None:
        return secret
    plaintext = plaintext_of(entry.password)
    if plaintext is None:
        return None
    return scram.derive_secret(plaintext, algorithm, scram.stable_salt(entry.name))


def _as_text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def set_password(path: str | os.PathLike[str], user: str, stored_hash: str) -> bool:
    """
    Give C{user} the stored password C{stored_hash}, adding the user if new.

    An existing user's line (matched case-insensitively) keeps everything
    but its password field; a new user is appended as C{user:hash} with the
    name lower-cased.  Every other line, comments included, is kept byte for
    byte.  The file is replaced atomically; a new file gets mode 0600, an
    existing one keeps its mode and (where permitted) its owner.

    Two concurrent writers are not serialised: the last one wins.

    @return: C{True} if the user was added, C{False} if updated.
    @raise ValueError: C{user} is not a valid name (L{validate_username}) or
        C{stored_hash} is empty or holds C{:} or a control character.
    """
    validate_username(user)
    if not stored_hash or any(
        c == ":" or unicodedata.category(c) == "Cc" for c in stored_hash
    ):
        raise ValueError(
            "a stored password cannot be empty or contain ':' or a control character"
        )
    key = user.lower()
    new_hash = stored_hash.encode("utf-8")

    def update(lines: list[bytes]) -> tuple[list[bytes], bool]:
        for index, line in enumerate(lines):
            if _line_user(line) == key:
                content = _content(line)
                ending = line[len(content) :]
                fields = content.split(b":")
                fields[1:2] = [new_hash]
                lines[index] = b":".join(fields) + ending
                return lines, False
        newline = b"\r\n" if lines and lines[0].endswith(b"\r\n") else b"\n"
        if lines and not lines[-1].endswith(b"\n"):
            lines[-1] += newline
        lines.append(key.encode("utf-8") + b":" + new_hash + newline)
        return lines, True

    return _rewrite(path, update)


def delete_user(path: str | os.PathLike[str], user: str) -> bool:
    """
    Remove every line of C{user} (matched case-insensitively), keeping the
    others byte for byte; the file is replaced atomically like
    L{set_password} does.

    @return: C{True} if a line was removed, C{False} if the user (or the
        file) did not exist.
    """
    key = user.lower()

    def update(lines: list[bytes]) -> tuple[list[bytes], bool]:
        kept = [line for line in lines if _line_user(line) != key]
        return kept, len(kept) != len(lines)

    return _rewrite(path, update)


def _line_user(line: bytes) -> str | None:
    """
    The lower-cased user name a line is for, or C{None} for blank, comment
    and undecodable lines.
    """
    content = _content(line)
    if _is_blank_or_comment(content) or b":" not in content:
        return None
    try:
        return content.split(b":", 1)[0].decode("utf-8").lower()
    except UnicodeDecodeError:
        return None


def _rewrite(path: str | os.PathLike[str], update) -> bool:
    """
    Read the file's lines, let C{update(lines)} return C{(lines, result)}
    and, if the lines changed, write them back atomically.

    @return: C{result}.
    """
    path = os.path.realpath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
            st = os.fstat(f.fileno())
    except FileNotFoundError:
        data, st = b"", None
    lines = _split_lines(data)
    new_lines, result = update(list(lines))
    if new_lines != lines:
        _write_atomically(path, b"".join(new_lines), st)
    return result


def _write_atomically(path: str, data: bytes, st: os.stat_result | None) -> None:
    """
    Replace C{path} with C{data}: a temporary file in the same directory,
    fsync'd, renamed over it, then the directory fsync'd.  C{st} is the
    replaced file's status (its mode and owner are kept), or C{None} for a
    new file (mode 0600).
    """
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(
        prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as f:
            if st is None:
                os.fchmod(f.fileno(), 0o600)
            else:
                os.fchmod(f.fileno(), stat.S_IMODE(st.st_mode))
                try:
                    os.fchown(f.fileno(), st.st_uid, st.st_gid)
                except PermissionError:
                    pass  # Only root can give a file away; ours stays ours.
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise
    directory_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(directory_fd)
    finally:
        os.close(directory_fd)
