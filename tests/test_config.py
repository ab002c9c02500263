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
