"""
popd under systemd: the units in C{etc/systemd/} pass C{systemd-analyze
verify}, and C{systemd:} endpoints serve sockets handed over the way
systemd's socket activation does (C{LISTEN_FDS}, C{LISTEN_PID}).
"""

from __future__ import annotations

import configparser
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers.ops_e2e import LaunchedPopd, wait_for
from helpers.popd_e2e import REPO, RawPOP3, config_text, twistd_command

UNITS = REPO / "etc" / "systemd"
UNIT_NAMES = ("popd.service", "popd.socket", "popd-activated.service")


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string((UNITS / name).read_text())
    return parser


def test_units_exist_and_say_what_they_must():
    service = unit("popd.service")["Service"]
    assert service["ExecStart"].startswith("/usr/bin/twistd --nodaemon --pidfile= ")
    assert service["ExecStart"].endswith(" popd --config /etc/popd/popd.toml")
    assert "--uid popd" in service["ExecStart"]
    for option in ("ProtectSystem", "NoNewPrivileges", "PrivateTmp", "ExecReload"):
        assert option in service, option
    socket = (UNITS / "popd.socket").read_text()
    listens = [
        line.split("=", 1)[1]
        for line in socket.splitlines()
        if line.startswith("ListenStream=")
    ]
    assert listens == ["110", "995", "127.0.0.1:24"]
    activated = unit("popd-activated.service")
    assert activated["Service"]["User"] == "popd"
    assert activated["Unit"]["Requires"] == "popd.socket"
    assert unit("popd.socket")["Socket"]["Service"] == "popd-activated.service"


def test_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    # The units name /usr/bin/twistd, which verify wants to exist: point
    # them at this environment's twistd.
    twistd = Path(sys.executable).with_name("twistd")
    if not twistd.exists():
        pytest.skip(f"no twistd next to {sys.executable}")
    for name in UNIT_NAMES:
        text = (UNITS / name).read_text().replace("/usr/bin/twistd", str(twistd))
        (tmp_path / name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", *(f"./{name}" for name in UNIT_NAMES)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


#: Binds the listening sockets, puts them at descriptors 3, 4, ... and
#: becomes twistd with LISTEN_FDS and LISTEN_PID set (exec keeps the pid),
#: as systemd does for a socket-activated service.
LAUNCHER = textwrap.dedent(
    """
    import json, os, socket, sys
    count, command = int(sys.argv[1]), json.loads(sys.argv[2])
    sockets = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(50)
        sockets.append(sock)
    high = [os.dup(sock.fileno()) for sock in sockets]
    for sock in sockets:
        sock.close()
    for index, descriptor in enumerate(high):
        os.dup2(descriptor, 3 + index)
        os.set_inheritable(3 + index, True)
        os.close(descriptor)
    os.environ["LISTEN_FDS"] = str(count)
    os.environ["LISTEN_PID"] = str(os.getpid())
    # systemd names every socket (by default after the .socket unit), and
    # Twisted wants as many names as descriptors.
    os.environ["LISTEN_FDNAMES"] = ":".join(["popd.socket"] * count)
    os.execv(command[0], command)
    """
)


def activated(tmp_path: Path, pki, extra: str = "") -> LaunchedPopd:
    config = tmp_path / "popd.toml"
    config.write_text(
        config_text(
            pki,
            plaintext="always",
            pop3_listen=["systemd:domain=INET:index=0"],
            pop3s_listen=["systemd:domain=INET:index=1"],
            server_extra=extra,
        )
    )
    command = [
        sys.executable,
        "-c",
        LAUNCHER,
        "2",
        json.dumps(twistd_command("--config", str(config))),
    ]
    return LaunchedPopd(tmp_path, config, command)


def retrieve(server, user: str) -> bytes:
    with RawPOP3(server.pop3_port) as client:
        assert client.command(f"USER {user}").startswith(b"+OK")
        assert client.command("PASS socket-pass").startswith(b"+OK")
        assert client.command("RETR 1").startswith(b"+OK")
        body = client.body()
        assert client.command("QUIT").startswith(b"+OK")
        return body


def test_socket_activation(tmp_path, pki):
    server = activated(tmp_path, pki).start()
    try:
        server.add_plain_user("sam", "socket-pass")
        server.deliver("sam", b"Subject: activated\n\nhello\n")
        assert b"hello" in retrieve(server, "sam")
        output = server.output()
        assert "POP3 listening on 127.0.0.1:" in output
        assert "(systemd:domain=INET:index=0)" in output
        assert "(systemd:domain=INET:index=1)" in output
        with RawPOP3(server.pop3s_port, context=pki.client_context()) as secure:
            assert secure.greeting.startswith(b"+OK")
    finally:
        output = server.stop()
    assert "Traceback" not in output, output


def test_socket_activation_with_workers(tmp_path, pki):
    server = activated(tmp_path, pki, extra="workers = 2").start()
    try:
        wait_for(lambda: server.output().count("POP3 accepting on") >= 2, timeout=30)
        server.add_plain_user("sue", "socket-pass")
        server.deliver("sue", b"Subject: activated\n\nhello workers\n")
        assert b"hello workers" in retrieve(server, "sue")
    finally:
        output = server.stop()
    assert "Traceback" not in output, output
