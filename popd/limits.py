"""
Connection limits: how many POP3 connections the server takes at once,
overall and from one client address.

A connection past a limit is answered at once with C{-ERR [SYS/TEMP] Too
many connections} and closed, so the client knows to come back later
rather than waiting on a server that never greets it (RFC 2449's SYS/TEMP
response code: a temporary condition of the server, not of the user).

L{LimitedFactory} wraps the POP3 factory innermost: behind the PROXY
protocol (the limits count the real client address) and, on POP3S, inside
TLS (the reply reaches the client encrypted).  Every listener of one process
shares one L{ConnectionLimiter}; with C{[server] workers} each process
counts its own connections (see L{limits_per_worker}).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from popd import metrics
from popd.auth.throttle import address_key

log = Logger()

#: The reply to a connection over a limit.
TOO_MANY = b"-ERR [SYS/TEMP] Too many connections\r\n"
#: Seconds a refused connection may take to receive the reply (a TLS
#: client has to finish its handshake first) before it is cut off.
REFUSED_LINGER = 5.0
#: Seconds between log lines about refused connections of one kind; those
#: in between are counted and reported with the next line.
LOG_INTERVAL = 10.0


def limits_per_worker(
    max_connections: int, max_per_address: int, workers: int
) -> tuple[int, int]:
    """
    The limits one of C{workers} processes enforces: the overall limit
    shared out (rounded up), the per-address limit as it is (the kernel
    hands connections to whichever worker accepts first, not by address,
    so an address may reach it in each worker).  0 stays 0: no limit.
    """
    if max_connections and workers > 1:
        max_connections = -(-max_connections // workers)
    return max_connections, max_per_address


class RateLimitedLog:
    """
    Log a kind of event at most once per L{LOG_INTERVAL} seconds, telling
    how many were not logged in between: a flood of refused connections
    must not become a flood of log lines.
    """

    def __init__(self, clock_seconds: Callable[[], float]) -> None:
        self._seconds = clock_seconds
        self._last: dict[str, float] = {}
        self._skipped: Counter[str] = Counter()

    def __call__(self, kind: str, text: str, **fields: object) -> None:
        now = self._seconds()
        last = self._last.get(kind)
        if last is not None and now - last < LOG_INTERVAL:
            self._skipped[kind] += 1
            return
        self._last[kind] = now
        skipped = self._skipped.pop(kind, 0)
        more = f" ({skipped} more not logged)" if skipped else ""
        log.warn(text + more, **fields)


class ConnectionLimiter:
    """
    Counts open connections, overall and per client address (an IPv6
    client by its /64, as L{popd.auth.throttle} does).

    @ivar max_connections: the most connections at once; 0 for no limit.
    @ivar max_per_address: the most from one address at once; 0 for none.
    """

    def __init__(self, max_connections: int, max_per_address: int) -> None:
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self.open = 0
        self._by_address: Counter[str] = Counter()

    def acquire(self, host: str | None) -> str | None:
        """
        Count a new connection from C{host}, or refuse it.

        @return: C{None} if it is admitted (release it later), else the
            limit it hit: C{"max_connections"} or C{"max_connections_per_ip"}.
        """
        if self.max_connections and self.open >= self.max_connections:
            return "max_connections"
        key = address_key(host)
        if key is not None:
            if self.max_per_address and self._by_address[key] >= self.max_per_address:
                return "max_connections_per_ip"
            self._by_address[key] += 1
        self.open += 1
        return None

    def release(self, host: str | None) -> None:
        """
        Forget a connection L{acquire} admitted.
        """
        self.open -= 1
        key = address_key(host)
        if key is not None:
            self._by_address[key] -= 1
            if self._by_address[key] <= 0:
                del self._by_address[key]

    def count(self, host: str | None) -> int:
        """
        The connections open now from C{host}'s address.
        """
        key = address_key(host)
        return self._by_address.get(key, 0) if key is not None else 0


class _LimitedProtocol(ProtocolWrapper):
    """
    Admits the connection to the wrapped protocol, or answers
    L{TOO_MANY} and closes it without the wrapped protocol ever seeing it.
    """

    _admitted = False
    _host: str | None = None
    _linger = None

    def makeConnection(self, transport) -> None:
        factory: LimitedFactory = self.factory
        self._host = getattr(transport.getPeer(), "host", None)
        reason = factory.limiter.acquire(self._host)
        if reason is None:
            self._admitted = True
            metrics.connection_opened(factory.label)
            super().makeConnection(transport)
            return
        Protocol.makeConnection(self, transport)
        metrics.connection_refused(reason)
        factory.refusal_log(
            reason,
            "connection refused client={client} listener={listener} "
            "reason={reason} open={open}",
            client=self._host,
            listener=factory.label,
            reason=reason,
            open=factory.limiter.open,
        )
        transport.write(TOO_MANY)
        transport.loseConnection()
        self._linger = factory.reactor.callLater(
            REFUSED_LINGER, transport.abortConnection
        )

    def dataReceived(self, data: bytes) -> None:
        if self._admitted:
            super().dataReceived(data)

    def connectionLost(self, reason) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None
        if not self._admitted:
            return
        self._admitted = False
        factory: LimitedFactory = self.factory
        factory.limiter.release(self._host)
        metrics.connection_closed(factory.label)
        super().connectionLost(reason)


class LimitedFactory(WrappingFactory):
    """
    Wraps a factory so that its connections are counted by C{limiter},
    and those over a limit are refused with L{TOO_MANY}.

    @ivar label: the listener's name (C{pop3}, C{pop3s}) for logs and
        metrics.
    """

    protocol = _LimitedProtocol
    noisy = False

    def __init__(
        self, wrappedFactory, limiter: ConnectionLimiter, label: str, reactor=None
    ) -> None:
        super().__init__(wrappedFactory)
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.limiter = limiter
        self.label = label
        self.refusal_log = RateLimitedLog(reactor.seconds)

    def logPrefix(self) -> str:
        return self.label.upper()
