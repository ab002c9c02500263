"""
Tests for popd.auth.passwdfile and popd.auth.credentials: the Dovecot
passwd-file, its Cred checker, its editing, and APOP credentials.

No reactor runs: the checker is given a thread pool that runs work only when
the test says so, and a reactor whose callFromThread calls at once.
"""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import (
    IUsernameHashedPassword,
    IUsernamePassword,
    UsernamePassword,
)
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from popd.auth import passwdfile
from popd.auth.credentials import (
    APOPCredentials,
    CertificateCredentials,
    CramMD5Credentials,
    ICertificateCredentials,
    ICramMD5Credentials,
    IScramSecretSource,
    IScramSHA1Credentials,
    IScramSHA256Credentials,
    IUsableCredentials,
    ScramCredentials,
)
from popd.auth.passwdfile import (
    PasswdEntry,
    PasswdFile,
    PasswdFileChecker,
    delete_user,
    set_password,
    validate_username,
)
from popd.auth.schemes import dummy_hash, hash_password, verify_password

# Cheap but real hashes for files: SHA512-CRYPT at its minimum cost.
SECRET_HASH = hash_password(b"secret", "SHA512-CRYPT", rounds=1000)


class QueuedThreadPool:
    """
    Stands in for a ThreadPool: holds work until L{run} is called, so a test
    can see that nothing happened on the calling ("reactor") thread.
    """

    def __init__(self):
        self.pending = []

    def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
        self.pending.append((onResult, f, args, kwargs))

    def run(self):
        while self.pending:
            on_result, f, args, kwargs = self.pending.pop(0)
            try:
                result = f(*args, **kwargs)
            except BaseException:
                on_result(False, Failure())
            else:
                on_result(True, result)


class ImmediateReactor:
    """
    Just enough reactor for deferToThreadPool (and a default thread pool).
    """

    def __init__(self, threadpool=None):
        self.threadpool = threadpool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)

    def getThreadPool(self):
        return self.threadpool


def outcome(d: defer.Deferred):
    """
    The result of a fired Deferred, or its Failure.
    """
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def write(path, data: bytes | str) -> None:
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def users_path(tmp_path):
    return tmp_path / "users"


@pytest.fixture
def pool():
    return QueuedThreadPool()


@pytest.fixture
def make_checker(users_path, pool):
    def make(text: str | bytes) -> PasswdFileChecker:
        write(users_path, text)
        return PasswdFileChecker(
            PasswdFile(users_path), reactor=ImmediateReactor(), threadpool=pool
        )

    return make


def login(checker, pool, credentials):
    d = checker.requestAvatarId(credentials)
    pool.run()
    return outcome(d)


def warnings_of(events):
    return [formatEvent(e) for e in events if e.get("log_level").name == "warn"]


# -- parsing ---------------------------------------------------------------


def test_full_entry(users_path):
    write(
        users_path,
        "Bob:{PLAIN}pw:1001:1002:Bob Smith,,,:/home/bob:/bin/sh:"
        "userdb_mail=maildir:~/Maildir nologin reason=gone\n",
    )
    entry = PasswdFile(users_path).lookup("bob")
    assert entry == PasswdEntry(
        name="bob",
        password="{PLAIN}pw",
        uid=1001,
        gid=1002,
        gecos="Bob Smith,,,",
        home="/home/bob",
        shell="/bin/sh",
        extra={"userdb_mail": "maildir:~/Maildir", "nologin": "", "reason": "gone"},
    )
    assert entry.flag("nologin")
    assert not entry.flag("nopassword")
    assert not entry.may_log_in


def test_minimal_entries_comments_blanks_and_crlf(users_path):
    write(
        users_path,
        b"# users of example.org\r\n"
        b"\r\n"
        b"alice:{PLAIN}a\r\n"
        b"   \n"
        b"  # indented comment is a bad user name, not a comment\n"
        b"carol:{PLAIN}c::\r\n"
        b"dave:{PLAIN}d:::::::\n"
        b"erin:{PLAIN}e",  # no final newline
    )
    passwd = PasswdFile(users_path)
    alice = passwd.lookup("alice")
    assert alice == PasswdEntry(name="alice", password="{PLAIN}a")
    assert alice.uid is None and alice.home is None and alice.extra == {}
    assert passwd.lookup("carol").password == "{PLAIN}c"
    assert passwd.lookup("dave").extra == {}
    assert passwd.lookup("erin").password == "{PLAIN}e"
    assert passwd.lookup("# users of example.org") is None


def test_names_match_case_insensitively_and_may_be_utf8(users_path):
    write(users_path, "Jürgen@Example.ORG:{PLAIN}x\n")
    passwd = PasswdFile(users_path)
    for name in ("jürgen@example.org", "JÜRGEN@EXAMPLE.ORG", "Jürgen@Example.ORG"):
        assert passwd.lookup(name).name == "jürgen@example.org"
    assert passwd.lookup("jurgen@example.org") is None


def test_old_format_mail_field(users_path):
    write(users_path, "u:{PLAIN}x:1:1::/h:/bin/false::maildir:/var/mail/u\n")
    assert PasswdFile(users_path).lookup("u").extra == {
        "userdb_mail": "maildir:/var/mail/u"
    }


def test_uid_and_gid_may_be_names(users_path):
    write(users_path, "u:{PLAIN}x:root:0\n")
    entry = PasswdFile(users_path).lookup("u")
    assert (entry.uid, entry.gid) == (0, 0)


def test_malformed_lines_are_skipped_with_a_warning(users_path):
    write(
        users_path,
        b"good1:{PLAIN}x\n"  # 1
        b"no-password-field\n"  # 2
        b"bad\xffutf8:{PLAIN}x\n"  # 3
        b"bad uid:{PLAIN}x:1\n"  # 4: space in the name
        b":{PLAIN}x\n"  # 5: empty name
        b"u:{PLAIN}x:notauser-xyzzy\n"  # 6
        b"v:{PLAIN}x:1:notagroup-xyzzy\n"  # 7
        b"GOOD1:{PLAIN}second\n"  # 8: repeated
        b"good2:{PLAIN}y\r\n",  # 9
    )
    with capturedLogs() as events:
        passwd = PasswdFile(users_path)
        assert passwd.lookup("good1").password == "{PLAIN}x"  # the first wins
        assert passwd.lookup("good2").password == "{PLAIN}y"
        for name in ("no-password-field", "bad uid", "", "u", "v"):
            assert passwd.lookup(name) is None
    warned = warnings_of(events)
    assert len(warned) == 7, warned
    for number, message in zip((2, 3, 4, 5, 6, 7, 8), warned, strict=True):
        assert message.startswith(f"passwd-file {users_path}, line {number}: ")
    assert "UTF-8" in warned[1]
    assert "repeated" in warned[6]


def test_unknown_scheme_and_nopassword_warn_at_load(users_path):
    write(users_path, "a:{NOPE}x\nb:{PLAIN}x:::::: nopassword\n")
    with capturedLogs() as events:
        passwd = PasswdFile(users_path)
        assert passwd.lookup("a") is not None
        assert not passwd.lookup("b").may_log_in
    warned = warnings_of(events)
    assert len(warned) == 2
    assert "line 1" in warned[0] and "NOPE" in warned[0]
    assert "line 2" in warned[1] and "nopassword" in warned[1]


@pytest.mark.parametrize(
    ("extra", "set_"),
    [("nologin", True), ("nologin=y", True), ("nologin=no", False), ("x=1", False)],
)
def test_flags(extra, set_):
    entry = PasswdEntry(
        name="u", password="{PLAIN}x", extra=dict([extra.partition("=")[::2]])
    )
    assert entry.flag("nologin") is set_
    assert entry.may_log_in is not set_


def test_empty_password_cannot_log_in():
    assert not PasswdEntry(name="u", password="").may_log_in


# -- reloading --------------------------------------------------------------


def test_reloads_when_the_file_changes(users_path):
    write(users_path, "alice:{PLAIN}a\n")
    passwd = PasswdFile(users_path)
    assert passwd.lookup("bob") is None
    write(users_path, "alice:{PLAIN}a\nbob:{PLAIN}b\n")
    assert passwd.lookup("bob").password == "{PLAIN}b"
    # Same size, in place: the modification time tells.
    write(users_path, "alice:{PLAIN}a\nbob:{PLAIN}c\n")
    st = os.stat(users_path)
    os.utime(users_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert passwd.lookup("bob").password == "{PLAIN}c"


def test_does_not_reread_an_unchanged_file(users_path, monkeypatch):
    write(users_path, "alice:{PLAIN}a\n")
    passwd = PasswdFile(users_path)
    parses = []
    original = passwd._parse
    monkeypatch.setattr(
        passwd, "_parse", lambda data: parses.append(1) or original(data)
    )
    for _ in range(3):
        assert passwd.lookup("alice") is not None
    assert len(parses) == 1


def test_missing_file_is_no_users_logged_once(users_path):
    with capturedLogs() as events:
        passwd = PasswdFile(users_path)
        assert passwd.lookup("alice") is None
        assert passwd.lookup("alice") is None
        write(users_path, "alice:{PLAIN}a\n")
        assert passwd.lookup("alice") is not None
        os.unlink(users_path)
        assert passwd.lookup("alice") is None
        assert passwd.lookup("alice") is None
    missing = [m for m in warnings_of(events) if "missing" in m]
    assert missing == [f"passwd-file {users_path}: missing; no users"] * 2


# -- the checker --------------------------------------------------------------


def test_checker_provides_the_interface(make_checker):
    checker = make_checker("")
    assert verifyObject(ICredentialsChecker, checker)
    assert checker.credentialInterfaces[:2] == (
        IUsernamePassword,
        IUsernameHashedPassword,
    )
    assert set(checker.credentialInterfaces[2:]) == {
        ICramMD5Credentials,
        IScramSHA1Credentials,
        IScramSHA256Credentials,
        ICertificateCredentials,
    }
    assert verifyObject(IScramSecretSource, checker)
    assert verifyObject(IUsableCredentials, checker)


@pytest.mark.parametrize(
    ("username", "password"),
    [(b"bob", b"secret"), (b"BOB", b"secret"), ("Bob", "secret"), ("bob", b"secret")],
)
def test_checker_accepts_the_right_password(make_checker, pool, username, password):
    checker = make_checker(f"Bob:{SECRET_HASH}\n")
    assert login(checker, pool, UsernamePassword(username, password)) == "bob"


def test_checker_verifies_in_the_thread_pool(make_checker, pool, monkeypatch):
    checker = make_checker(f"bob:{SECRET_HASH}\n")
    calls = []
    monkeypatch.setattr(
        passwdfile, "verify_password", lambda *a: calls.append(a) or verify_password(*a)
    )
    d = checker.requestAvatarId(UsernamePassword(b"bob", b"secret"))
    assert not calls and not d.called
    pool.run()
    assert calls == [(SECRET_HASH, b"secret")]
    assert outcome(d) == "bob"


def test_checker_defaults_to_the_reactors_thread_pool(users_path, pool):
    write(users_path, f"bob:{SECRET_HASH}\n")
    checker = PasswdFileChecker(PasswdFile(users_path), reactor=ImmediateReactor(pool))
    assert login(checker, pool, UsernamePassword(b"bob", b"secret")) == "bob"


def refusal_message(result) -> str:
    assert isinstance(result, Failure), result
    assert result.check(UnauthorizedLogin)
    return str(result.value)


def test_checker_refusals_are_all_alike(make_checker, pool, monkeypatch):
    checker = make_checker(
        f"bob:{SECRET_HASH}\n"
        f"gone:{SECRET_HASH}:::::: nologin\n"
        f"open:{SECRET_HASH}:::::: nopassword\n"
        "empty:\n"
    )
    calls = []
    monkeypatch.setattr(
        passwdfile, "verify_password", lambda *a: calls.append(a) or verify_password(*a)
    )
    attempts = {
        "wrong password": (b"bob", b"Secret", SECRET_HASH),
        "unknown user": (b"nobody", b"secret", dummy_hash()),
        "nologin": (b"gone", b"secret", SECRET_HASH),
        "nopassword": (b"open", b"anything", SECRET_HASH),
        "empty password field": (b"empty", b"", dummy_hash()),
    }
    messages = set()
    for name, (user, password, verified_against) in attempts.items():
        calls.clear()
        result = login(checker, pool, UsernamePassword(user, password))
        messages.add(refusal_message(result))
        # Every refusal costs one real verification: an unknown user's too.
        assert calls == [(verified_against, password)], name
    assert len(messages) == 1


def test_checker_refuses_invalid_utf8_names(make_checker, pool):
    checker = make_checker(f"bob:{SECRET_HASH}\n")
    d = checker.requestAvatarId(UsernamePassword(b"b\xffob", b"secret"))
    assert refusal_message(outcome(d))
    assert not pool.pending


def test_checker_sees_file_changes(make_checker, pool, users_path):
    checker = make_checker("")
    assert isinstance(login(checker, pool, UsernamePassword(b"bob", b"pw")), Failure)
    set_password(users_path, "bob", hash_password(b"pw", "SHA256-CRYPT", rounds=1000))
    assert login(checker, pool, UsernamePassword(b"bob", b"pw")) == "bob"


def test_checker_behind_a_portal(make_checker, pool):
    @implementer(IRealm)
    class Realm:
        def requestAvatar(self, avatarId, mind, *interfaces):
            return interfaces[0], avatarId, lambda: None

    portal = Portal(Realm(), [make_checker(f"bob:{SECRET_HASH}\n")])
    d = portal.login(UsernamePassword(b"Bob", b"secret"), None, IUsernamePassword)
    pool.run()
    assert outcome(d)[1] == "bob"
    d = portal.login(UsernamePassword(b"bob", b"nope"), None, IUsernamePassword)
    pool.run()
    assert outcome(d).check(UnauthorizedLogin)


# -- APOP ----------------------------------------------------------------------

# RFC 1939, section 7.
RFC_CHALLENGE = b"<1896.697170952@dbc.mtview.ca.us>"
RFC_DIGEST = b"c4c9334bac560ecc979e58001b3e22fb"


def apop(user: bytes, password: bytes, challenge: bytes = RFC_CHALLENGE):
    digest = hashlib.md5(challenge + password).hexdigest().encode()
    return APOPCredentials(user, challenge, digest)


def test_apop_credentials_rfc_example():
    credentials = APOPCredentials(b"mrose", RFC_CHALLENGE, RFC_DIGEST)
    assert verifyObject(IUsernameHashedPassword, credentials)
    assert credentials.checkPassword(b"tanstaaf") is True
    assert credentials.checkPassword("tanstaaf") is True
    assert credentials.checkPassword(b"tanstaaF") is False
    assert credentials.checkPassword(b"") is False
    upper = APOPCredentials(b"mrose", RFC_CHALLENGE, RFC_DIGEST.upper())
    assert upper.checkPassword(b"tanstaaf") is True
    other_challenge = APOPCredentials(b"mrose", b"<1@x>", RFC_DIGEST)
    assert other_challenge.checkPassword(b"tanstaaf") is False
    assert (
        APOPCredentials(b"mrose", RFC_CHALLENGE, b"\xff" * 32).checkPassword(
            b"tanstaaf"
        )
        is False
    )


def test_apop_compares_in_constant_time(monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(
        hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b)
    )
    APOPCredentials(b"mrose", RFC_CHALLENGE, RFC_DIGEST.upper()).checkPassword(
        b"tanstaaf"
    )
    assert calls == [(RFC_DIGEST, RFC_DIGEST)]


def test_apop_credentials_repr_hides_the_digest():
    assert RFC_DIGEST.decode() not in repr(
        APOPCredentials(b"m", RFC_CHALLENGE, RFC_DIGEST)
    )


def test_checker_apop(make_checker, pool):
    checker = make_checker(
        "alice:{PLAIN}wonder\n"
        "Carol:{PLAIN.B64}YTpi\n"  # "a:b"
        f"bob:{SECRET_HASH}\n"
        "gone:{PLAIN}x:::::: nologin\n"
    )
    assert login(checker, pool, apop(b"alice", b"wonder")) == "alice"
    assert login(checker, pool, apop(b"CAROL", b"a:b")) == "carol"
    refused = [
        apop(b"alice", b"Wonder"),
        apop(b"bob", b"secret"),  # no plaintext to check against
        apop(b"nobody", b"x"),
        apop(b"gone", b"x"),
        APOPCredentials(b"alice", RFC_CHALLENGE, b"not hex"),
    ]
    for credentials in refused:
        refusal_message(login(checker, pool, credentials))


# -- editing the file ---------------------------------------------------------


def test_set_password_creates_a_private_file(users_path):
    old_umask = os.umask(0o022)
    try:
        assert set_password(users_path, "Bob", "{PLAIN}x") is True
    finally:
        os.umask(old_umask)
    assert users_path.read_bytes() == b"bob:{PLAIN}x\n"
    assert stat.S_IMODE(os.stat(users_path).st_mode) == 0o600


ORIGINAL = (
    b"# the users\r\n"
    b"alice:{PLAIN}a:1000:1000::/home/alice::userdb_quota_rule=*:storage=1G\r\n"
    b"\r\n"
    b"#bob:{PLAIN}commented-out\r\n"
    b"Bob:{PLAIN}old:1001:1001:Bob:/home/bob:/bin/sh:nologin\r\n"
    b"carol:{PLAIN}c"
)


def test_set_password_updates_in_place(users_path):
    write(users_path, ORIGINAL)
    os.chmod(users_path, 0o640)
    assert set_password(users_path, "bob", "{PLAIN}new") is False
    assert users_path.read_bytes() == ORIGINAL.replace(
        b"Bob:{PLAIN}old:", b"Bob:{PLAIN}new:"
    )
    assert stat.S_IMODE(os.stat(users_path).st_mode) == 0o640
    assert os.listdir(users_path.parent) == ["users"]  # no temporary left


def test_set_password_appends_in_the_files_style(users_path):
    write(users_path, ORIGINAL)
    assert set_password(users_path, "Dave", "{PLAIN}d") is True
    assert users_path.read_bytes() == ORIGINAL + b"\r\ndave:{PLAIN}d\r\n"
    write(users_path, b"a:{PLAIN}a\n")
    assert set_password(users_path, "e", "{PLAIN}e") is True
    assert users_path.read_bytes() == b"a:{PLAIN}a\ne:{PLAIN}e\n"


def test_set_password_utf8_name(users_path):
    assert set_password(users_path, "Jürgen", "{PLAIN}x") is True
    assert set_password(users_path, "JÜRGEN", "{PLAIN}y") is False
    assert users_path.read_bytes() == "jürgen:{PLAIN}y\n".encode()
    assert PasswdFile(users_path).lookup("jürgen").password == "{PLAIN}y"


BAD_NAMES = [
    "",
    "a:b",
    "a b",
    "a\tb",
    "a\nb",
    "a\x00b",
    "a\x7fb",
    "a\u200bb",  # zero-width space: a format character
    "a\u00a0b",  # no-break space
    "#a",
    ".",
    "..",
    "a/b",
    "a\\b",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_set_password_refuses_bad_names(users_path, name):
    with pytest.raises(ValueError, match="user name|cannot be"):
        set_password(users_path, name, "{PLAIN}x")
    assert not users_path.exists()
    with pytest.raises(ValueError):
        validate_username(name)


@pytest.mark.parametrize("stored", ["", "{PLAIN}a:b", "{PLAIN}a\nb", "{PLAIN}a\x00"])
def test_set_password_refuses_bad_hashes(users_path, stored):
    with pytest.raises(ValueError, match="stored password"):
        set_password(users_path, "bob", stored)
    assert not users_path.exists()


def test_set_password_failure_leaves_the_file_alone(users_path, monkeypatch):
    write(users_path, ORIGINAL)

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        set_password(users_path, "bob", "{PLAIN}new")
    assert users_path.read_bytes() == ORIGINAL
    assert os.listdir(users_path.parent) == ["users"]


def test_set_password_through_a_symlink(tmp_path):
    target = tmp_path / "real-users"
    write(target, b"a:{PLAIN}a\n")
    link = tmp_path / "users"
    link.symlink_to(target)
    set_password(link, "b", "{PLAIN}b")
    assert link.is_symlink()
    assert target.read_bytes() == b"a:{PLAIN}a\nb:{PLAIN}b\n"


def test_delete_user(users_path):
    write(users_path, ORIGINAL + b"\r\nbob:{PLAIN}dup\r\n")
    assert delete_user(users_path, "BOB") is True
    assert (
        users_path.read_bytes()
        == ORIGINAL.replace(
            b"Bob:{PLAIN}old:1001:1001:Bob:/home/bob:/bin/sh:nologin\r\n", b""
        )
        + b"\r\n"
    )
    assert delete_user(users_path, "bob") is False
    missing = users_path.parent / "missing"
    assert delete_user(missing, "bob") is False
    assert not missing.exists()


# -- challenge-response credentials, SCRAM secrets, what CAPA may offer -------

CRAM_PASSWORD = hash_password(b"cram-pw", "CRAM-MD5")
SCRAM_256 = hash_password(b"scram-pw", "SCRAM-SHA-256", rounds=64)
SCRAM_1 = hash_password(b"scram-pw", "SCRAM-SHA-1", rounds=64)


def cram_response(username: bytes, password: bytes) -> CramMD5Credentials:
    import hmac as hmac_module

    challenge = b"<12345.678@pop.example>"
    digest = hmac_module.new(password, challenge, hashlib.md5).hexdigest()
    return CramMD5Credentials(username, challenge, digest.encode())


@pytest.mark.parametrize(
    ("line", "password", "accepted"),
    [
        ("bob:{PLAIN}pw\n", b"pw", True),
        ("bob:{PLAIN}pw\n", b"wrong", False),
        (f"bob:{CRAM_PASSWORD}\n", b"cram-pw", True),
        (f"bob:{CRAM_PASSWORD}\n", b"wrong", False),
        (f"bob:{SECRET_HASH}\n", b"secret", False),
        (f"bob:{CRAM_PASSWORD}:::::: nologin\n", b"cram-pw", False),
        ("", b"pw", False),
    ],
)
def test_cram_md5(make_checker, pool, line, password, accepted):
    checker = make_checker(line)
    result = login(checker, pool, cram_response(b"bob", password))
    assert result == "bob" if accepted else refusal_message(result)
    assert "digest" not in repr(cram_response(b"bob", password))


def test_apop_needs_the_plaintext_even_where_cram_md5_works(make_checker, pool):
    checker = make_checker(f"bob:{CRAM_PASSWORD}\n")
    challenge = b"<1.2@pop.example>"
    digest = hashlib.md5(challenge + b"cram-pw").hexdigest().encode()
    result = login(checker, pool, APOPCredentials(b"bob", challenge, digest))
    assert refusal_message(result) == "Authentication failed"


def scram_secret(checker, pool, username, algorithm):
    d = checker.scram_secret(username, algorithm)
    pool.run()
    return outcome(d)


def test_scram_secrets(make_checker, pool):
    from popd.auth import scram

    checker = make_checker(
        f"plain:{{PLAIN}}pw\nsha256:{SCRAM_256}\nsha1:{SCRAM_1}\n"
        f"hashed:{SECRET_HASH}\ngone:{{PLAIN}}pw:::::: nologin\n"
    )
    stored = scram_secret(checker, pool, b"SHA256", "SHA-256")
    assert stored.iterations == 64 and scram.verify_password(stored, b"scram-pw")
    assert scram_secret(checker, pool, "sha256", "SHA-1") is None
    assert scram_secret(checker, pool, "sha1", "SHA-1").iterations == 64
    derived = scram_secret(checker, pool, "plain", "SHA-256")
    assert derived.iterations == scram.DEFAULT_ITERATIONS
    assert derived.salt == scram.stable_salt("plain")
    assert derived == scram_secret(checker, pool, "PLAIN", "SHA-256")
    assert scram.verify_password(derived, b"pw")
    assert scram_secret(checker, pool, "hashed", "SHA-256") is None
    assert scram_secret(checker, pool, "nobody", "SHA-256") is None
    assert scram_secret(checker, pool, "plain", "SHA-512") is None
    assert scram_secret(checker, pool, b"\xff", "SHA-256") is None
    # nologin: the real salt, and a refusal at the end like a wrong password.
    assert scram_secret(checker, pool, "gone", "SHA-256") is not None


def test_scram_secret_is_looked_up_in_the_thread_pool(make_checker, pool):
    checker = make_checker("plain:{PLAIN}pw\n")
    d = checker.scram_secret(b"plain", "SHA-256")
    assert not d.called
    pool.run()
    assert outcome(d) is not None


def scram_credentials(secret, username: bytes, password: bytes, algorithm: str):
    """
    What a client proving C{password} against C{secret}'s salt sends.
    """
    import hmac as hmac_module

    from popd.auth import scram

    name = scram.ALGORITHMS[algorithm]
    mine = scram.derive_secret(password, algorithm, secret.salt, secret.iterations)
    auth_message = b"n=x,r=a,r=ab,s=c,i=1,c=biws,r=ab"
    salted = hashlib.pbkdf2_hmac(name, password, secret.salt, secret.iterations)
    client_key = hmac_module.new(salted, b"Client Key", name).digest()
    signature = hmac_module.new(mine.stored_key, auth_message, name).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return ScramCredentials(
        username, algorithm, auth_message, proof, secret.salt, secret.iterations
    )


@pytest.mark.parametrize(
    ("user", "algorithm", "password", "accepted"),
    [
        ("plain", "SHA-256", b"pw", True),
        ("plain", "SHA-1", b"pw", True),
        ("sha256", "SHA-256", b"scram-pw", True),
        ("sha256", "SHA-256", b"wrong", False),
        ("gone", "SHA-256", b"pw", False),
    ],
)
def test_scram_credentials(make_checker, pool, user, algorithm, password, accepted):
    checker = make_checker(
        f"plain:{{PLAIN}}pw\nsha256:{SCRAM_256}\ngone:{{PLAIN}}pw:::::: nologin\n"
    )
    secret = scram_secret(checker, pool, user, algorithm)
    credentials = scram_credentials(secret, user.encode(), password, algorithm)
    result = login(checker, pool, credentials)
    assert result == user if accepted else refusal_message(result)


def test_scram_credentials_for_another_salt_are_refused(make_checker, pool):
    from popd.auth import scram

    checker = make_checker("plain:{PLAIN}pw\n")
    other = scram.derive_secret(b"pw", "SHA-256")  # a random salt
    result = login(checker, pool, scram_credentials(other, b"plain", b"pw", "SHA-256"))
    assert refusal_message(result)
    unknown = scram.unknown_user_secret("nobody", "SHA-256")
    credentials = scram_credentials(unknown, b"nobody", b"pw", "SHA-256")
    assert refusal_message(login(checker, pool, credentials))


@pytest.mark.parametrize(
    ("line", "accepted"),
    [
        ("carol:*\n", True),
        (f"carol:{SECRET_HASH}\n", True),
        ("carol:*:::::: nologin\n", False),
        ("carol:\n", False),
        ("", False),
    ],
)
def test_certificate_credentials(make_checker, pool, line, accepted):
    checker = make_checker(line)
    result = login(checker, pool, CertificateCredentials(b"Carol", certificate=None))
    assert result == "carol" if accepted else refusal_message(result)


EVERYTHING = {
    IUsernamePassword,
    ICertificateCredentials,
    IUsernameHashedPassword,
    ICramMD5Credentials,
    IScramSHA1Credentials,
    IScramSHA256Credentials,
}


@pytest.mark.parametrize(
    ("text", "usable"),
    [
        ("bob:{PLAIN}pw\n", EVERYTHING),
        (f"bob:{SECRET_HASH}\n", {IUsernamePassword, ICertificateCredentials}),
        ("", {IUsernamePassword, ICertificateCredentials}),
        (
            f"bob:{CRAM_PASSWORD}\ncarol:{SCRAM_1}\n",
            {
                IUsernamePassword,
                ICertificateCredentials,
                ICramMD5Credentials,
                IScramSHA1Credentials,
            },
        ),
        (
            f"bob:{SCRAM_256}\ndave:{{PLAIN}}pw:::::: nologin\n",
            {IUsernamePassword, ICertificateCredentials, IScramSHA256Credentials},
        ),
    ],
)
def test_usable_credential_interfaces(make_checker, text, usable):
    checker = make_checker(text)
    assert checker.usableCredentialInterfaces() == usable


def test_usable_interfaces_never_block_after_the_first_read(
    make_checker, users_path, pool, monkeypatch
):
    checker = make_checker(f"bob:{SECRET_HASH}\n")
    # The first answer reads the file at once.
    assert IUsernameHashedPassword not in checker.usableCredentialInterfaces()
    write(users_path, "bob:{PLAIN}pw\n")
    assert IUsernameHashedPassword not in checker.usableCredentialInterfaces()
    # Once stale, the file is read again in the thread pool, once at a time.
    monkeypatch.setattr(passwdfile, "KINDS_MAX_AGE", -1)
    checker.usableCredentialInterfaces()
    checker.usableCredentialInterfaces()
    assert len(pool.pending) == 1
    assert IUsernameHashedPassword not in checker.usableCredentialInterfaces()
    pool.run()
    assert IUsernameHashedPassword in checker.usableCredentialInterfaces()


# -- cheap checks on the reactor thread --------------------------------------


class FakeClock:
    """
    A C{time.monotonic} stand-in that only moves when told.
    """

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def make_fresh_checker(users_path, pool, clock):
    """
    A checker on a fake clock whose file was just read, as a login in the
    thread pool leaves it.
    """

    def make(text: str) -> PasswdFileChecker:
        write(users_path, text)
        passwd = PasswdFile(users_path, clock=clock)
        passwd.refresh()
        return PasswdFileChecker(passwd, reactor=ImmediateReactor(), threadpool=pool)

    return make


def count_verifications(monkeypatch) -> list:
    """
    Record every C{(stored, password)} the checker verifies.
    """
    calls = []
    monkeypatch.setattr(
        passwdfile, "verify_password", lambda *a: calls.append(a) or verify_password(*a)
    )
    return calls


CHEAP_STORED = [
    "{PLAIN}pw",
    "{PLAIN.B64}cHc=",
    "{SHA256.HEX}" + hashlib.sha256(b"pw").hexdigest(),
    hash_password(b"pw", "SSHA512"),
    hash_password(b"pw", "CRAM-MD5"),
]


@pytest.mark.parametrize("stored", CHEAP_STORED)
def test_cheap_schemes_are_verified_without_the_thread_pool(
    make_fresh_checker, pool, stored
):
    checker = make_fresh_checker(f"Bob:{stored}\n")
    d = checker.requestAvatarId(UsernamePassword(b"BOB", b"pw"))
    assert d.called and not pool.pending
    assert outcome(d) == "bob"


def test_wrong_password_is_refused_inline(make_fresh_checker, pool, monkeypatch):
    checker = make_fresh_checker("bob:{PLAIN}pw\n")
    calls = count_verifications(monkeypatch)
    d = checker.requestAvatarId(UsernamePassword(b"bob", b"PW"))
    assert d.called and not pool.pending
    assert refusal_message(outcome(d)) == "Authentication failed"
    assert calls == [("{PLAIN}pw", b"PW")]


EXPENSIVE_STORED = [
    SECRET_HASH,
    hash_password(b"secret", "ARGON2ID", rounds=1),
    hash_password(b"secret", "BLF-CRYPT", rounds=4),
    hash_password(b"secret", "SCRAM-SHA-256", rounds=64),
    hash_password(b"secret", "MD5-CRYPT"),
]


@pytest.mark.parametrize("stored", EXPENSIVE_STORED)
def test_expensive_schemes_still_go_to_the_thread_pool(
    make_fresh_checker, pool, stored
):
    checker = make_fresh_checker(f"bob:{stored}\n")
    d = checker.requestAvatarId(UsernamePassword(b"bob", b"secret"))
    assert not d.called and len(pool.pending) == 1
    pool.run()
    assert outcome(d) == "bob"


def test_unknown_user_goes_to_the_thread_pool(make_fresh_checker, pool, monkeypatch):
    checker = make_fresh_checker("bob:{PLAIN}pw\n")
    calls = count_verifications(monkeypatch)
    d = checker.requestAvatarId(UsernamePassword(b"nobody", b"pw"))
    assert not d.called and not calls
    pool.run()
    assert refusal_message(outcome(d))
    # It still costs a verification against the dummy hash.
    assert calls == [(dummy_hash(), b"pw")]


@pytest.mark.parametrize(
    "line", ["gone:{PLAIN}pw:::::: nologin\n", "gone:{PLAIN}pw:::::: nopassword\n"]
)
def test_users_who_may_not_log_in_go_to_the_thread_pool(make_fresh_checker, pool, line):
    checker = make_fresh_checker(line)
    d = checker.requestAvatarId(UsernamePassword(b"gone", b"pw"))
    assert not d.called
    pool.run()
    assert refusal_message(outcome(d))


def test_other_credentials_go_to_the_thread_pool(make_fresh_checker, pool):
    checker = make_fresh_checker("bob:{PLAIN}pw\n")
    challenge = b"<1.2@pop.example>"
    digest = hashlib.md5(challenge + b"pw").hexdigest().encode()
    for credentials in (
        APOPCredentials(b"bob", challenge, digest),
        cram_response(b"bob", b"pw"),
        CertificateCredentials(b"bob", certificate=None),
    ):
        d = checker.requestAvatarId(credentials)
        assert not d.called
        pool.run()
        assert outcome(d) == "bob"


def test_a_never_read_file_goes_to_the_thread_pool(users_path, pool, clock):
    write(users_path, "bob:{PLAIN}pw\n")
    passwd = PasswdFile(users_path, clock=clock)
    checker = PasswdFileChecker(passwd, reactor=ImmediateReactor(), threadpool=pool)
    d = checker.requestAvatarId(UsernamePassword(b"bob", b"pw"))
    assert not d.called
    pool.run()
    assert outcome(d) == "bob"
    # That read the file: the next login is verified at once.
    d = checker.requestAvatarId(UsernamePassword(b"bob", b"pw"))
    assert d.called and not pool.pending


def test_file_edits_take_effect_once_the_cache_is_stale(
    make_fresh_checker, pool, clock, users_path
):
    checker = make_fresh_checker("bob:{PLAIN}old\n")
    set_password(users_path, "bob", "{PLAIN}new")
    # Within the window the cached entry answers, without reading the file.
    clock.advance(passwdfile.LOOKUP_MAX_AGE / 2)
    assert outcome(checker.requestAvatarId(UsernamePassword(b"bob", b"old"))) == "bob"
    assert not pool.pending
    clock.advance(passwdfile.LOOKUP_MAX_AGE / 2)
    d = checker.requestAvatarId(UsernamePassword(b"bob", b"new"))
    assert not d.called
    pool.run()
    assert outcome(d) == "bob"
    # Read again: the new password now works inline, the old one no more.
    assert outcome(checker.requestAvatarId(UsernamePassword(b"bob", b"new"))) == "bob"
    old = outcome(checker.requestAvatarId(UsernamePassword(b"bob", b"old")))
    assert refusal_message(old) and not pool.pending


def test_cached_lookup(users_path, clock):
    write(users_path, "Bob:{PLAIN}pw\n")
    passwd = PasswdFile(users_path, clock=clock)
    assert passwd.cached_lookup("bob") is passwdfile.STALE
    assert passwd.lookup("bob") is not None
    assert passwd.cached_lookup("BOB").password == "{PLAIN}pw"
    assert passwd.cached_lookup("nobody") is None
    # Another thread reading the file: no waiting for it.
    with passwd._lock:
        assert passwd.cached_lookup("bob") is passwdfile.STALE
    clock.advance(passwdfile.LOOKUP_MAX_AGE)
    assert passwd.cached_lookup("bob") is passwdfile.STALE


def test_cached_lookup_never_touches_the_filesystem(users_path, clock, monkeypatch):
    write(users_path, "bob:{PLAIN}pw\n")
    passwd = PasswdFile(users_path, clock=clock)
    passwd.refresh()

    def forbidden(*args, **kwargs):
        raise AssertionError("the filesystem was touched")

    monkeypatch.setattr(os, "stat", forbidden)
    monkeypatch.setattr("builtins.open", forbidden)
    assert passwd.cached_lookup("bob") is not None


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (b"bob", b"pw"),
        ("Bob", "pw"),
        (b"bob", b"PW"),
        (b"bob", b""),
        (b"bob", b"p" * 5000),
        (b"gone", b"pw"),
        (b"empty", b""),
        (b"nobody", b"pw"),
    ],
)
def test_inline_and_thread_pool_answers_agree(
    make_fresh_checker, pool, clock, username, password
):
    checker = make_fresh_checker(
        "bob:{PLAIN}pw\ngone:{PLAIN}pw:::::: nologin\nempty:\n"
    )
    first = login(checker, pool, UsernamePassword(username, password))
    clock.advance(passwdfile.LOOKUP_MAX_AGE)
    d = checker.requestAvatarId(UsernamePassword(username, password))
    assert not d.called  # stale: this one goes to the pool
    pool.run()
    threaded = outcome(d)
    if isinstance(threaded, Failure):
        assert refusal_message(first) == refusal_message(threaded)
    else:
        assert first == threaded == "bob"
