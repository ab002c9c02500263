"""
Multi-line replies (LIST, UIDL) written as the socket drains.

A 100,000-message LIST is a few megabytes; building it whole for every
client that asks would let a handful of clients pin a lot of memory, so the
lines are generated in batches by a streaming producer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

#: About how many octets each write carries: the transport pauses the
#: producer once its buffer holds more than 64 KiB.
WRITE_SIZE = 32 * 1024


@implementer(IPushProducer)
class _LineProducer:
    def __init__(self, consumer, lines: Iterator[bytes]) -> None:
        self._consumer = consumer
        self._lines = lines
        self._paused = False
        self._writing = False
        self.done: Deferred[None] = Deferred()

    def start(self) -> None:
        self._consumer.registerProducer(self, True)
        self._write()

    def _write(self) -> None:
        # pauseProducing may be called from inside write(): re-entrancy guard.
        if self._writing or self.done.called:
            return
        self._writing = True
        try:
            while not self._paused:
                batch = []
                size = 0
                for line in self._lines:
                    batch.append(line)
                    size += len(line)
                    if size >= WRITE_SIZE:
                        break
                if not batch:
                    self._finish()
                    return
                self._consumer.write(b"".join(batch))
        finally:
            self._writing = False

    def _finish(self) -> None:
        self._consumer.write(b".\r\n")
        self._consumer.unregisterProducer()
        self.done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._write()

    def stopProducing(self) -> None:
        self._paused = True
        if not self.done.called:
            self.done.callback(None)


def send_lines(consumer, lines: Iterable[bytes]) -> Deferred[None]:
    """
    Write C{lines} (each ending in CRLF, none starting with a dot) and the
    terminating C{.} line to C{consumer}, pausing while it is full.
    """
    producer = _LineProducer(consumer, iter(lines))
    producer.start()
    return producer.done
