"""
How fast L{popd.stream.send_message} turns a stored message into wire form.

The message goes from memory into a consumer that counts and drops what it
gets: no disk, no network, no reactor (a L{Clock} runs the turns).  The
figures are octets of stored message per second, in MB (10**6 octets), for
large messages, and microseconds per message for small ones (the common
case, where the cost of a send is mostly per message, not per octet).

Run from the repository root::

    python -m bench.stream_throughput
"""

from __future__ import annotations

import io
import random
import time

from twisted.internet.task import Clock

from bench.maildata import small_message
from popd.stream import send_message

SIZES = [1_000_000, 100_000_000]
SMALL_MESSAGES = 1000
REPEATS = 5

WORDS = [
    b"the",
    b"message",
    b"server",
    b"POP3",
    b"=3D",
    b"quoted-printable",
    b"caf\xc3\xa9",
    b"www.example.org.",
    b"...",
]


def make_message(size: int) -> bytes:
    """
    @return: a message of about C{size} octets with LF line endings: a
        header block, then lines of 0 to 20 words, one in 50 starting with
        a dot.
    """
    rng = random.Random(1939)
    lines = [b"From: a@example.org", b"Subject: benchmark", b""]
    for number in range(40_000):
        line = b" ".join(rng.choices(WORDS, k=rng.randint(0, 20)))
        lines.append(b"." + line if number % 50 == 0 else line)
    block = b"\n".join(lines) + b"\n"
    return (block * (size // len(block) + 1))[:size]


class DiscardingConsumer:
    """
    A transport that never pushes back and only counts what it is given.
    """

    def __init__(self) -> None:
        self.octets = 0

    def registerProducer(self, producer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.octets += len(data)


def time_send(message: bytes) -> float:
    """
    @return: the seconds one RETR of C{message} takes.
    """
    clock = Clock()
    consumer = DiscardingConsumer()
    sizes = []
    start = time.perf_counter()
    d = send_message(consumer, io.BytesIO(message), clock=clock)
    while clock.getDelayedCalls():
        clock.advance(0)
    elapsed = time.perf_counter() - start
    d.addCallback(sizes.append)
    assert sizes and consumer.octets > sizes[0] >= len(message)
    return elapsed


def main() -> None:
    for size in SIZES:
        lf_message = make_message(size)
        for endings, message in [
            ("LF", lf_message),
            ("CRLF", lf_message.replace(b"\n", b"\r\n")),
        ]:
            best = min(time_send(message) for _ in range(REPEATS))
            print(
                f"{len(message) / 1e6:7.1f} MB stored with {endings:4} endings:"
                f" {len(message) / best / 1e6:6.0f} MB/s"
            )
    small = [small_message("bench", number) for number in range(SMALL_MESSAGES)]
    best = min(sum(map(time_send, small)) for _ in range(REPEATS))
    print(
        f"{len(small):,} messages of 2-4 KB with LF endings:"
        f" {best / len(small) * 1e6:6.1f} µs each"
    )


if __name__ == "__main__":
    main()
