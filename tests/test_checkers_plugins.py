"""
Tests for popd.auth.factories (the checker-factory plug-ins), the dropin
that declares them, popd.auth.chain (several databases in order), and
Twisted's own C{memory:} and C{file:} checkers logging in through popd.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from twisted.cred import strcred
from twisted.cred.checkers import FilePasswordDB
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.address import IPv4Address
from twisted.internet.defer import fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface.verify import verifyObject

import twisted.plugins
from popd.auth.chain import CheckerChain, avatar_text
from popd.auth.checkpassword import CheckpasswordChecker
from popd.auth.errors import AuthUnavailable
from popd.auth.factories import build_checkers
from popd.auth.passwdfile import PasswdFileChecker
from popd.auth.sqlusers import SQLUsersChecker
from popd.config import ConfigError, load_settings
from popd.protocol import POP3Factory, SessionPolicy
from popd.realm import MaildropRealm
from popd.service import build_portal
from popd.testing import MemoryMaildropProvider

REPO = Path(__file__).resolve().parents[1]
KINDS = ("passwd-file", "sql", "pam", "checkpassword")


def outcome(d):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    result = results[0]
    if hasattr(result, "raiseException"):
        result.raiseException()
    return result


def python(code: str, *path: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """
    Run C{code} in a fresh interpreter with C{path} on its PYTHONPATH.
    """
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# The plug-ins


@pytest.mark.parametrize("kind", KINDS)
def test_plugins_are_found_and_provide_the_interface(kind):
    factory = strcred.findCheckerFactory(kind)
    assert verifyObject(strcred.ICheckerFactory, factory)
    assert factory.authType == kind
    assert factory.authHelp.strip() and factory.argStringFormat


def test_listing_plugins_imports_nothing_heavy():
    result = python(
        """
        import sys
        from twisted.cred import strcred
        kinds = sorted(f.authType for f in strcred.findCheckerFactories())
        heavy = [m for m in ("argon2", "passlib", "pamela", "psycopg",
                             "popd.auth.passwdfile", "popd.auth.sqlusers",
                             "popd.service", "twisted.enterprise.adbapi")
                 if m in sys.modules]
        print(kinds, heavy)
        """,
        str(REPO),
    )
    assert result.returncode == 0, result.stderr
    assert "'passwd-file'" in result.stdout and "'memory'" in result.stdout
    assert result.stdout.strip().endswith("[]"), result.stdout


def test_a_broken_popd_never_breaks_plugin_discovery(tmp_path):
    # A copy of the dropin next to a popd that cannot be imported (its own
    # plug-in cache, so the checkout's is not rewritten without popd's).
    plugins = tmp_path / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    dropin = REPO / "twisted" / "plugins" / "popd_plugin.py"
    (plugins / "popd_plugin.py").write_bytes(dropin.read_bytes())
    broken = tmp_path / "popd"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise RuntimeError('broken install')\n")
    # Discovery with popd broken rewrites the plug-in caches it reads, the
    # installed one included: put them back, or later discovery in this
    # environment would go on without popd's checkers.
    caches = [Path(d) / "dropin.cache" for d in twisted.plugins.__path__]
    saved = {cache: cache.read_bytes() if cache.exists() else None for cache in caches}
    try:
        result = _discover_with_broken_popd(tmp_path)
    finally:
        for cache, content in saved.items():
            if content is None:
                cache.unlink(missing_ok=True)
            else:
                cache.write_bytes(content)
    assert result.returncode == 0, result.stderr
    kinds, taps = result.stdout.splitlines()
    assert "'memory'" in kinds and "'passwd-file'" not in kinds
    assert "'popd'" in taps
    assert "Traceback" not in result.stderr


def _discover_with_broken_popd(tmp_path):
    return python(
        """
        from twisted.application.service import IServiceMaker
        from twisted.cred import strcred
        from twisted.plugin import getPlugins
        print(sorted(f.authType for f in strcred.findCheckerFactories()))
        print(sorted(m.tapname for m in getPlugins(IServiceMaker)))
        """,
        str(tmp_path),
        cwd=tmp_path,
    )


# Building checkers from descriptions


def test_build_passwd_file(tmp_path):
    (checker,) = build_checkers([f"passwd-file:{tmp_path / 'passwd'}"])
    assert isinstance(checker, PasswdFileChecker)
    assert checker.passwd_file.path == str(tmp_path / "passwd")


def test_build_checkpassword(tmp_path):
    (checker,) = build_checkers(["checkpassword:true"])
    assert isinstance(checker, CheckpasswordChecker)
    assert checker.argv[0].endswith("/true") and len(checker.argv) == 2


def test_build_sql_takes_the_configured_dsn_and_query(tmp_path):
    dsn = f"sqlite:///{tmp_path / 'users.db'}"
    query = "SELECT pw FROM accounts WHERE name = :user"
    (default,) = build_checkers(["sql"], dsn, query)
    (given,) = build_checkers(
        [f"sql:{dsn} SELECT x FROM y WHERE z = :local"], "sqlite:///nope.db", query
    )
    try:
        assert isinstance(default, SQLUsersChecker)
        assert default.query == query and str(tmp_path) in default.display
        assert given.query == "SELECT x FROM y WHERE z = :local"
    finally:
        default.close()
        given.close()


@pytest.mark.parametrize(
    "description, message",
    [
        ("nosuchkind:x", "no checker plug-in named 'nosuchkind'"),
        ("anonymous", "anonymous does not check passwords"),
        ("passwd-file:", "passwd-file needs a path"),
        ("checkpassword:", "checkpassword needs a program"),
        ("checkpassword:/nonexistent/prog", "is not an executable program"),
        ("sql:", "sql needs a DSN"),
        ("sql:mysql://x/y", "unsupported database DSN"),
        ("memory:alice", "argstring must be in format"),
    ],
)
def test_build_errors_name_the_description(description, message):
    with pytest.raises(ValueError, match=message) as error:
        build_checkers([description])
    assert repr(description) in str(error.value) or description in str(error.value)


def test_build_errors_never_show_a_dsn_password():
    with pytest.raises(ValueError) as error:
        build_checkers(["sql:postgresql://popd:s3cret@127.0.0.1/x SELECT 1"])
    assert "s3cret" not in str(error.value)
    assert "postgresql://popd:***@127.0.0.1/x" in str(error.value)


# The chain


class Fixed:
    """
    A checker with a fixed answer.
    """

    def __init__(self, answer, interfaces=(UsernamePassword.__implemented__,)):
        self.answer = answer
        self.asked = 0
        self.credentialInterfaces = tuple(
            i for spec in interfaces for i in spec.interfaces()
        )

    def requestAvatarId(self, credentials):
        self.asked += 1
        if isinstance(self.answer, Exception):
            return fail(self.answer)
        return succeed(self.answer)


def credentials(user=b"alice", password=b"secret"):
    return UsernamePassword(user, password)


def test_chain_first_acceptance_wins():
    first, second, third = Fixed(UnauthorizedLogin()), Fixed(b"alice"), Fixed("x")
    chain = CheckerChain([first, second, third])
    assert outcome(chain.requestAvatarId(credentials())) == "alice"
    assert (first.asked, second.asked, third.asked) == (1, 1, 0)


def test_chain_refuses_when_all_refuse():
    chain = CheckerChain([Fixed(UnauthorizedLogin()), Fixed(UnauthorizedLogin())])
    with pytest.raises(UnauthorizedLogin):
        outcome(chain.requestAvatarId(credentials()))


def test_chain_unavailable_database_is_not_a_wrong_password():
    chain = CheckerChain([Fixed(AuthUnavailable("down")), Fixed(UnauthorizedLogin())])
    with pytest.raises(AuthUnavailable, match="down"):
        outcome(chain.requestAvatarId(credentials()))
    chain = CheckerChain([Fixed(AuthUnavailable("down")), Fixed("alice")])
    assert outcome(chain.requestAvatarId(credentials())) == "alice"


def test_chain_unexpected_error_is_logged_and_unavailable():
    from twisted.logger import capturedLogs

    chain = CheckerChain([Fixed(ZeroDivisionError("bug"))])
    with capturedLogs() as events:
        with pytest.raises(AuthUnavailable, match="ZeroDivisionError"):
            outcome(chain.requestAvatarId(credentials()))
    assert any(e.get("log_failure") is not None for e in events)


def test_chain_asks_only_checkers_of_the_credentials_kind():
    from popd.auth.credentials import APOPCredentials

    plain_only = Fixed("alice")
    plain_only.credentialInterfaces = tuple(
        UsernamePassword.__implemented__.interfaces()
    )
    chain = CheckerChain([plain_only])
    apop = APOPCredentials(b"alice", b"<1@x>", b"0" * 32)
    with pytest.raises(UnauthorizedLogin):
        outcome(chain.requestAvatarId(apop))
    assert plain_only.asked == 0


def test_avatar_text():
    assert avatar_text(b"j\xc3\xbcrgen") == "jürgen" == avatar_text("jürgen")
    with pytest.raises(UnauthorizedLogin):
        avatar_text(b"\xff")


# Twisted's own checkers through popd


def pop3_login(portal: Portal, user: bytes, password: bytes) -> bytes:
    factory = POP3Factory(
        portal, SessionPolicy(plaintext="always", failure_delay=0), reactor=Clock()
    )
    address = IPv4Address("TCP", "192.0.2.1", 1234)
    transport = StringTransport(peerAddress=address)
    protocol = factory.buildProtocol(address)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"USER " + user + b"\r\nPASS " + password + b"\r\n")
    factory.reactor.advance(0)
    return transport.value().split(b"\r\n", 2)[2]


def portal_for(descriptions) -> Portal:
    provider = MemoryMaildropProvider()
    provider.deliver("alice", b"Subject: hi\n\nhello\n")
    checkers = build_checkers(descriptions)
    return Portal(MaildropRealm(provider), [CheckerChain(checkers)])


def test_twisted_memory_checker_logs_in_through_popd():
    portal = portal_for(["memory:alice:secret:bob:hunter2"])
    assert pop3_login(portal, b"alice", b"secret").startswith(b"+OK Logged in, 1")
    assert pop3_login(portal, b"alice", b"wrong").startswith(b"-ERR [AUTH]")


def test_twisted_file_checker_logs_in_through_popd(tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("alice:secret\nbob:hunter2\n")
    assert isinstance(build_checkers([f"file:{users}"])[0], FilePasswordDB)
    portal = portal_for([f"file:{users}"])
    assert pop3_login(portal, b"alice", b"secret").startswith(b"+OK Logged in, 1")
    assert pop3_login(portal, b"alice", b"wrong").startswith(b"-ERR [AUTH]")


def test_service_portal_from_the_configured_checkers(tmp_path):
    settings = load_settings(None, tmp_path)
    portal = build_portal(settings, MemoryMaildropProvider())
    (chain,) = set(portal.checkers.values())
    assert isinstance(chain, CheckerChain)
    assert [type(c) for c in chain.checkers] == [PasswdFileChecker]
    bad = dataclasses.replace(settings, checkers=("nosuch:x",))
    with pytest.raises(ConfigError, match=r"\[auth\] checkers: 'nosuch:x': no checker"):
        build_portal(bad, MemoryMaildropProvider())
