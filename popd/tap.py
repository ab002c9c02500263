"""
The command line of C{twistd popd}: options and the service they make.
"""

from __future__ import annotations

import dataclasses

from twisted.application.service import IService
from twisted.cred import strcred
from twisted.cred.credentials import IUsernamePassword
from twisted.python import usage

from popd.config import ConfigError, load_settings
from popd.service import make_service


class Options(usage.Options, strcred.AuthOptionMixin):
    """
    C{twistd popd [--config FILE] [--data-dir DIR] [--auth KIND:ARGS ...]}.

    Each C{--auth} names a Cred checker plug-in (C{passwd-file:PATH},
    C{sql:DSN}, C{pam:SERVICE}, C{checkpassword:PROGRAM}, Twisted's
    C{memory:} and C{file:}, or a site's own); given at least once, they
    replace the configuration's C{[auth] checkers} and are asked in order.
    C{--help-auth} lists the installed kinds.
    """

    supportedInterfaces = (IUsernamePassword,)

    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/popd.toml)."],
        ["data-dir", "d", None, "Data directory (default ./popd-data)."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["auth"] = []

    def opt_auth(self, description: str) -> None:
        """
        A user database, KIND:ARGUMENTS (repeatable; --help-auth lists them).
        """
        kind = description.partition(":")[0]
        try:
            factory = strcred.findCheckerFactory(kind)
        except strcred.InvalidAuthType:
            known = sorted(f.authType for f in self._checkerFactoriesForOptHelpAuth())
            raise SystemExit(
                f"popd: --auth: no checker plug-in named {kind!r} "
                f"(installed: {', '.join(known)})"
            ) from None
        if not any(map(self.supportsInterface, factory.credentialInterfaces)):
            raise SystemExit(f"popd: --auth: {kind} does not check passwords")
        # Made once the configuration is read (an sql checker may take the
        # DSN from it), by the same code as the configuration's checkers.
        self["auth"].append(description)

    def postOptions(self) -> None:
        # Every mistake is one line naming the key or file: neither a
        # traceback nor twistd's whole usage text.
        try:
            settings = load_settings(self["config"], self["data-dir"])
        except ConfigError as error:
            raise SystemExit(f"popd: {error}") from None
        if self["auth"]:
            settings = dataclasses.replace(settings, checkers=tuple(self["auth"]))
        self["settings"] = settings


def makeService(options: Options) -> IService:
    try:
        return make_service(options["settings"])
    except ConfigError as error:
        message = str(error)
        if options["auth"]:
            message = message.replace("[auth] checkers:", "--auth", 1)
        raise SystemExit(f"popd: {message}") from None
