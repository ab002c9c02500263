"""
End to end: the failure delay of a real C{twistd -n popd} holds back the
clients that fail, all at once and without blocking, while a client with
the right password gets in at once.

Fifty clients fail together, each from an address of its own in 127/8 and
for a user of its own, so each gets the plain failure delay (2 s) and no
penalty; a good client logs in meanwhile.  Were the delay a sleep, the good
client would wait behind them and the fifty replies would take 100 s.
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.popd_e2e import HOST, PopdServer, ServerFailed, config_text

from popd.auth.schemes import hash_password

FAILING = 50
FAILURE_DELAY = 2.0
# What a login takes without any delay, with room for a slow machine.
GOOD_LOGIN_BOUND = 1.5
# Every wait on a socket.
SOCKET_TIMEOUT = 30.0


@pytest.fixture
def server(tmp_path, pki):
    directory = tmp_path / "server"
    directory.mkdir()
    config = directory / "popd.toml"
    config.write_text(config_text(pki, extra=f"failure_delay = {FAILURE_DELAY}\n"))
    data = directory / "data"
    data.mkdir(mode=0o700)
    # Cheap hashes: the test is about delays, not the cost of hashing.
    users = {f"fail{i}": f"pw{i}" for i in range(FAILING)} | {"good": "good-pw"}
    (data / "passwd").write_text(
        "".join(
            f"{user}:{hash_password(pw.encode(), 'SHA512-CRYPT', rounds=1000)}\n"
            for user, pw in users.items()
        )
    )
    server = PopdServer(directory, config).start()
    yield server
    try:
        server.finish()
    except ServerFailed as error:
        pytest.fail(str(error), pytrace=False)


class Client:
    """
    A bare POP3 connection from a chosen loopback address.
    """

    def __init__(self, port: int, source: str = HOST) -> None:
        self.sock = socket.create_connection(
            (HOST, port), timeout=SOCKET_TIMEOUT, source_address=(source, 0)
        )
        self.file = self.sock.makefile("rb")
        assert self.line().startswith(b"+OK")

    def line(self) -> bytes:
        return self.file.readline(4096)

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_failing_clients_wait_together_and_never_slow_a_good_login(server):
    port = server.pop3_port
    failing = [Client(port, f"127.0.0.{10 + i}") for i in range(FAILING)]
    try:
        for i, client in enumerate(failing):
            assert client.command(f"USER fail{i}") == b"+OK\r\n"
        sent = []
        for client in failing:
            client.sock.sendall(b"PASS wrong-password-xyz\r\n")
            sent.append(time.monotonic())

        def reply(index: int) -> tuple[bytes, float]:
            line = failing[index].line()
            return line, time.monotonic() - sent[index]

        with ThreadPoolExecutor(max_workers=FAILING) as pool:
            replies = pool.map(reply, range(FAILING))
            # The failing clients are now all waiting for their replies.
            time.sleep(0.2)
            good = Client(port)
            try:
                assert good.command("USER good") == b"+OK\r\n"
                started = time.monotonic()
                answer = good.command("PASS good-pw")
                good_login = time.monotonic() - started
                good_done = time.monotonic()
                assert answer.startswith(b"+OK Logged in"), answer
                assert good.command("QUIT").startswith(b"+OK")
            finally:
                good.close()
            results = list(replies)
        first_failure_reply = min(sent) + min(elapsed for _, elapsed in results)
    finally:
        for client in failing:
            client.close()

    assert good_login < GOOD_LOGIN_BOUND, good_login
    assert good_done < first_failure_reply
    for line, elapsed in results:
        assert line == b"-ERR [AUTH] Authentication failed.\r\n"
        assert FAILURE_DELAY - 0.05 <= elapsed < FAILURE_DELAY + 5, elapsed
    output = server.output()
    assert "login failed user=fail7 client=127.0.0.17 mechanism=USER" in output
    assert "login user=good client=127.0.0.1 mechanism=USER" in output
    assert "wrong-password-xyz" not in output and "good-pw" not in output
