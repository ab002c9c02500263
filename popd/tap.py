"""
The command line of C{twistd popd}: options and the service they make.
"""

from __future__ import annotations

from twisted.application.service import IService
from twisted.python import usage

from popd.config import ConfigError, load_settings
from popd.service import make_service


class Options(usage.Options):
    """
    C{twistd popd [--config FILE] [--data-dir DIR]}.
    """

    optParameters = [
        ["config", "c", None, "TOML configuration file (see etc/popd.toml)."],
        ["data-dir", "d", None, "Data directory (default ./popd-data)."],
    ]

    def postOptions(self) -> None:
        # Every mistake is one line naming the key or file: neither a
        # traceback nor twistd's whole usage text.
        try:
            self["settings"] = load_settings(self["config"], self["data-dir"])
        except ConfigError as error:
            raise SystemExit(f"popd: {error}") from None


def makeService(options: Options) -> IService:
    try:
        return make_service(options["settings"])
    except ConfigError as error:
        raise SystemExit(f"popd: {error}") from None
