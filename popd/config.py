"""
popd's TOML configuration as typed settings.

Every mistake (an unknown key, a wrong type, a value out of range) is a
L{ConfigError} whose message names the key, so an administrator never has
to read a traceback.  With no file at all the embedded defaults serve
127.0.0.1 on unprivileged ports from a data directory.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path("popd-data")
PLAINTEXT_POLICIES = ("tls-only", "always")
MAILDROP_TYPES = ("maildir", "mbox", "sql")
MBOX_VARIANTS = ("mboxrd", "mboxo")
_DEFAULT_PATHS = {
    "maildir": ("mail", "%u", "Maildir"),
    "mbox": ("mail", "%u", "mbox"),
}
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")


class ConfigError(Exception):
    """
    The configuration cannot be used; the message says which key or file.
    """


@dataclass(frozen=True)
class Settings:
    """
    The whole configuration, with every path absolute.
    """

    config_file: Path | None
    data_dir: Path
    pop3_listen: tuple[str, ...] = ("tcp:1110:interface=127.0.0.1",)
    pop3s_listen: tuple[str, ...] = ("tcp:1995:interface=127.0.0.1",)
    expire: str | None = None
    login_delay: int | None = None
    tls_certificate: Path | None = None
    tls_key: Path | None = None
    tls_min_version: str = "TLSv1.2"
    passwd_file: Path | None = None
    plaintext: str = "tls-only"
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    apop: bool = False
    maildrop_type: str = "maildir"
    maildrop_path: str = ""
    mbox_folders: str | None = None
    mbox_variant: str = "mboxrd"
    dsn: str = ""
    folder_separator: str = "#"
    auth_timeout: float = 120.0
    transaction_timeout: float = 600.0
    max_bad_commands: int = 20
    max_auth_failures: int = 3
    generated_tls: bool = field(default=False)

    @property
    def tls_dir(self) -> Path:
        """
        Where the self-signed certificate of the embedded defaults lives.
        """
        return self.data_dir / "tls"


class _Section:
    """
    Reads one TOML table, remembering which keys were used so that any
    other key is reported as unknown.
    """

    def __init__(self, name: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        self.name = name
        self._table = table
        self._used: set[str] = set()

    def _get(self, key: str, kinds: tuple[type, ...], default: Any) -> Any:
        self._used.add(key)
        if key not in self._table:
            return default
        value = self._table[key]
        if not isinstance(value, kinds) or isinstance(value, bool) != (bool in kinds):
            wanted = " or ".join(kind.__name__ for kind in kinds)
            raise ConfigError(f"[{self.name}] {key} must be a {wanted}, not {value!r}")
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        return self._get(key, (str,), default)

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        if value not in choices:
            options = ", ".join(f'"{choice}"' for choice in choices)
            raise ConfigError(
                f"[{self.name}] {key} must be one of {options}, not {value!r}"
            )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return self._get(key, (bool,), default)

    def number(self, key: str, default: float | None, minimum: float = 0) -> Any:
        value = self._get(key, (int, float), default)
        if value is not None and value < minimum:
            raise ConfigError(
                f"[{self.name}] {key} must be at least {minimum}, not {value}"
            )
        return value

    def integer(self, key: str, default: int | None, minimum: int = 0) -> int | None:
        value = self.number(key, default, minimum)
        if value is not None and not isinstance(value, int):
            raise ConfigError(
                f"[{self.name}] {key} must be a whole number, not {value}"
            )
        return value

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, (list,), None)
        if value is None:
            return default
        if not all(isinstance(item, str) and item for item in value):
            raise ConfigError(
                f"[{self.name}] {key} must be a list of non-empty strings"
            )
        return tuple(value)

    def check_unknown(self) -> None:
        unknown = sorted(set(self._table) - self._used)
        if unknown:
            raise ConfigError(f"unknown key [{self.name}] {unknown[0]}")


_SECTIONS = ("server", "pop3", "pop3s", "tls", "auth", "maildrop", "limits")


def _read_toml(path: Path) -> dict:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except OSError as error:
        raise ConfigError(
            f"cannot read configuration file {path}: {error.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path} is not valid TOML: {error}") from None


def _path(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    return (base / Path(value).expanduser()).absolute()


def _store_settings(maildrop: _Section, base: Path, root: Path) -> dict:
    """
    The [maildrop] keys of the chosen store type; a key of another type is
    a mistake worth naming, since it would silently do nothing.
    """
    kind = maildrop.choice("type", MAILDROP_TYPES, "maildir")
    separator = maildrop.string("folder_separator", "#")
    if len(separator) > 1 or separator.isalnum() or (separator and separator in "/.%"):
        raise ConfigError(
            "[maildrop] folder_separator must be one punctuation character "
            "other than / . % (or empty to turn folder selection off)"
        )
    store: dict = {"maildrop_type": kind, "folder_separator": separator}
    own_keys = {
        "maildir": ("path",),
        "mbox": ("path", "folders", "variant"),
        "sql": ("dsn",),
    }[kind]
    for key in ("path", "folders", "variant", "dsn"):
        if key in maildrop._table and key not in own_keys:
            raise ConfigError(f'[maildrop] {key} does not apply to type = "{kind}"')
    if kind == "sql":
        default = f"sqlite:///{root / 'popd.sqlite3'}"
        dsn = maildrop.string("dsn", default)
        if dsn.startswith("sqlite:") and not dsn.startswith("sqlite:///"):
            dsn = f"sqlite:///{_path(base, dsn.removeprefix('sqlite:'))}"
        elif not dsn.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ConfigError(
                "[maildrop] dsn must start with sqlite:// or postgresql://"
            )
        store["dsn"] = dsn
        return store
    path = maildrop.string("path", str(root.joinpath(*_DEFAULT_PATHS[kind])))
    if "%u" not in path and "%n" not in path:
        raise ConfigError(
            "[maildrop] path must contain %u or %n, one maildrop per user"
        )
    store["maildrop_path"] = str(_path(base, path))
    if kind == "mbox":
        folders = maildrop.string("folders")
        if folders is not None and "%u" not in folders and "%n" not in folders:
            raise ConfigError("[maildrop] folders must contain %u or %n")
        store["mbox_folders"] = str(_path(base, folders)) if folders else None
        store["mbox_variant"] = maildrop.choice("variant", MBOX_VARIANTS, "mboxrd")
    return store


def load_settings(
    config_file: str | Path | None = None, data_dir: str | Path | None = None
) -> Settings:
    """
    Read C{config_file} (or nothing: the embedded defaults) into L{Settings}.

    Relative paths in the file are taken from the file's directory;
    C{data_dir}, from the command line, wins over the file's.
    """
    raw: dict = {}
    base = Path.cwd()
    config_path = None
    if config_file is not None:
        config_path = Path(config_file).absolute()
        raw = _read_toml(config_path)
        base = config_path.parent
        unknown = sorted(set(raw) - set(_SECTIONS))
        if unknown:
            raise ConfigError(f"unknown section [{unknown[0]}] in {config_path}")
    sections = {name: _Section(name, raw.get(name, {})) for name in _SECTIONS}
    server, pop3, pop3s, tls, auth, maildrop, limits = (
        sections[name] for name in _SECTIONS
    )

    if data_dir is not None:
        server.string("data_dir")
        root = Path(data_dir).absolute()
    else:
        root = _path(base, server.string("data_dir", str(DEFAULT_DATA_DIR)))

    certificate = _path(base, tls.string("certificate"))
    key = _path(base, tls.string("key"))
    if (certificate is None) != (key is None):
        raise ConfigError("[tls] certificate and key must be given together")

    networks = auth.strings("trusted_networks", Settings.trusted_networks)
    for network in networks:
        try:
            ip_network(network)
        except ValueError:
            raise ConfigError(
                f"[auth] trusted_networks: {network!r} is not a network address"
            ) from None

    expire = pop3.string("expire")
    if expire is not None and not (expire == "NEVER" or expire.isdigit()):
        raise ConfigError(
            '[pop3] expire must be "NEVER" or a number of days as a string'
        )

    store = _store_settings(maildrop, base, root)

    settings = Settings(
        config_file=config_path,
        data_dir=root,
        pop3_listen=pop3.strings("listen", Settings.pop3_listen),
        pop3s_listen=pop3s.strings("listen", Settings.pop3s_listen),
        expire=expire,
        login_delay=pop3.integer("login_delay", None),
        tls_certificate=certificate or root / "tls" / "cert.pem",
        tls_key=key or root / "tls" / "key.pem",
        tls_min_version=tls.choice("min_version", TLS_VERSIONS, "TLSv1.2"),
        generated_tls=certificate is None,
        passwd_file=_path(base, auth.string("passwd_file")) or root / "passwd",
        plaintext=auth.choice("plaintext", PLAINTEXT_POLICIES, "tls-only"),
        trusted_networks=networks,
        apop=auth.boolean("apop", False),
        **store,
        auth_timeout=limits.number("auth_timeout", 120.0, minimum=1),
        transaction_timeout=limits.number("transaction_timeout", 600.0, minimum=1),
        max_bad_commands=limits.integer("max_bad_commands", 20, minimum=1),
        max_auth_failures=limits.integer("max_auth_failures", 3, minimum=1),
    )
    for section in sections.values():
        section.check_unknown()
    return settings
