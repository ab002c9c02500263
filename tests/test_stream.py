"""
Tests for L{popd.stream}: wire sizes, the wire encoding of RETR and TOP, and
sending with back-pressure, driven by a L{Clock} instead of a reactor.
"""

from __future__ import annotations

import io
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from popd.stream import (
    SendAborted,
    WireEncoder,
    WireSizeCounter,
    send_message,
    wire_size,
)


class CountingFile:
    """
    A stored message that counts its reads, may fail them, and records
    whether it was closed.
    """

    def __init__(self, data: bytes, fail_at_read: int | None = None) -> None:
        self._file = io.BytesIO(data)
        self._fail_at_read = fail_at_read
        self.reads = 0
        self.closed = False

    def read(self, size: int) -> bytes:
        self.reads += 1
        if self.reads == self._fail_at_read:
            raise OSError(5, "Input/output error")
        return self._file.read(size)

    def close(self) -> None:
        self.closed = True


class SlowConsumer:
    """
    A transport whose client reads slowly, with the producer handling of
    Twisted's TCP transport: C{write} pauses a streaming producer once more
    than C{buffer_size} octets wait, C{drain} empties the buffer and resumes
    it, and losing the connection stops it.
    """

    def __init__(self, buffer_size: int, disconnected: bool = False) -> None:
        self.buffer_size = buffer_size
        self.disconnected = disconnected
        self.buffered = b""
        self.received = b""
        self.producer = None

    def registerProducer(self, producer, streaming: bool) -> None:
        assert streaming
        if self.disconnected:
            producer.stopProducing()
        else:
            self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        self.buffered += data
        if len(self.buffered) > self.buffer_size and self.producer is not None:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.received += self.buffered
        self.buffered = b""
        if self.producer is not None:
            self.producer.resumeProducing()

    def connection_lost(self) -> None:
        self.disconnected = True
        if self.producer is not None:
            self.producer.stopProducing()
            self.producer = None


class TurnClock:
    """
    The C{callLater} of a reactor, run one turn at a time: unlike L{Clock},
    a call made during a turn waits for the next one.
    """

    def __init__(self) -> None:
        self.pending: list[DelayedCall] = []

    def callLater(self, delay: float, f, *args, **kwargs) -> DelayedCall:
        call = DelayedCall(
            delay, f, args, kwargs, self.pending.remove, lambda call: None
        )
        self.pending.append(call)
        return call

    def turn(self) -> None:
        due, self.pending = self.pending, []
        for call in due:
            call.called = 1
            call.func(*call.args, **call.kw)


def run(clock: Clock) -> None:
    """
    Run what is due on C{clock}, including what that schedules, until
    nothing is left.
    """
    while clock.getDelayedCalls():
        clock.advance(0)


def result_of(d: Deferred):
    """
    @return: the result C{d} has fired with; a failure is raised.
    """
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def send(
    data: bytes, body_lines: int | None = None, chunk_size: int = 65536
) -> tuple[bytes, int]:
    """
    Send C{data} into a L{StringTransport}.

    @return: what was written and the size the send fired with.
    """
    transport = StringTransport()
    clock = Clock()
    d = send_message(
        transport,
        CountingFile(data),
        body_lines,
        chunk_size=chunk_size,
        clock=clock,
    )
    run(clock)
    return transport.value(), result_of(d)


def reference(message: bytes, body_lines: int | None = None) -> tuple[bytes, int]:
    """
    The wire form of C{message} and its size, computed line by line.
    """
    *terminated, last = message.split(b"\n")
    lines = [(line.removesuffix(b"\r"), b"\r\n") for line in terminated]
    if last:
        lines.append((last, b""))
    if body_lines is not None and (b"", b"\r\n") in lines:
        lines = lines[: lines.index((b"", b"\r\n")) + 1 + body_lines]
    wire = b"".join(b"." * line.startswith(b".") + line + b"\r\n" for line, _ in lines)
    size = sum(len(line) + len(ending) for line, ending in lines)
    return wire + b".\r\n", size


def unstuff(wire: bytes) -> bytes:
    """
    Read a multi-line response the way a client does: up to the lone C{.}
    line, removing the stuffed C{.}.
    """
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    lines = wire.split(b"\r\n")[:-2]
    return b"".join(line.removeprefix(b".") + b"\r\n" for line in lines)


def crlf(message: bytes) -> bytes:
    """
    C{message} with every LF not preceded by CR turned into CRLF.
    """
    return re.sub(rb"(?<!\r)\n", b"\r\n", message)


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """
    Split C{data} into chunks of the given sizes, cycling through them.
    """
    chunks = []
    position = 0
    while position < len(data):
        size = sizes[len(chunks) % len(sizes)]
        chunks.append(data[position : position + size])
        position += size
    return chunks


messages = st.lists(
    st.sampled_from(
        [b"\n", b"\r\n", b"\r", b".", b"..", b"a", b"Subject: x", b"\xff\x00"]
    ),
    max_size=40,
).map(b"".join)


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (b"", 0),
        (b"abc", 3),
        (b"a\n", 3),
        (b"a\r\n", 3),
        (b"a\r", 2),
        (b"\r\r\n\n", 5),
        (b"\n\n", 4),
    ],
)
def test_wire_size(data: bytes, size: int) -> None:
    assert wire_size(data) == size


def test_wire_size_counter_crlf_split_across_chunks() -> None:
    counter = WireSizeCounter()
    for chunk in (b"a\r", b"\nb\r", b"", b"\n", b"\n"):
        counter.feed(chunk)
    assert counter.size == len(b"a\r\nb\r\n\r\n")


def test_wire_size_counter_bare_cr_then_lf_later() -> None:
    counter = WireSizeCounter()
    for chunk in (b"a\r", b"b\n"):
        counter.feed(chunk)
    assert counter.size == len(b"a\rb\r\n")


@given(messages, st.lists(st.integers(1, 100), min_size=1))
def test_wire_size_counter_any_chunking(message: bytes, sizes: list[int]) -> None:
    counter = WireSizeCounter()
    for chunk in chunked(message, sizes):
        counter.feed(chunk)
    assert counter.size == wire_size(message) == len(crlf(message))


@pytest.mark.parametrize(
    ("data", "wire"),
    [
        (b"", b".\r\n"),
        (b"\n", b"\r\n.\r\n"),
        (b"a\nb\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb\r\n", b"a\r\nb\r\n.\r\n"),
        (b"a\r\nb\nc\r\n", b"a\r\nb\r\nc\r\n.\r\n"),
        (b"no newline", b"no newline\r\n.\r\n"),
        (b"a\nno newline", b"a\r\nno newline\r\n.\r\n"),
        (b".\n", b"..\r\n.\r\n"),
        (b".", b"..\r\n.\r\n"),
        (b"a\n.\nb\n", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"..\n", b"...\r\n.\r\n"),
        (b".hidden\n..two\n", b"..hidden\r\n...two\r\n.\r\n"),
        (b"a.b\n a.\n", b"a.b\r\n a.\r\n.\r\n"),
        (b"a\rb\n", b"a\rb\r\n.\r\n"),
        (b"a\r.b\n", b"a\r.b\r\n.\r\n"),
        (b"a\r", b"a\r\r\n.\r\n"),
        (b"\r\r\n", b"\r\r\n.\r\n"),
        (b"caf\xc3\xa9\x00\xff\n", b"caf\xc3\xa9\x00\xff\r\n.\r\n"),
    ],
)
def test_retr_wire_form(data: bytes, wire: bytes) -> None:
    for chunk_size in (1, 2, 3, 65536):
        assert send(data, chunk_size=chunk_size) == (wire, wire_size(data))


@pytest.mark.parametrize(
    ("chunks", "wire"),
    [
        # CR at the end of a chunk, LF at the start of the next.
        ([b"a\r", b"\nb\r\n"], b"a\r\nb\r\n"),
        ([b"a\r", b"\n.b\n"], b"a\r\n..b\r\n"),
        ([b"a\r", b"\r", b"\n"], b"a\r\r\n"),
        # A chunk that starts a line with a dot.
        ([b"a\n", b".b\n"], b"a\r\n..b\r\n"),
        ([b"a\r\n", b".", b".\n"], b"a\r\n...\r\n"),
        # A dot after a bare CR at a chunk boundary starts no line.
        ([b"a\r", b".b\n"], b"a\r.b\r\n"),
        ([b"a", b".b\n"], b"a.b\r\n"),
    ],
)
def test_encoder_chunk_boundaries(chunks: list[bytes], wire: bytes) -> None:
    encoder = WireEncoder()
    assert b"".join(map(encoder.feed, chunks)) + encoder.finish() == wire + b".\r\n"
    assert encoder.size == wire_size(b"".join(chunks))


TOP_MESSAGE = b"From: a\nSubject: b\n\nline 1\n.line 2\nline 3\n"


@pytest.mark.parametrize(
    ("body_lines", "wire"),
    [
        (0, b"From: a\r\nSubject: b\r\n\r\n"),
        (1, b"From: a\r\nSubject: b\r\n\r\nline 1\r\n"),
        (2, b"From: a\r\nSubject: b\r\n\r\nline 1\r\n..line 2\r\n"),
        (3, b"From: a\r\nSubject: b\r\n\r\nline 1\r\n..line 2\r\nline 3\r\n"),
        (100, b"From: a\r\nSubject: b\r\n\r\nline 1\r\n..line 2\r\nline 3\r\n"),
    ],
)
def test_top(body_lines: int, wire: bytes) -> None:
    for chunk_size in (1, 5, 65536):
        assert send(TOP_MESSAGE, body_lines, chunk_size) == (
            wire + b".\r\n",
            len(wire) - wire.count(b"\n.."),
        )


@pytest.mark.parametrize(
    ("data", "body_lines", "wire", "size"),
    [
        # CRLF headers, and an empty line kept in the body.
        (b"A: 1\r\n\r\n\r\nx\r\ny\r\n", 2, b"A: 1\r\n\r\n\r\nx\r\n", 13),
        # No empty line: all header, sent whole.
        (b"A: 1\nB: 2", 0, b"A: 1\r\nB: 2\r\n", 10),
        # An empty first line: the header block is empty.
        (b"\nbody\nmore\n", 1, b"\r\nbody\r\n", 8),
        (b"\nbody\nmore\n", 0, b"\r\n", 2),
        # A line holding a bare CR is not empty.
        (b"A\n\r\r\nb\n\nc\n", 0, b"A\r\n\r\r\nb\r\n\r\n", 11),
        # TOP stops before a CR that ends the chunk.
        (b"A\n\nb\nc\r", 1, b"A\r\n\r\nb\r\n", 8),
        # The last body line has no newline.
        (b"A\n\nbody", 5, b"A\r\n\r\nbody\r\n", 9),
    ],
)
def test_top_edges(data: bytes, body_lines: int, wire: bytes, size: int) -> None:
    for chunk_size in (1, 2, 65536):
        assert send(data, body_lines, chunk_size) == (wire + b".\r\n", size)


def test_top_stops_reading() -> None:
    """
    Once TOP has its lines, the rest of the message is not read.
    """
    message = CountingFile(b"A: 1\n\nbody\n" + b"x" * 1000)
    transport = StringTransport()
    clock = Clock()
    d = send_message(transport, message, 1, chunk_size=4, clock=clock)
    run(clock)
    assert result_of(d) == len(b"A: 1\r\n\r\nbody\r\n")
    assert message.reads == 3
    assert message.closed


@given(
    messages,
    st.none() | st.integers(0, 5),
    st.integers(1, 100),
)
def test_matches_reference(
    message: bytes, body_lines: int | None, chunk_size: int
) -> None:
    wire, size = send(message, body_lines, chunk_size)
    assert (wire, size) == reference(message, body_lines)
    if body_lines is None:
        assert size == wire_size(message)
        expected = crlf(message)
        if expected and not expected.endswith(b"\r\n"):
            expected += b"\r\n"
        assert unstuff(wire) == expected


@pytest.mark.parametrize(("body_lines", "chunk_size"), [(-1, 65536), (None, 0)])
def test_bad_arguments_refused(body_lines: int | None, chunk_size: int) -> None:
    transport = StringTransport()
    with pytest.raises(ValueError):
        send_message(
            transport, io.BytesIO(b""), body_lines, chunk_size=chunk_size, clock=Clock()
        )
    assert transport.producer is None


def test_registers_push_producer_and_unregisters() -> None:
    transport = StringTransport()
    clock = Clock()
    message = CountingFile(b"a\n")
    d = send_message(transport, message, clock=clock)
    assert transport.streaming
    assert verifyObject(IPushProducer, transport.producer)
    assert transport.value() == b""
    run(clock)
    assert result_of(d) == 3
    assert transport.producer is None
    assert message.closed


def test_bounded_chunks_per_turn() -> None:
    """
    A big message is sent over several turns of the reactor, a bounded
    amount each, so other connections get to run.
    """
    transport = StringTransport()
    clock = TurnClock()
    send_message(transport, CountingFile(b"x" * 1000), chunk_size=10, clock=clock)
    assert transport.value() == b""
    clock.turn()
    first_turn = len(transport.value())
    assert 0 < first_turn < 1000
    clock.turn()
    assert len(transport.value()) == 2 * first_turn


def test_back_pressure() -> None:
    """
    While the client does not read, the file is not read either, and little
    is buffered; once the client reads, sending continues to the end.
    """
    data = b"line\n" * 2000
    consumer = SlowConsumer(buffer_size=100)
    clock = Clock()
    message = CountingFile(data)
    d = send_message(consumer, message, chunk_size=64, clock=clock)
    run(clock)
    reads = message.reads
    assert reads > 0
    assert len(consumer.buffered) <= 100 + 2 * 64
    for _ in range(10):
        clock.advance(1)
    assert message.reads == reads
    assert not d.called

    consumer.drain()
    run(clock)
    assert message.reads > reads

    while not d.called:
        consumer.drain()
        run(clock)
    consumer.drain()
    assert consumer.received == data.replace(b"\n", b"\r\n") + b".\r\n"
    assert result_of(d) == wire_size(data)
    assert message.closed


def test_resume_without_pause() -> None:
    """
    A resumeProducing without a pause (TLS transports send them) does not
    start a second loop: a turn still writes no more than it would.
    """
    transport = StringTransport()
    clock = TurnClock()
    d = send_message(transport, CountingFile(b"x" * 1000), chunk_size=10, clock=clock)
    clock.turn()
    one_turn = len(transport.value())
    transport.producer.resumeProducing()
    transport.producer.resumeProducing()
    clock.turn()
    assert len(transport.value()) == 2 * one_turn
    while clock.pending:
        clock.turn()
    assert transport.value() == b"x" * 1000 + b"\r\n.\r\n"
    assert result_of(d) == 1000


def test_connection_lost() -> None:
    consumer = SlowConsumer(buffer_size=10)
    clock = Clock()
    message = CountingFile(b"line\n" * 100)
    d = send_message(consumer, message, chunk_size=8, clock=clock)
    run(clock)
    reads = message.reads
    consumer.connection_lost()
    run(clock)
    with pytest.raises(SendAborted):
        result_of(d)
    assert message.closed
    assert message.reads == reads
    assert consumer.producer is None


def test_connection_lost_while_sending() -> None:
    transport = StringTransport()
    clock = TurnClock()
    message = CountingFile(b"x" * 1000)
    d = send_message(transport, message, chunk_size=10, clock=clock)
    clock.turn()
    transport.producer.stopProducing()
    reads = message.reads
    assert clock.pending == []
    with pytest.raises(SendAborted):
        result_of(d)
    assert message.closed
    assert message.reads == reads
    assert transport.producer is None


def test_already_disconnected() -> None:
    """
    A transport that is already gone stops the producer as it registers.
    """
    consumer = SlowConsumer(buffer_size=10, disconnected=True)
    clock = Clock()
    message = CountingFile(b"a\n")
    d = send_message(consumer, message, clock=clock)
    run(clock)
    with pytest.raises(SendAborted):
        result_of(d)
    assert message.reads == 0
    assert message.closed


def test_read_error() -> None:
    transport = StringTransport()
    clock = Clock()
    message = CountingFile(b"x" * 100, fail_at_read=3)
    d = send_message(transport, message, chunk_size=10, clock=clock)
    run(clock)
    with pytest.raises(OSError, match="Input/output error"):
        result_of(d)
    assert message.closed
    assert transport.producer is None
    assert transport.value() == b"x" * 20


def test_on_progress() -> None:
    transport = StringTransport()
    clock = Clock()
    progress = []
    d = send_message(
        transport,
        CountingFile(b"x" * 95),
        chunk_size=10,
        on_progress=lambda: progress.append(len(transport.value())),
        clock=clock,
    )
    run(clock)
    assert result_of(d) == 95
    assert progress == list(range(10, 100, 10)) + [95]
