"""
End to end: several listeners from Twisted endpoint strings, a UNIX
socket among them (README: C{unix:/run/popd.sock} works), each announced
by one log line, all serving the same users and mail.
"""

from __future__ import annotations

import poplib
import shutil
import socket
import tempfile
from pathlib import Path

import pytest
from helpers.popd_e2e import (
    CLIENT_TIMEOUT,
    MESSAGES,
    PopdServer,
    ServerFailed,
    config_text,
    downloaded,
    joined,
    wire_form,
)

pytestmark = pytest.mark.e2e

PASSWORD = "many-doors"


@pytest.fixture(scope="module")
def socket_path():
    # Short, whatever the temporary directory: sun_path holds 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="popd-", dir="/tmp"))
    yield directory / "pop3.sock"
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def server(popd_factory, socket_path):
    server = popd_factory(
        "listeners",
        pop3_listen=[
            "tcp:0:interface=127.0.0.1",
            "tcp:0:interface=127.0.0.1:backlog=20",
            f"unix:{socket_path}",
        ],
    )
    server.add_plain_user("una", PASSWORD)
    server.deliver("una", MESSAGES["dots"])
    return server


def listening_lines(server) -> list[str]:
    return [line for line in server.output().splitlines() if " listening on " in line]


def test_one_line_per_listener(server, socket_path):
    lines = listening_lines(server)
    assert len(lines) == 4, lines
    assert len(server.ports["POP3"]) == 2 and len(server.ports["POP3S"]) == 1
    assert len(set(server.ports["POP3"] + server.ports["POP3S"])) == 3


def test_unix_listener_is_named_by_its_path(server, socket_path):
    (line,) = [line for line in listening_lines(server) if "unix:" in line]
    assert f"POP3 listening on {socket_path} (unix:{socket_path})" in line, line


@pytest.mark.parametrize("which", [0, 1])
def test_each_tcp_listener_serves(server, which):
    client = poplib.POP3("127.0.0.1", server.ports["POP3"][which], timeout=30)
    try:
        client.user("una")
        client.pass_(PASSWORD)
        assert joined(client.retr(1)[1]) == downloaded(MESSAGES["dots"])
    finally:
        client.quit()


def test_unix_socket_serves(server, socket_path):
    with socket.socket(socket.AF_UNIX) as unix:
        unix.settimeout(CLIENT_TIMEOUT)
        unix.connect(str(socket_path))
        replies = unix.makefile("rb")
        assert replies.readline().startswith(b"+OK")
        # A local socket is as trusted as loopback: USER/PASS without TLS.
        unix.sendall(f"USER una\r\nPASS {PASSWORD}\r\nRETR 1\r\n".encode())
        assert replies.readline().startswith(b"+OK")
        assert replies.readline().startswith(b"+OK")
        assert replies.readline().startswith(b"+OK")
        body = b""
        while not body.endswith(b"\n.\r\n"):
            line = replies.readline()
            assert line, "connection closed in the middle of RETR"
            body += line
        unix.sendall(b"QUIT\r\n")
        assert replies.readline().startswith(b"+OK")
    assert body == wire_form(MESSAGES["dots"])


def test_same_endpoint_twice(pki, tmp_path):
    """
    The same endpoint string twice in one C{listen} list: either two
    listeners (C{tcp:0} gives each its own port) or a one-line message
    naming the key, never a traceback.
    """
    config = tmp_path / "popd.toml"
    config.write_text(config_text(pki, pop3_listen=["tcp:0:interface=127.0.0.1"] * 2))
    server = PopdServer(tmp_path, config)
    try:
        server.start()
    except ServerFailed as error:
        output = str(error)
        assert "Traceback" not in output, output
        assert "[pop3] listen" in output, output
    else:
        try:
            assert len(server.ports["POP3"]) == 2, server.output()
        finally:
            server.finish()
