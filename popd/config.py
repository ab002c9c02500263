"""
popd's TOML configuration as typed settings.

Every mistake (an unknown key, a wrong type, a value out of range) is a
L{ConfigError} whose message names the key, so an administrator never has
to read a traceback.  With no file at all the embedded defaults serve
127.0.0.1 on unprivileged ports from a data directory.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from popd.auth.sqlusers import DEFAULT_QUERY as DEFAULT_SQL_QUERY
from popd.auth.sqlusers import check_query

DEFAULT_DATA_DIR = Path("popd-data")
PLAINTEXT_POLICIES = ("tls-only", "always")
MAILDROP_TYPES = ("maildir", "mbox", "sql")
MBOX_VARIANTS = ("mboxrd", "mboxo")
_DEFAULT_PATHS = {
    "maildir": ("mail", "%u", "Maildir"),
    "mbox": ("mail", "%u", "mbox"),
}
TLS_VERSIONS = ("TLSv1.2", "TLSv1.3")
# The same as popd.sasl.DEFAULT_MECHANISMS (a test keeps them equal).
DEFAULT_SASL_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-1", "CRAM-MD5", "PLAIN", "LOGIN")
_SASL_NAME = re.compile(r"[A-Z0-9_-]{1,20}")


class ConfigError(Exception):
    """
    The configuration cannot be used; the message says which key or file.
    """


@dataclass(frozen=True)
class SNICertificate:
    """
    One C{[tls] sni} entry: the certificate and key for clients that ask
    for one of C{names} (exact host names, or C{*.domain} for one label).
    """

    names: tuple[str, ...]
    certificate: Path
    key: Path


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
    tls_client_ca: Path | None = None
    passwd_file: Path | None = None
    sasl_mechanisms: tuple[str, ...] = DEFAULT_SASL_MECHANISMS
    external: bool = False
    checkers: tuple[str, ...] = ()
    failure_delay: float = 2.0
    sql_dsn: str = ""
    sql_query: str = DEFAULT_SQL_QUERY
    plaintext: str = "tls-only"
    trusted_networks: tuple[str, ...] = ("127.0.0.0/8", "::1/128")
    apop: bool = False
    maildrop_type: str = "maildir"
    maildrop_path: str = ""
    maildir_cache_messages: int = 250_000
    maildir_index: bool = True
    mbox_folders: str | None = None
    mbox_variant: str = "mboxrd"
    dsn: str = ""
    folder_separator: str = "#"
    auth_timeout: float = 120.0
    transaction_timeout: float = 600.0
    max_bad_commands: int = 20
    max_auth_failures: int = 3
    lmtp_listen: tuple[str, ...] = ("tcp:24024:interface=127.0.0.1",)
    smtp_listen: tuple[str, ...] = ()
    max_message_size: int = 50 * 1024 * 1024
    delivery_recipient: str = "auto"
    recipient_delimiter: str = "+"
    detail_folders: bool = False
    generated_tls: bool = field(default=False)
    # Running it for real: see _operations_settings.
    workers: int = 1
    trusted_proxies: tuple[str, ...] = ()
    pop3_proxy_protocol: bool = False
    pop3s_proxy_protocol: bool = False
    log_format: str = "text"
    log_file: Path | None = None
    tls_ciphers: str | None = None
    tls_sni: tuple[SNICertificate, ...] = ()
    max_connections: int = 10000
    max_connections_per_ip: int = 50
    metrics_listen: tuple[str, ...] = ()

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


_SECTIONS = (
    "server",
    "pop3",
    "pop3s",
    "tls",
    "auth",
    "maildrop",
    "limits",
    "lmtp",
    "smtp",
    "delivery",
    "metrics",
)
RECIPIENT_MODES = ("auto", "full", "local")


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
        "maildir": ("path", "cache_messages", "index"),
        "mbox": ("path", "folders", "variant"),
        "sql": ("dsn",),
    }[kind]
    for key in ("path", "folders", "variant", "dsn", "cache_messages", "index"):
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
    if kind == "maildir":
        store["maildir_cache_messages"] = maildrop.integer("cache_messages", 250_000)
        store["maildir_index"] = maildrop.boolean("index", True)
    return store


def _delivery_settings(lmtp: _Section, smtp: _Section, delivery: _Section) -> dict:
    """
    The keys of delivery from the MTA: the LMTP and SMTP listeners and
    [delivery].
    """
    delimiter = delivery.string("recipient_delimiter", "+")
    if len(delimiter) > 1 or delimiter.isalnum() or delimiter in ("@", '"'):
        raise ConfigError(
            "[delivery] recipient_delimiter must be one punctuation character "
            'other than @ and " (or empty to turn address details off)'
        )
    return {
        "lmtp_listen": lmtp.strings("listen", Settings.lmtp_listen),
        "smtp_listen": smtp.strings("listen", Settings.smtp_listen),
        "max_message_size": delivery.integer(
            "max_message_size", Settings.max_message_size, minimum=1
        ),
        "delivery_recipient": delivery.choice("recipient", RECIPIENT_MODES, "auto"),
        "recipient_delimiter": delimiter,
        "detail_folders": delivery.boolean("detail_folders", False),
    }


def _checker_settings(
    auth: _Section, base: Path, root: Path, store: dict, passwd_file: Path
) -> dict:
    """
    The [auth] keys of the user databases: C{checkers} (C{KIND:ARGUMENTS}
    strings, default the passwd-file), C{failure_delay}, and C{sql_dsn} /
    C{sql_query} for C{sql} checkers given without them.
    """
    checkers = []
    for description in auth.strings("checkers", (f"passwd-file:{passwd_file}",)):
        kind, colon, argument = description.partition(":")
        if not kind or not kind.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(
                f"[auth] checkers: {description!r} is not KIND:ARGUMENTS "
                '(such as "passwd-file:/etc/popd/passwd")'
            )
        if kind == "passwd-file":
            if not argument:
                raise ConfigError("[auth] checkers: passwd-file needs a path")
            description = f"passwd-file:{_path(base, argument)}"
        checkers.append(description)
    default_dsn = store.get("dsn") or f"sqlite:///{root / 'popd.sqlite3'}"
    dsn = auth.string("sql_dsn", default_dsn)
    if dsn.startswith("sqlite:") and not dsn.startswith("sqlite:///"):
        dsn = f"sqlite:///{_path(base, dsn.removeprefix('sqlite:'))}"
    query = auth.string("sql_query", DEFAULT_SQL_QUERY)
    try:
        check_query(query)
    except ValueError as error:
        raise ConfigError(f"[auth] sql_query: {error}") from None
    return {
        "checkers": tuple(checkers),
        "failure_delay": auth.number("failure_delay", 2.0),
        "sql_dsn": dsn,
        "sql_query": query,
    }


def _sasl_settings(auth: _Section, client_ca: Path | None) -> dict:
    """
    The [auth] keys of SASL: C{mechanisms} (names, offered in that order
    where they can work) and C{external} (SASL EXTERNAL with TLS client
    certificates, which needs [tls] client_ca and adds EXTERNAL).
    """
    names = tuple(
        name.upper() for name in auth.strings("mechanisms", DEFAULT_SASL_MECHANISMS)
    )
    for name in names:
        if not _SASL_NAME.fullmatch(name):
            raise ConfigError(
                f"[auth] mechanisms: {name!r} is not a SASL mechanism name"
            )
    if len(set(names)) != len(names):
        raise ConfigError("[auth] mechanisms: a mechanism is named twice")
    external = auth.boolean("external", False)
    if external and client_ca is None:
        raise ConfigError(
            "[auth] external = true needs [tls] client_ca, the CAs whose client "
            "certificates are trusted"
        )
    if "EXTERNAL" in names and not external:
        raise ConfigError("[auth] mechanisms: EXTERNAL needs [auth] external = true")
    if external and "EXTERNAL" not in names:
        names += ("EXTERNAL",)
    return {"sasl_mechanisms": names, "external": external}


_HOST_NAME = re.compile(
    r"(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*"
)
LOG_FORMATS = ("text", "json")


def _networks(section: _Section, key: str, default: tuple[str, ...]) -> tuple:
    networks = section.strings(key, default)
    for network in networks:
        try:
            ip_network(network)
        except ValueError:
            raise ConfigError(
                f"[{section.name}] {key}: {network!r} is not a network address"
            ) from None
    return networks


def _workers(server: _Section) -> int:
    """
    C{[server] workers}: a number of processes, or C{"auto"} for one per
    core this process may run on.
    """
    value = server._get("workers", (int, str), 1)
    if value == "auto":
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    if isinstance(value, str) or not 1 <= value <= 256:
        raise ConfigError(
            f'[server] workers must be "auto" or a number from 1 to 256, not {value!r}'
        )
    return value


def _sni_entry(where: str, names, table: Any, base: Path) -> SNICertificate:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table with certificate and key")
    unknown = sorted(set(table) - {"certificate", "key", "name", "names"})
    if unknown:
        raise ConfigError(f"unknown key {where} {unknown[0]}")
    paths = {}
    for key in ("certificate", "key"):
        value = table.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where} needs {key}, a PEM file")
        paths[key] = _path(base, value)
    cleaned = []
    for name in names:
        if not isinstance(name, str) or not _HOST_NAME.fullmatch(
            name.lower().rstrip(".")
        ):
            raise ConfigError(f"{where}: {name!r} is not a host name")
        cleaned.append(name.lower().rstrip("."))
    if not cleaned:
        raise ConfigError(f"{where} names no host")
    return SNICertificate(tuple(cleaned), paths["certificate"], paths["key"])


def _sni(tls: _Section, base: Path) -> tuple[SNICertificate, ...]:
    """
    C{[tls] sni}: a table of host name -> C{{certificate, key}}, or an
    array of tables each with C{name} (or C{names}), C{certificate} and
    C{key}.
    """
    raw = tls._get("sni", (dict, list), None)
    if raw is None:
        return ()
    entries = []
    if isinstance(raw, dict):
        for name, table in raw.items():
            entries.append(_sni_entry(f"[tls] sni {name!r}", [name], table, base))
    else:
        for number, table in enumerate(raw, 1):
            where = f"[tls] sni entry {number}"
            if not isinstance(table, dict):
                raise ConfigError(f"{where} must be a table")
            names = table.get("names", [])
            if "name" in table:
                names = [table["name"], *names]
            if not isinstance(names, list):
                raise ConfigError(f"{where}: names must be a list of host names")
            entries.append(_sni_entry(where, names, table, base))
    seen: set[str] = set()
    for entry in entries:
        for name in entry.names:
            if name in seen:
                raise ConfigError(f"[tls] sni: {name} is named twice")
            seen.add(name)
    return tuple(entries)


def _operations_settings(sections: dict[str, _Section], base: Path) -> dict:
    """
    The keys of running popd for real: worker processes, logging, the
    PROXY protocol, TLS ciphers and SNI certificates, connection limits
    and the metrics listener.
    """
    server, tls, limits = sections["server"], sections["tls"], sections["limits"]
    proxies = _networks(server, "trusted_proxies", ())
    proxied = {}
    for label in ("pop3", "pop3s"):
        proxied[label] = sections[label].boolean("proxy_protocol", False)
        if proxied[label] and not proxies:
            raise ConfigError(
                f"[{label}] proxy_protocol = true needs [server] trusted_proxies, "
                "the addresses of the load balancers"
            )
    ciphers = tls.string("ciphers")
    if ciphers is not None and not ciphers.strip():
        raise ConfigError("[tls] ciphers must be an OpenSSL cipher string")
    return {
        "workers": _workers(server),
        "trusted_proxies": proxies,
        "pop3_proxy_protocol": proxied["pop3"],
        "pop3s_proxy_protocol": proxied["pop3s"],
        "log_format": server.choice("log_format", LOG_FORMATS, "text"),
        "log_file": _path(base, server.string("log_file")),
        "tls_ciphers": ciphers,
        "tls_sni": _sni(tls, base),
        "max_connections": limits.integer("max_connections", 10000),
        "max_connections_per_ip": limits.integer("max_connections_per_ip", 50),
        "metrics_listen": sections["metrics"].strings("listen", ()),
    }


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
    server, pop3, pop3s, tls, auth, maildrop, limits, lmtp, smtp, delivery = (
        sections[name] for name in _SECTIONS[:10]
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
    client_ca = _path(base, tls.string("client_ca"))

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
    passwd_file = _path(base, auth.string("passwd_file")) or root / "passwd"

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
        tls_client_ca=client_ca,
        passwd_file=passwd_file,
        **_sasl_settings(auth, client_ca),
        **_checker_settings(auth, base, root, store, passwd_file),
        plaintext=auth.choice("plaintext", PLAINTEXT_POLICIES, "tls-only"),
        trusted_networks=networks,
        apop=auth.boolean("apop", False),
        **store,
        auth_timeout=limits.number("auth_timeout", 120.0, minimum=1),
        transaction_timeout=limits.number("transaction_timeout", 600.0, minimum=1),
        max_bad_commands=limits.integer("max_bad_commands", 20, minimum=1),
        max_auth_failures=limits.integer("max_auth_failures", 3, minimum=1),
        **_delivery_settings(lmtp, smtp, delivery),
        **_operations_settings(sections, base),
    )
    for section in sections.values():
        section.check_unknown()
    return settings
