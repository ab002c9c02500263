"""
Where popd spends its time: py-spy samples popd (every thread) while the
load generator drives the C{sessions} scenario, then the C{retr} scenario,
and prints the functions with the most samples, by self time and by
inclusive time, with their share of the server's CPU per session, per
RETR'd megabyte and per login on the large maildrop.

    /work/venv/bin/pip install py-spy
    python -m bench.profile --clients 16 --duration 15

Writes C{NAME.txt} (py-spy's raw collapsed stacks) and C{NAME.svg} (a
flame graph) for each scenario to C{--out}.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from bench import loadgen, maildata, proctree, servers

_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        raise SystemExit("py-spy is missing: pip install py-spy")
    return found


def record(
    pid: int, seconds: float, output: Path, fmt: str, rate: int
) -> threading.Thread:
    """
    Run C{py-spy record} against C{pid} for C{seconds} in the background.
    """
    command = [
        py_spy(),
        "record",
        "--pid",
        str(pid),
        # popd's workers are the master's children.
        "--subprocesses",
        "--duration",
        str(int(seconds)),
        "--rate",
        str(rate),
        "--format",
        fmt,
        "--output",
        str(output),
    ]
    thread = threading.Thread(
        target=subprocess.run,
        args=(command,),
        kwargs={"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL},
        daemon=True,
    )
    thread.start()
    return thread


def _short(frame: str) -> str:
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match['function']} ({path})"


# Leaves where a thread waits rather than works (py-spy samples a thread
# blocked on a lock or in epoll_wait as active): the reactor waiting for
# events, thread-pool workers waiting for work.
IDLE_LEAVES = (
    "Condition.wait (threading.py)",
    "EPollReactor.doPoll (twisted/internet/epollreactor.py)",
)


def summarise(raw: Path, per_unit_ms: float | None, unit: str, top: int) -> str:
    """
    Self and inclusive sample counts by function from py-spy's raw output,
    and self time by innermost popd function, over the busy samples.
    """
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_popd: Counter[str] = Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # Frames run outermost first.
        frames = [_short(frame) for frame in stack.split(";")]
        if frames[-1] in IDLE_LEAVES:
            idle += count
            continue
        total += count
        self_counts[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
        owner = next((f for f in reversed(frames) if "(popd/" in f), None)
        by_popd[owner or f"(no popd frame) {frames[-1]}"] += count
    if not total:
        return "no samples"

    def table(counter: Counter[str], title: str) -> list[str]:
        lines = [f"{title} (of {total} samples)"]
        for frame, count in counter.most_common(top):
            share = count / total
            cost = ""
            if per_unit_ms:
                cost = f"  {share * per_unit_ms * 1000:8.0f} µs/{unit}"
            lines.append(f"  {share * 100:5.1f}%{cost}  {frame}")
        return lines

    out = [
        f"{total} busy samples ({idle} more idle: reactor in epoll_wait, "
        "workers waiting); shares are of the busy samples, µs are shares of "
        f"the server's measured CPU per {unit}",
        "",
    ]
    out += table(self_counts, "self time by function")
    out.append("")
    out += table(by_popd, "self time by innermost popd function")
    out.append("")
    out += table(inclusive, "inclusive time")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--rate", type=int, default=100, help="samples/s")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument(
        "--scenarios",
        default="sessions,retr,bigstat",
        help="comma-separated subset of sessions,retr,bigstat (later logins "
        "on the workspace's large maildrop)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/popd-bench/quick"))
    parser.add_argument(
        "--big-messages", type=int, default=10_000, help="the workspace's layout"
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/popd-bench/profile"))
    options = parser.parse_args(argv)
    options.out.mkdir(parents=True, exist_ok=True)
    servers.raise_open_files()
    layout = maildata.Layout(1000, options.big_messages)
    workspace = servers.Workspace(options.workdir, layout)
    popd = servers.Popd(workspace)
    seconds = options.duration

    def sessions() -> tuple[str, float, str]:
        result = loadgen.run_sessions(
            popd.port, options.clients, seconds, 0.5, server_pid=popd.pid
        )
        per_session = result["server_cpu_s"] * 1000 / max(1, result["sessions"])
        return (
            f"sessions, {options.clients} clients, under py-spy: "
            f"{result['sessions_per_s']:.0f} sessions/s, {per_session:.2f} ms "
            f"server CPU/session, ok={result['ok']}",
            per_session,
            "session",
        )

    def retr() -> tuple[str, float, str]:
        result = loadgen.run_retr(popd.port, False, seconds, server_pid=popd.pid)
        per_mb = result["server_cpu_s"] * 1000 / max(1e-9, result["octets"] / 1e6)
        return (
            f"retr, plain, 1 MB messages, under py-spy: {result['mb_per_s']:.0f} "
            f"MB/s, {per_mb:.2f} ms server CPU/MB, ok={result['ok']}",
            per_mb,
            "MB",
        )

    def bigstat() -> tuple[str, float, str]:
        # Later logins (the first one is in the warm-up), each with LIST and
        # UIDL, until the recording ends.
        before = proctree.tree_cpu_seconds(popd.pid)
        deadline = time.monotonic() + seconds - 1
        logins = 0
        ok = True
        while time.monotonic() < deadline:
            result = loadgen.run_bigstat(popd.port, options.big_messages, later=1)
            logins += 2
            ok = ok and result["ok"]
        per_login = (proctree.tree_cpu_seconds(popd.pid) - before) * 1000 / logins
        return (
            f"bigstat, {options.big_messages:,} messages, under py-spy: {logins} "
            f"logins (half with LIST and UIDL), {per_login:.0f} ms server "
            f"CPU/login, ok={ok}",
            per_login,
            "login",
        )

    chosen = {"sessions": sessions, "retr": retr, "bigstat": bigstat}
    names = [name.strip() for name in options.scenarios.split(",") if name.strip()]
    reports = []
    try:
        popd.start()
        loadgen.run_sessions(popd.port, options.clients, 2.0, 0.5)
        if "bigstat" in names:
            loadgen.run_bigstat(popd.port, options.big_messages, later=0)
        for name in names:
            for fmt in ("raw", "flamegraph"):
                output = options.out / f"{name}.{fmt[:3]}"
                spy = record(popd.pid, seconds, output, fmt, options.rate)
                title, per_unit, unit = chosen[name]()
                spy.join(seconds + 30)
                if fmt == "raw":
                    summary = summarise(output, per_unit, unit, options.top)
                    reports.append(f"== {title}\n{summary}")
        for path in options.out.glob("*.fla"):
            path.rename(path.with_suffix(".svg"))
        for path in options.out.glob("*.raw"):
            path.rename(path.with_suffix(".txt"))
        print("\n\n".join(reports))
        print(f"\nflame graphs and raw stacks in {options.out}")
    finally:
        popd.stop()
        workspace.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
