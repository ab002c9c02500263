"""
The PROXY protocol (HAProxy's, versions 1 and 2) on listeners behind a TCP
load balancer: the balancer sends the client's real address in a header
before the client's bytes, and popd uses that address for everything: the
session log line, the login throttle, connection limits and the trusted
networks of plaintext login.

The header parsers are Twisted's (C{twisted.protocols.haproxy}); this
module is the transport glue, stricter than Twisted's own
C{proxyEndpoint} wrapper:

  - only connections from C{[server] trusted_proxies} may send a header; a
    connection from anywhere else is closed at once, with a log line, since
    whoever can connect to a PROXY listener can claim any address;
  - the POP3 session starts (greeting, C{getPeer}) only once the header is
    complete, so it never sees the balancer's address;
  - a header may arrive in pieces of any size; one that is malformed, too
    long or late (L{HEADER_TIMEOUT}) closes the connection;
  - a v2 C{LOCAL} header (the balancer's own health check) or an
    C{UNKNOWN} one keeps the connection's own addresses.
"""

from __future__ import annotations

import struct
from ipaddress import ip_address, ip_network

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

# Twisted's parsers; its public proxyEndpoint wraps them in a transport
# that starts the session before the header is read.
from twisted.protocols.haproxy._exceptions import InvalidProxyHeader
from twisted.protocols.haproxy._v1parser import V1Parser
from twisted.protocols.haproxy._v2parser import V2Parser
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from popd import metrics
from popd.limits import RateLimitedLog

log = Logger()

#: Seconds the balancer has to send the whole header.
HEADER_TIMEOUT = 10.0
#: The longest v1 header line, CRLF included (the specification's 107).
MAX_V1 = 107
#: The longest v2 header accepted (addresses and a few TLVs).
MAX_V2 = 4096
_V1_START = b"PROXY "


class HeaderError(Exception):
    """
    What arrived is no acceptable PROXY header.
    """


def parse_header(buffer: bytes):
    """
    Parse a PROXY header at the start of C{buffer}.

    @return: C{(info, rest)} with Twisted's C{ProxyInfo} and the bytes
        after the header, or C{None} if more bytes are needed.
    @raise HeaderError: if it cannot become a valid header.
    """
    prefix = V2Parser.PREFIX
    if buffer[: len(prefix)] == prefix[: len(buffer)]:
        if len(buffer) < 16:
            return None
        size = 16 + struct.unpack("!H", buffer[14:16])[0]
        if size > MAX_V2:
            raise HeaderError(f"v2 header of {size} octets")
        if len(buffer) < size:
            return None
        header, rest = buffer[:size], buffer[size:]
        parse = V2Parser.parse
    elif buffer[: len(_V1_START)] == _V1_START[: len(buffer)]:
        end = buffer.find(b"\r\n")
        if end < 0:
            if len(buffer) >= MAX_V1:
                raise HeaderError("v1 header without CRLF")
            return None
        if end + 2 > MAX_V1:
            raise HeaderError("v1 header too long")
        header, rest = buffer[:end], buffer[end + 2 :]
        parse = V1Parser.parse
    else:
        raise HeaderError("no PROXY header")
    try:
        info = parse(header)
    except (InvalidProxyHeader, ValueError, KeyError, IndexError, struct.error):
        raise HeaderError("malformed header") from None
    for address in (info.source, info.destination):
        if isinstance(address, IPv4Address | IPv6Address):
            try:
                ip_address(address.host)
            except ValueError:
                raise HeaderError("malformed address") from None
    return info, rest


def _normalized(address):
    """
    C{address} with its host in the usual text form (Twisted's v2 parser
    writes IPv6 addresses with every zero), or C{None}.
    """
    if not isinstance(address, IPv4Address | IPv6Address):
        return None
    try:
        host = ip_address(address.host)
    except ValueError:
        return None
    if host.version == 6 and host.ipv4_mapped is not None:
        return IPv4Address(address.type, str(host.ipv4_mapped), address.port)
    kind = IPv6Address if host.version == 6 else IPv4Address
    return kind(address.type, str(host), address.port)


class ProxyProtocolWrapper(ProtocolWrapper):
    """
    Reads the PROXY header from a trusted balancer, then runs the wrapped
    protocol with the addresses it gave.
    """

    _source = None
    _destination = None
    _started = False
    _refused = False
    _timeout = None

    def makeConnection(self, transport) -> None:
        # Not ProtocolWrapper's: the wrapped protocol starts after the header.
        Protocol.makeConnection(self, transport)
        self._buffer = b""
        factory: ProxyFactory = self.factory
        proxy = getattr(transport.getPeer(), "host", None)
        if not factory.trusts(proxy):
            self._refuse("untrusted_proxy", "not in [server] trusted_proxies")
            return
        self._timeout = factory.reactor.callLater(HEADER_TIMEOUT, self._too_slow)

    def _refuse(self, reason: str, why: str) -> None:
        self._refused = True
        self._cancel_timeout()
        metrics.connection_refused(reason)
        factory: ProxyFactory = self.factory
        factory.refusal_log(
            reason,
            "PROXY connection from {proxy} to {listener} closed: {why}",
            proxy=getattr(self.transport.getPeer(), "host", None),
            listener=factory.label,
            why=why,
        )
        self.transport.abortConnection()

    def _too_slow(self) -> None:
        self._timeout = None
        self._refuse("proxy_header", "no complete PROXY header in time")

    def _cancel_timeout(self) -> None:
        if self._timeout is not None and self._timeout.active():
            self._timeout.cancel()
        self._timeout = None

    def dataReceived(self, data: bytes) -> None:
        if self._started:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        try:
            parsed = parse_header(self._buffer)
        except HeaderError as error:
            self._refuse("proxy_header", f"bad PROXY header ({error})")
            return
        if parsed is None:
            return
        info, rest = parsed
        self._buffer = b""
        self._cancel_timeout()
        self._source = _normalized(info.source)
        self._destination = _normalized(info.destination)
        self._started = True
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)
        if rest and self._started and self.connected:
            self.wrappedProtocol.dataReceived(rest)

    def getPeer(self):
        return self._source or self.transport.getPeer()

    def getHost(self):
        return self._destination or self.transport.getHost()

    def connectionLost(self, reason) -> None:
        self._cancel_timeout()
        self.connected = 0
        if self._started:
            self._started = False
            super().connectionLost(reason)


class ProxyFactory(WrappingFactory):
    """
    Wraps a listener's factory for connections from a load balancer that
    speaks the PROXY protocol.

    @ivar trusted_proxies: the networks balancers connect from.
    @ivar label: the listener's name for logs.
    """

    protocol = ProxyProtocolWrapper
    noisy = False

    def __init__(
        self, wrappedFactory, trusted_proxies, label: str, reactor=None
    ) -> None:
        super().__init__(wrappedFactory)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.label = label
        self._networks = tuple(ip_network(n) for n in trusted_proxies)
        self.refusal_log = RateLimitedLog(reactor.seconds)

    def trusts(self, host: str | None) -> bool:
        """
        Whether a connection from C{host} may send a PROXY header (a UNIX
        socket peer always may: only local processes reach it).
        """
        if host is None:
            return True
        try:
            address = ip_address(host)
        except ValueError:
            return False
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def logPrefix(self) -> str:
        return f"{self.label.upper()} (PROXY)"
