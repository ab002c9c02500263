"""
A mechanism is a plug-in: OAUTHBEARER (RFC 7628) with a site's token
validator and a Cred checker for its credentials, defined here, logs in end
to end through the unchanged protocol.  Also: the mechanism registry and
Twisted plugin discovery.
"""

from __future__ import annotations

import base64
import json
import sys
import textwrap

import pytest
from helpers.sasl_session import Session, make_factory, passwd_checker, sasl_line
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.plugin import IPlugin
from zope.interface import Attribute, implementer

from popd import sasl
from popd.realm import MaildropRealm

# The site's part: credentials, a token validator and a checker.


class IBearerTokenCredentials(ICredentials):
    username = Attribute("bytes: the user the client says the token is for.")
    token = Attribute("bytes: the OAuth 2.0 bearer token.")


@implementer(IBearerTokenCredentials)
class BearerToken:
    def __init__(self, username: bytes, token: bytes) -> None:
        self.username = username
        self.token = token


class TokenValidator:
    """
    Stands in for a site's token introspection (an HTTP call, so: Deferreds).
    """

    def __init__(self, tokens: dict[bytes, str]) -> None:
        self.tokens = tokens
        self.asked = 0

    def user_of(self, token: bytes) -> defer.Deferred:
        self.asked += 1
        return defer.succeed(self.tokens.get(token))


@implementer(ICredentialsChecker)
class BearerTokenChecker:
    credentialInterfaces = (IBearerTokenCredentials,)

    def __init__(self, validator: TokenValidator) -> None:
        self.validator = validator

    def requestAvatarId(self, credentials):
        def check(user):
            if user is None or user.encode() != credentials.username:
                raise UnauthorizedLogin("invalid token")
            return user

        return self.validator.user_of(credentials.token).addCallback(check)


# The mechanism: RFC 7628 OAUTHBEARER, server side.

ERROR_STATUS = json.dumps(
    {"status": "invalid_token", "scope": "mail", "openid-configuration": ""}
).encode()


class OAuthBearerExchange(sasl.Exchange):
    def __init__(self, context, validator: TokenValidator) -> None:
        super().__init__(context)
        self.validator = validator
        self.failed = False

    def step(self, response):
        if response is None:
            return sasl.Challenge(b"")
        if self.failed:
            # RFC 7628 section 3.2.3: the client answers the error with ^A.
            raise sasl.SASLError("Invalid bearer token.")
        header, _, rest = response.partition(b"\x01")
        fields = header.split(b",")
        if len(fields) != 3 or fields[0] not in (b"n", b"y"):
            raise sasl.SASLError("Malformed OAUTHBEARER message.")
        if not fields[1].startswith(b"a=") or not rest.endswith(b"\x01\x01"):
            raise sasl.SASLError("Malformed OAUTHBEARER message.")
        user = fields[1][2:]
        pairs = dict(
            pair.partition(b"=")[::2] for pair in rest[:-2].split(b"\x01") if pair
        )
        scheme, _, token = pairs.get(b"auth", b"").partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            raise sasl.SASLError("Malformed OAUTHBEARER message.")

        def validated(owner):
            if owner is None or owner.encode() != self.context.account_name(user):
                self.failed = True
                return sasl.Challenge(ERROR_STATUS)
            return BearerToken(user, token)

        return self.validator.user_of(token).addCallback(validated)


@implementer(IPlugin, sasl.ISASLMechanism)
class OAuthBearer:
    name = "OAUTHBEARER"
    # A bearer token is as good as a password to whoever sees it.
    plaintext = True

    def __init__(self, validator: TokenValidator) -> None:
        self.validator = validator

    def available(self, context) -> bool:
        return context.can_check(IBearerTokenCredentials)

    def start(self, context):
        return OAuthBearerExchange(context, self.validator)


def oauthbearer_message(user: str, token: str) -> bytes:
    return (
        f"n,a={user},\x01host=pop.example\x01port=995\x01auth=Bearer {token}\x01\x01"
    ).encode()


# The tests


@pytest.fixture
def validator():
    return TokenValidator({b"tok-alice": "alice"})


@pytest.fixture
def factory(tmp_path, validator):
    passwd = passwd_checker(tmp_path / "passwd", "alice:{PLAIN}secret\n")
    registry = sasl.MechanismRegistry(sasl.BUILTIN_MECHANISMS)
    registry.register(OAuthBearer(validator))
    mechanisms = registry.select(["OAUTHBEARER", "PLAIN"])
    factory = make_factory(passwd, mechanisms, plaintext="always")
    factory.portal = Portal(
        MaildropRealm(factory.provider), [passwd, BearerTokenChecker(validator)]
    )
    return factory


def test_offered_next_to_the_built_in_ones(factory):
    assert sasl_line(Session(factory)) == b"OAUTHBEARER PLAIN"


def test_login_with_initial_response(factory, validator):
    session = Session(factory)
    message = base64.b64encode(oauthbearer_message("alice", "tok-alice"))
    assert session.line(b"AUTH OAUTHBEARER " + message).startswith(b"+OK Logged in")
    assert session.protocol._avatar_id == "alice"
    assert validator.asked == 2  # the mechanism, then the checker


def test_login_after_empty_challenge(factory):
    session = Session(factory)
    assert session.line(b"AUTH OAUTHBEARER") == b"+ \r\n"
    reply = session.respond(oauthbearer_message("alice", "tok-alice"))
    assert reply.startswith(b"+OK Logged in")


@pytest.mark.parametrize(
    "user, token", [("alice", "stolen"), ("bob", "tok-alice"), ("alice", "")]
)
def test_bad_token_gets_the_rfc_7628_error_then_err(factory, user, token):
    session = Session(factory)
    message = base64.b64encode(oauthbearer_message(user, token))
    reply = session.line(b"AUTH OAUTHBEARER " + message)
    if not token:
        assert reply == b"-ERR [AUTH] Malformed OAUTHBEARER message.\r\n"
        return
    assert json.loads(session.challenge(reply))["status"] == "invalid_token"
    assert session.respond(b"\x01") == b"-ERR [AUTH] Invalid bearer token.\r\n"
    assert session.line(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==").startswith(b"+OK")


def test_refused_before_tls_like_any_plaintext_mechanism(factory):
    factory.policy = type(factory.policy)(hostname="pop.example", failure_delay=0)
    session = Session(factory)
    assert sasl_line(session) is None
    reply = session.line(b"AUTH OAUTHBEARER")
    assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")


def test_not_offered_without_a_checker_for_its_credentials(tmp_path, validator):
    passwd = passwd_checker(tmp_path / "passwd", "alice:{PLAIN}secret\n")
    registry = sasl.MechanismRegistry([OAuthBearer(validator)])
    factory = make_factory(passwd, registry.select(["OAUTHBEARER"]), plaintext="always")
    assert sasl_line(Session(factory)) is None


# The registry


def test_registry_refuses_what_is_not_a_mechanism():
    registry = sasl.MechanismRegistry()
    with pytest.raises(ValueError, match="is not a SASL mechanism"):
        registry.register(object())

    @implementer(sasl.ISASLMechanism)
    class Named:
        plaintext = False

        def __init__(self, name):
            self.name = name

        def available(self, context):
            return True

        def start(self, context):
            return None

    for bad in ("lower", "", "X" * 21, "WITH SPACE"):
        with pytest.raises(ValueError, match="not a valid SASL mechanism name"):
            registry.register(Named(bad))
    registry.register(Named("X-GOOD_1"))
    with pytest.raises(ValueError, match="already registered"):
        registry.register(Named("X-GOOD_1"))
    registry.register(Named("X-GOOD_1"), replace=True)
    assert registry.get("x-good_1").name == "X-GOOD_1"
    registry.unregister("X-GOOD_1")
    with pytest.raises(sasl.UnknownMechanism):
        registry.select(["X-GOOD_1"])


def test_register_mechanism_makes_it_configurable(validator):
    from popd.config import Settings
    from popd.service import build_mechanisms

    sasl.register_mechanism(OAuthBearer(validator))
    try:
        settings = Settings(
            config_file=None,
            data_dir=None,
            sasl_mechanisms=("PLAIN", "OAUTHBEARER"),
        )
        names = [m.name for m in build_mechanisms(settings)]
        assert names == ["PLAIN", "OAUTHBEARER"]
    finally:
        sasl.registry.unregister("OAUTHBEARER")


def test_unknown_configured_mechanism_is_a_config_error(monkeypatch):
    from popd.config import ConfigError, Settings
    from popd.service import build_mechanisms

    settings = Settings(
        config_file=None, data_dir=None, sasl_mechanisms=("PLAIN", "X-NOPE")
    )
    with pytest.raises(ConfigError, match=r"\[auth\] mechanisms: no SASL .*X-NOPE"):
        build_mechanisms(settings)


def test_twisted_plugins_are_found(tmp_path, monkeypatch):
    package = tmp_path / "popd_test_dropins"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "xtest_mechanism.py").write_text(
        textwrap.dedent(
            """
            from twisted.plugin import IPlugin
            from zope.interface import implementer

            from popd import sasl


            @implementer(IPlugin, sasl.ISASLMechanism)
            class XTest:
                name = "X-TEST"
                plaintext = False

                def available(self, context):
                    return True

                def start(self, context):
                    return None


            xtest = XTest()
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import popd_test_dropins

    registry = sasl.MechanismRegistry(sasl.BUILTIN_MECHANISMS)
    registry.load_plugins(popd_test_dropins)
    assert registry.get("X-TEST").name == "X-TEST"
    assert "SCRAM-SHA-256" in registry.names()
    sys.modules.pop("popd_test_dropins", None)
