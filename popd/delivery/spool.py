"""
Where an incoming message waits while it is received: in memory up to
1 MiB, then in an unlinked temporary file, so that a large message is never
held whole in memory.  Each recipient's delivery reads it again from the
start, behind that recipient's own trace header fields.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO

__all__ = ["MEMORY_LIMIT", "HEAD_SIZE", "MessageTooLarge", "Spool", "spool_directory"]

#: Messages up to this size stay in memory; larger ones go to a file.
MEMORY_LIMIT = 1 << 20

#: How much of the start of a message is kept aside (see L{Spool.head}).
HEAD_SIZE = 1024


class MessageTooLarge(Exception):
    """
    The message is larger than C{[delivery] max_message_size}.
    """


def spool_directory(data_dir: Path) -> Path:
    """
    The spool directory of a data directory: C{<data_dir>/spool}.
    """
    return data_dir / "spool"


class Spool:
    """
    One message being received.

    @ivar stored: the octets written so far.
    @ivar head: the first L{HEAD_SIZE} octets, for L{needs_separator
        <popd.delivery.headers.needs_separator>}.
    """

    def __init__(self, directory: Path | str | None = None) -> None:
        """
        @param directory: where a message larger than L{MEMORY_LIMIT} goes
            (created with mode 0700 if missing); the system's temporary
            directory if C{None}.
        """
        if directory is not None:
            os.makedirs(directory, 0o700, exist_ok=True)
        self._file = tempfile.SpooledTemporaryFile(
            max_size=MEMORY_LIMIT,
            mode="w+b",
            dir=None if directory is None else os.fspath(directory),
            prefix="popd-spool-",
        )
        self.stored = 0
        self.head = b""

    def write(self, data: bytes) -> None:
        """
        Append C{data}.  The one write that crosses L{MEMORY_LIMIT} moves
        the message to a file.

        @raise OSError: the file cannot be made or written.
        """
        if not data:
            return
        if len(self.head) < HEAD_SIZE:
            self.head += data[: HEAD_SIZE - len(self.head)]
        self._file.write(data)
        self.stored += len(data)

    @property
    def in_memory(self) -> bool:
        return not self._file._rolled

    def reader(self, prefix: bytes = b"") -> BinaryIO:
        """
        A file object reading C{prefix} and then the whole message from its
        start.  One reader at a time: each one rewinds the spool.
        """
        self._file.seek(0)
        return _PrefixedReader(prefix, self._file)

    def close(self) -> None:
        """
        Throw the message away (the file, if any, was never linked).
        """
        self._file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _PrefixedReader:
    """
    C{prefix}, then the rest of C{source}: what a store's C{deliver} reads.
    Closing it leaves the source open for the next recipient.
    """

    def __init__(self, prefix: bytes, source: BinaryIO) -> None:
        self._prefix = prefix
        self._source = source

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            data, self._prefix = self._prefix, b""
            return data + self._source.read()
        if self._prefix:
            data, self._prefix = self._prefix[:size], self._prefix[size:]
            if len(data) < size:
                data += self._source.read(size - len(data))
            return data
        return self._source.read(size)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._prefix = b""
