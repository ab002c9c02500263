"""
Which SASL mechanisms exist: the built-in ones, those a site registers in
code with L{register_mechanism}, and Twisted plugins.

A plugin is an object providing both C{twisted.plugin.IPlugin} and
L{ISASLMechanism} at module level in a C{twisted/plugins/*.py} dropin on
C{sys.path} (no C{__init__.py} there), e.g.::

    # twisted/plugins/mysite_oauth.py
    from zope.interface import provider
    from twisted.plugin import IPlugin
    from popd.sasl import ISASLMechanism
    from mysite.oauth import OAuthBearerMechanism

    oauthbearer = OAuthBearerMechanism(validator=...)  # provides both

Plugins are only looked for when a name is not known otherwise, so a server
that names only built-in mechanisms never scans for them.
"""

from __future__ import annotations

from collections.abc import Iterable

from zope.interface.exceptions import Invalid
from zope.interface.verify import verifyObject

from popd.sasl.base import MECHANISM_NAME, ISASLMechanism
from popd.sasl.crammd5 import CRAM_MD5
from popd.sasl.external import EXTERNAL
from popd.sasl.login import LOGIN
from popd.sasl.plain import PLAIN
from popd.sasl.scram import SCRAM_SHA_1, SCRAM_SHA_256

__all__ = [
    "BUILTIN_MECHANISMS",
    "DEFAULT_MECHANISMS",
    "MechanismRegistry",
    "UnknownMechanism",
    "default_mechanisms",
    "register_mechanism",
    "registry",
]

BUILTIN_MECHANISMS = (SCRAM_SHA_256, SCRAM_SHA_1, CRAM_MD5, PLAIN, LOGIN, EXTERNAL)

#: What a server offers unless configured otherwise (each only where it can
#: work): strongest first, as CAPA lists them.  EXTERNAL is added by
#: C{[auth] external = true}.
DEFAULT_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")


class UnknownMechanism(KeyError):  # noqa: N818 - reads well where raised
    """
    No mechanism of that name is built in, registered or a plugin.
    """


class MechanismRegistry:
    """
    Mechanisms by name.
    """

    def __init__(self, mechanisms: Iterable = ()) -> None:
        self._mechanisms: dict[str, object] = {}
        self._plugins_loaded = False
        for mechanism in mechanisms:
            self.register(mechanism)

    def register(self, mechanism, replace: bool = False) -> None:
        """
        Make C{mechanism} (an L{ISASLMechanism} provider) known by its name.

        @raise ValueError: it is not a valid mechanism, its name is not a
            valid SASL name (RFC 4422 section 3.1: 1-20 of A-Z 0-9 - _), or
            the name is taken and not C{replace}.
        """
        try:
            verifyObject(ISASLMechanism, mechanism)
        except Invalid as error:
            problem = f"{mechanism!r} is not a SASL mechanism: {error}"
            raise ValueError(problem) from None
        name = mechanism.name
        if not isinstance(name, str) or not MECHANISM_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a valid SASL mechanism name")
        if name in self._mechanisms and not replace:
            raise ValueError(f"a SASL mechanism named {name} is already registered")
        self._mechanisms[name] = mechanism

    def unregister(self, name: str) -> None:
        """
        Forget the mechanism called C{name}, if any.
        """
        self._mechanisms.pop(name.upper(), None)

    def load_plugins(self, package=None) -> None:
        """
        Register every Twisted plugin providing L{ISASLMechanism} (below
        C{package}, by default C{twisted.plugins}) whose name is not taken.
        """
        from twisted.plugin import getPlugins

        self._plugins_loaded = True
        for mechanism in getPlugins(ISASLMechanism, package):
            if getattr(mechanism, "name", None) not in self._mechanisms:
                self.register(mechanism)

    def get(self, name: str):
        """
        The mechanism called C{name} (any letter case), looking among the
        plugins if it is not known yet; C{None} if there is none.
        """
        name = name.upper()
        if name not in self._mechanisms and not self._plugins_loaded:
            self.load_plugins()
        return self._mechanisms.get(name)

    def names(self) -> list[str]:
        """
        Every known mechanism's name, plugins included.
        """
        if not self._plugins_loaded:
            self.load_plugins()
        return list(self._mechanisms)

    def select(self, names: Iterable[str]) -> tuple:
        """
        The mechanisms called C{names}, in that order.

        @raise UnknownMechanism: for the first name that is unknown.
        """
        selected = []
        for name in names:
            mechanism = self.get(name)
            if mechanism is None:
                raise UnknownMechanism(name)
            selected.append(mechanism)
        return tuple(selected)


#: The process-wide registry the configuration's names are looked up in.
registry = MechanismRegistry(BUILTIN_MECHANISMS)


def register_mechanism(mechanism, replace: bool = False) -> None:
    """
    Register C{mechanism} in the process-wide L{registry} (see
    L{MechanismRegistry.register}); name it in C{[auth] mechanisms} to
    offer it.
    """
    registry.register(mechanism, replace=replace)


def default_mechanisms() -> tuple:
    """
    The mechanisms of L{DEFAULT_MECHANISMS}.
    """
    return registry.select(DEFAULT_MECHANISMS)
