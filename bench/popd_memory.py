"""
What an idle authenticated popd session is made of: popd runs under
C{tracemalloc} (the same service C{twistd popd} builds), the load
generator holds N sessions, and the Python memory allocated between a
snapshot before and one while they are held is shown by allocation site
(the innermost popd frame, else Twisted's, else the allocating line), per
session.  Memory outside Python's allocator (kernel socket buffers,
OpenSSL) is not in these figures; PSS (see C{bench.run}) has the
process's share of everything resident.

    python -m bench.popd_memory --sessions 1000
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import tracemalloc
from collections import defaultdict
from pathlib import Path

SNAPSHOT_FRAMES = 12


def serve(config: str, snapshots: Path) -> None:
    """
    Run popd's service under tracemalloc; on SIGUSR1 write the next
    snapshot as C{snapshots}/N.snap.
    """
    tracemalloc.start(SNAPSHOT_FRAMES)
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from popd.tap import Options, makeService

    # Twisted keeps events in memory until logging begins: begin it.
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    options = Options()
    options.parseOptions(["--config", config])
    service = makeService(options)
    service.privilegedStartService()
    service.startService()
    taken = [0]

    def dump() -> None:
        taken[0] += 1
        path = snapshots / f"{taken[0]}.snap"
        tracemalloc.take_snapshot().dump(str(path) + ".tmp")
        os.rename(str(path) + ".tmp", path)

    signal.signal(signal.SIGUSR1, lambda *_: reactor.callFromThread(dump))
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def _where(frame: tracemalloc.Frame) -> str:
    name = frame.filename.split("site-packages/")[-1].split("/work/main/")[-1]
    if name.startswith("/"):
        name = name.rsplit("/", 1)[-1]
    return f"{name}:{frame.lineno}"


def _site(traceback: tracemalloc.Traceback) -> str:
    """
    The allocating line, and (after "<") the innermost popd frame that led
    to it, or else Twisted's.
    """
    frames = list(reversed(traceback))  # most recent call first
    site = _where(frames[0])
    for marker in ("/popd/", "/twisted/"):
        for frame in frames:
            if marker in frame.filename:
                caller = _where(frame)
                return site if caller == site else f"{site} < {caller}"
    return site


def analyse(before: Path, after: Path, sessions: int, top: int) -> str:
    first = tracemalloc.Snapshot.load(str(before))
    second = tracemalloc.Snapshot.load(str(after))
    ignore = [
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    ]
    first, second = first.filter_traces(ignore), second.filter_traces(ignore)
    sizes: dict[str, int] = defaultdict(int)
    counts: dict[str, int] = defaultdict(int)
    for diff in second.compare_to(first, "traceback"):
        site = _site(diff.traceback)
        sizes[site] += diff.size_diff
        counts[site] += diff.count_diff
    total = sum(sizes.values())
    import linecache

    lines = [
        f"Python allocations per held session: {total / sessions / 1024:.2f} KiB "
        f"({total / 1024:.0f} KiB for {sessions} sessions)",
        "  bytes/session  blocks/session  site",
    ]
    roots = ("/work/main/", sys.prefix + "/lib/python3.11/site-packages/")
    for site, size in sorted(sizes.items(), key=lambda item: -item[1])[:top]:
        filename, _, lineno = site.split(" < ")[0].rpartition(":")
        source = ""
        for root in roots:
            text = linecache.getline(root + filename, int(lineno)).strip()
            if text:
                source = text[:60]
                break
        lines.append(
            f"  {size / sessions:13.0f}  {counts[site] / sessions:14.1f}"
            f"  {site}  {source}"
        )
    by_file: dict[str, int] = defaultdict(int)
    for site, size in sizes.items():
        owner = site.split(" < ")[-1].rpartition(":")[0]
        by_file[owner] += size
    lines += ["", "  bytes/session  by file (the popd or Twisted file that allocated)"]
    for owner, size in sorted(by_file.items(), key=lambda item: -item[1])[:12]:
        lines.append(f"  {size / sessions:13.0f}  {owner}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--snapshots", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/popd-bench/quick"))
    options = parser.parse_args(argv)
    if options.serve:
        serve(options.serve, options.snapshots)
        return 0

    from bench import loadgen, maildata, servers

    class TracedPopd(servers.Popd):
        name = "popd-traced"

        def command(self) -> list[str]:
            return [
                sys.executable,
                "-m",
                "bench.popd_memory",
                "--serve",
                str(self.config),
                "--snapshots",
                str(self.dir),
            ]

    servers.raise_open_files()
    layout = maildata.Layout(max(1000, options.sessions), 10_000)
    workspace = servers.Workspace(options.workdir, layout)
    popd = TracedPopd(workspace)
    taken: list[Path] = []

    def snapshot(label: str) -> None:
        os.kill(popd.pid, signal.SIGUSR1)
        path = popd.dir / f"{len(taken) + 1}.snap"
        deadline = time.monotonic() + 300
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        taken.append(path)

    try:
        popd.start()
        result = loadgen.run_idle(
            popd.port, options.sessions, popd.pid, on_held=snapshot
        )
        if not result["ok"]:
            print("idle run failed:", result["errors"][:3])
            return 1
        print(analyse(taken[0], taken[1], result["sessions"], options.top))
    finally:
        popd.stop()
        workspace.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
