"""
The TOML configuration: defaults, every key, and clear messages for mistakes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from popd.config import ConfigError, load_settings


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "popd.toml"
    path.write_text(text)
    return path


def test_embedded_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.config_file is None
    assert settings.data_dir == tmp_path / "popd-data"
    assert settings.pop3_listen == ("tcp:1110:interface=127.0.0.1",)
    assert settings.pop3s_listen == ("tcp:1995:interface=127.0.0.1",)
    assert settings.passwd_file == tmp_path / "popd-data" / "passwd"
    assert settings.tls_certificate == tmp_path / "popd-data" / "tls" / "cert.pem"
    assert settings.generated_tls
    assert settings.maildrop_path == str(
        tmp_path / "popd-data" / "mail" / "%u" / "Maildir"
    )
    assert settings.plaintext == "tls-only"
    assert settings.transaction_timeout >= 600


def test_data_dir_option_wins(tmp_path):
    config = write(tmp_path, '[server]\ndata_dir = "elsewhere"\n')
    assert load_settings(config, tmp_path / "d").data_dir == tmp_path / "d"
    assert load_settings(config).data_dir == tmp_path / "elsewhere"


def test_example_configuration_loads():
    example = Path(__file__).parent.parent / "etc" / "popd.toml"
    settings = load_settings(example)
    assert settings.pop3_listen == ("tcp:1110:interface=127.0.0.1",)
    assert settings.max_bad_commands == 20


def test_every_key(tmp_path):
    config = write(
        tmp_path,
        """
[server]
data_dir = "/srv/popd"
[pop3]
listen = ["tcp:110:interface=::", "systemd:domain=INET:index=0"]
expire = "NEVER"
login_delay = 300
[pop3s]
listen = ["tcp:995"]
[tls]
certificate = "cert.pem"
key = "/etc/key.pem"
min_version = "TLSv1.3"
[auth]
passwd_file = "users"
plaintext = "always"
trusted_networks = ["10.0.0.0/8"]
apop = true
[maildrop]
type = "maildir"
path = "/var/mail/%d/%n"
[limits]
auth_timeout = 30
transaction_timeout = 900.5
max_bad_commands = 5
max_auth_failures = 2
""",
    )
    s = load_settings(config)
    assert s.pop3_listen == ("tcp:110:interface=::", "systemd:domain=INET:index=0")
    assert (s.expire, s.login_delay, s.pop3s_listen) == ("NEVER", 300, ("tcp:995",))
    assert s.tls_certificate == tmp_path / "cert.pem" and s.tls_key == Path(
        "/etc/key.pem"
    )
    assert not s.generated_tls and s.tls_min_version == "TLSv1.3"
    assert s.passwd_file == tmp_path / "users"
    assert (s.plaintext, s.trusted_networks, s.apop) == (
        "always",
        ("10.0.0.0/8",),
        True,
    )
    assert s.maildrop_path == "/var/mail/%d/%n"
    assert (s.auth_timeout, s.transaction_timeout) == (30, 900.5)
    assert (s.max_bad_commands, s.max_auth_failures) == (5, 2)


@pytest.mark.parametrize(
    "text, message",
    [
        ('[pop3]\nlisten = "tcp:110"\n', "[pop3] listen must be a list"),
        ("[pop3]\nlisen = []\n", "unknown key [pop3] lisen"),
        ("[pop4]\n", "unknown section [pop4]"),
        ('[auth]\nplaintext = "never"\n', "[auth] plaintext must be one of"),
        ("[auth]\napop = 1\n", "[auth] apop must be a bool"),
        ('[auth]\ntrusted_networks = ["nonsense"]\n', "[auth] trusted_networks"),
        (
            "[limits]\nmax_bad_commands = 0\n",
            "[limits] max_bad_commands must be at least 1",
        ),
        ("[limits]\nauth_timeout = true\n", "[limits] auth_timeout must be"),
        (
            "[limits]\nmax_auth_failures = 2.5\n",
            "[limits] max_auth_failures must be a whole number",
        ),
        (
            '[tls]\ncertificate = "c.pem"\n',
            "[tls] certificate and key must be given together",
        ),
        ('[tls]\nmin_version = "SSLv3"\n', "[tls] min_version must be one of"),
        ('[maildrop]\ntype = "nfs"\n', "[maildrop] type must be one of"),
        (
            '[maildrop]\ndsn = "sqlite:///x"\n',
            '[maildrop] dsn does not apply to type = "maildir"',
        ),
        (
            '[maildrop]\ntype = "sql"\npath = "/m/%u"\n',
            "[maildrop] path does not apply",
        ),
        (
            '[maildrop]\ntype = "sql"\ndsn = "mysql://x"\n',
            "[maildrop] dsn must start with",
        ),
        (
            '[maildrop]\ntype = "mbox"\nvariant = "x"\n',
            "[maildrop] variant must be one of",
        ),
        (
            '[maildrop]\ntype = "mbox"\nfolders = "/f"\n',
            "[maildrop] folders must contain",
        ),
        (
            '[maildrop]\nfolder_separator = "ab"\n',
            "[maildrop] folder_separator must be",
        ),
        ('[maildrop]\nfolder_separator = "/"\n', "[maildrop] folder_separator must be"),
        (
            '[maildrop]\npath = "/var/mail/all"\n',
            "[maildrop] path must contain %u or %n",
        ),
        (
            '[maildrop]\ntype = "mbox"\ncache_messages = 10\n',
            '[maildrop] cache_messages does not apply to type = "mbox"',
        ),
        ("[maildrop]\ncache_messages = -1\n", "[maildrop] cache_messages must be"),
        ('[maildrop]\nindex = "yes"\n', "[maildrop] index must be"),
        ('[pop3]\nexpire = "soon"\n', "[pop3] expire"),
        ("pop3 = 1\n", "[pop3] must be a table"),
        ("[pop3\n", "is not valid TOML"),
    ],
)
def test_mistakes_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text))
    assert message in str(error.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="nope.toml does not exist"):
        load_settings(tmp_path / "nope.toml")


def test_store_types(tmp_path):
    sql = load_settings(write(tmp_path, '[maildrop]\ntype = "sql"\n'))
    assert sql.dsn == f"sqlite:///{tmp_path / 'popd-data' / 'popd.sqlite3'}"
    relative = load_settings(
        write(tmp_path, '[maildrop]\ntype = "sql"\ndsn = "sqlite:m.db"\n')
    )
    assert relative.dsn == f"sqlite:///{tmp_path / 'm.db'}"
    pg = "postgresql://postgres@127.0.0.1:5432/mail"
    assert (
        load_settings(write(tmp_path, f'[maildrop]\ntype = "sql"\ndsn = "{pg}"\n')).dsn
        == pg
    )
    mbox = load_settings(
        write(
            tmp_path,
            '[maildrop]\ntype = "mbox"\npath = "/var/mail/%u"\nfolders = "f/%u"\n'
            'variant = "mboxo"\nfolder_separator = "+"\n',
        )
    )
    assert (mbox.maildrop_path, mbox.mbox_folders) == (
        "/var/mail/%u",
        str(tmp_path / "f/%u"),
    )
    assert (mbox.mbox_variant, mbox.folder_separator) == ("mboxo", "+")
    default_mbox = load_settings(write(tmp_path, '[maildrop]\ntype = "mbox"\n'))
    assert default_mbox.maildrop_path == str(
        tmp_path / "popd-data" / "mail" / "%u" / "mbox"
    )
    off = load_settings(write(tmp_path, '[maildrop]\nfolder_separator = ""\n'))
    assert off.folder_separator == ""


# Delivery from the MTA: [lmtp], [smtp], [delivery]


def test_delivery_defaults(tmp_path):
    settings = load_settings(write(tmp_path, ""))
    assert settings.lmtp_listen == ("tcp:24024:interface=127.0.0.1",)
    assert settings.smtp_listen == ()
    assert settings.max_message_size == 52428800
    assert settings.delivery_recipient == "auto"
    assert settings.recipient_delimiter == "+"
    assert settings.detail_folders is False


def test_delivery_keys(tmp_path):
    settings = load_settings(
        write(
            tmp_path,
            '[lmtp]\nlisten = ["unix:/run/popd/lmtp"]\n'
            '[smtp]\nlisten = ["tcp:2525:interface=127.0.0.1"]\n'
            '[delivery]\nmax_message_size = 1000\nrecipient = "local"\n'
            'recipient_delimiter = "-"\ndetail_folders = true\n',
        )
    )
    assert settings.lmtp_listen == ("unix:/run/popd/lmtp",)
    assert settings.smtp_listen == ("tcp:2525:interface=127.0.0.1",)
    assert settings.max_message_size == 1000
    assert settings.delivery_recipient == "local"
    assert settings.recipient_delimiter == "-"
    assert settings.detail_folders is True
    off = load_settings(
        write(tmp_path, '[lmtp]\nlisten = []\n[delivery]\nrecipient_delimiter = ""\n')
    )
    assert off.lmtp_listen == () and off.recipient_delimiter == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[lmtp]\nlisten = 24\n", "[lmtp] listen must be a list"),
        ('[smtp]\nlisten = [""]\n', "[smtp] listen must be a list of non-empty"),
        ("[delivery]\nmax_message_size = 0\n", "[delivery] max_message_size"),
        ("[delivery]\nmax_message_size = 1.5\n", "[delivery] max_message_size"),
        ('[delivery]\nrecipient = "domain"\n', "[delivery] recipient must be one of"),
        ('[delivery]\nrecipient_delimiter = "ab"\n', "[delivery] recipient_delimiter"),
        ('[delivery]\nrecipient_delimiter = "@"\n', "[delivery] recipient_delimiter"),
        ('[delivery]\ndetail_folders = "yes"\n', "[delivery] detail_folders"),
        ("[delivery]\nmax_size = 1\n", "unknown key [delivery] max_size"),
        ("[lmtp]\nport = 24\n", "unknown key [lmtp] port"),
    ],
)
def test_delivery_mistakes_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text))
    assert message in str(error.value)


# SASL: [auth] mechanisms, [auth] external, [tls] client_ca


def test_sasl_defaults(tmp_path, monkeypatch):
    from popd import sasl
    from popd.config import DEFAULT_SASL_MECHANISMS

    monkeypatch.chdir(tmp_path)
    settings = load_settings()
    assert settings.sasl_mechanisms == DEFAULT_SASL_MECHANISMS
    assert DEFAULT_SASL_MECHANISMS == sasl.DEFAULT_MECHANISMS
    assert settings.external is False and settings.tls_client_ca is None


def test_sasl_keys(tmp_path):
    settings = load_settings(
        write(
            tmp_path,
            '[tls]\nclient_ca = "ca.pem"\n'
            '[auth]\nmechanisms = ["plain", "SCRAM-SHA-256"]\nexternal = true\n',
        )
    )
    assert settings.sasl_mechanisms == ("PLAIN", "SCRAM-SHA-256", "EXTERNAL")
    assert settings.external is True
    assert settings.tls_client_ca == tmp_path / "ca.pem"
    listed = load_settings(
        write(
            tmp_path,
            '[tls]\nclient_ca = "ca.pem"\n'
            '[auth]\nmechanisms = ["EXTERNAL", "PLAIN"]\nexternal = true\n',
        )
    )
    assert listed.sasl_mechanisms == ("EXTERNAL", "PLAIN")
    none = load_settings(write(tmp_path, "[auth]\nmechanisms = []\n"))
    assert none.sasl_mechanisms == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[auth]\nmechanisms = "PLAIN"\n', "[auth] mechanisms must be a list"),
        ('[auth]\nmechanisms = ["PLAIN AUTH"]\n', "is not a SASL mechanism name"),
        ('[auth]\nmechanisms = ["PLAIN", "plain"]\n', "named twice"),
        ("[auth]\nexternal = true\n", "[auth] external = true needs [tls] client_ca"),
        ('[auth]\nexternal = "yes"\n', "[auth] external must be a bool"),
        ('[auth]\nmechanisms = ["EXTERNAL"]\n', "EXTERNAL needs [auth] external"),
        ("[tls]\nclient_ca = 1\n", "[tls] client_ca must be a str"),
    ],
)
def test_sasl_mistakes_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as error:
        load_settings(write(tmp_path, text))
    assert message in str(error.value)


# [auth] checkers, failure_delay, sql_dsn, sql_query


def test_auth_checker_keys(tmp_path):
    config = write(
        tmp_path,
        "[auth]\n"
        'checkers = ["passwd-file:users", "sql", "pam:popd"]\n'
        "failure_delay = 0.5\n"
        'sql_dsn = "sqlite:db/users.db"\n'
        'sql_query = "SELECT pw FROM u WHERE n = lower(:user)"\n',
    )
    settings = load_settings(config)
    assert settings.checkers == (f"passwd-file:{tmp_path / 'users'}", "sql", "pam:popd")
    assert settings.failure_delay == 0.5
    assert settings.sql_dsn == f"sqlite:///{tmp_path / 'db' / 'users.db'}"
    assert settings.sql_query == "SELECT pw FROM u WHERE n = lower(:user)"


def test_auth_checker_defaults(tmp_path):
    settings = load_settings(None, tmp_path)
    assert settings.failure_delay == 2.0
    assert settings.sql_dsn == f"sqlite:///{tmp_path / 'popd.sqlite3'}"
    assert settings.sql_query == "SELECT password FROM users WHERE username = :user"
    assert settings.checkers == (f"passwd-file:{tmp_path / 'passwd'}",)


def test_sql_users_default_to_the_sql_store_database(tmp_path):
    config = write(tmp_path, '[maildrop]\ntype = "sql"\ndsn = "postgresql://db/mail"\n')
    assert load_settings(config).sql_dsn == "postgresql://db/mail"


@pytest.mark.parametrize(
    "text, message",
    [
        ('checkers = "passwd-file:x"', r"\[auth\] checkers must be a list"),
        ('checkers = [":x"]', r"\[auth\] checkers: ':x' is not KIND:ARGUMENTS"),
        ('checkers = ["passwd-file:"]', r"\[auth\] checkers: passwd-file needs a path"),
        ("failure_delay = -1", r"\[auth\] failure_delay must be at least 0"),
        ('failure_delay = "2"', r"\[auth\] failure_delay must be a int or float"),
        ('sql_query = "SELECT 1"', r"\[auth\] sql_query: the query must use :user"),
        ("sql_dsn = 5", r"\[auth\] sql_dsn must be a str"),
    ],
)
def test_auth_checker_mistakes_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, f"[auth]\n{text}\n"))


# Running it for real: [server] workers, trusted_proxies, log_format,
# log_file; [pop3]/[pop3s] proxy_protocol; [tls] ciphers, sni; [limits]
# max_connections, max_connections_per_ip; [metrics] listen


def test_operations_defaults(tmp_path):
    settings = load_settings(None, tmp_path)
    assert settings.workers == 1
    assert settings.trusted_proxies == ()
    assert not settings.pop3_proxy_protocol and not settings.pop3s_proxy_protocol
    assert settings.log_format == "text" and settings.log_file is None
    assert settings.tls_ciphers is None and settings.tls_sni == ()
    assert settings.max_connections == 10000
    assert settings.max_connections_per_ip == 50
    assert settings.metrics_listen == ()


def test_operations_keys(tmp_path):
    from popd.config import SNICertificate

    config = write(
        tmp_path,
        "[server]\n"
        "workers = 4\n"
        'trusted_proxies = ["10.0.0.0/24", "2001:db8::/64"]\n'
        'log_format = "json"\n'
        'log_file = "log/popd.json"\n'
        "[pop3]\nproxy_protocol = true\n"
        "[pop3s]\nproxy_protocol = true\n"
        "[tls]\n"
        'ciphers = "ECDHE+AESGCM"\n'
        '[tls.sni."Pop.Example.org"]\ncertificate = "a.pem"\nkey = "a.key"\n'
        "[limits]\nmax_connections = 500\nmax_connections_per_ip = 0\n"
        '[metrics]\nlisten = ["tcp:9110:interface=127.0.0.1"]\n',
    )
    settings = load_settings(config)
    assert settings.workers == 4
    assert settings.trusted_proxies == ("10.0.0.0/24", "2001:db8::/64")
    assert settings.pop3_proxy_protocol and settings.pop3s_proxy_protocol
    assert settings.log_format == "json"
    assert settings.log_file == tmp_path / "log" / "popd.json"
    assert settings.tls_ciphers == "ECDHE+AESGCM"
    assert settings.tls_sni == (
        SNICertificate(("pop.example.org",), tmp_path / "a.pem", tmp_path / "a.key"),
    )
    assert settings.max_connections == 500
    assert settings.max_connections_per_ip == 0
    assert settings.metrics_listen == ("tcp:9110:interface=127.0.0.1",)


def test_workers_auto_is_one_per_core(tmp_path):
    import os

    settings = load_settings(write(tmp_path, '[server]\nworkers = "auto"\n'))
    assert settings.workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[server]\nworkers = 0\n", r'\[server\] workers must be "auto" or a number'),
        ('[server]\nworkers = "many"\n', r"\[server\] workers must be"),
        ('[server]\ntrusted_proxies = ["x"]\n', r"\[server\] trusted_proxies: 'x'"),
        ('[server]\nlog_format = "xml"\n', r"\[server\] log_format must be one of"),
        ("[pop3]\nproxy_protocol = true\n", r"\[pop3\] proxy_protocol = true needs"),
        ('[pop3s]\nproxy_protocol = "yes"\n', r"\[pop3s\] proxy_protocol must be"),
        ('[tls]\nciphers = " "\n', r"\[tls\] ciphers must be an OpenSSL"),
        ('[tls]\nsni = "x"\n', r"\[tls\] sni must be a dict or list"),
        ('[tls.sni."a.example"]\nkey = "k"\n', r"\[tls\] sni 'a.example' needs cert"),
        (
            '[tls.sni."bad name!"]\ncertificate = "c"\nkey = "k"\n',
            r"'bad name!' is not a host name",
        ),
        (
            '[[tls.sni]]\ncertificate = "c"\nkey = "k"\n',
            r"\[tls\] sni entry 1 names no host",
        ),
        (
            '[[tls.sni]]\nname = "a.example"\ncertificate = "c"\nkey = "k"\n'
            '[[tls.sni]]\nname = "A.example"\ncertificate = "c"\nkey = "k"\n',
            r"a.example is named twice",
        ),
        (
            '[[tls.sni]]\nname = "a.example"\ncertificate = "c"\nkey = "k"\nx = 1\n',
            r"unknown key \[tls\] sni entry 1 x",
        ),
        ("[limits]\nmax_connections = -1\n", r"\[limits\] max_connections must be"),
        ("[limits]\nmax_connections_per_ip = 1.5\n", r"max_connections_per_ip must"),
        ('[metrics]\nlisten = "tcp:9110"\n', r"\[metrics\] listen must be a list"),
        ("[metrics]\nport = 1\n", r"unknown key \[metrics\] port"),
    ],
)
def test_operations_mistakes_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(write(tmp_path, text))


def test_maildir_cache_settings(tmp_path):
    settings = load_settings(
        write(tmp_path, "[maildrop]\ncache_messages = 1000\nindex = false\n")
    )
    assert (settings.maildir_cache_messages, settings.maildir_index) == (1000, False)
    defaults = load_settings(write(tmp_path, ""))
    assert (defaults.maildir_cache_messages, defaults.maildir_index) == (250_000, True)


def test_maildir_cache_settings_reach_the_store(tmp_path):
    from popd.service import build_provider

    text = "[maildrop]\ncache_messages = 0\nindex = false\n"
    provider = build_provider(load_settings(write(tmp_path, text)))
    assert provider._snapshots is None and provider._index is False
    provider = build_provider(load_settings(write(tmp_path, "")))
    assert provider._snapshots.capacity == 250_000 and provider._index is True
