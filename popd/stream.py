"""
A stored message in POP3 wire form, sent as fast as the client reads it.

RFC 1939 sends a message as lines ending in CRLF, with a line that starts
with C{.} stuffed with one more C{.}, and a lone C{.} line at the end.  Stores
keep messages the way they were delivered (usually with LF line endings), so
the conversion happens here, one chunk at a time:

  - L{WireSizeCounter} and L{wire_size} count the octets a message has in
    CRLF form: the size STAT and LIST report.
  - L{WireEncoder} turns chunks of a stored message into wire bytes, with the
    state that crosses chunk boundaries, and cuts the message short for TOP.
    It only consumes and returns bytes, so it is tested at every chunk size.
  - L{send_message} reads a file, feeds the encoder and writes to the
    transport as a streaming producer: when the client reads slowly the
    transport pauses it and the file is no longer read, so a session buffers
    about one chunk beyond the transport's own buffer however big the message.

The conversion works on whole chunks with C{bytes} methods and two small
regular expressions, which run in C; there is no loop over bytes or lines in
Python.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import BinaryIO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
)
from twisted.python.failure import Failure
from zope.interface import implementer

# How many octets of the stored message L{send_message} reads at a time.
# Twisted's TCP transport pauses its producer once more than 64 KiB wait,
# sends at most 128 KiB (SEND_LIMIT) each time the socket is writable, and
# resumes the producer once its buffer is empty: each chunk costs a pause
# and a resume, two epoll_ctl calls and a turn of the reactor, and one whose
# wire form passes 128 KiB a second send and turn.  120 KiB leaves room for
# the CRs and stuffed dots of lines down to about 15 octets.  RETR of 1 MB
# LF messages over loopback (bench.run --quick --scenarios retr, popd alone,
# median of 4 interleaved runs) made 571 MB/s with 64 KiB chunks, 612 with
# 120 KiB, 510 with 128 KiB and 506 with 256 KiB.
_CHUNK_SIZE = 120 * 1024

# How many chunks one message may write in one turn of the reactor before it
# lets other connections run: 480 KiB with the default chunk size.  A TCP
# transport pauses the message after the first (its buffer holds 64 KiB).
_CHUNKS_PER_TURN = 4

# A line of a message in CRLF form that starts with a dot, except the first.
# On CPython 3.11, in 120 KiB chunks of mail text in CRLF form, substituting
# with this takes 0.49 ms per MB, bytes.replace of the two-octet b"\n." 1.94
# and split and join 1.03: bytes methods look for a needle of two octets
# with a slow general loop, the regular expression for its literal prefix
# with a tight one.
_DOT_AFTER_LF = re.compile(rb"\n\.")

# A LF not preceded by CR.  Searching for one takes 0.46 ms per MB of CRLF
# text where comparing the bytes.count of b"\n" and of b"\r\n" takes 1.16,
# and a substitution that finds none returns its argument itself.
_BARE_LF = re.compile(rb"\n(?<!\r\n)")


class SendAborted(Exception):  # noqa: N818 - the name the protocol expects
    """
    The consumer stopped the producer (the connection was lost) before the
    whole message was sent.
    """


class WireSizeCounter:
    """
    Count the octets of a message in CRLF form, fed in chunks of any size.

    A LF not preceded by CR counts 2 octets (it becomes CRLF), a CRLF counts
    2, a bare CR counts 1 (it is sent unchanged), any other octet 1.  No
    terminating CRLF is added for a last line without one.

    @ivar size: the octets counted so far.
    """

    def __init__(self) -> None:
        self.size = 0
        self._after_cr = False

    def feed(self, chunk: bytes) -> None:
        """
        Count one more chunk of the stored message.
        """
        if not chunk:
            return
        bare_lf = chunk.count(b"\n")
        if b"\r" in chunk:
            bare_lf -= chunk.count(b"\r\n")
        if self._after_cr and chunk.startswith(b"\n"):
            bare_lf -= 1
        self.size += len(chunk) + bare_lf
        self._after_cr = chunk.endswith(b"\r")


def wire_size(data: bytes) -> int:
    """
    @return: the octets of the stored message C{data} in CRLF form, as
        L{WireSizeCounter} counts them (without making one: a first login
        to a large Maildir asks this of every message).
    """
    bare_lf = data.count(b"\n")
    if b"\r" in data:
        bare_lf -= data.count(b"\r\n")
    return len(data) + bare_lf


def file_wire_size(message: BinaryIO, chunk_size: int = 65536) -> int:
    """
    @return: the CRLF-form octets of what is left in the binary file
        C{message}, read C{chunk_size} octets at a time.
    """
    counter = WireSizeCounter()
    for chunk in iter(lambda: message.read(chunk_size), b""):
        counter.feed(chunk)
    return counter.size


def _to_crlf(data: bytes) -> bytes:
    """
    @return: C{data} with every LF not preceded by CR turned into CRLF.
    """
    # Without a CR (a message stored with LF endings) bytes.replace takes
    # 0.32 ms per MB, the regular expression 1.45; with one (CRLF endings)
    # the regular expression changes only the bare LFs, usually none.
    if b"\r" not in data:
        return data.replace(b"\n", b"\r\n")
    return _BARE_LF.sub(b"\r\n", data)


class WireEncoder:
    """
    Turn a stored message, fed in chunks, into its POP3 wire form.

    LF becomes CRLF (CRLF and bare CR are kept), a line starting with C{.}
    gets another C{.}, and L{finish} ends a last line without a newline with
    CRLF and adds the terminating C{.} line.  The chunks may split the
    message anywhere, even between the CR and the LF of a line ending.

    For TOP, C{body_lines} limits the message to its header block (up to
    and including the first empty line) and that many lines of the body.  A
    message without an empty line is all header and is sent whole.

    @ivar size: the octets of the message in CRLF form returned so far, not
        counting dot-stuffing, an added final CRLF or the terminator: for a
        whole message, L{wire_size} of the stored bytes.
    @ivar done: C{True} once TOP has all the lines it wants; feed no more.
    """

    def __init__(self, body_lines: int | None = None) -> None:
        """
        @param body_lines: the number of body lines TOP sends, or C{None}
            for the whole message (RETR).
        """
        if body_lines is not None and body_lines < 0:
            raise ValueError(f"body_lines must not be negative: {body_lines}")
        self.size = 0
        self.done = False
        self._lines_left = body_lines
        self._in_header = True
        self._at_line_start = True
        # A CR at the end of a chunk is held back until the next chunk tells
        # whether it starts a CRLF, so that the encoded data never ends
        # between the two.
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        """
        Encode the next chunk of the stored message.

        @return: the wire bytes to send for it, possibly empty.
        """
        if self.done:
            return b""
        if self._pending_cr:
            chunk = b"\r" + chunk
        self._pending_cr = chunk.endswith(b"\r")
        if self._pending_cr:
            chunk = chunk[:-1]
        return self._encode(_to_crlf(chunk))

    def finish(self) -> bytes:
        """
        End the message.

        @return: the last wire bytes: a held-back CR, a CRLF ending a last
            line that had none, and the terminating C{.} line.
        """
        tail = self._encode(b"\r") if self._pending_cr else b""
        if not self._at_line_start:
            tail += b"\r\n"
        return tail + b".\r\n"

    def _encode(self, data: bytes) -> bytes:
        """
        Cut C{data} (in CRLF form) for TOP, count it and dot-stuff it.
        """
        if self._lines_left is not None:
            data = self._cut(data)
        if not data:
            return b""
        self.size += len(data)
        # Looking for any dot at all is a memchr (0.01 ms per MB): chunks of
        # base64, most of a large message usually, have none and so skip the
        # 0.36 ms per MB the regular expression takes to find nothing.
        wire = _DOT_AFTER_LF.sub(b"\n..", data) if b"." in data else data
        if self._at_line_start and data.startswith(b"."):
            wire = b"." + wire
        self._at_line_start = data.endswith(b"\n")
        return wire

    def _cut(self, data: bytes) -> bytes:
        """
        @return: the part of C{data} (in CRLF form) that TOP still sends;
            sets L{done} when that is less than all of it.
        """
        body_start = 0
        if self._in_header:
            if self._at_line_start and data.startswith(b"\r\n"):
                body_start = 2
            else:
                blank_line = data.find(b"\r\n\r\n")
                if blank_line < 0:
                    return data
                body_start = blank_line + 4
            self._in_header = False
        body_lines = data.count(b"\n", body_start)
        if body_lines < self._lines_left:
            self._lines_left -= body_lines
            return data
        end = body_start
        for _ in range(self._lines_left):
            end = data.index(b"\n", end) + 1
        self.done = True
        self._pending_cr = False
        return data[:end]


@implementer(IPushProducer)
class _MessageSender:
    """
    The streaming producer behind L{send_message}.

    A turn reads, encodes and writes up to L{_CHUNKS_PER_TURN} chunks,
    stopping early once the consumer pauses it.  The first turn runs within
    L{start}, so that a message of one chunk (most are a few KB) is written
    whole before L{send_message} returns, costing no L{IDelayedCall} and no
    turn of the reactor.  A turn that ends unpaused schedules the next with
    C{callLater(0)}, so that other connections get to run; one paused waits
    for L{resumeProducing}, which runs the next turn at once: the transport
    calls it when its buffer has emptied.

    @ivar deferred: fires with L{WireEncoder.size} once the terminator is
        written, or fails.
    """

    def __init__(
        self,
        consumer: IConsumer,
        message: BinaryIO,
        encoder: WireEncoder,
        chunk_size: int,
        on_progress: Callable[[], None] | None,
        clock: IReactorTime,
    ) -> None:
        self.deferred: Deferred[int] = Deferred()
        self._consumer = consumer
        self._message = message
        self._encoder = encoder
        self._chunk_size = chunk_size
        self._on_progress = on_progress
        self._clock = clock
        self._call: IDelayedCall | None = None
        self._paused = False
        self._running = False
        self._finished = False

    def start(self) -> None:
        """
        Register with the consumer and run the first turn.
        """
        # A transport that is already disconnected stops the producer from
        # within registerProducer: the turn then does nothing.
        self._consumer.registerProducer(self, True)
        self._turn()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        # Only a resume after a pause runs a turn, and only if none is running
        # (the consumer may resume from within a turn's write) or scheduled:
        # TLS transports also resume producers they never paused.
        if self._paused:
            self._paused = False
            if not self._running and self._call is None:
                self._turn()

    def stopProducing(self) -> None:
        if not self._finished:
            self._stop(
                Failure(
                    SendAborted(
                        "the connection was lost after"
                        f" {self._encoder.size} octets of the message"
                    )
                )
            )

    def _scheduled_turn(self) -> None:
        self._call = None
        self._turn()

    def _turn(self) -> None:
        """
        Send up to L{_CHUNKS_PER_TURN} chunks, and schedule the next turn
        unless the consumer paused or stopped this one, or the message is
        all sent.
        """
        self._running = True
        try:
            for _ in range(_CHUNKS_PER_TURN):
                if self._paused or self._finished:
                    return
                if self._encoder.done:
                    chunk = b""
                else:
                    chunk = self._message.read(self._chunk_size)
                if not chunk:
                    self._consumer.write(self._encoder.finish())
                    self._stop(self._encoder.size)
                    return
                wire = self._encoder.feed(chunk)
                if wire:
                    self._consumer.write(wire)
                if self._on_progress is not None:
                    self._on_progress()
        except Exception:
            if not self._finished:
                self._stop(Failure())
            return
        finally:
            self._running = False
        if not (self._paused or self._finished):
            self._call = self._clock.callLater(0, self._scheduled_turn)

    def _stop(self, result: int | Failure) -> None:
        """
        Close the file, unregister from the consumer and fire the Deferred.
        """
        self._finished = True
        if self._call is not None:
            self._call.cancel()
            self._call = None
        try:
            self._message.close()
        finally:
            self._consumer.unregisterProducer()
            if isinstance(result, Failure):
                self.deferred.errback(result)
            else:
                self.deferred.callback(result)


def send_message(
    consumer: IConsumer,
    message: BinaryIO,
    body_lines: int | None = None,
    *,
    chunk_size: int = _CHUNK_SIZE,
    on_progress: Callable[[], None] | None = None,
    clock: IReactorTime | None = None,
) -> Deferred[int]:
    """
    Send a stored message in wire form, then the terminating C{.} line.

    The caller has written the C{+OK} line already.  The message is written
    as a streaming producer registered with C{consumer}, starting at once: a
    message that fits in the first turn (up to L{_CHUNKS_PER_TURN} chunks,
    fewer if the consumer pauses the producer) is all written, and the
    L{Deferred} has fired, when this returns.  While the consumer has paused
    the producer nothing is read from C{message}.  C{message} is closed
    however the send ends.

    @param consumer: where the wire bytes go: the session's transport.
    @param message: the message as stored (LF or CRLF line endings, no
        dot-stuffing), open for reading in binary.
    @param body_lines: for TOP, the number of body lines to send after the
        header block; C{None} sends the whole message (RETR).  Once TOP has
        its lines the rest of the file is not read.
    @param chunk_size: how many octets to read from C{message} at a time.
    @param on_progress: called after each chunk is written, so the session
        can reset its idle timeout.
    @param clock: schedules the turn after one that the consumer did not
        pause; the global reactor by default.

    @return: a L{Deferred} firing with the octets of the message sent, in
        CRLF form and without dot-stuffing or the terminator (for RETR,
        L{wire_size} of the stored message).  It fails with L{SendAborted}
        if the consumer stops the producer (the connection was lost), or
        with the error that reading the file or writing raised: either way
        the client got part of the message, and the session must be
        dropped.
    @raise ValueError: if C{body_lines} is negative or C{chunk_size} is not
        positive; nothing is sent then, and C{message} is left open.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive: {chunk_size}")
    encoder = WireEncoder(body_lines)
    if clock is None:
        from twisted.internet import reactor as clock
    sender = _MessageSender(consumer, message, encoder, chunk_size, on_progress, clock)
    sender.start()
    return sender.deferred
