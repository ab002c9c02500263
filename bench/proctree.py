"""
A server's whole process tree as /proc shows it: its processes, their
proportional set size (PSS) and the CPU time they have used.
"""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            data = file.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after the last ")".
    return data[data.rfind(")") + 2 :].split()


def tree_pids(root: int) -> list[int]:
    """
    C{root} and every process descended from it, alive now.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found = [root]
    index = 0
    while index < len(found):
        found.extend(children.get(found[index], ()))
        index += 1
    return found


def pss_kib(pid: int) -> int:
    """
    The PSS of one process in KiB (0 if it is gone).
    """
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as file:
            for line in file:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss_kib(root: int) -> tuple[int, int]:
    """
    The PSS of the whole tree in KiB, and how many processes it has.
    """
    pids = tree_pids(root)
    return sum(pss_kib(pid) for pid in pids), len(pids)


def tree_cpu_seconds(root: int) -> float:
    """
    CPU seconds (user + system) used by the tree, including children that
    have exited and been reaped by a process of the tree: differences
    between two calls are the CPU the server spent between them.
    """
    ticks = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is not None:
            # utime, stime, cutime, cstime (fields 14-17 of stat, from 1).
            ticks += sum(int(value) for value in fields[11:15])
    return ticks / _TICKS


def loadavg() -> str:
    with open("/proc/loadavg") as file:
        return " ".join(file.read().split()[:3])


def listen_drops() -> int:
    """
    The machine's count of connections dropped because a listen queue was
    full (TcpExt ListenOverflows + ListenDrops): a client then waits for a
    SYN retransmission, a second or more.
    """
    try:
        with open("/proc/net/netstat") as file:
            lines = file.read().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0)) + int(
                table.get("ListenDrops", 0)
            )
    return 0
