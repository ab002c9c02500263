"""
What the model, fuzz and hostile-client tests share.

  - L{Wire}: a bare POP3 socket client with a deadline on every read, for
    tests that send exactly the bytes they mean (pipelines, garbage,
    half-sent lines) and read exactly what comes back.
  - L{hypothesis_settings}: the example budget of a property test under the
    profile named by C{POPD_HYPOTHESIS_PROFILE} (C{ci}, the default, or
    C{long}), without loading a profile for the whole test run.
  - L{weighted}: a strategy choosing among others in given proportions.
  - L{rss_kib}: a process's resident memory, from C{/proc}.
  - L{probe}: a complete short session against a server, timed.
  - L{Seeder}: delivery into a running server's store from the test
    process, through the store's own code, quicker than C{popd deliver}.

Every wait is bounded; every connection goes to 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
import time
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

HOST = "127.0.0.1"

#: The profile the property tests run with: "ci" (bounded, the default) or
#: "long" (for a soak run from the command line).
PROFILE = os.environ.get("POPD_HYPOTHESIS_PROFILE", "ci")
PROFILES = ("ci", "long")


def hypothesis_settings(**budgets: dict) -> settings:
    """
    C{settings} for one property test: C{budgets} maps each profile name
    to that test's budget there (C{max_examples}, C{stateful_step_count},
    ...); every test gets C{deadline=None} (a real server's latency is not
    the code under test) and no "too slow" health check.

    @raise ValueError: C{POPD_HYPOTHESIS_PROFILE} names no known profile.
    """
    if PROFILE not in PROFILES:
        raise ValueError(
            f"POPD_HYPOTHESIS_PROFILE={PROFILE!r}: use one of {', '.join(PROFILES)}"
        )
    return settings(
        deadline=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
        ],
        **budgets[PROFILE],
    )


def weighted(*choices):
    """
    One of C{(weight, strategy)} C{choices}, each drawn as often as its
    weight says (C{one_of} promises no particular mix).
    """
    table = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(table) - 1).flatmap(lambda index: table[index])


class Closed(EOFError):
    """
    The server closed the connection.
    """


class Wire:
    """
    One POP3 connection over a bare socket (optionally TLS), reading with a
    deadline: a test never hangs on a server that stopped answering.

    @ivar greeting: the server's first line, or C{None} if C{greet=False}.
    """

    def __init__(
        self,
        port: int,
        *,
        context: ssl.SSLContext | None = None,
        source: str | None = None,
        timeout: float = 10.0,
        greet: bool = True,
    ) -> None:
        self.timeout = timeout
        self.sock = socket.create_connection(
            (HOST, port),
            timeout=timeout,
            source_address=(source, 0) if source else None,
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if context is not None:
            self.sock = context.wrap_socket(self.sock, server_hostname=HOST)
        self.secure = context is not None
        self._buffer = b""
        self.greeting = self.line() if greet else None

    # Sending

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes | str) -> bytes:
        """
        Send one command line (CRLF added); return its status line.
        """
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.line()

    # Receiving

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no reply in {self.timeout} s")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            raise TimeoutError(f"no reply in {self.timeout} s") from None
        except (ConnectionResetError, ssl.SSLEOFError, BrokenPipeError) as error:
            raise Closed(f"the server closed the connection: {error}") from None
        if not data:
            raise Closed("the server closed the connection")
        self._buffer += data

    def line(self, limit: int = 1 << 20) -> bytes:
        """
        One line with its CRLF (or what there is of it at C{limit} octets).

        @raise Closed: the server closed the connection first.
        @raise TimeoutError: nothing came for C{timeout} seconds.
        """
        deadline = time.monotonic() + self.timeout
        for _ in range(100000):
            end = self._buffer.find(b"\n")
            if end >= 0 or len(self._buffer) >= limit:
                cut = end + 1 if end >= 0 else limit
                line, self._buffer = self._buffer[:cut], self._buffer[cut:]
                return line
            self._fill(deadline)
        raise AssertionError("unreachable: a line never ended")

    def body(self, limit: int = 64 << 20) -> bytes:
        """
        The rest of a multi-line reply as sent, lone-dot line included.
        """
        deadline = time.monotonic() + self.timeout
        for _ in range(1000000):
            end = self._buffer.find(b"\r\n.\r\n")
            if self._buffer.startswith(b".\r\n"):
                end, skip = 0, 3
            else:
                skip = 5
            if end >= 0:
                cut = end + skip
                body, self._buffer = self._buffer[:cut], self._buffer[cut:]
                return body
            if len(self._buffer) > limit:
                raise AssertionError(f"a multi-line reply over {limit} octets")
            self._fill(deadline)
        raise AssertionError("unreachable: a body never ended")

    def closed(self, timeout: float | None = None) -> bool:
        """
        Whether the server closes the connection (within C{timeout})
        without sending anything more.

        @raise AssertionError: it sent something instead.
        """
        deadline = time.monotonic() + (timeout or self.timeout)
        try:
            self._fill(deadline)
        except Closed:
            return True
        except TimeoutError:
            return False
        raise AssertionError(f"unexpected data from the server: {self._buffer[:200]!r}")

    def starttls(self, context: ssl.SSLContext) -> None:
        """
        The TLS handshake, after STLS's +OK.
        """
        assert not self._buffer, f"data before the TLS handshake: {self._buffer!r}"
        self.sock.settimeout(self.timeout)
        self.sock = context.wrap_socket(self.sock, server_hostname=HOST)
        self.secure = True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def abort(self) -> None:
        """
        Drop the connection with a TCP reset, the rudest way a client goes.
        """
        try:
            raw = self.sock
            if isinstance(raw, ssl.SSLSocket):
                raw = socket.socket(fileno=os.dup(raw.fileno()))
                self.sock.close()
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
        except OSError:
            self.close()

    def __enter__(self) -> Wire:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def rss_kib(pid: int) -> int:
    """
    The resident set size of process C{pid} in KiB (C{VmRSS}).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for process {pid}")


def probe(
    port: int,
    user: str | None = None,
    password: str | None = None,
    *,
    context: ssl.SSLContext | None = None,
    source: str | None = None,
    timeout: float = 1.0,
) -> float:
    """
    A whole short session (greeting, CAPA, optionally USER/PASS and STAT,
    QUIT) that must complete within C{timeout} seconds.

    @return: how long it took.
    """
    started = time.monotonic()
    with Wire(port, context=context, source=source, timeout=timeout) as wire:
        assert wire.greeting.startswith(b"+OK"), wire.greeting
        assert wire.command("CAPA").startswith(b"+OK")
        assert b"\r\nUIDL\r\n" in b"\r\n" + wire.body()
        if user is not None:
            assert wire.command(f"USER {user}").startswith(b"+OK")
            reply = wire.command(f"PASS {password}")
            assert reply.startswith(b"+OK"), reply
            assert wire.command("STAT").startswith(b"+OK")
        assert wire.command("QUIT").startswith(b"+OK")
        assert wire.closed()
    elapsed = time.monotonic() - started
    assert elapsed < timeout, f"the probe session took {elapsed:.2f} s"
    return elapsed


class Seeder:
    """
    Delivers into a running server's store from this process, through the
    store's own C{deliver} (what C{popd deliver} calls, without starting a
    process per message), built from the server's configuration.
    """

    def __init__(self, config: Path) -> None:
        from popd.config import load_settings
        from popd.service import build_provider

        self.provider = build_provider(load_settings(config))

    def deliver(self, user: str, message: bytes, folder: str | None = None) -> str:
        from io import BytesIO

        from popd.testing import wait_for

        return wait_for(self.provider.deliver(user, BytesIO(message), folder), 60)

    def deliver_all(self, user: str, messages: list[bytes]) -> list[str]:
        """
        Deliver C{messages} at the same time, as concurrent MTA deliveries
        do; their order in the maildrop is then any.

        @return: their UIDs, in the order of C{messages}.
        """
        from io import BytesIO

        from twisted.internet.defer import gatherResults

        from popd.testing import wait_for

        deliveries = [self.provider.deliver(user, BytesIO(m)) for m in messages]
        return wait_for(gatherResults(deliveries, consumeErrors=True), 60)

    def close(self) -> None:
        from popd.testing import stop_reactor_threadpool, wait_for

        close = getattr(self.provider, "close", None)
        if close is not None:
            wait_for(close(), 30)
        stop_reactor_threadpool()
