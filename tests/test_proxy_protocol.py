"""
The PROXY protocol (v1 and v2) on listeners behind a load balancer
(L{popd.proxy}): the header is parsed in pieces of any size, only trusted
proxies may send one, and the session sees the client's real address.
"""

from __future__ import annotations

import socket
import struct

import pytest
from helpers.ops_e2e import insecure_client, session_ends, wait_for
from helpers.popd_e2e import HOST
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from popd.proxy import HEADER_TIMEOUT, HeaderError, ProxyFactory, parse_header

V2_PREFIX = b"\r\n\r\n\x00\r\nQUIT\n"


def v1(source: str, destination: str = "127.0.0.1", ports=(40000, 110)) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    return f"PROXY {family} {source} {destination} {ports[0]} {ports[1]}\r\n".encode()


def v2(
    source: str, destination: str = "127.0.0.1", ports=(40000, 110), tlvs=b""
) -> bytes:
    if ":" in source:
        family, kind = 0x21, socket.AF_INET6
        if ":" not in destination:
            destination = "::1"
    else:
        family, kind = 0x11, socket.AF_INET
    body = (
        socket.inet_pton(kind, source)
        + socket.inet_pton(kind, destination)
        + struct.pack("!HH", *ports)
        + tlvs
    )
    return V2_PREFIX + bytes([0x21, family]) + struct.pack("!H", len(body)) + body


def v2_local() -> bytes:
    return V2_PREFIX + bytes([0x20, 0x00]) + struct.pack("!H", 0)


# The parser


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
@pytest.mark.parametrize("chunk", [1, 2, 5, 13, 16, 1000])
def test_header_in_pieces(make, chunk):
    data = make("198.51.100.7") + b"CAPA\r\n"
    buffer = b""
    result = None
    for start in range(0, len(data), chunk):
        buffer += data[start : start + chunk]
        result = parse_header(buffer)
        if result is not None:
            break
    assert result is not None
    info, rest = result
    assert info.source.host == "198.51.100.7" and info.source.port == 40000
    assert (rest + data[len(buffer) :]) == b"CAPA\r\n"


def test_ipv6_headers():
    for make in (v1, v2):
        info, rest = parse_header(make("2001:db8::7", "2001:db8::1"))
        assert isinstance(info.source, IPv6Address) and rest == b""


@pytest.mark.parametrize(
    "data",
    [
        b"CAPA\r\n",
        b"PROXY TCP4 not-an-address 127.0.0.1 1 2\r\n",
        b"PROXY " + b"x" * 200,
        V2_PREFIX + b"\x21\x11\xff\xff",
        b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c",
    ],
    ids=["no header", "bad address", "v1 too long", "v2 too long", "bad prefix"],
)
def test_bad_headers(data):
    with pytest.raises(HeaderError):
        parse_header(data)


# The wrapper, in memory


class Recorder(Protocol):
    def __init__(self):
        self.received = b""
        self.peer = None
        self.made = False

    def connectionMade(self):
        self.made = True
        self.peer = self.transport.getPeer()
        self.transport.write(b"+OK hello\r\n")

    def dataReceived(self, data):
        self.received += data


def connect(peer_host: str, trusted=("127.0.0.1/32",)):
    clock = Clock()
    factory = ProxyFactory(Factory.forProtocol(Recorder), trusted, "pop3", clock)
    peer = IPv4Address("TCP", peer_host, 50000)
    protocol = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return protocol, transport, clock


def test_session_starts_after_the_header():
    protocol, transport, _clock = connect("127.0.0.1")
    recorder = protocol.wrappedProtocol
    assert not recorder.made and transport.value() == b""
    protocol.dataReceived(v2("198.51.100.7")[:10])
    assert not recorder.made
    protocol.dataReceived(v2("198.51.100.7")[10:] + b"USER a\r\n")
    assert recorder.made
    assert recorder.peer == IPv4Address("TCP", "198.51.100.7", 40000)
    assert recorder.received == b"USER a\r\n"
    assert transport.value() == b"+OK hello\r\n"


def test_local_header_keeps_the_connection_address():
    protocol, _transport, _clock = connect("127.0.0.1")
    protocol.dataReceived(v2_local())
    assert protocol.wrappedProtocol.peer.host == "127.0.0.1"


def test_untrusted_source_closed_at_once():
    protocol, transport, _clock = connect("192.0.2.9")
    assert transport.disconnecting or transport.disconnected
    protocol.dataReceived(v1("198.51.100.7"))
    assert not protocol.wrappedProtocol.made


def test_bad_header_closes():
    protocol, transport, _clock = connect("127.0.0.1")
    protocol.dataReceived(b"USER alice\r\n")
    assert transport.disconnecting or transport.disconnected
    assert not protocol.wrappedProtocol.made


def test_slow_header_closes():
    protocol, transport, clock = connect("127.0.0.1")
    protocol.dataReceived(b"PROXY TCP4 ")
    clock.advance(HEADER_TIMEOUT + 1)
    assert transport.disconnecting or transport.disconnected
    assert not protocol.wrappedProtocol.made


def test_no_timer_left_behind():
    protocol, _transport, clock = connect("127.0.0.1")
    protocol.dataReceived(v1("198.51.100.7"))
    assert clock.getDelayedCalls() == []
    protocol, _transport, clock = connect("127.0.0.1")
    protocol.connectionLost(None)
    assert clock.getDelayedCalls() == []


# End to end


@pytest.fixture(scope="module")
def proxied(popd_factory):
    server = popd_factory(
        "proxy",
        # Plaintext login only from the trusted network, which the test
        # reaches only through the proxy's header.
        trusted_networks=["198.51.100.0/24"],
        pop3_listen=["haproxy:tcp:0:interface=127.0.0.1"],
        pop3s_listen=["haproxy:tcp:0:interface=127.0.0.1"],
        server_extra='trusted_proxies = ["127.0.0.1/32"]',
    )
    server.add_plain_user("pia", "proxy-pass")
    return server


class Client:
    def __init__(self, port: int, header: bytes, source: str | None = None):
        self.sock = socket.create_connection(
            (HOST, port), timeout=10, source_address=(source, 0) if source else None
        )
        self.sock.sendall(header)
        self.file = self.sock.makefile("rb")

    def line(self) -> bytes:
        return self.file.readline(4096)

    def command(self, text: str) -> bytes:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.line()

    def closed_at_once(self) -> bool:
        """
        Whether the server closed the connection without a word (a reset
        counts: it had unread bytes from us).
        """
        try:
            return self.line() == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def close(self):
        self.file.close()
        self.sock.close()


def login_as_proxied(port: int, header: bytes) -> list[bytes]:
    client = Client(port, header)
    try:
        replies = [client.line(), client.command("USER pia")]
        if replies[-1].startswith(b"+OK"):
            replies.append(client.command("PASS proxy-pass"))
        replies.append(client.command("QUIT"))
        return replies
    finally:
        client.close()


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_trusted_network_seen_through_the_proxy(proxied, make):
    replies = login_as_proxied(proxied.pop3_port, make("198.51.100.7"))
    assert replies[0].startswith(b"+OK")
    assert replies[1].startswith(b"+OK") and replies[2].startswith(b"+OK")
    wait_for(
        lambda: (
            ("pia", "198.51.100.7", "quit")
            in [end[:3] for end in session_ends(proxied)]
        )
    )
    assert "login user=pia client=198.51.100.7 mechanism=USER" in proxied.output()


@pytest.mark.parametrize("make", [v1, v2], ids=["v1", "v2"])
def test_untrusted_network_seen_through_the_proxy(proxied, make):
    replies = login_as_proxied(proxied.pop3_port, make("203.0.113.9"))
    assert replies[1].startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
    wait_for(lambda: "203.0.113.9" in [end[1] for end in session_ends(proxied)])


def test_ipv6_client_through_the_proxy(proxied):
    login_as_proxied(proxied.pop3_port, v2("2001:db8::42", "2001:db8::1"))
    wait_for(lambda: "2001:db8::42" in [end[1] for end in session_ends(proxied)])


def test_pop3s_behind_the_proxy(proxied):
    raw = socket.create_connection((HOST, proxied.pop3s_port), timeout=10)
    raw.sendall(v2("198.51.100.8"))
    with insecure_client().wrap_socket(raw, server_hostname="localhost") as tls:
        file = tls.makefile("rb")
        assert file.readline().startswith(b"+OK")
        tls.sendall(b"USER pia\r\nPASS proxy-pass\r\nQUIT\r\n")
        assert [file.readline()[:3] for _ in range(3)] == [b"+OK"] * 3
        file.close()
    wait_for(
        lambda: (
            ("pia", "198.51.100.8", "quit")
            in [end[:3] for end in session_ends(proxied)]
        )
    )


def closed_without_greeting(port: int, header: bytes, source=None) -> bool:
    """
    Whether the server closes a connection that sends C{header} without a
    word.  It may close it so fast that connecting or sending already sees
    the reset (the client's bytes were unread).
    """
    try:
        client = Client(port, header, source=source)
    except (ConnectionResetError, BrokenPipeError):
        return True
    try:
        return client.closed_at_once()
    finally:
        client.close()


def test_connection_from_an_untrusted_proxy_is_closed(proxied):
    # 127.0.0.2 is loopback too, but not in trusted_proxies.
    assert closed_without_greeting(
        proxied.pop3_port, v1("198.51.100.9"), source="127.0.0.2"
    )
    wait_for(
        lambda: (
            "PROXY connection from 127.0.0.2 to pop3 closed: not in "
            "[server] trusted_proxies" in proxied.output()
        )
    )
    assert "198.51.100.9" not in proxied.output()


def test_garbage_instead_of_a_header_is_closed(proxied):
    assert closed_without_greeting(proxied.pop3_port, b"USER pia\r\n")
    wait_for(lambda: "bad PROXY header" in proxied.output())


def test_stls_behind_the_proxy(proxied):
    client = Client(proxied.pop3_port, v1("203.0.113.10"))
    try:
        assert client.line().startswith(b"+OK")
        assert client.command("STLS").startswith(b"+OK")
        client.file.close()
        tls = insecure_client().wrap_socket(client.sock, server_hostname="localhost")
        client.sock, client.file = tls, tls.makefile("rb")
        # Inside TLS plaintext login is fine from anywhere.
        assert client.command("USER pia").startswith(b"+OK")
        assert client.command("PASS proxy-pass").startswith(b"+OK")
        assert client.command("QUIT").startswith(b"+OK")
    finally:
        client.close()
    wait_for(
        lambda: (
            ("pia", "203.0.113.10", "quit")
            in [end[:3] for end in session_ends(proxied)]
        )
    )


# The service tree


def service_settings(tmp_path, text: str):
    from popd.config import load_settings

    config = tmp_path / "popd.toml"
    config.write_text(text + "[lmtp]\nlisten = []\n")
    return load_settings(config)


def test_service_puts_the_proxy_in_front(tmp_path):
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from popd.limits import LimitedFactory
    from popd.protocol import POP3Factory
    from popd.service import ListenerService, make_service

    settings = service_settings(
        tmp_path,
        '[server]\ndata_dir = "d"\ntrusted_proxies = ["10.0.0.1/32"]\n'
        '[pop3]\nlisten = ["tcp:0:interface=127.0.0.1"]\nproxy_protocol = true\n'
        '[pop3s]\nlisten = ["haproxy:tcp:0:interface=127.0.0.1"]\n',
    )
    top = make_service(settings)
    listeners = {s.label: s for s in top if isinstance(s, ListenerService)}
    pop3, pop3s = listeners["pop3"], listeners["pop3s"]
    assert isinstance(pop3.factory, ProxyFactory)
    assert isinstance(pop3.factory.wrappedFactory, LimitedFactory)
    assert isinstance(pop3.factory.wrappedFactory.wrappedFactory, POP3Factory)
    # The PROXY header comes before the TLS handshake.
    assert pop3s.description == "tcp:0:interface=127.0.0.1"
    assert isinstance(pop3s.factory, ProxyFactory)
    assert isinstance(pop3s.factory.wrappedFactory, TLSMemoryBIOFactory)
    assert pop3s.factory.trusts("10.0.0.1") and not pop3s.factory.trusts("10.0.0.2")


def test_haproxy_listener_needs_trusted_proxies(tmp_path):
    from popd.config import ConfigError
    from popd.service import make_service

    settings = service_settings(
        tmp_path,
        '[server]\ndata_dir = "d"\n'
        '[pop3]\nlisten = ["haproxy:tcp:0:interface=127.0.0.1"]\n',
    )
    with pytest.raises(ConfigError, match=r"\[pop3\] listen: .* trusted_proxies"):
        make_service(settings)
