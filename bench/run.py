"""
Every scenario of L{bench.loadgen} against popd, Dovecot and a minimal
C{twisted.mail.pop3} server over the same mail, the servers interleaved
(round I runs them in a rotated order) so that machine noise hits all
alike; then a table of figures (median of the rounds, and their range)
with the ratios popd/Dovecot and popd/twisted.mail.pop3.

A trial with any verification error or failed session is reported and
does not count.

    python -m bench.run --quick     # a smoke run: about 3 minutes
    python -m bench.run             # the full run: about 20 minutes
    python -m bench.run --servers popd,dovecot,twisted,dovecot-default

C{dovecot} is Dovecot in its high-performance mode (login and pop3
processes reused); C{dovecot-default} (not run unless named) keeps
Dovecot's default of two new processes per session.  The mail tree is
made once under C{--workdir} and kept for later runs.

Run from the repository root with the virtualenv's Python (popd need not
be installed: the benchmark runs C{twistd popd} with this tree on
PYTHONPATH).  Dovecot is installed from Debian's packages if absent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import loadgen, maildata, proctree, servers


@dataclass
class Plan:
    rounds: int
    session_clients: tuple[int, ...]
    session_duration: float
    session_warmup: float
    retr_duration: float
    idle_counts: tuple[int, ...]
    big_messages: int
    bigstat_rounds: int
    notes: list[str] = field(default_factory=list)


def make_plan(quick: bool, rounds: int | None, fd_limit: int) -> Plan:
    if quick:
        plan = Plan(1, (1, 16, 64), 3.0, 0.5, 2.0, (1000,), 10_000, 1)
    else:
        plan = Plan(3, (1, 16, 64), 10.0, 1.0, 5.0, (1000, 10_000), 100_000, 2)
    if rounds:
        plan.rounds = rounds
        plan.bigstat_rounds = rounds
    # popd holds two descriptors per session (socket and maildrop lock),
    # shared among its workers (one per core), and the generator one: the
    # hard RLIMIT_NOFILE of one process bounds the sessions held.
    workers = os.cpu_count() or 1
    fit = min(fd_limit - 300, (fd_limit - 300) * workers // 2) // 100 * 100
    counts = []
    for count in plan.idle_counts:
        if count > fit:
            plan.notes.append(
                f"idle: {fit:,} sessions held instead of {count:,}: the hard "
                f"RLIMIT_NOFILE here is {fd_limit:,} (it cannot be raised without "
                "CAP_SYS_RESOURCE) and popd needs two descriptors per session "
                f"(socket and maildrop lock) in {workers} process(es)"
            )
            count = fit
        counts.append(count)
    plan.idle_counts = tuple(counts)
    return plan


def machine() -> str:
    model = "?"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dovecot = subprocess.run(
        [servers.ensure_dovecot(), "--version"], capture_output=True, text=True
    ).stdout.strip()
    import twisted

    return (
        f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {model}; "
        f"Linux {platform.release()}; Python {platform.python_version()}; "
        f"Twisted {twisted.__version__}; Dovecot {dovecot}"
    )


class Runner:
    def __init__(self, plan: Plan, chosen: list[servers.Server], log) -> None:
        self.plan = plan
        self.servers = chosen
        self.log = log
        self.results: dict[tuple, dict[str, list[dict]]] = {}

    def order(self, round_number: int) -> list[servers.Server]:
        shift = round_number % len(self.servers)
        return self.servers[shift:] + self.servers[:shift]

    def record(self, key: tuple, server: servers.Server, result: dict) -> None:
        self.results.setdefault(key, {}).setdefault(server.name, []).append(result)
        flag = "ok" if result["ok"] else f"FAILED ({result['failures']} failures)"
        summary = {
            k: round(v, 3) if isinstance(v, float) else v
            for k, v in result.items()
            if k not in ("errors", "ok", "scenario", "failures")
        }
        self.log(f"  {server.label:18} {flag}: {summary}")
        for error in result["errors"][:3]:
            self.log(f"      error: {error}")

    def sessions(self) -> None:
        plan = self.plan
        for clients in plan.session_clients:
            for round_number in range(plan.rounds):
                self.log(f"sessions, {clients} clients, round {round_number + 1}")
                for server in self.order(round_number):
                    result = loadgen.run_sessions(
                        server.port,
                        clients,
                        plan.session_duration,
                        plan.session_warmup,
                        server_pid=server.pid,
                    )
                    self.record(("sessions", clients), server, result)

    def retr(self) -> None:
        for tls in (False, True):
            for round_number in range(self.plan.rounds):
                kind = "TLS" if tls else "plain"
                self.log(f"retr, {kind}, round {round_number + 1}")
                for server in self.order(round_number):
                    result = loadgen.run_retr(
                        server.tls_port if tls else server.port,
                        tls,
                        self.plan.retr_duration,
                        server_pid=server.pid,
                    )
                    self.record(("retr", tls), server, result)

    def idle(self) -> None:
        for count in self.plan.idle_counts:
            self.log(f"idle, {count:,} sessions held")
            for server in self.servers:
                # A fresh server: earlier scenarios' freed memory would
                # otherwise absorb the sessions'.
                server.restart()
                result = loadgen.run_idle(server.port, count, server.pid)
                self.record(("idle", count), server, result)
                settle(server)
                quiet()

    def bigstat(self) -> None:
        messages = self.plan.big_messages
        # Whichever server went first would otherwise read the mail from
        # disk and leave it in the page cache for the others.
        big = maildata.maildir_of(self.servers[0].ws.mail_root, maildata.BIG_USER)
        self.log(f"bigstat: reading {big} into the page cache")
        maildata.read_all(big)
        for round_number in range(self.plan.bigstat_rounds):
            self.log(f"bigstat, {messages:,} messages, round {round_number + 1}")
            for server in self.order(round_number):
                result = loadgen.run_bigstat(
                    server.port, messages, forget=server.forget
                )
                self.record(("bigstat", messages), server, result)


def settle(server: servers.Server, timeout: float = 180.0) -> None:
    """
    Wait until the server is back to about its resting processes (Dovecot's
    pop3 processes of closed sessions have exited).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(proctree.tree_pids(server.pid)) <= server.resting + 2:
            break
        time.sleep(0.5)
    time.sleep(1.0)


def quiet(timeout: float = 60.0) -> None:
    """
    Wait (a bounded time) until few processes are runnable: thousands of
    server processes exiting keep the machine busy after a trial.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open("/proc/stat") as stat:
            for line in stat:
                if line.startswith("procs_running"):
                    running = int(line.split()[1])
                    break
            else:
                return
        if running <= 4:
            return
        time.sleep(1.0)


# The table.


def _valid(trials: list[dict]) -> list[dict]:
    return [trial for trial in trials if trial["ok"]]


def _figure(trials: list[dict] | None, key: str) -> tuple[float | None, str]:
    """
    The median of C{key} over the valid trials, and how to show it.
    """
    if not trials:
        return None, "—"
    valid = [t[key] for t in _valid(trials) if t.get(key) is not None]
    failed = len(trials) - len(_valid(trials))
    if not valid:
        return None, f"FAILED ({failed}/{len(trials)})"
    median = statistics.median(valid)
    text = _number(median)
    if len(valid) > 1:
        text += f" ({_number(min(valid))}–{_number(max(valid))})"
    if failed:
        text += f" [{failed} failed]"
    return median, text


def _number(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b:
        return "—"
    return f"{a / b:.2f}"


def rows(runner: Runner) -> list[tuple[str, str, dict[str, list[dict]]]]:
    """
    (label, key, trials by server) for each line of the table.
    """
    out = []
    results = runner.results
    for clients in runner.plan.session_clients:
        trials = results.get(("sessions", clients), {})
        out.append((f"sessions/s, {clients} client(s) ↑", "sessions_per_s", trials))
    for clients in runner.plan.session_clients:
        trials = results.get(("sessions", clients), {})
        out.append((f"session p50 ms, {clients} client(s) ↓", "p50_ms", trials))
        out.append((f"session p99 ms, {clients} client(s) ↓", "p99_ms", trials))
    for clients in runner.plan.session_clients:
        trials = results.get(("sessions", clients), {})
        out.append((f"server CPU ms/session, {clients} client(s) ↓", "cpu_ms", trials))
    for tls in (False, True):
        trials = results.get(("retr", tls), {})
        kind = "TLS" if tls else "plain"
        out.append((f"RETR MB/s, 1 MB messages, {kind} ↑", "mb_per_s", trials))
    for count in runner.plan.idle_counts:
        trials = results.get(("idle", count), {})
        out.append(
            (f"PSS KiB/idle session, {count:,} held ↓", "kib_per_session", trials)
        )
    messages = runner.plan.big_messages
    trials = results.get(("bigstat", messages), {})
    for label, key in (
        ("connect→STAT s, first login", "first_stat_s"),
        ("connect→STAT s, later logins", "later_stat_s"),
        ("LIST s", "list_s"),
        ("UIDL s", "uidl_s"),
    ):
        out.append((f"{label}, {messages:,} msgs ↓", key, trials))
    return out


def _derive(runner: Runner) -> None:
    for key, by_server in runner.results.items():
        if key[0] != "sessions":
            continue
        for trials in by_server.values():
            for trial in trials:
                counted = trial.get("sessions") or 0
                cpu = trial.get("server_cpu_s")
                # The CPU window is the measuring window, in which `counted`
                # sessions ended (about as many began).
                trial["cpu_ms"] = cpu * 1000 / counted if cpu and counted else None


def table(runner: Runner) -> str:
    _derive(runner)
    names = [server.name for server in runner.servers]
    labels = {server.name: server.label for server in runner.servers}
    header = ["scenario"] + [labels[name] for name in names]
    ratios = [
        (other, f"popd/{labels[other]}")
        for other in ("dovecot", "twisted")
        if other in names and "popd" in names
    ]
    header += [title for _, title in ratios]
    lines = [header]
    for label, key, trials in rows(runner):
        medians = {}
        cells = [label]
        for name in names:
            medians[name], text = _figure(trials.get(name), key)
            cells.append(text)
        for other, _ in ratios:
            cells.append(_ratio(medians.get("popd"), medians.get(other)))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for number, line in enumerate(lines):
        out.append(
            "| "
            + " | ".join(
                cell.ljust(width) for cell, width in zip(line, widths, strict=True)
            )
            + " |"
        )
        if number == 0:
            out.append("| " + " | ".join("-" * width for width in widths) + " |")
    return "\n".join(out)


def cpu_lines(runner: Runner) -> list[str]:
    """
    The generator's CPU beside the server's, per scenario and server.
    """
    out = []
    for key, by_server in runner.results.items():
        if key[0] not in ("sessions", "retr"):
            continue
        parts = []
        for name, trials in by_server.items():
            shares = [
                t["loadgen_cpu_per_server_cpu"]
                for t in trials
                if "loadgen_cpu_per_server_cpu" in t
            ]
            if shares:
                parts.append(f"{name} {statistics.median(shares) * 100:.0f}%")
        label = (
            f"sessions {key[1]} clients"
            if key[0] == "sessions"
            else f"retr {'TLS' if key[1] else 'plain'}"
        )
        out.append(f"  {label}: " + ", ".join(parts))
    return out


def drop_lines(runner: Runner) -> list[str]:
    """
    Connections the kernel dropped from a full listen queue (machine-wide)
    during the sessions trials: each costs its client a SYN retransmission.
    """
    out = []
    for key, by_server in runner.results.items():
        if key[0] != "sessions":
            continue
        parts = [
            f"{name} {sum(t.get('listen_queue_drops', 0) for t in trials)}"
            for name, trials in by_server.items()
        ]
        out.append(f"  sessions {key[1]} clients: " + ", ".join(parts))
    return out


def load_lines(runner: Runner) -> str:
    loads = []
    for by_server in runner.results.values():
        for trials in by_server.values():
            for trial in trials:
                for key in ("loadavg_start", "loadavg_end"):
                    if key in trial:
                        loads.append(float(trial[key].split()[0]))
    if not loads:
        return "?"
    low, high, middle = min(loads), max(loads), statistics.median(loads)
    return (
        f"1-minute load average during trials: {low:.2f}–{high:.2f} "
        f"(median {middle:.2f})"
    )


def failures_text(runner: Runner) -> list[str]:
    out = []
    for key, by_server in runner.results.items():
        for name, trials in by_server.items():
            for trial in trials:
                if not trial["ok"]:
                    out.append(
                        f"  {key} {name}: {trial['failures']} failures: "
                        f"{trial['errors'][:2]}"
                    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run of a few minutes"
    )
    parser.add_argument("--rounds", type=int, help="rounds of each scenario")
    parser.add_argument(
        "--scenarios",
        default="sessions,retr,bigstat,idle",
        help="comma-separated subset of sessions,retr,bigstat,idle "
        "(idle runs last: thousands of Dovecot processes leave the machine "
        "busy for a while)",
    )
    parser.add_argument(
        "--servers", default="popd,dovecot,twisted", help="comma-separated subset"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        help="mail tree and run directories (default /tmp/popd-bench/quick or full)",
    )
    parser.add_argument("--json", type=Path, help="also write every trial here")
    parser.add_argument("--keep-logs", action="store_true")
    options = parser.parse_args(argv)

    fd_limit = servers.raise_open_files()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    plan = make_plan(options.quick, options.rounds, min(fd_limit, hard))
    workdir = options.workdir or Path("/tmp/popd-bench") / (
        "quick" if options.quick else "full"
    )
    scenarios = [name.strip() for name in options.scenarios.split(",") if name.strip()]
    chosen_names = [name.strip() for name in options.servers.split(",") if name.strip()]
    classes = {cls.name: cls for cls in servers.SERVERS}
    unknown = [name for name in chosen_names if name not in classes] + [
        name
        for name in scenarios
        if name not in ("sessions", "retr", "idle", "bigstat")
    ]
    if unknown:
        parser.error(f"unknown: {', '.join(unknown)}")

    def log(message: str) -> None:
        print(message, flush=True)

    def terminate(signum, frame):
        raise KeyboardInterrupt()

    signal.signal(signal.SIGTERM, terminate)
    started_at = datetime.datetime.now(datetime.UTC)
    command = " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]])
    log(f"popd benchmark, {started_at:%Y-%m-%d %H:%M} UTC: {command}")
    log(f"machine: {machine()}")
    log(f"load average at start: {proctree.loadavg()}")
    layout = maildata.Layout(max(plan.idle_counts), plan.big_messages)
    workspace = servers.Workspace(workdir, layout, log=log)
    running: list[servers.Server] = []
    runner = None
    try:
        for name in chosen_names:
            server = classes[name](workspace)
            server.start()
            running.append(server)
            log(
                f"{server.label}: pid {server.pid}, "
                f"ports {server.port} / {server.tls_port} (TLS)"
            )
        runner = Runner(plan, running, log)
        for name in scenarios:
            getattr(runner, name)()
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for server in running:
            server.stop()
        workspace.cleanup(keep_logs=options.keep_logs)
        if runner is not None and runner.results:
            report(runner, plan, command, started_at, options.json)
    return 0


def report(runner, plan, command, started_at, json_path) -> None:
    print()
    print(f"## popd benchmark, {started_at:%Y-%m-%d %H:%M} UTC")
    print()
    print(f"`{command}` — {plan.rounds} round(s), servers interleaved; median (range)")
    print()
    print(f"Machine: {machine()}")
    print(load_lines(runner))
    print()
    print(table(runner))
    print()
    print(
        "↑ higher is better, ↓ lower is better; "
        "ratios are popd's figure over the other's."
    )
    for note in plan.notes:
        print(f"Note: {note}")
    sizes = {
        name: [t["sizes_exact"] for t in trials]
        for key, by_server in runner.results.items()
        if key[0] == "bigstat"
        for name, trials in by_server.items()
    }
    inexact = [name for name, flags in sizes.items() if not all(flags)]
    if inexact:
        print(
            "Note: STAT octets differ from the CRLF size of the messages for: "
            + ", ".join(inexact)
        )
    print("Load generator CPU as a share of the server's CPU (median):")
    for line in cpu_lines(runner):
        print(line)
    print("Listen-queue drops (SYN retransmitted after 1 s) in sessions trials:")
    for line in drop_lines(runner):
        print(line)
    failed = failures_text(runner)
    if failed:
        print("Failed trials (not counted):")
        for line in failed:
            print(line)
    if json_path:
        data = {
            "date": started_at.isoformat(),
            "command": command,
            "machine": machine(),
            "plan": plan.__dict__,
            "trials": [
                {"key": list(key), "server": name, **trial}
                for key, by_server in runner.results.items()
                for name, trials in by_server.items()
                for trial in trials
            ],
        }
        json_path.write_text(json.dumps(data, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
