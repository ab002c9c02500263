"""
What a file store saw of a maildrop, kept in memory between sessions, so a
login to an unchanged maildrop costs a few C{stat} calls instead of a scan.

Whatever is cached is keyed by the I{stamps} of the files and directories it
was built from (L{file_stamp}: inode, size, modification and change times):
any delivery, removal, rename or flag change in a Maildir changes the
modification time of C{new/} or C{cur/}, and popd replaces its own files
by renaming over them.  Timestamps are coarse, though (a few milliseconds,
a whole second on some filesystems): two changes close together can leave
the same time.  So a value built from sources that changed less than
L{SETTLE_SECONDS} before they were looked at is not reused (L{is_settled}),
and the next session looks again.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

#: How long after its last change a source is trusted not to change again
#: under the same timestamp.
SETTLE_SECONDS = 2.0

#: A file's identity and last change: C{(inode, size, mtime, ctime)} in
#: nanoseconds, or C{None} for a missing file.
Stamp = tuple[int, int, int, int] | None

Key = TypeVar("Key")
Value = TypeVar("Value")


def file_stamp(path: str) -> Stamp:
    """
    The stamp of C{path} (following symbolic links), C{None} if it is
    missing.

    @raise OSError: it cannot be looked at for another reason.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def is_settled(stamps: Iterable[Stamp], looked_at: float) -> bool:
    """
    Whether none of the sources with C{stamps} changed in the
    L{SETTLE_SECONDS} before C{looked_at} (POSIX seconds, taken before the
    stamps were).
    """
    limit = int((looked_at - SETTLE_SECONDS) * 1e9)
    return all(
        stamp is None or (stamp[2] < limit and stamp[3] < limit) for stamp in stamps
    )


class BoundedCache(Generic[Key, Value]):
    """
    A thread-safe mapping that forgets its least recently used entries once
    their total weight passes C{capacity}.

    @param weigh: the weight of a value (for a snapshot, its messages);
        an entry heavier than the whole capacity is not kept.
    """

    def __init__(self, capacity: int, weigh: Callable[[Value], int]) -> None:
        self.capacity = capacity
        self._weigh = weigh
        self._entries: OrderedDict[Key, tuple[Value, int]] = OrderedDict()
        self._weight = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def weight(self) -> int:
        """
        The total weight of the entries kept.
        """
        return self._weight

    def get(self, key: Key) -> Value | None:
        """
        The value kept for C{key}, now the most recently used; or C{None}.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: Key, value: Value) -> None:
        """
        Keep C{value} for C{key}, replacing what was there, then forget the
        least recently used entries until the weight fits.
        """
        weight = self._weigh(value)
        with self._lock:
            self._discard(key)
            if weight > self.capacity:
                return
            self._entries[key] = (value, weight)
            self._weight += weight
            while self._weight > self.capacity:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._weight -= dropped

    def discard(self, key: Key) -> None:
        """
        Forget the entry for C{key}, if any.
        """
        with self._lock:
            self._discard(key)

    def _discard(self, key: Key) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._weight -= entry[1]
