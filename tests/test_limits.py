"""
Connection limits (L{popd.limits}): overall and per client address,
answered with C{-ERR [SYS/TEMP] Too many connections} and a close.
"""

from __future__ import annotations

import socket

import pytest
from helpers.ops_e2e import insecure_client, wait_for
from helpers.popd_e2e import HOST, fresh_loopback
from test_proxy_protocol import v1
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from popd.limits import (
    REFUSED_LINGER,
    TOO_MANY,
    ConnectionLimiter,
    LimitedFactory,
    limits_per_worker,
)

# The limiter


def test_per_address_and_overall():
    limiter = ConnectionLimiter(max_connections=3, max_per_address=2)
    assert limiter.acquire("192.0.2.1") is None
    assert limiter.acquire("192.0.2.1") is None
    assert limiter.acquire("192.0.2.1") == "max_connections_per_ip"
    assert limiter.acquire("192.0.2.2") is None
    assert limiter.acquire("192.0.2.3") == "max_connections"
    limiter.release("192.0.2.1")
    assert limiter.count("192.0.2.1") == 1
    assert limiter.acquire("192.0.2.1") is None
    assert limiter.open == 3


def test_ipv6_counted_by_its_64():
    limiter = ConnectionLimiter(max_connections=0, max_per_address=1)
    assert limiter.acquire("2001:db8:1:2::1") is None
    assert limiter.acquire("2001:db8:1:2::99") == "max_connections_per_ip"
    assert limiter.acquire("2001:db8:1:3::1") is None
    assert limiter.acquire("::ffff:192.0.2.1") is None
    assert limiter.acquire("192.0.2.1") == "max_connections_per_ip"


def test_zero_is_no_limit_and_unix_sockets_count_overall_only():
    limiter = ConnectionLimiter(max_connections=0, max_per_address=0)
    for _ in range(1000):
        assert limiter.acquire("192.0.2.1") is None
    limiter = ConnectionLimiter(max_connections=2, max_per_address=1)
    assert limiter.acquire(None) is None
    assert limiter.acquire(None) is None
    assert limiter.acquire(None) == "max_connections"


def test_shared_out_among_workers():
    assert limits_per_worker(10000, 50, 1) == (10000, 50)
    assert limits_per_worker(10000, 50, 3) == (3334, 50)
    assert limits_per_worker(0, 0, 4) == (0, 0)


# The factory wrapper, in memory


class Greeter(Protocol):
    made = lost = False

    def connectionMade(self):
        self.made = True
        self.transport.write(b"+OK ready\r\n")

    def connectionLost(self, reason=None):
        self.lost = True


def connect(factory, host="192.0.2.1"):
    peer = (IPv6Address if ":" in host else IPv4Address)("TCP", host, 40000)
    protocol = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return protocol, transport


def test_refused_connection_gets_the_reply_and_a_close():
    clock = Clock()
    limiter = ConnectionLimiter(max_connections=10, max_per_address=1)
    factory = LimitedFactory(Factory.forProtocol(Greeter), limiter, "pop3", clock)
    first, first_transport = connect(factory)
    assert first_transport.value() == b"+OK ready\r\n"
    second, transport = connect(factory)
    assert transport.value() == TOO_MANY
    assert transport.value() == b"-ERR [SYS/TEMP] Too many connections\r\n"
    assert transport.disconnecting
    assert not second.wrappedProtocol.made
    # A client that never reads the reply is cut off after a while.
    clock.advance(REFUSED_LINGER)
    assert transport.disconnected or transport.disconnecting
    second.connectionLost(None)
    assert not second.wrappedProtocol.lost
    # The refused one did not count; the admitted one is released.
    assert limiter.open == 1
    greeter = first.wrappedProtocol
    first.connectionLost(None)
    assert greeter.lost
    assert limiter.open == 0
    assert clock.getDelayedCalls() == []


# End to end

LIMITS = "[limits]\nmax_connections = 4\nmax_connections_per_ip = 2\n"


@pytest.fixture(scope="module")
def limited(popd_factory):
    return popd_factory("limits", extra=LIMITS)


def open_session(port: int, source: str | None = None, header: bytes = b""):
    sock = socket.create_connection(
        (HOST, port), timeout=10, source_address=(source, 0) if source else None
    )
    if header:
        sock.sendall(header)
    file = sock.makefile("rb")
    return sock, file


def first_line(file) -> bytes:
    try:
        return file.readline(4096)
    except ConnectionResetError:
        return b""


def refused(port: int, source: str | None = None, header: bytes = b"") -> bool:
    """
    Whether a new connection gets the limit's reply and then the end.
    """
    sock, file = open_session(port, source, header)
    try:
        line = first_line(file)
        if line != TOO_MANY:
            return False
        assert first_line(file) == b""  # and closed
        return True
    finally:
        file.close()
        sock.close()


def test_limits_end_to_end(limited):
    port = limited.pop3_port
    held = []
    try:
        first = fresh_loopback()
        for _ in range(2):
            held.append(open_session(port, first))
            assert first_line(held[-1][1]).startswith(b"+OK")
        assert refused(port, first)
        wait_for(lambda: "reason=max_connections_per_ip" in limited.output())
        # Other addresses still get in, up to the overall limit.
        for _ in range(2):
            held.append(open_session(port, fresh_loopback()))
            assert first_line(held[-1][1]).startswith(b"+OK")
        assert refused(port, fresh_loopback())
        wait_for(lambda: "reason=max_connections " in limited.output())
        # POP3S counts towards the same limit, and its refusal is in TLS.
        with socket.create_connection((HOST, limited.pop3s_port), timeout=10) as raw:
            with insecure_client().wrap_socket(raw, server_hostname=HOST) as tls:
                assert tls.makefile("rb").readline() == TOO_MANY
        # A session that ends makes room again.
        sock, file = held.pop()
        file.close()
        sock.close()

        def admitted() -> bool:
            sock, file = open_session(port, fresh_loopback())
            line = first_line(file)
            if line.startswith(b"+OK"):
                held.append((sock, file))
                return True
            file.close()
            sock.close()
            return False

        wait_for(admitted, timeout=10, interval=0.1)
    finally:
        for sock, file in held:
            file.close()
            sock.close()


def test_limits_count_the_address_behind_a_proxy(popd_factory):
    server = popd_factory(
        "limits-proxy",
        pop3_listen=["haproxy:tcp:0:interface=127.0.0.1"],
        server_extra='trusted_proxies = ["127.0.0.0/8"]',
        extra="[limits]\nmax_connections_per_ip = 1\n",
    )
    port = server.pop3_port
    held = []
    try:
        # All from the one proxy address, for two different clients.
        for client in ("198.51.100.1", "198.51.100.2"):
            held.append(open_session(port, header=v1(client)))
            assert first_line(held[-1][1]).startswith(b"+OK")
        assert refused(port, header=v1("198.51.100.1"))
        wait_for(
            lambda: (
                "client=198.51.100.1 listener=pop3 reason=max_connections_per_ip"
                in server.output()
            )
        )
    finally:
        for sock, file in held:
            file.close()
            sock.close()
