"""
C{twistd -n popd} with no configuration at all, the way the README starts
it: the embedded defaults (POP3 + STLS on 127.0.0.1:1110, POP3S on
127.0.0.1:1995, C{./popd-data}, a self-signed certificate made at first
start), and the admin command on the same defaults.  Also: a broken
configuration stops twistd with one line naming the key or the file.
"""

from __future__ import annotations

import errno
import poplib
import re
import socket
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from helpers.popd_e2e import (
    MESSAGES,
    PopdServer,
    ServerFailed,
    downloaded,
    popd_env,
    run_cli,
    twistd_command,
)

pytestmark = pytest.mark.e2e

PORTS = {"POP3": 1110, "POP3S": 1995}
LMTP_PORT = 24024
PASSWORD = "defaults-pass"


def port_busy(port: int) -> bool:
    """
    Whether 127.0.0.1:PORT cannot be listened on, the way twistd binds.
    """
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return True
            raise
    return False


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    for port in (*PORTS.values(), LMTP_PORT):
        if port_busy(port):
            pytest.skip(f"127.0.0.1:{port} is busy: cannot run popd on its defaults")
    directory = tmp_path_factory.mktemp("defaults")
    server = PopdServer(directory, None)
    try:
        server.start()
    except ServerFailed as error:
        if "Address already in use" in str(error):
            pytest.skip(f"the default ports were taken meanwhile: {error}")
        raise
    yield server
    server.finish()


@pytest.fixture(scope="module")
def mail(server) -> dict[str, bytes]:
    """
    A user added and mail delivered with the admin command on its defaults
    (the same working directory, no --config): UID -> message.
    """
    run_cli(
        "adduser",
        "dee",
        "--password-stdin",
        cwd=server.directory,
        stdin=PASSWORD.encode() + b"\n",
    )
    names = ("plain", "dots", "eight_bit", "no_final_newline", "crlf")
    uids = [
        run_cli("deliver", "-v", "dee", cwd=server.directory, stdin=MESSAGES[name])
        .stdout.split()[2]
        .decode()
        for name in names
    ]
    return dict(zip(uids, (MESSAGES[name] for name in names), strict=True))


def generated_ca(server) -> ssl.SSLContext:
    return ssl.create_default_context(
        cafile=str(server.directory / "popd-data" / "tls" / "cert.pem")
    )


def check_mailbox(client: poplib.POP3, expected: dict[str, bytes]) -> None:
    client.user("dee")
    client.pass_(PASSWORD)
    _reply, lines, _octets = client.uidl()
    numbers = dict(line.decode().split() for line in lines)
    assert sorted(numbers.values()) == sorted(expected)
    for number, uid in numbers.items():
        _reply, message_lines, _octets = client.retr(int(number))
        got = b"".join(line + b"\r\n" for line in message_lines)
        assert got == downloaded(expected[uid]), f"message {number}"


def test_listens_on_the_default_ports(server):
    assert server.ports == {"POP3": [1110], "POP3S": [1995]}
    lines = [line for line in server.output().splitlines() if "listening on" in line]
    assert len(lines) == 3, lines
    assert any(f"LMTP listening on 127.0.0.1:{LMTP_PORT} " in line for line in lines)
    assert any("POP3 listening on 127.0.0.1:1110 " in line for line in lines), lines
    assert any("POP3S listening on 127.0.0.1:1995 " in line for line in lines), lines


def test_created_data_dir_and_certificate(server):
    tls = server.directory / "popd-data" / "tls"
    assert (tls / "cert.pem").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    key_mode = stat.S_IMODE((tls / "key.pem").stat().st_mode)
    assert key_mode & 0o077 == 0, oct(key_mode)


def test_admin_command_uses_the_same_defaults(server, mail):
    passwd = server.directory / "popd-data" / "passwd"
    assert re.search(rb"^dee:\{ARGON2ID\}", passwd.read_bytes(), re.MULTILINE)
    assert stat.S_IMODE(passwd.stat().st_mode) & 0o077 == 0
    assert (
        server.directory / "popd-data" / "mail" / "dee" / "Maildir" / "new"
    ).is_dir()


def test_pop3s_with_generated_certificate(server, mail):
    client = poplib.POP3_SSL(
        "localhost", 1995, timeout=30, context=generated_ca(server)
    )
    try:
        check_mailbox(client, mail)
    finally:
        client.quit()


def test_plain_then_stls(server, mail):
    client = poplib.POP3("localhost", 1110, timeout=30)
    try:
        assert "STLS" in client.capa()
        client.stls(context=generated_ca(server))
        assert "STLS" not in client.capa()
        check_mailbox(client, mail)
    finally:
        client.quit()


def test_plain_from_loopback(server, mail):
    client = poplib.POP3("127.0.0.1", 1110, timeout=30)
    try:
        check_mailbox(client, mail)
    finally:
        client.quit()


# A broken configuration


def run_twistd(directory: Path, *arguments: str) -> tuple[int, str]:
    result = subprocess.run(
        twistd_command(*arguments),
        cwd=directory,
        env=popd_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


LISTEN_ANYWHERE = (
    '[pop3]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
    '[pop3s]\nlisten = ["tcp:0:interface=127.0.0.1"]\n'
)


def test_unknown_key_is_one_line(tmp_path):
    config = tmp_path / "popd.toml"
    config.write_text(LISTEN_ANYWHERE + '[auth]\nplaintxt = "always"\n')
    code, output = run_twistd(tmp_path, "--config", str(config))
    assert code != 0, output
    assert "Traceback" not in output, output
    naming = [line for line in output.splitlines() if "plaintxt" in line]
    assert len(naming) == 1, output
    assert "[auth]" in naming[0], output
    assert not (tmp_path / "popd-data").exists()


def test_missing_certificate_is_one_line(tmp_path):
    config = tmp_path / "popd.toml"
    config.write_text(
        LISTEN_ANYWHERE + '[tls]\ncertificate = "missing.pem"\nkey = "missing.key"\n'
    )
    code, output = run_twistd(tmp_path, "--config", str(config))
    assert code != 0, output
    assert "Traceback" not in output, output
    naming = [line for line in output.splitlines() if "missing.pem" in line]
    assert len(naming) == 1, output
    assert "listening on" not in output, output


def test_check_config_names_the_key(tmp_path):
    config = tmp_path / "popd.toml"
    config.write_text("[limits]\nmax_bad_comands = 3\n")
    result = run_cli("check-config", str(config), cwd=tmp_path, check=False)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 78, output  # EX_CONFIG
    assert "Traceback" not in output
    assert output.strip().count("\n") == 0, output
    assert "max_bad_comands" in output


def test_missing_config_file_is_one_line(tmp_path):
    code, output = run_twistd(tmp_path, "--config", str(tmp_path / "absent.toml"))
    assert code != 0, output
    assert "Traceback" not in output, output
    naming = [line for line in output.splitlines() if "absent.toml" in line]
    assert len(naming) == 1, output


def test_check_config_names_the_missing_certificate(tmp_path):
    config = tmp_path / "popd.toml"
    config.write_text('[tls]\ncertificate = "gone.pem"\nkey = "gone.key"\n')
    (tmp_path / "popd-data").mkdir()
    (tmp_path / "popd-data" / "passwd").write_text("")
    result = run_cli("check-config", str(config), cwd=tmp_path, check=False)
    output = (result.stdout + result.stderr).decode()
    assert result.returncode == 78, output
    assert "Traceback" not in output
    assert output.strip().count("\n") == 0, output
    assert "gone.pem" in output
