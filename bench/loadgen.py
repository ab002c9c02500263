"""
A POP3 load generator that costs much less CPU than the server it drives,
and says how much.

It speaks POP3 lock-step (one command, then its whole reply), as most
clients do, over raw non-blocking sockets on one C{epoll} loop: no asyncio
futures or tasks, no per-line Python work.  Replies are framed with
C{bytes.find} on the reply's tail and messages are checked with one
C{memcmp} against their expected dot-stuffed wire form, so the figures are
the server's.  Every run reports the generator's own CPU time beside the
server's (its whole process tree, from /proc) and fails, with the reason,
on any verification error or failed session.

Only 127.0.0.1; every loop is bounded in count and in time.

Scenarios (see L{bench.maildata} for the users and messages):

  - C{sessions}: N concurrent clients, each doing full sessions one after
    the other (USER/PASS, STAT, UIDL, RETR of three small messages, QUIT)
    for a bounded time: sessions/s, p50/p99 session latency, failures;
    every RETR checked byte for byte.
  - C{retr}: one client retrieving 1 MB messages over one session (plain or
    implicit TLS): MB/s (10**6 octets of message, CRLF form, per second),
    every byte checked.
  - C{idle}: N authenticated sessions (after STAT) held at once; the
    server's PSS over its whole process tree before and after, per session.
  - C{bigstat}: connect → STAT reply on a large maildrop, first login and
    later logins; LIST and UIDL time on it.

    python -m bench.loadgen sessions --port 1110 --clients 16 --duration 10
    python -m bench.loadgen retr --port 1995 --tls --duration 5
    python -m bench.loadgen idle --port 1110 --count 1000 --server-pid PID
    python -m bench.loadgen bigstat --port 1110 --messages 100000
"""

from __future__ import annotations

import argparse
import errno
import json
import select
import socket
import ssl
import statistics
import sys
import time
from collections.abc import Callable

from bench import maildata, proctree

HOST = "127.0.0.1"
RECV_SIZE = 256 * 1024
MAX_ERRORS_KEPT = 10
CRLF = b"\r\n"
TERMINATOR = b"\r\n.\r\n"
PLUS = 0x2B  # "+"


class Failures:
    """
    How many things went wrong, and the first few of them in words.
    """

    def __init__(self) -> None:
        self.count = 0
        self.first: list[str] = []

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.first) < MAX_ERRORS_KEPT:
            self.first.append(message)


class Expected:
    """
    The wire form (dot-stuffed, CRLF) of every message a scenario may
    retrieve, by C{USER/N}, and its size un-stuffed.
    """

    def __init__(self, messages: dict[str, bytes]) -> None:
        self.wire = {
            key.encode(): maildata.wire(data) for key, data in messages.items()
        }
        self.octets = {
            key.encode(): len(data) + data.count(b"\n")
            for key, data in messages.items()
        }

    def check(self, buf: bytearray, start: int, end: int, user: bytes) -> bytes | str:
        """
        Check the message body C{buf[start:end]} (wire form, ending with its
        last CRLF, without the terminating dot line).

        @return: its C{USER/N} if it is exactly the expected message of
            C{user}, else what is wrong with it.
        """
        key = maildata.message_id(memoryview(buf)[start : start + 80])
        if key is None:
            return f"unknown message starting {bytes(buf[start : start + 40])!r}"
        wanted = self.wire.get(key)
        if wanted is None or not key.startswith(user + b"/"):
            return f"message {key!r} does not belong to {user!r}"
        if end - start == len(wanted) and buf.startswith(wanted, start):
            return key
        got = maildata.unstuff(bytes(buf[start:end]))
        expected = maildata.unstuff(wanted)
        at = next(
            (i for i, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b),
            min(len(got), len(expected)),
        )
        return (
            f"message {key.decode()} differs at octet {at} (got {len(got)} octets, "
            f"expected {len(expected)}): {got[max(0, at - 20) : at + 20]!r} vs "
            f"{expected[max(0, at - 20) : at + 20]!r}"
        )


def _percentile(values: list[float], fraction: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _cpu_window(server_pid: int | None) -> Callable[[], dict]:
    """
    Start measuring CPU (the generator's and the server tree's) and wall
    time; the returned function ends the window and reports.
    """
    wall = time.perf_counter()
    own = time.process_time()
    server = proctree.tree_cpu_seconds(server_pid) if server_pid else None
    load = proctree.loadavg()
    drops = proctree.listen_drops()

    def stop() -> dict:
        elapsed = time.perf_counter() - wall
        report = {
            "elapsed_s": elapsed,
            "loadgen_cpu_s": time.process_time() - own,
            "loadavg_start": load,
            "loadavg_end": proctree.loadavg(),
            "listen_queue_drops": proctree.listen_drops() - drops,
        }
        if server_pid:
            report["server_cpu_s"] = proctree.tree_cpu_seconds(server_pid) - server
        return report

    return stop


# The event loop of the concurrent scenarios.


class Connection:
    """
    One client connection and the reply it is waiting for.
    """

    __slots__ = (
        "sock",
        "fd",
        "buf",
        "status_end",
        "scan",
        "multiline",
        "step",
        "user",
        "secret",
        "slot",
        "started",
        "deadline",
        "ids",
        "held",
        "closing",
    )

    def __init__(self, slot: int, user: str, timeout: float) -> None:
        self.slot = slot
        self.user = user.encode()
        self.secret = maildata.password(user).encode()
        self.buf = bytearray()
        self.status_end = -1
        self.scan = 0
        self.multiline = False
        self.step = 0
        self.started = time.perf_counter()
        self.deadline = self.started + timeout
        self.ids: set[bytes] = set()
        self.held = False
        self.closing = False
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = self.sock.fileno()


class Loop:
    """
    Many lock-step POP3 client connections on one epoll.

    A scenario gives C{on_reply(conn, buf, status_end, body_end)} (called
    with the whole reply in C{conn.buf}: the status line ends at
    C{status_end}, a multi-line body at C{body_end}), C{on_eof(conn)} and
    C{on_failure(conn, why)}.
    """

    def __init__(self, port: int, on_reply, on_eof, on_failure) -> None:
        self.port = port
        self.epoll = select.epoll()
        self.conns: dict[int, Connection] = {}
        self.on_reply = on_reply
        self.on_eof = on_eof
        self.on_failure = on_failure

    def open(self, conn: Connection) -> None:
        code = conn.sock.connect_ex((HOST, self.port))
        if code not in (0, errno.EINPROGRESS):
            conn.sock.close()
            self.on_failure(conn, f"connect: {errno.errorcode.get(code, code)}")
            return
        # The greeting is the first reply; a refused connection shows up as
        # an error on the first read.
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, select.EPOLLIN)

    def send(self, conn: Connection, command: bytes, multiline: bool = False) -> None:
        conn.multiline = multiline
        try:
            conn.sock.send(command)
        except OSError as error:
            self.fail(conn, f"send {command[:4]!r}: {error}")

    def close(self, conn: Connection) -> None:
        if self.conns.pop(conn.fd, None) is not None:
            self.epoll.unregister(conn.fd)
            conn.sock.close()

    def fail(self, conn: Connection, why: str) -> None:
        self.close(conn)
        self.on_failure(conn, why)

    def poll(self, timeout: float) -> None:
        for fd, _events in self.epoll.poll(timeout):
            conn = self.conns.get(fd)
            if conn is None:
                continue
            try:
                data = conn.sock.recv(RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as error:
                self.fail(conn, f"step {conn.step}: {error}")
                continue
            if not data:
                if conn.closing:
                    self.close(conn)
                    self.on_eof(conn)
                else:
                    self.fail(conn, f"step {conn.step}: connection closed by server")
                continue
            if conn.closing:
                self.fail(conn, f"data after the last reply: {data[:60]!r}")
                continue
            self._feed(conn, data)

    def _feed(self, conn: Connection, data: bytes) -> None:
        buf = conn.buf
        buf += data
        if conn.status_end < 0:
            conn.status_end = buf.find(CRLF)
            if conn.status_end < 0:
                if len(buf) > 4096:
                    self.fail(conn, f"status line too long: {bytes(buf[:60])!r}")
                return
            if not conn.multiline or buf[0] != PLUS:
                end = conn.status_end + 2
                if len(buf) != end:
                    self.fail(
                        conn, f"data after a reply: {bytes(buf[end : end + 60])!r}"
                    )
                    return
                self._reply(conn, -1)
                return
            conn.scan = conn.status_end
        found = buf.find(TERMINATOR, conn.scan)
        if found < 0:
            conn.scan = max(conn.status_end, len(buf) - 4)
            return
        if found + 5 != len(buf):
            self.fail(
                conn, f"data after a reply: {bytes(buf[found + 5 : found + 65])!r}"
            )
            return
        self._reply(conn, found + 2)

    def _reply(self, conn: Connection, body_end: int) -> None:
        buf, status_end = conn.buf, conn.status_end
        conn.buf = bytearray()
        conn.status_end = -1
        self.on_reply(conn, buf, status_end, body_end)

    def expire(self, now: float) -> None:
        for conn in list(self.conns.values()):
            if now > conn.deadline and not conn.held:
                self.fail(conn, f"step {conn.step}: no reply in time")

    def shutdown(self) -> None:
        for conn in list(self.conns.values()):
            self.close(conn)
        self.epoll.close()


def _status(buf: bytearray, status_end: int) -> str:
    return bytes(buf[:status_end]).decode("latin-1")


def _uidl_lines(buf: bytearray, status_end: int, body_end: int) -> list[bytes]:
    return bytes(buf[status_end + 2 : body_end]).split(CRLF)[:-1]


# sessions


SESSION_STEPS = (b"USER", b"PASS", b"STAT", b"UIDL", b"RETR 1", b"RETR 2", b"RETR 3")


def run_sessions(
    port: int,
    clients: int,
    duration: float,
    warmup: float = 1.0,
    max_sessions: int = 1_000_000,
    server_pid: int | None = None,
    timeout: float = 30.0,
    first_user: int = 0,
) -> dict:
    """
    C{clients} concurrent clients, client I logging in as session user I,
    each doing full sessions back to back for C{warmup + duration} seconds
    (and at most C{max_sessions}); the sessions under way then finish
    (within C{timeout}) and are checked.  The rate (and the latencies) are
    of the sessions whose QUIT reply came in the C{duration} seconds after
    the warm-up.  Every session is checked, counted or not.
    """
    if not 1 <= clients <= maildata.SESSION_USERS:
        raise ValueError(f"1 to {maildata.SESSION_USERS} clients")
    users = [maildata.session_user(first_user + i) for i in range(clients)]
    expected = Expected(
        {
            f"{user}/{n}": maildata.small_message(user, n)
            for user in users
            for n in range(1, maildata.SMALL_MESSAGES + 1)
        }
    )
    failures = Failures()
    latencies: list[float] = []
    started = [0]
    counted = [0]
    window: dict = {}
    begin = time.perf_counter()
    measure_from = begin + warmup
    stop_at = measure_from + duration
    hard_stop = stop_at + timeout
    stop_cpu: list = []
    # Slots to start a session in, from the loop (never recursively: a
    # refused connection fails at once).
    pending: list[int] = list(range(clients))

    def start(slot: int) -> None:
        now = time.perf_counter()
        if now >= stop_at or started[0] >= max_sessions:
            return
        started[0] += 1
        loop.open(Connection(slot, users[slot], timeout))

    def on_failure(conn: Connection, why: str) -> None:
        failures.add(f"{conn.user.decode()}: {why}")
        pending.append(conn.slot)

    def on_eof(conn: Connection) -> None:
        start(conn.slot)

    def on_reply(
        conn: Connection, buf: bytearray, status_end: int, body_end: int
    ) -> None:
        step = conn.step
        if buf[0] != PLUS:
            loop.fail(conn, f"step {step}: {_status(buf, status_end)}")
            return
        if step == 3:
            fields = bytes(buf[:status_end]).split()
            if len(fields) < 3 or fields[1] != b"%d" % maildata.SMALL_MESSAGES:
                loop.fail(conn, f"STAT: {_status(buf, status_end)}")
                return
        elif step == 4:
            lines = _uidl_lines(buf, status_end, body_end)
            numbers = [line.split(b" ", 1)[0] for line in lines]
            uids = {line.split(b" ", 1)[-1] for line in lines}
            if numbers != [b"1", b"2", b"3"] or len(uids) != 3:
                loop.fail(conn, f"UIDL: {lines!r}")
                return
        elif 5 <= step <= 7:
            outcome = expected.check(buf, status_end + 2, body_end, conn.user)
            if isinstance(outcome, str):
                loop.fail(conn, f"RETR {step - 4}: {outcome}")
                return
            if outcome in conn.ids:
                loop.fail(conn, f"RETR {step - 4}: {outcome!r} again")
                return
            conn.ids.add(outcome)
        elif step == 8:
            now = time.perf_counter()
            if measure_from <= now <= stop_at:
                latencies.append(now - conn.started)
                counted[0] += 1
            conn.closing = True
            conn.step = 9
            return
        conn.step = step + 1
        if step == 0:
            loop.send(conn, b"USER " + conn.user + CRLF)
        elif step == 1:
            loop.send(conn, b"PASS " + conn.secret + CRLF)
        elif step <= 6:
            loop.send(conn, SESSION_STEPS[step] + CRLF, multiline=step >= 3)
        else:
            loop.send(conn, b"QUIT\r\n")

    loop = Loop(port, on_reply, on_eof, on_failure)
    try:
        next_expiry = 0.0
        while loop.conns or (pending and time.perf_counter() < stop_at):
            while pending:
                start(pending.pop())
            now = time.perf_counter()
            if not window and now >= measure_from:
                window["stop"] = True
                stop_cpu.append(_cpu_window(server_pid))
            if len(stop_cpu) == 1 and now >= stop_at:
                stop_cpu.append(stop_cpu[0]())
            if now > hard_stop:
                for conn in list(loop.conns.values()):
                    loop.fail(conn, f"step {conn.step}: still running at the end")
                break
            if now >= next_expiry:
                loop.expire(now)
                next_expiry = now + 0.5
            loop.poll(0.2)
    finally:
        loop.shutdown()
    if len(stop_cpu) == 1:
        stop_cpu.append(stop_cpu[0]())
    cpu = stop_cpu[1] if len(stop_cpu) > 1 else {"elapsed_s": 0.0}
    # Sessions are counted when their QUIT reply came within the window of
    # `duration` seconds after the warm-up.
    result = {
        "scenario": "sessions",
        "clients": clients,
        "sessions": counted[0],
        "sessions_started": started[0],
        "sessions_per_s": counted[0] / duration,
        "p50_ms": _ms(_percentile(latencies, 0.50)),
        "p99_ms": _ms(_percentile(latencies, 0.99)),
        **cpu,
    }
    return _finish(result, failures)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _finish(result: dict, failures: Failures) -> dict:
    result["failures"] = failures.count
    result["errors"] = failures.first
    result["ok"] = failures.count == 0
    if "server_cpu_s" in result and result.get("server_cpu_s"):
        result["loadgen_cpu_per_server_cpu"] = (
            result["loadgen_cpu_s"] / result["server_cpu_s"]
        )
    return result


# idle


def run_idle(
    port: int,
    count: int,
    server_pid: int | None,
    concurrency: int = 64,
    settle: float = 2.0,
    timeout: float = 600.0,
    warmup_sessions: int = 20,
    on_held: Callable[[str], None] | None = None,
) -> dict:
    """
    Hold C{count} authenticated sessions (users C{i00001}…, each after its
    STAT reply) at once; the server tree's PSS before and after.
    C{on_held("before")} and C{on_held("after")} are called where the PSS
    is measured.
    """
    from bench.servers import raise_open_files

    limit = raise_open_files()
    if limit < count + 100:
        raise SystemExit(f"RLIMIT_NOFILE is {limit}: too low for {count} sessions")
    failures = Failures()
    users = [maildata.idle_user(i) for i in range(count)]
    held: list[Connection] = []
    quit_replies = [0]
    state = {"next": 0, "phase": "login"}
    begin = time.perf_counter()
    hard_stop = begin + timeout

    # Logins to start, from the loop (never recursively: a refused
    # connection fails at once), and logins under way.
    pending = [0]
    in_flight = [0]

    def start_login() -> None:
        if state["phase"] == "login" and state["next"] < count:
            index = state["next"]
            state["next"] += 1
            in_flight[0] += 1
            loop.open(Connection(index, users[index], timeout))

    def on_failure(conn: Connection, why: str) -> None:
        failures.add(f"{conn.user.decode()}: {why}")
        if not conn.held and state["phase"] == "login":
            in_flight[0] -= 1
            pending[0] += 1

    def on_eof(conn: Connection) -> None:
        pass

    def on_reply(
        conn: Connection, buf: bytearray, status_end: int, body_end: int
    ) -> None:
        step = conn.step
        if buf[0] != PLUS:
            loop.fail(conn, f"step {step}: {_status(buf, status_end)}")
            return
        conn.step = step + 1
        if step == 0:
            loop.send(conn, b"USER " + conn.user + CRLF)
        elif step == 1:
            loop.send(conn, b"PASS " + conn.secret + CRLF)
        elif step == 2:
            loop.send(conn, b"STAT\r\n")
        elif step == 3:
            if not buf.startswith(b"+OK 1 "):
                loop.fail(conn, f"STAT: {_status(buf, status_end)}")
                return
            conn.held = True
            held.append(conn)
            in_flight[0] -= 1
            pending[0] += 1
        elif step == 4:
            quit_replies[0] += 1
            conn.closing = True

    # Warm the server up (lazy imports, caches, first-time allocations) with
    # a few whole sessions before the baseline.
    loop = Loop(port, on_reply, on_eof, on_failure)
    for index in range(min(warmup_sessions, count)):
        result = _one_login(port, users[index], quit_after=True)
        if isinstance(result, str):
            failures.add(f"warm-up {users[index]}: {result}")
    time.sleep(settle)
    if on_held is not None:
        on_held("before")
    before, processes_before = (
        proctree.tree_pss_kib(server_pid) if server_pid else (0, 0)
    )
    stop = _cpu_window(server_pid)
    try:
        pending[0] = min(concurrency, count)
        next_expiry = 0.0
        while state["next"] < count or in_flight[0] > 0:
            while pending[0] and state["next"] < count:
                pending[0] -= 1
                start_login()
            now = time.perf_counter()
            if now > hard_stop:
                failures.add(f"only {len(held)} of {count} sessions held in time")
                break
            if now >= next_expiry:
                # A pass over every connection: not on every event.
                loop.expire(now)
                next_expiry = now + 0.5
            loop.poll(0.2)
        login_window = stop()
        state["phase"] = "hold"
        time.sleep(settle)
        if on_held is not None:
            on_held("after")
        after, processes_after = (
            proctree.tree_pss_kib(server_pid) if server_pid else (0, 0)
        )
        # Every session still works: QUIT each and wait for the server to
        # close it, C{concurrency} at a time (thousands of server processes
        # exiting at once would load the machine for everyone).
        state["phase"] = "quit"
        quit_deadline = time.perf_counter() + timeout
        for conn in list(loop.conns.values()):
            if not conn.held:
                loop.fail(conn, "login not finished in time")
        to_quit = held[::-1]
        next_expiry = 0.0
        while time.perf_counter() < quit_deadline:
            outstanding = len(loop.conns) - len(to_quit)
            while to_quit and outstanding < concurrency:
                conn = to_quit.pop()
                if loop.conns.get(conn.fd) is not conn:
                    continue
                conn.deadline = quit_deadline
                conn.held = False
                loop.send(conn, b"QUIT\r\n")
                outstanding += 1
            if not loop.conns:
                break
            now = time.perf_counter()
            if now >= next_expiry:
                loop.expire(now)
                next_expiry = now + 0.5
            loop.poll(0.2)
        for conn in list(loop.conns.values()):
            loop.fail(conn, "no QUIT reply and close in time")
    finally:
        loop.shutdown()
    if quit_replies[0] != len(held):
        failures.add(f"{len(held) - quit_replies[0]} held sessions did not QUIT")
    result = {
        "scenario": "idle",
        "sessions": len(held),
        "pss_before_kib": before,
        "pss_after_kib": after,
        "processes_before": processes_before,
        "processes_after": processes_after,
        "kib_per_session": (after - before) / len(held) if held else None,
        "logins_per_s": len(held) / login_window["elapsed_s"]
        if login_window["elapsed_s"]
        else None,
        **login_window,
    }
    return _finish(result, failures)


# The one-connection scenarios.


class Client:
    """
    One blocking lock-step client connection with a reusable receive
    buffer (plain or implicit TLS).
    """

    def __init__(self, port: int, tls: bool = False, timeout: float = 120.0) -> None:
        sock = socket.create_connection((HOST, port), timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(sock, server_hostname="localhost")
        self.sock = sock
        self.buf = bytearray(4 * 1024 * 1024)
        self.view = memoryview(self.buf)

    def reply(self, multiline: bool = False) -> tuple[int, int]:
        """
        Read one reply into C{self.buf}.

        @return: where the status line ends, and (for a positive multi-line
            reply) where the body ends (before the terminating dot line;
            -1 otherwise).
        @raise OSError: the server closed the connection or went quiet.
        """
        pos = 0
        status_end = -1
        buf, sock = self.buf, self.sock
        while True:
            if pos == len(buf):
                bigger = bytearray(len(buf) * 2)
                bigger[:pos] = buf
                self.view.release()
                self.buf = buf = bigger
                self.view = memoryview(buf)
            received = sock.recv_into(self.view[pos:])
            if not received:
                raise OSError("connection closed by server")
            pos += received
            if status_end < 0:
                status_end = buf.find(CRLF, 0, pos)
                if status_end < 0:
                    continue
                if not multiline or buf[0] != PLUS:
                    if pos != status_end + 2:
                        raise OSError("data after a reply")
                    return status_end, -1
            # Lock-step: the terminator can only be the last thing received
            # (inside a dot-stuffed body a line of one dot cannot occur).
            if pos >= status_end + 5 and buf[pos - 5 : pos] == TERMINATOR:
                return status_end, pos - 3

    def command(self, line: bytes, multiline: bool = False) -> tuple[int, int]:
        self.sock.sendall(line + CRLF)
        status_end, body_end = self.reply(multiline)
        if self.buf[0] != PLUS:
            raise ProtocolError(
                f"{line.split()[0].decode()}: "
                + bytes(self.buf[:status_end]).decode("latin-1")
            )
        return status_end, body_end

    def login(self, user: str) -> None:
        status_end, _ = self.reply()
        if self.buf[0] != PLUS:
            raise ProtocolError("greeting: " + bytes(self.buf[:status_end]).decode())
        self.command(b"USER " + user.encode())
        self.command(b"PASS " + maildata.password(user).encode())

    def quit(self) -> None:
        """
        QUIT and wait for the server to close the connection.
        """
        self.command(b"QUIT")
        try:
            while self.sock.recv(4096):
                pass
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        self.view.release()
        self.sock.close()


class ProtocolError(Exception):
    pass


def _one_login(port: int, user: str, quit_after: bool) -> Client | str:
    try:
        client = Client(port, timeout=30)
        client.login(user)
        client.command(b"STAT")
        if quit_after:
            client.quit()
        return client
    except (OSError, ProtocolError) as error:
        return str(error) or error.__class__.__name__


def run_retr(
    port: int,
    tls: bool = False,
    duration: float = 5.0,
    max_messages: int = 100_000,
    server_pid: int | None = None,
) -> dict:
    """
    One session retrieving the 1 MB messages of C{r1} in turn for
    C{duration} seconds (after one warm-up round), every byte checked.
    """
    user = maildata.RETR_USER
    expected = Expected(
        {
            f"{user}/{n}": maildata.big_message(user, n)
            for n in range(1, maildata.RETR_MESSAGES + 1)
        }
    )
    failures = Failures()
    octets = 0
    messages = 0
    window: dict = {"elapsed_s": 0.0}
    client = None
    try:
        client = Client(port, tls=tls)
        client.login(user)
        fields = bytes(client.buf[: client.command(b"STAT")[0]]).split()
        count = int(fields[1])
        if count != maildata.RETR_MESSAGES:
            raise ProtocolError(f"STAT: {count} messages")

        def retrieve(number: int) -> int:
            status_end, body_end = client.command(b"RETR %d" % number, True)
            outcome = expected.check(
                client.buf, status_end + 2, body_end, user.encode()
            )
            if isinstance(outcome, str):
                raise ProtocolError(f"RETR {number}: {outcome}")
            return expected.octets[outcome]

        for number in range(1, count + 1):
            retrieve(number)
        stop = _cpu_window(server_pid)
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline and messages < max_messages:
            octets += retrieve(messages % count + 1)
            messages += 1
        window = stop()
        client.quit()
        client = None
    except (OSError, ProtocolError, ValueError, IndexError) as error:
        failures.add(str(error) or error.__class__.__name__)
    finally:
        if client is not None:
            client.close()
    result = {
        "scenario": "retr",
        "tls": tls,
        "messages": messages,
        "octets": octets,
        "mb_per_s": octets / 1e6 / window["elapsed_s"] if window["elapsed_s"] else 0.0,
        **window,
    }
    return _finish(result, failures)


def run_bigstat(port: int, messages: int, later: int = 3, forget=None) -> dict:
    """
    Connect → STAT reply on the large maildrop: once after C{forget()}
    (which makes the server's next login a first one), then C{later} times;
    LIST and UIDL are timed in each later session.
    """
    user = maildata.BIG_USER
    count, octets = maildata.big_totals(messages)
    failures = Failures()
    first = None
    later_stat: list[float] = []
    list_times: list[float] = []
    uidl_times: list[float] = []
    sizes_exact = True
    if forget is not None:
        forget(user)
    for attempt in range(later + 1):
        client = None
        try:
            started = time.perf_counter()
            client = Client(port, timeout=600)
            client.login(user)
            status_end, _ = client.command(b"STAT")
            stat_time = time.perf_counter() - started
            fields = bytes(client.buf[:status_end]).split()
            if int(fields[1]) != count:
                raise ProtocolError(f"STAT: {fields[1]!r} messages, not {count}")
            if int(fields[2]) != octets:
                sizes_exact = False
            if attempt == 0:
                first = stat_time
            else:
                later_stat.append(stat_time)
                for command, times in ((b"LIST", list_times), (b"UIDL", uidl_times)):
                    started = time.perf_counter()
                    status_end, body_end = client.command(command, True)
                    times.append(time.perf_counter() - started)
                    lines = bytes(client.buf[status_end + 2 : body_end]).split(CRLF)
                    lines.pop()
                    if len(lines) != count or lines[-1].split()[0] != b"%d" % count:
                        raise ProtocolError(f"{command.decode()}: {len(lines)} lines")
                    if (
                        command == b"UIDL"
                        and len({line.split()[1] for line in lines}) != count
                    ):
                        raise ProtocolError("UIDL: duplicate UIDs")
            client.quit()
            client = None
        except (OSError, ProtocolError, ValueError, IndexError) as error:
            failures.add(f"login {attempt}: {error}")
        finally:
            if client is not None:
                client.close()
    result = {
        "scenario": "bigstat",
        "messages": count,
        "first_stat_s": first,
        "later_stat_s": statistics.median(later_stat) if later_stat else None,
        "list_s": statistics.median(list_times) if list_times else None,
        "uidl_s": statistics.median(uidl_times) if uidl_times else None,
        "sizes_exact": sizes_exact,
        "loadavg_end": proctree.loadavg(),
    }
    return _finish(result, failures)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    scenarios = parser.add_subparsers(dest="scenario", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--port", type=int, required=True, help="on 127.0.0.1")
    common.add_argument("--server-pid", type=int, help="for CPU and PSS figures")
    sessions = scenarios.add_parser("sessions", parents=[common])
    sessions.add_argument("--clients", type=int, default=1)
    sessions.add_argument("--duration", type=float, default=10.0)
    sessions.add_argument("--warmup", type=float, default=1.0)
    sessions.add_argument("--max-sessions", type=int, default=1_000_000)
    retr = scenarios.add_parser("retr", parents=[common])
    retr.add_argument("--tls", action="store_true", help="implicit TLS port")
    retr.add_argument("--duration", type=float, default=5.0)
    idle = scenarios.add_parser("idle", parents=[common])
    idle.add_argument("--count", type=int, default=1000)
    bigstat = scenarios.add_parser(
        "bigstat",
        parents=[common],
        help="the first login is a first one only if the server's caches of "
        "the maildrop were cleared (bench.run does that)",
    )
    bigstat.add_argument("--messages", type=int, default=100_000)
    bigstat.add_argument("--later", type=int, default=3)
    options = parser.parse_args(argv)
    if options.scenario == "sessions":
        result = run_sessions(
            options.port,
            options.clients,
            options.duration,
            options.warmup,
            options.max_sessions,
            options.server_pid,
        )
    elif options.scenario == "retr":
        result = run_retr(
            options.port, options.tls, options.duration, server_pid=options.server_pid
        )
    elif options.scenario == "idle":
        result = run_idle(options.port, options.count, options.server_pid)
    else:
        result = run_bigstat(options.port, options.messages, options.later)
    json.dump(result, sys.stdout, indent=2)
    print()
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
