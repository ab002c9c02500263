"""
The popd admin command against the same defaults as twistd popd.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from popd.auth.passwdfile import PasswdFile
from popd.auth.schemes import verify_password
from popd.cli import EX_CONFIG, EX_NOUSER, main

REPO = Path(__file__).resolve().parent.parent


class Stdin:
    def __init__(self, data: bytes) -> None:
        self.buffer = io.BytesIO(data)


def run(monkeypatch, argv, stdin=b""):
    monkeypatch.setattr(sys, "stdin", Stdin(stdin))
    return main(argv)


def popd(cwd: Path, *argv: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "popd.cli", *argv],
        input=stdin,
        capture_output=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )


def test_adduser_writes_a_strong_hash_under_the_default_data_dir(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert run(monkeypatch, ["adduser", "alice", "--password-stdin"], b"s3cret\n") == 0
    entry = PasswdFile(tmp_path / "popd-data" / "passwd").lookup("alice")
    assert entry.password.startswith("{ARGON2ID}$argon2id$")
    assert verify_password(entry.password, b"s3cret")
    assert not verify_password(entry.password, b"s3cret\n")
    assert "added alice" in capsys.readouterr().out


def test_adduser_twice_refused_and_passwd_changes(tmp_path, monkeypatch, capsys):
    args = ["--data-dir", str(tmp_path)]
    assert (
        run(monkeypatch, [*args, "adduser", "bob", "--password-stdin"], b"one\n") == 0
    )
    assert (
        run(monkeypatch, [*args, "adduser", "bob", "--password-stdin"], b"two\n") == 1
    )
    assert "already exists" in capsys.readouterr().err
    assert (
        run(
            monkeypatch,
            [*args, "passwd", "bob", "--password-stdin", "--scheme", "sha512-crypt"],
            b"two\n",
        )
        == 0
    )
    entry = PasswdFile(tmp_path / "passwd").lookup("bob")
    assert entry.password.startswith("{SHA512-CRYPT}$6$")
    assert verify_password(entry.password, b"two")


def test_passwd_of_unknown_user(tmp_path, monkeypatch, capsys):
    argv = ["--data-dir", str(tmp_path), "passwd", "nobody", "--password-stdin"]
    assert run(monkeypatch, argv, b"x\n") == EX_NOUSER
    assert "no user nobody" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["a:b", "a b", "", "a\x00b"])
def test_adduser_rejects_bad_names(tmp_path, monkeypatch, capsys, name):
    argv = ["--data-dir", str(tmp_path), "adduser", name, "--password-stdin"]
    assert run(monkeypatch, argv, b"pw\n") != 0
    assert capsys.readouterr().err.startswith("popd: ")


def test_empty_password_refused(tmp_path, monkeypatch, capsys):
    argv = ["--data-dir", str(tmp_path), "adduser", "carol", "--password-stdin"]
    assert run(monkeypatch, argv, b"\n") != 0
    assert "empty" in capsys.readouterr().err


@pytest.mark.parametrize(
    "scheme, prefix",
    [
        ("ARGON2ID", "{ARGON2ID}$argon2id$"),
        ("SHA512-CRYPT", "{SHA512-CRYPT}$6$"),
        ("BLF-CRYPT", "{BLF-CRYPT}$2y$"),
        ("SSHA512", "{SSHA512}"),
    ],
)
def test_hash_prints_a_passwd_file_value(monkeypatch, capsys, scheme, prefix):
    assert (
        run(monkeypatch, ["hash", "--password-stdin", "--scheme", scheme], b"pw\n") == 0
    )
    printed = capsys.readouterr().out.strip()
    assert printed.startswith(prefix)
    assert verify_password(printed, b"pw")


def test_check_config(tmp_path, monkeypatch, capsys):
    good = tmp_path / "good.toml"
    good.write_text(f'[server]\ndata_dir = "{tmp_path}"\n')
    (tmp_path / "passwd").write_text("")
    assert run(monkeypatch, ["check-config", str(good)]) == 0
    assert "configuration OK" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text('[auth]\nplaintext = "maybe"\n')
    assert run(monkeypatch, ["check-config", str(bad)]) == EX_CONFIG
    assert "[auth] plaintext" in capsys.readouterr().err


def test_check_config_names_unreadable_certificate(tmp_path, monkeypatch, capsys):
    config = tmp_path / "popd.toml"
    config.write_text('[tls]\ncertificate = "missing.pem"\nkey = "missing.key"\n')
    assert run(monkeypatch, ["check-config", str(config)]) == EX_CONFIG
    assert "missing.pem" in capsys.readouterr().err


def test_deliver_writes_a_durable_maildir_message(tmp_path):
    assert (
        popd(tmp_path, "adduser", "alice", "--password-stdin", stdin=b"pw\n").returncode
        == 0
    )
    message = b"Subject: hi\n\n.dot line\nbody\n"
    result = popd(tmp_path, "deliver", "alice", stdin=message)
    assert result.returncode == 0, result.stderr
    new = tmp_path / "popd-data" / "mail" / "alice" / "Maildir" / "new"
    (stored,) = list(new.iterdir())
    assert stored.read_bytes() == message
    assert not list((new.parent / "tmp").iterdir())


def test_deliver_to_unknown_user_is_ex_nouser(tmp_path):
    result = popd(tmp_path, "deliver", "ghost", stdin=b"x\n")
    assert result.returncode == EX_NOUSER
    assert b"no user ghost" in result.stderr
    assert b"Traceback" not in result.stderr


def test_db_upgrade_and_status_on_sqlite(tmp_path, monkeypatch, capsys):
    config = tmp_path / "popd.toml"
    config.write_text('[maildrop]\ntype = "sql"\ndsn = "sqlite:mail.db"\n')
    assert run(monkeypatch, ["--config", str(config), "db", "status"]) == 1
    assert "schema version 0 of" in capsys.readouterr().out
    assert run(monkeypatch, ["--config", str(config), "db", "upgrade"]) == 0
    assert "applied migration" in capsys.readouterr().out
    assert run(monkeypatch, ["--config", str(config), "db", "upgrade"]) == 0
    assert "applied migration" not in capsys.readouterr().out
    assert run(monkeypatch, ["--config", str(config), "db", "status"]) == 0


def test_db_needs_the_sql_store(tmp_path, monkeypatch, capsys):
    assert run(monkeypatch, ["--data-dir", str(tmp_path), "db", "status"]) == EX_CONFIG
    assert "only the SQL store has a schema" in capsys.readouterr().err


def test_check_config_reports_the_store(tmp_path, monkeypatch, capsys):
    (tmp_path / "passwd").write_text("")
    config = tmp_path / "popd.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path}"\n'
        '[maildrop]\ntype = "sql"\ndsn = "sqlite:m.db"\n'
    )
    assert run(monkeypatch, ["check-config", str(config)]) == EX_CONFIG
    assert "run `popd db upgrade`" in capsys.readouterr().err
    assert run(monkeypatch, ["--config", str(config), "db", "upgrade"]) == 0
    assert run(monkeypatch, ["check-config", str(config)]) == 0
    assert "SQL store at schema version" in capsys.readouterr().out


def test_check_config_names_an_unknown_checker(tmp_path, monkeypatch, capsys):
    config = tmp_path / "popd.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path}"\n[auth]\ncheckers = ["ldap:x"]\n'
    )
    assert run(monkeypatch, ["check-config", str(config)]) == EX_CONFIG
    assert "no checker plug-in named 'ldap'" in capsys.readouterr().err
