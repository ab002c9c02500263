"""
The mail data of SMTP's and LMTP's DATA command, decoded from the wire as
it arrives: a parser that only consumes bytes (L{DataDecoder.feed}) and
knows nothing of the transport, so it is tested at every chunk size.

What it does to the octets (RFC 5321 sections 4.1.1.4 and 4.5.2):

  - the data ends at the first line that is a lone C{.}, that is at
    C{CRLF . CRLF} (or at C{. CRLF} as the very first line);
  - a C{.} starting any other line is removed (dot-stuffing undone);
  - each CRLF line end becomes a bare LF, the way Maildir and mbox files
    store mail (as Postfix's local(8) and Dovecot do).  A lone CR or a lone
    LF is not a line end on the wire: it is kept as it is, and a C{.} after
    it is not a line start.

Its size is counted as RFC 1870 counts it: the octets with CRLF line ends,
without the stuffing dots and the final C{.} line.  Past C{limit} the data
is still read to its end, but no longer stored.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["DataDecoder"]

_END = b".\r\n"
_DOT = 0x2E


class DataDecoder:
    """
    Decodes one message's data and hands the stored form to C{write}.

    @ivar size: the message's size so far (CRLF octets, RFC 1870).
    @ivar too_large: whether C{size} went past the limit; nothing more is
        written then.
    @ivar done: whether the final C{.} line has been seen.
    """

    def __init__(self, write: Callable[[bytes], object], limit: int | None) -> None:
        self._write = write
        self._limit = limit
        self._pending = b""
        self._line_start = True
        self.size = 0
        self.too_large = False
        self.done = False

    def feed(self, data: bytes) -> bytes | None:
        """
        Decode C{data}, the next octets from the client.

        @return: C{None} while the data goes on; once the final C{.} line
            has been read, the octets that followed it (the next commands,
            possibly C{b""}).
        @raise Exception: whatever C{write} raised; the decoder cannot be
            used any more then.
        """
        if self.done:
            return data
        buffer = self._pending + data if self._pending else data
        self._pending = b""
        position = 0
        end = len(buffer)
        while position < end:
            if self._line_start:
                if buffer.startswith(_END, position):
                    self.done = True
                    return buffer[position + len(_END) :]
                if end - position < len(_END) and _END.startswith(buffer[position:]):
                    # "." or ".\r": too early to tell.
                    break
                if buffer[position] == _DOT:
                    position += 1
                self._line_start = False
            found = buffer.find(b"\r\n.", position)
            if found != -1:
                self._emit(buffer, position, found + 2)
                position = found + 2
                self._line_start = True
                continue
            # No line starting with a dot in the rest: take it all, but keep
            # a trailing CR back until we know whether an LF follows it.
            if buffer.endswith(b"\r\n", position):
                self._emit(buffer, position, end)
                self._line_start = True
                position = end
            elif buffer.endswith(b"\r", position):
                self._emit(buffer, position, end - 1)
                position = end - 1
                break
            else:
                self._emit(buffer, position, end)
                position = end
        self._pending = buffer[position:]
        return None

    def _emit(self, buffer: bytes, start: int, stop: int) -> None:
        """
        Count and store C{buffer[start:stop]}, whose line ends are CRLF.
        """
        if start >= stop:
            return
        self.size += stop - start
        if self.too_large:
            return
        if self._limit is not None and self.size > self._limit:
            self.too_large = True
            return
        self._write(buffer[start:stop].replace(b"\r\n", b"\n"))
