"""
A bounded load test of one popd process: it holds many concurrent
connections (10,000 by default) while a few hundred of them are active
sessions, and reports what the server did.

  - The server: C{twistd -n popd} from this tree on 127.0.0.1, over a fresh
    Maildir tree in a temporary directory (C{{PLAIN}} users, so that
    password hashing does not hide the server's own cost), started with
    the open-files limit this script raised for itself (a child inherits
    it; root raises the hard limit too), its connection limits off
    (every client is 127.0.0.1) and its idle timeouts past the run.
  - Idle connections: opened C{--connect-concurrency} at a time; each
    reads the greeting and then waits; C{--idle-logins} of them also log
    in (each as its own user, holding its maildrop's lock and snapshot).
  - Active sessions: C{--active} clients, each as its own user, loop for
    C{--duration} seconds: connect, USER, PASS, STAT, RETR of a random
    message (checked octet for octet against its known wire form), QUIT,
    then a random pause of 0 to 2x C{--think} seconds (default 1), as
    polling mail clients do; C{--think 0} saturates the server instead
    (every command then waits behind those of the other clients).
    Latency is per command, from sending it to the end of its reply.
  - A probe thread (blocking sockets, apart from the asyncio loop) runs a
    whole session every half second; the server counts as responsive if
    every probe finished within C{--probe-limit} seconds (default 1).
  - At the end: every idle connection is asked CAPA (or NOOP when logged
    in) and must answer; every maildrop must still hold all its messages
    (STAT); the server must still be running.

Figures: connections held, connect+greeting latency, sessions and
commands per second, p50/p99 per command, probe times, and the server's
memory (RSS and PSS from /proc, at start, with the connections held, and
at the end) and CPU time.  The exit status is 0 only if nothing failed.

Everything is on 127.0.0.1 and bounded in count and time; the server is
killed at the end, whatever happens.

    python bench/load.py                           # 10,000 connections
    python bench/load.py --think 0                 # ... saturating popd
    python bench/load.py --connections 2000 --active 100 --duration 10
    python bench/load.py --backlog 50              # Twisted's default
    python bench/load.py --json results.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 60.0
IO_TIMEOUT = 30.0
LISTENING = re.compile(rb"\bPOP3 listening on 127\.0\.0\.1:(\d+) ")
TERMINATOR = b"\r\n.\r\n"


# Data


def make_message(user: str, number: int, rng: random.Random) -> bytes:
    """
    A message with LF line ends: a few KB, or about 60 KB for every fifth.
    """
    lines = [
        f"X-Load-Id: {user}/{number}\n",
        "From: load@example.org\n",
        f"To: {user}@example.org\n",
        f"Subject: load test message {number}\n",
        "\n",
    ]
    count = 1000 if number % 5 == 4 else rng.randint(20, 80)
    for line in range(count):
        if line % 17 == 0:
            lines.append(".a line with a leading dot\n")
        else:
            lines.append(f"{line:05d} {rng.getrandbits(160):040x}\n")
    return "".join(lines).encode()


def wire_form(message: bytes) -> bytes:
    """
    What follows RETR's +OK line: CRLF, dot-stuffed, terminated.
    """
    crlf = message.replace(b"\n", b"\r\n")
    stuffed = re.sub(rb"(?m)^\.", b"..", crlf)
    return stuffed + b".\r\n"


def make_data(
    directory: Path, users: list[str], messages: int, seed: int
) -> dict[str, list[bytes]]:
    """
    A passwd-file and a Maildir of C{messages} messages for each user (as
    a delivery agent writes them, without size fields in the names).

    @return: each user's messages' wire forms, in delivery order.
    """
    rng = random.Random(seed)
    expected = {}
    passwd = directory / "data" / "passwd"
    passwd.parent.mkdir(parents=True, exist_ok=True)
    with open(passwd, "w") as out:
        for user in users:
            out.write(f"{user}:{{PLAIN}}pw-{user}\n")
    for user in users:
        maildir = directory / "data" / "mail" / user / "Maildir"
        for sub in ("tmp", "new", "cur"):
            (maildir / sub).mkdir(parents=True, exist_ok=True)
        forms = []
        for number in range(messages):
            message = make_message(user, number, rng)
            name = f"{1700000000 + number}.M{number:06d}P1Q{number}.load"
            (maildir / "new" / name).write_bytes(message)
            forms.append(wire_form(message))
        expected[user] = forms
    return expected


# Limits and the server


def raise_open_files(needed: int) -> tuple[int, int]:
    """
    Raise RLIMIT_NOFILE to at least C{needed} (the hard limit too, if this
    process may), or as far as the hard limit allows.

    @return: the limits now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(needed, hard)))
        except (ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Server:
    """
    C{twistd -n popd} on 127.0.0.1 in C{directory}, in its own process
    group.
    """

    def __init__(self, directory: Path, backlog: int | None, auth_timeout: int):
        self.directory = directory
        listen = "tcp:0:interface=127.0.0.1" + (
            f":backlog={backlog}" if backlog else ""
        )
        self.config = directory / "popd.toml"
        self.config.write_text(
            "[server]\n"
            'data_dir = "data"\n'
            "[pop3]\n"
            f"listen = {json.dumps([listen])}\n"
            "[pop3s]\n"
            "listen = []\n"
            "[lmtp]\n"
            "listen = []\n"
            "[auth]\n"
            'plaintext = "always"\n'
            "failure_delay = 0\n"
            "[limits]\n"
            f"auth_timeout = {auth_timeout}\n"
            f"transaction_timeout = {auth_timeout}\n"
            # Every client comes from 127.0.0.1: no per-address limit, and
            # no overall one below what this run holds.
            "max_connections = 0\n"
            "max_connections_per_ip = 0\n"
        )
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.log = directory / "popd.log"

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO), *filter(None, [env.get("PYTHONPATH")])]
        )
        command = [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            "-n",
            "--pidfile",
            "",
            "popd",
            "--config",
            str(self.config),
        ]
        log = open(self.log, "wb")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            command,
            cwd=self.directory,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            match = LISTENING.search(self.log.read_bytes())
            if match:
                self.port = int(match.group(1))
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"popd did not start:\n{self.output()[-3000:]}")

    def output(self) -> str:
        return self.log.read_bytes().decode("utf-8", "replace")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def memory_kib(self) -> dict[str, int]:
        """
        The server's RSS and PSS (KiB), from /proc.
        """
        figures = {}
        if self.process is None:
            return figures
        with contextlib.suppress(OSError):
            with open(f"/proc/{self.process.pid}/smaps_rollup") as rollup:
                for line in rollup:
                    key, _, value = line.partition(":")
                    if key in ("Rss", "Pss"):
                        figures[key.lower()] = int(value.split()[0])
        return figures

    def cpu_seconds(self) -> float:
        with contextlib.suppress(OSError):
            with open(f"/proc/{self.process.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return 0.0

    def open_files_limit(self) -> str:
        with contextlib.suppress(OSError):
            with open(f"/proc/{self.process.pid}/limits") as limits:
                for line in limits:
                    if line.startswith("Max open files"):
                        return " ".join(line.split()[3:5])
        return "?"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


# Clients


class Failed(Exception):
    """
    A reply that should not have come.
    """


@dataclass
class Figures:
    connect: list[float] = field(default_factory=list)
    commands: dict[str, list[float]] = field(default_factory=dict)
    sessions: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    probes: list[float] = field(default_factory=list)
    probe_failures: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(text)

    def timed(self, command: str, seconds: float) -> None:
        self.commands.setdefault(command, []).append(seconds)


class Connection:
    """
    One POP3 connection over asyncio streams.
    """

    def __init__(self, reader, writer) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 22)
        connection = cls(reader, writer)
        greeting = await connection.reader.readline()
        if not greeting.startswith(b"+OK"):
            raise Failed(f"greeting {greeting!r}")
        return connection

    async def command(self, line: str, *, multi: bool = False) -> bytes:
        self.writer.write(line.encode() + b"\r\n")
        status = await self.reader.readline()
        if not status.startswith(b"+OK"):
            raise Failed(f"{line.split()[0]}: {status!r}")
        if not multi:
            return status
        return await self.reader.readuntil(TERMINATOR)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


async def hold(
    port: int,
    user: str | None,
    held: list[tuple[Connection, bool]],
    figures: Figures,
    gate: asyncio.Semaphore,
) -> None:
    """
    Open one idle connection (logging in as C{user} if given) and keep it.
    """
    async with gate:
        started = time.monotonic()
        try:
            connection = await asyncio.wait_for(Connection.open(port), IO_TIMEOUT)
            figures.connect.append(time.monotonic() - started)
            if user is not None:
                await connection.command(f"USER {user}")
                await connection.command(f"PASS pw-{user}")
                await connection.command("STAT")
        except (TimeoutError, OSError, asyncio.IncompleteReadError, Failed) as e:
            figures.error(f"idle connection: {e!r}")
            return
        held.append((connection, user is not None))


async def active(
    port: int,
    user: str,
    expected: list[bytes],
    figures: Figures,
    stop_at: float,
    rng: random.Random,
    think: float,
) -> None:
    """
    Sessions one after another until C{stop_at}, each after a random pause
    of up to twice C{think} seconds (the first one within C{think}).
    """
    await asyncio.sleep(rng.uniform(0, think))
    for _ in range(10_000_000):
        if time.monotonic() >= stop_at:
            return
        connection = None
        try:
            started = time.monotonic()
            connection = await asyncio.wait_for(Connection.open(port), IO_TIMEOUT)
            figures.timed("connect+greeting", time.monotonic() - started)
            for line, multi in (
                (f"USER {user}", False),
                (f"PASS pw-{user}", False),
                ("STAT", False),
            ):
                sent = time.monotonic()
                reply = await asyncio.wait_for(
                    connection.command(line, multi=multi), IO_TIMEOUT
                )
                figures.timed(line.split()[0], time.monotonic() - sent)
            count = int(reply.split()[1])
            if count != len(expected):
                figures.error(f"{user}: STAT says {count}, not {len(expected)}")
            number = rng.randrange(len(expected))
            sent = time.monotonic()
            body = await asyncio.wait_for(
                connection.command(f"RETR {number + 1}", multi=True), IO_TIMEOUT
            )
            figures.timed("RETR", time.monotonic() - sent)
            if body != expected[number]:
                figures.error(f"{user}: RETR {number + 1} is not the message")
            sent = time.monotonic()
            await asyncio.wait_for(connection.command("QUIT"), IO_TIMEOUT)
            figures.timed("QUIT", time.monotonic() - sent)
            figures.sessions += 1
        except (TimeoutError, OSError, asyncio.IncompleteReadError, Failed) as e:
            figures.error(f"{user}: {e!r}")
            await asyncio.sleep(0.05)
        finally:
            if connection is not None:
                connection.close()
        if think:
            await asyncio.sleep(rng.uniform(0, 2 * think))


def probe_loop(
    port: int, user: str, expected: bytes, figures: Figures, stop: threading.Event
) -> None:
    """
    A whole session every half second over blocking sockets, timed.
    """
    for _ in range(100_000):
        if stop.wait(0.5):
            return
        started = time.monotonic()
        try:
            with socket.create_connection((HOST, port), timeout=IO_TIMEOUT) as sock:
                stream = sock.makefile("rb")
                replies = [stream.readline()]
                for line in (f"USER {user}", f"PASS pw-{user}", "STAT", "RETR 1"):
                    sock.sendall(line.encode() + b"\r\n")
                    replies.append(stream.readline())
                body = b""
                while not body.endswith(TERMINATOR) and len(body) < 1 << 22:
                    chunk = stream.readline()
                    if not chunk:
                        break
                    body += chunk
                sock.sendall(b"QUIT\r\n")
                replies.append(stream.readline())
            if not all(reply.startswith(b"+OK") for reply in replies):
                raise Failed(f"probe replies {replies!r}")
            if body != expected:
                raise Failed("probe RETR is not the message")
            figures.probes.append(time.monotonic() - started)
        except (OSError, Failed) as e:
            figures.probe_failures.append(repr(e))


async def check_idle(held: list[tuple[Connection, bool]], figures: Figures) -> int:
    """
    Ask every held connection something (NOOP if logged in, else CAPA);
    count those that answered.
    """
    answered = 0

    async def ask(index: int, connection: Connection, logged_in: bool) -> bool:
        try:
            if logged_in:
                await asyncio.wait_for(connection.command("NOOP"), IO_TIMEOUT)
            else:
                await asyncio.wait_for(
                    connection.command("CAPA", multi=True), IO_TIMEOUT
                )
            return True
        except (TimeoutError, OSError, asyncio.IncompleteReadError, Failed) as e:
            figures.error(f"held connection {index}: {e!r}")
            return False

    for start in range(0, len(held), 1000):
        results = await asyncio.gather(
            *(
                ask(index, connection, logged_in)
                for index, (connection, logged_in) in enumerate(
                    held[start : start + 1000], start
                )
            )
        )
        answered += sum(results)
    return answered


async def stat_all(port: int, expected: dict[str, list[bytes]], figures: Figures):
    """
    Every maildrop still holds all its messages, with their sizes.
    """
    gate = asyncio.Semaphore(100)

    async def one(user: str) -> None:
        async with gate:
            connection = None
            try:
                connection = await asyncio.wait_for(Connection.open(port), IO_TIMEOUT)
                await connection.command(f"USER {user}")
                await connection.command(f"PASS pw-{user}")
                reply = await connection.command("STAT")
                count = int(reply.split()[1])
                if count != len(expected[user]):
                    figures.error(f"lost mail: {user} has {count} messages at the end")
                await connection.command("QUIT")
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                figures.error(f"final STAT of {user}: {e!r}")
            except Failed as e:
                figures.error(f"final STAT of {user}: {e}")
            finally:
                if connection is not None:
                    connection.close()

    await asyncio.gather(*(one(user) for user in expected))


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


# The run


async def run(args: argparse.Namespace, server: Server, expected, users) -> dict:
    figures = Figures()
    rng = random.Random(args.seed)
    idle_count = args.connections - args.active
    login_users = users["idle"][: args.idle_logins]
    report: dict = {"server_open_files_limit": server.open_files_limit()}
    report["memory_start_kib"] = server.memory_kib()

    # The idle connections.
    held: list[tuple[Connection, bool]] = []
    gate = asyncio.Semaphore(args.connect_concurrency)
    started = time.monotonic()
    await asyncio.gather(
        *(
            hold(
                server.port,
                login_users[index] if index < len(login_users) else None,
                held,
                figures,
                gate,
            )
            for index in range(idle_count)
        )
    )
    report["idle_open_seconds"] = round(time.monotonic() - started, 2)
    report["idle_connections"] = len(held)
    report["connect_p50_ms"] = round(percentile(figures.connect, 0.5) * 1000, 2)
    report["connect_p99_ms"] = round(percentile(figures.connect, 0.99) * 1000, 2)
    report["connect_max_ms"] = round(max(figures.connect, default=0) * 1000, 2)
    report["connect_over_1s"] = sum(1 for c in figures.connect if c > 1.0)
    report["memory_idle_kib"] = server.memory_kib()

    # The active sessions, and the probe.
    stop = threading.Event()
    probe_user = users["probe"][0]
    probe = threading.Thread(
        target=probe_loop,
        args=(server.port, probe_user, expected[probe_user][0], figures, stop),
        daemon=True,
    )
    cpu_before = server.cpu_seconds()
    own_before = resource.getrusage(resource.RUSAGE_SELF)
    probe.start()
    started = time.monotonic()
    stop_at = started + args.duration
    peak: dict[str, int] = {}

    async def sample_memory() -> None:
        while time.monotonic() < stop_at:
            now = server.memory_kib()
            for key, value in now.items():
                peak[key] = max(peak.get(key, 0), value)
            await asyncio.sleep(1.0)

    await asyncio.gather(
        sample_memory(),
        *(
            active(
                server.port,
                user,
                expected[user],
                figures,
                stop_at,
                random.Random(rng.random()),
                args.think,
            )
            for user in users["active"]
        ),
    )
    elapsed = time.monotonic() - started
    stop.set()
    probe.join(IO_TIMEOUT)
    report["active_sessions"] = args.active
    report["active_seconds"] = round(elapsed, 2)
    report["server_cpu_seconds_active"] = round(server.cpu_seconds() - cpu_before, 2)
    own = resource.getrusage(resource.RUSAGE_SELF)
    report["client_cpu_seconds_active"] = round(
        own.ru_utime + own.ru_stime - own_before.ru_utime - own_before.ru_stime, 2
    )
    report["load_average"] = [round(x, 2) for x in os.getloadavg()]
    report["cpus"] = os.cpu_count()
    report["memory_peak_kib"] = peak
    report["sessions"] = figures.sessions
    report["sessions_per_second"] = round(figures.sessions / elapsed, 1)
    total_commands = sum(
        len(values) for name, values in figures.commands.items() if name != "connect"
    )
    report["commands_per_second"] = round(total_commands / elapsed, 1)
    report["latency_ms"] = {
        name: {
            "p50": round(percentile(values, 0.5) * 1000, 2),
            "p99": round(percentile(values, 0.99) * 1000, 2),
            "max": round(max(values) * 1000, 2),
            "count": len(values),
        }
        for name, values in sorted(figures.commands.items())
    }
    every = [value for values in figures.commands.values() for value in values]
    report["latency_all_commands_ms"] = {
        "p50": round(percentile(every, 0.5) * 1000, 2),
        "p99": round(percentile(every, 0.99) * 1000, 2),
    }
    report["probe_count"] = len(figures.probes)
    report["probe_max_ms"] = round(max(figures.probes, default=0) * 1000, 1)
    report["probe_p50_ms"] = round(percentile(figures.probes, 0.5) * 1000, 1)
    report["probe_failures"] = figures.probe_failures[:5]

    # Nothing lost, everyone still served.
    report["idle_still_answering"] = await check_idle(held, figures)
    report["memory_end_kib"] = server.memory_kib()
    for connection, _logged_in in held:
        connection.close()
    await asyncio.sleep(0.5)
    await stat_all(server.port, expected, figures)
    report["server_alive"] = server.alive
    report["errors"] = figures.error_count
    report["first_errors"] = figures.errors
    idle_memory = report["memory_idle_kib"].get("pss", 0)
    start_memory = report["memory_start_kib"].get("pss", 0)
    if held:
        report["pss_per_idle_connection_kib"] = round(
            (idle_memory - start_memory) / len(held), 2
        )
    report["ok"] = (
        figures.error_count == 0
        and not figures.probe_failures
        and report["probe_max_ms"] <= args.probe_limit * 1000
        and report["idle_connections"] == idle_count
        and report["idle_still_answering"] == idle_count
        and server.alive
    )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--active", type=int, default=300)
    parser.add_argument("--idle-logins", type=int, default=1000)
    parser.add_argument("--messages", type=int, default=5, help="per maildrop")
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument(
        "--think",
        type=float,
        default=1.0,
        help="mean pause between an active client's sessions (default 1 s; "
        "0 for none: the server saturated)",
    )
    parser.add_argument("--connect-concurrency", type=int, default=500)
    parser.add_argument(
        "--backlog", type=int, default=None, help="listen backlog (popd's default)"
    )
    parser.add_argument("--probe-limit", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the directory")
    args = parser.parse_args(argv)
    if not 0 < args.active < args.connections:
        parser.error("--active must be between 0 and --connections")
    args.idle_logins = min(args.idle_logins, args.connections - args.active)
    args.duration = min(args.duration, 600.0)

    limit = raise_open_files(args.connections + 2048)
    print(f"open files limit (this process and the server): {limit}")
    directory = Path(tempfile.mkdtemp(prefix="popd-load-"))
    users = {
        "active": [f"a{index:04d}" for index in range(args.active)],
        "idle": [f"i{index:05d}" for index in range(args.idle_logins)],
        "probe": ["probe"],
    }
    every_user = users["active"] + users["idle"] + users["probe"]
    started = time.monotonic()
    expected = make_data(directory, every_user, args.messages, args.seed)
    print(f"{len(every_user)} maildrops written in {time.monotonic() - started:.1f} s")
    server = Server(directory, args.backlog, auth_timeout=int(args.duration) + 600)
    try:
        server.start()
        print(
            f"popd pid {server.process.pid} on {HOST}:{server.port}, "
            f"open files limit {server.open_files_limit()}"
        )
        report = asyncio.run(run(args, server, expected, users))
    finally:
        server.stop()
        if not args.keep:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)
    report["command"] = " ".join(["python", "bench/load.py", *(argv or sys.argv[1:])])
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    summary(report)
    return 0 if report["ok"] else 1


def summary(report: dict) -> None:
    memory = report["memory_idle_kib"]
    peak = report["memory_peak_kib"]
    every = report["latency_all_commands_ms"]
    print(
        f"\nheld {report['idle_connections']} idle + {report['active_sessions']} "
        f"active connections; {report['sessions_per_second']} sessions/s, "
        f"{report['commands_per_second']} commands/s; command latency p50 "
        f"{every['p50']} ms, p99 {every['p99']} ms; probe max "
        f"{report['probe_max_ms']} ms; server RSS {memory.get('rss', 0) // 1024} "
        f"MiB / PSS {memory.get('pss', 0) // 1024} MiB with the connections held, "
        f"peak RSS {peak.get('rss', 0) // 1024} MiB; errors {report['errors']}; "
        f"{'OK' if report['ok'] else 'FAILED'}"
    )


if __name__ == "__main__":
    sys.exit(main())
