"""
Tests for L{popd.stream}: wire sizes, the wire encoding of RETR and TOP, and
sending with back-pressure, driven by a L{Clock} instead of a reactor.
"""

from __future__ import annotations

import io
import re
from itertools import cycle, pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.base import DelayedCall
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface.verify import verifyObject

from popd.stream import (
    _CHUNKS_PER_TURN,
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


class RecordingTransport(StringTransport):
    """
    A L{StringTransport} that records the producer calls it gets, and can
    lose the connection from within a write.

    @ivar calls: C{("register", streaming)} and C{("unregister",)} in order.
    @ivar registered: the producer registered last.
    """

    def __init__(self, lose_at_write: int | None = None) -> None:
        super().__init__()
        self.calls: list[tuple] = []
        self.registered = None
        self.writes = 0
        self._lose_at_write = lose_at_write

    def registerProducer(self, producer, streaming: bool) -> None:
        self.calls.append(("register", streaming))
        self.registered = producer
        super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        self.calls.append(("unregister",))
        super().unregisterProducer()

    def write(self, data: bytes) -> None:
        super().write(data)
        self.writes += 1
        if self.writes == self._lose_at_write:
            self.producer.stopProducing()


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
    The wire form of C{message} and its size, computed line by line: split
    on LF, drop the CR of a CRLF, cut for TOP after the first empty line,
    stuff a leading dot, end every line with CRLF and add the terminator.
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

# Messages built of lines rather than octets: LF, CRLF and bare CR line
# endings, empty lines (the end of the header block for TOP), dots leading
# lines, ending lines and ending the message, a last line with no ending.
mail_lines = st.lists(
    st.tuples(
        st.sampled_from([b"", b".", b"..", b".x", b"\r.", b"\r"]),
        st.sampled_from([b"", b"text", b"a.b", b" .", b"\xff\x00", b"\r\r"]),
        st.sampled_from([b"\n", b"\n", b"\r\n", b"\r\n", b"\r", b""]),
    ).map(b"".join),
    max_size=30,
).map(b"".join)


@st.composite
def cut_points(draw: st.DrawFn, message: bytes) -> list[int]:
    """
    Where to split C{message} into chunks: anywhere, and in particular just
    before and after its dots, CRs and LFs.
    """
    anywhere = draw(st.sets(st.integers(0, len(message)), max_size=10))
    special = [
        i + shift
        for i, octet in enumerate(message)
        for shift in (0, 1)
        if octet in b".\r\n"
    ]
    near = draw(st.sets(st.sampled_from(special))) if special else set()
    return sorted(anywhere | near)


def cut(message: bytes, points: list[int]) -> list[bytes]:
    """
    C{message} split at C{points}, which are sorted.
    """
    bounds = [0, *points, len(message)]
    return [message[start:end] for start, end in pairwise(bounds)]


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


@settings(max_examples=500, deadline=None)
@given(st.data(), mail_lines, st.none() | st.integers(0, 6))
def test_encoder_matches_reference_at_any_cut(
    data: st.DataObject, message: bytes, body_lines: int | None
) -> None:
    """
    Whatever the chunks, including empty ones and boundaries at dots, CRs
    and LFs, the encoder returns what the line-by-line reference does.
    """
    chunks = cut(message, data.draw(cut_points(message)))
    encoder = WireEncoder(body_lines)
    wire = b"".join(map(encoder.feed, chunks)) + encoder.finish()
    assert (wire, encoder.size) == reference(message, body_lines)


@settings(max_examples=200, deadline=None)
@given(
    st.data(),
    mail_lines,
    st.none() | st.integers(0, 6),
    st.integers(1, 40),
    st.integers(0, 60),
)
def test_send_matches_reference_under_back_pressure(
    data: st.DataObject,
    message: bytes,
    body_lines: int | None,
    chunk_size: int,
    buffer_size: int,
) -> None:
    """
    A client reading at random moments, between random turns of the
    reactor, gets what the reference sends, and the Deferred fires once.
    """
    consumer = SlowConsumer(buffer_size)
    clock = TurnClock()
    file = CountingFile(message)
    d = send_message(consumer, file, body_lines, chunk_size=chunk_size, clock=clock)
    fired = []
    d.addBoth(fired.append)
    # Whether the client reads (True) or the reactor turns, in a cycle that
    # does both, so that each cycle sends at least one more chunk.
    steps = data.draw(st.lists(st.booleans(), max_size=8)) + [True, False]
    schedule = cycle(steps)
    for _ in range(len(steps) * (len(message) + 2)):
        if fired:
            break
        assert consumer.producer is not None
        if next(schedule):
            consumer.drain()
        else:
            clock.turn()
    consumer.drain()
    wire, size = reference(message, body_lines)
    assert (consumer.received, fired) == (wire, [size])
    assert file.closed
    assert consumer.producer is None
    assert clock.pending == []


@pytest.mark.parametrize(("body_lines", "chunk_size"), [(-1, 65536), (None, 0)])
def test_bad_arguments_refused(body_lines: int | None, chunk_size: int) -> None:
    transport = StringTransport()
    with pytest.raises(ValueError):
        send_message(
            transport, io.BytesIO(b""), body_lines, chunk_size=chunk_size, clock=Clock()
        )
    assert transport.producer is None


def test_registers_push_producer_and_unregisters() -> None:
    transport = RecordingTransport()
    clock = Clock()
    message = CountingFile(b"a\n" * (2 * _CHUNKS_PER_TURN))
    d = send_message(transport, message, chunk_size=2, clock=clock)
    assert transport.calls == [("register", True)]
    assert verifyObject(IPushProducer, transport.producer)
    run(clock)
    assert result_of(d) == 6 * _CHUNKS_PER_TURN
    assert transport.calls == [("register", True), ("unregister",)]
    assert message.closed


def test_small_message_sent_at_once() -> None:
    """
    A message that fits in the first turn is written before send_message
    returns, without a turn of the reactor, and the producer is
    registered and unregistered once.
    """
    transport = RecordingTransport()
    clock = TurnClock()
    message = CountingFile(b"Subject: x\n\n.body\n")
    d = send_message(transport, message, clock=clock)
    assert transport.value() == b"Subject: x\r\n\r\n..body\r\n.\r\n"
    assert result_of(d) == 21
    assert transport.calls == [("register", True), ("unregister",)]
    assert transport.producer is None
    assert message.closed
    assert clock.pending == []


def test_stopped_after_sent_at_once() -> None:
    """
    A stopProducing once the message is all sent changes nothing: the
    Deferred has fired, and fires once.
    """
    transport = RecordingTransport()
    clock = TurnClock()
    d = send_message(transport, CountingFile(b"a\n"), clock=clock)
    fired = []
    d.addBoth(fired.append)
    assert fired == [3]
    transport.registered.stopProducing()
    transport.registered.resumeProducing()
    assert fired == [3]
    assert transport.calls == [("register", True), ("unregister",)]
    assert clock.pending == []


def test_connection_lost_in_first_turn() -> None:
    """
    A connection lost while the first turn writes fails the Deferred once,
    and nothing more is read or scheduled.
    """
    transport = RecordingTransport(lose_at_write=1)
    clock = TurnClock()
    message = CountingFile(b"x" * 100)
    d = send_message(transport, message, chunk_size=10, clock=clock)
    with pytest.raises(SendAborted):
        result_of(d)
    assert message.reads == 1
    assert message.closed
    assert transport.calls == [("register", True), ("unregister",)]
    assert clock.pending == []


def test_read_error_in_first_turn() -> None:
    transport = RecordingTransport()
    clock = TurnClock()
    message = CountingFile(b"x" * 100, fail_at_read=1)
    d = send_message(transport, message, clock=clock)
    with pytest.raises(OSError, match="Input/output error"):
        result_of(d)
    assert message.closed
    assert transport.calls == [("register", True), ("unregister",)]
    assert transport.value() == b""
    assert clock.pending == []


def test_bounded_chunks_per_turn() -> None:
    """
    A big message is sent over several turns of the reactor, a bounded
    amount each, so other connections get to run.
    """
    transport = StringTransport()
    clock = TurnClock()
    send_message(transport, CountingFile(b"x" * 1000), chunk_size=10, clock=clock)
    first_turn = len(transport.value())
    assert first_turn == 10 * _CHUNKS_PER_TURN
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
    one_turn = len(transport.value())
    transport.producer.resumeProducing()
    transport.producer.resumeProducing()
    clock.turn()
    assert len(transport.value()) == 2 * one_turn
    while clock.pending:
        clock.turn()
    assert transport.value() == b"x" * 1000 + b"\r\n.\r\n"
    assert result_of(d) == 1000


def test_pause_and_resume_between_turns() -> None:
    """
    A pause and resume while the next turn is scheduled leave that turn to
    run as scheduled: no turn runs at once, nor one more.
    """
    transport = StringTransport()
    clock = TurnClock()
    d = send_message(transport, CountingFile(b"x" * 1000), chunk_size=10, clock=clock)
    one_turn = len(transport.value())
    transport.producer.pauseProducing()
    transport.producer.resumeProducing()
    assert len(transport.value()) == one_turn
    clock.turn()
    assert len(transport.value()) == 2 * one_turn
    while clock.pending:
        clock.turn()
    assert result_of(d) == 1000


class BufferingConsumer(StringTransport):
    """
    A consumer that pauses its producer and resumes it again from within
    every write, and records how deeply writes nest.
    """

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.deepest = 0

    def write(self, data: bytes) -> None:
        self.depth += 1
        self.deepest = max(self.deepest, self.depth)
        super().write(data)
        self.producer.pauseProducing()
        self.producer.resumeProducing()
        self.depth -= 1


def test_resume_from_within_write() -> None:
    """
    A resume from within a write lets the running turn go on rather than
    start another inside it: a turn writes no more than it would.
    """
    transport = BufferingConsumer()
    clock = TurnClock()
    d = send_message(transport, CountingFile(b"x" * 1000), chunk_size=10, clock=clock)
    assert len(transport.value()) == 10 * _CHUNKS_PER_TURN
    while clock.pending:
        clock.turn()
    assert transport.value() == b"x" * 1000 + b"\r\n.\r\n"
    assert result_of(d) == 1000
    assert transport.deepest == 1


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
