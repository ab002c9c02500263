"""
Splitting the client's byte stream into command lines.

The parser only consumes bytes and returns results, in the style of
L{twisted.protocols.haproxy}: it knows nothing of transports or state, so
every chunking of the same input gives the same lines.
"""

from __future__ import annotations

from dataclasses import dataclass

# The longest line kept in memory.  Command lines are limited to 255 octets
# by RFC 2449 section 4, which the protocol enforces; SASL responses
# (RFC 5034) may be longer, so the parser itself only guards memory.
MAX_BUFFERED_LINE = 8192


@dataclass(frozen=True, slots=True)
class Line:
    """
    One complete line without its terminator.

    @ivar octets: the line's length on the wire, terminator included, which
        is what RFC 2449's 255-octet limit counts.
    """

    text: bytes
    octets: int


@dataclass(frozen=True, slots=True)
class OverlongLine:
    """
    A line longer than the parser keeps; its bytes were thrown away.
    """


class LineParser:
    """
    Turns chunks of bytes into L{Line}s, accepting CRLF or a bare LF.
    """

    def __init__(self, max_length: int = MAX_BUFFERED_LINE) -> None:
        self._max_length = max_length
        self._buffer = b""
        self._discarding = False

    def feed(self, data: bytes) -> list[Line | OverlongLine]:
        """
        Consume C{data} and return every line it completes, in order.
        """
        buffer = self._buffer + data if self._buffer else data
        lines: list[Line | OverlongLine] = []
        start = 0
        while (end := buffer.find(b"\n", start)) >= 0:
            text = buffer[start:end]
            start = end + 1
            if self._discarding:
                self._discarding = False
                lines.append(OverlongLine())
                continue
            octets = len(text) + 1
            if text.endswith(b"\r"):
                text = text[:-1]
            if octets > self._max_length:
                lines.append(OverlongLine())
            else:
                lines.append(Line(text, octets))
        rest = buffer[start:]
        if self._discarding or len(rest) > self._max_length:
            self._discarding = True
            rest = b""
        self._buffer = rest
        return lines

    def reset(self) -> None:
        """
        Forget any partial line, as STLS requires (RFC 2595 section 4).
        """
        self._buffer = b""
        self._discarding = False
