"""
The mbox file format: finding the messages in a file, undoing and applying
C{From } quoting chunk by chunk, and reading one message as a stream.

Nothing here locks, opens or names files; L{popd.maildrops.mbox} does that.

The format
==========

An mbox is a sequence of messages, each starting with an envelope line
C{From <sender> <date>} at the start of a line.  Writers separate messages
with an empty line, which belongs to no message, and I{quote} body lines that
would look like an envelope line:

  - C{mboxrd} (the default): a line matching C{^>*From } gets one more
    C{>} when written, and a line matching C{^>+From } loses one when read.
    It is reversible.
  - C{mboxo}: only C{^From } becomes C{>From } when written, and only
    C{^>From } becomes C{From } when read.  It is ambiguous: a message that
    had a C{>From } line gets it back as C{From }.  Postfix and Exim quote
    this way by default, which is why reading an mboxo file as C{mboxrd}
    (removing one C{>} from C{^>+From } lines) is the usual choice: the two
    only differ for lines with two or more C{>}.

Message boundaries
==================

Every line that starts with C{From } (after a LF, or at the start of the
file) starts a message, unless a C{Content-Length:} header says otherwise:
when a message has exactly one such header and the octet after that many
body octets is the end of the file, a LF (or CRLF) at the end of the file,
or a LF (or CRLF) followed by C{From }, the message ends there, even if its
body has unquoted C{From } lines (the mboxcl formats).  Any other
C{Content-Length} is ignored and the message ends before the next C{From }
line.  A message loses one empty line at its end: the separator.

A file that is not empty must start with C{From }; anything else is not an
mbox and is refused rather than guessed at.

popd's own header lines
=======================

popd writes C{X-UIDL: <uid>} as the first line after the envelope of every
message it delivers, and, for a message that did not end with a line break,
C{X-Popd-Unterminated: 1} after it (the LF popd then adds is not part of the
message; C{X-Popd-Unterminated: 0} is written only for a message that itself
starts with such a line).  These leading lines are popd's bookkeeping and are
not served: reading gives back exactly the octets that were delivered.  An
C{X-UIDL:} anywhere else in the header (as older POP servers wrote it) is
served and still gives the message its UID.  A sender can put an C{X-UIDL}
into mail an MTA writes directly; UIDs still never repeat within the file
(a taken one falls back to the derived UID), so the most a forged one can do
is make a client skip that very message as already seen.

UIDs
====

A message's UID is the value of its first C{X-UIDL:} header when that is a
valid UIDL (1 to 70 characters in 0x21-0x7E) not taken by an earlier message
of the file.  Otherwise it is derived from the content: the first 40 hex
digits of the SHA-256 of the envelope line and the message with its trailing
line breaks and a few headers that mail readers rewrite in place
(C{Status}, C{X-Status}, C{X-Keywords}, C{X-UID}, C{X-IMAP}, C{X-IMAPbase},
C{Content-Length}) left out, followed by C{.<n>} for the n-th (n >= 1)
earlier message in the file with the same hash.  The envelope line carries
the sender and the delivery time to the second, so two messages only share
a hash if they are byte for byte the same and were delivered in the same
second by the same sender; they still get different UIDs.

What stays stable: deleting any message never changes the UID of a message
with a different hash.  The corner case: of two or more identical messages
without C{X-UIDL}, deleting an earlier one gives a later one the UID the
deleted one had; a client that remembers that UID already has the very same
octets.  popd's own deliveries always carry C{X-UIDL}, so only mail written
by an MTA directly can meet this.  A program that edits a message (other
than the headers above) changes its derived UID: the client sees it as new.

Only the first L{HEADER_LIMIT} octets of a header block are examined for
C{Content-Length} and C{X-UIDL}, and for the headers left out of the hash.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from popd.stream import WireSizeCounter

#: The quoting variants understood.
VARIANTS = ("mboxrd", "mboxo")

#: How much of a file is read at a time.
CHUNK_SIZE = 64 * 1024

#: How much of a message's header block is examined.
HEADER_LIMIT = 64 * 1024

_UIDL = re.compile(rb"[!-~]{1,70}")
_CONTENT_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*([0-9]{1,18})[ \t]*\r?$")
_X_UIDL = re.compile(rb"(?im)^x-uidl:[ \t]*([!-~]{1,70})[ \t]*\r?$")
_OWN_UIDL_LINE = re.compile(rb"(?i)x-uidl:[ \t]*[!-~]{1,70}[ \t]*\r?\n")
_UNTERMINATED_LINE = re.compile(rb"(?i)x-popd-unterminated:[ \t]*([01])[ \t]*\r?\n")
_UNTERMINATED_NAME = re.compile(rb"(?i)x-popd-unterminated[ \t]*:")
_RETURN_PATH = re.compile(rb"(?im)^return-path:[ \t]*<([^<>\r\n]*)>")
_ENVELOPE_SENDER = re.compile(rb"[!-~]{1,256}")
_MUTABLE_HEADERS = frozenset(
    {
        b"status",
        b"x-status",
        b"x-keywords",
        b"x-uid",
        b"x-imap",
        b"x-imapbase",
        b"content-length",
    }
)


class MboxFormatError(ValueError):
    """
    The file is not an mbox: it does not start with C{From }.
    """


class MboxTruncatedError(OSError):
    """
    The file became shorter than expected while it was read: another
    program changed it without locking.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(errno.EIO, "the mbox changed while it was read", path)


def check_variant(variant: str) -> str:
    """
    @return: C{variant} if it is one of L{VARIANTS}.
    @raise ValueError: otherwise.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown mbox variant {variant!r} (use mboxrd or mboxo)")
    return variant


class _LineStartRewriter:
    """
    Apply a substitution that only concerns the start of lines to a stream
    fed in chunks of any size.

    The substitution is made with a pattern anchored on the LF before a
    line; a chunk is prefixed with a LF when it starts a line.  The end of a
    chunk that might still become a match (a few C{>} and part of C{From})
    is held back until the next chunk, except for leading C{>} that L{_tail}
    may let through.
    """

    def __init__(
        self,
        pattern: re.Pattern[bytes],
        replacement: bytes,
        tail: re.Pattern[bytes],
    ) -> None:
        self._pattern = pattern
        self._replacement = replacement
        self._tail = tail
        self._held = b""
        self._line_start = True

    def feed(self, chunk: bytes) -> bytes:
        """
        @return: the rewritten octets that are certain so far.
        """
        if not chunk:
            return b""
        prefix = b"\n" if self._line_start else b""
        text = self._pattern.sub(self._replacement, prefix + self._held + chunk)
        last = text.rfind(b"\n")
        if last < 0:
            self._held = b""
            self._line_start = False
            return text
        tail = text[last + 1 :]
        match = self._tail.fullmatch(tail)
        if not tail:
            hold = 0
            self._line_start = True
        elif match is not None:
            # The held part starts a line as far as the substitution cares:
            # the C{>} let through before it make no difference to it.
            hold = len(match.group(2))
            self._line_start = True
        else:
            hold = 0
            self._line_start = False
        self._held = text[len(text) - hold :] if hold else b""
        return text[len(prefix) : len(text) - hold]

    def flush(self) -> bytes:
        """
        @return: what was held back; the stream is at its end.
        """
        held, self._held = self._held, b""
        self._line_start = True
        return held


_FROM_PREFIX = rb"(?:F|Fr|Fro|From)?"


def Unquoter(variant: str = "mboxrd") -> _LineStartRewriter:  # noqa: N802
    """
    A chunk-wise undoer of C{From } quoting: C{^>+From } loses one C{>}
    (C{mboxrd}), or C{^>From } becomes C{From } (C{mboxo}).
    """
    if check_variant(variant) == "mboxrd":
        return _LineStartRewriter(
            re.compile(rb"\n>(?=>*From )"),
            b"\n",
            re.compile(rb"(>*)(>" + _FROM_PREFIX + rb")"),
        )
    return _LineStartRewriter(
        re.compile(rb"\n>(?=From )"),
        b"\n",
        re.compile(rb"()(>" + _FROM_PREFIX + rb")"),
    )


def Quoter(variant: str = "mboxrd") -> _LineStartRewriter:  # noqa: N802
    """
    A chunk-wise applier of C{From } quoting: C{^>*From } gains one C{>}
    (C{mboxrd}), or C{^From } becomes C{>From } (C{mboxo}).
    """
    if check_variant(variant) == "mboxrd":
        return _LineStartRewriter(
            re.compile(rb"\n(?=>*From )"),
            b"\n>",
            re.compile(rb"(>*)(" + _FROM_PREFIX + rb")"),
        )
    return _LineStartRewriter(
        re.compile(rb"\n(?=From )"),
        b"\n>",
        re.compile(rb"()(" + _FROM_PREFIX + rb")"),
    )


def unquote(data: bytes, variant: str = "mboxrd") -> bytes:
    """
    @return: C{data} with the C{From } quoting of C{variant} undone.
    """
    unquoter = Unquoter(variant)
    return unquoter.feed(data) + unquoter.flush()


def quote(data: bytes, variant: str = "mboxrd") -> bytes:
    """
    @return: C{data} with the C{From } quoting of C{variant} applied.
    """
    quoter = Quoter(variant)
    return quoter.feed(data) + quoter.flush()


@dataclass(frozen=True, slots=True)
class MboxMessage:
    """
    Where one message lies in an mbox file.

    @ivar start: the offset of its C{From } line.
    @ivar content: where the message as served begins: after the envelope
        line and popd's own leading header lines.
    @ivar end: where it ends, before the separating empty line.
    @ivar next: where the next message (or the scanned part) begins.
    @ivar size: the octets of the message as served, in CRLF form.
    @ivar digest: the SHA-256 that a derived UID comes from.
    @ivar uidl: the value of its first C{X-UIDL:} header, if valid.
    """

    start: int
    content: int
    end: int
    next: int
    size: int
    digest: bytes
    uidl: str | None


class _Source:
    """
    Positioned reads of a file up to a limit, where a short read means the
    file shrank under us.
    """

    def __init__(self, fd: int, limit: int, chunk_size: int) -> None:
        self.fd = fd
        self.limit = limit
        self.chunk_size = chunk_size

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.limit - offset))
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise MboxTruncatedError()
        return data

    def chunks(self, start: int, stop: int) -> Iterable[tuple[int, bytes]]:
        position = start
        while position < stop:
            data = self.read(position, min(self.chunk_size, stop - position))
            yield position, data
            position += len(data)

    def find(self, needle: bytes, start: int, stop: int) -> int:
        """
        The offset of the first C{needle} lying wholly in C{[start, stop)},
        or -1.
        """
        overlap = len(needle) - 1
        position = start
        while stop - position >= len(needle):
            data = self.read(position, min(self.chunk_size + overlap, stop - position))
            found = data.find(needle)
            if found >= 0:
                return position + found
            position += len(data) - overlap
        return -1


def scan(
    fd: int,
    limit: int,
    variant: str = "mboxrd",
    chunk_size: int | None = None,
) -> list[MboxMessage]:
    """
    Find the messages in the first C{limit} octets of the mbox file C{fd},
    with their served sizes and hashes.

    @raise MboxFormatError: the file does not start with C{From }.
    @raise MboxTruncatedError: the file is shorter than C{limit}.
    """
    source = _Source(fd, limit, chunk_size or CHUNK_SIZE)
    if limit == 0:
        return []
    if limit < 5 or source.read(0, 5) != b"From ":
        raise MboxFormatError("the file does not start with a 'From ' line")
    messages = []
    position = 0
    while position < limit:
        message = _scan_one(source, position, variant)
        messages.append(message)
        position = message.next
    return messages


def _scan_one(source: _Source, start: int, variant: str) -> MboxMessage:
    """
    The message whose C{From } line is at C{start}.
    """
    limit = source.limit
    newline = source.find(b"\n", start, limit)
    if newline < 0:
        # An envelope line cut off at the end of the file: an empty message.
        digest = hashlib.sha256(source.read(start, limit - start)).digest()
        return MboxMessage(start, limit, limit, limit, 0, digest, None)
    header_start = newline + 1
    separator = source.find(b"\nFrom ", newline, limit)
    naive_next = separator + 1 if separator >= 0 else limit

    window = source.read(header_start, min(HEADER_LIMIT, naive_next - header_start))
    own_uidl = _OWN_UIDL_LINE.match(window)
    marker = own_uidl and _UNTERMINATED_LINE.match(window, own_uidl.end())
    own_lines = marker or own_uidl
    content = header_start + (own_lines.end() if own_lines else 0)
    unterminated = marker and marker.group(1) == b"1"
    body_start = _body_start(window)
    header_block = window[:body_start] if body_start is not None else window
    uidl_match = _X_UIDL.search(header_block)
    uidl = uidl_match.group(1).decode("ascii") if uidl_match else None

    end = next_start = None
    if body_start is not None:
        lengths = _CONTENT_LENGTH.findall(header_block)
        if len(lengths) == 1:
            framed = _content_length_frame(
                source, header_start, header_start + body_start + int(lengths[0])
            )
            if framed is not None:
                end, next_start = framed
    if end is None:
        next_start = naive_next
        end = _before_separator(source, header_start, naive_next)
    end = max(end, content)
    if unterminated and end > content and source.read(end - 1, 1) == b"\n":
        end -= 1

    envelope = source.read(start, header_start - start)
    digest = _digest(source, envelope, header_start, end, header_block, body_start)
    size = _served_size(source, content, end, variant)
    return MboxMessage(start, content, end, next_start, size, digest, uidl)


def _body_start(window: bytes) -> int | None:
    """
    Where the body starts in C{window} (the start of a message after its
    envelope line): after the first empty line, or C{None} if there is none.
    """
    for empty in (b"\n", b"\r\n"):
        if window.startswith(empty):
            return len(empty)
    found = [
        (at + len(empty))
        for empty in (b"\n\n", b"\n\r\n")
        if (at := window.find(empty)) >= 0
    ]
    return min(found) if found else None


def _content_length_frame(
    source: _Source, header_start: int, body_end: int
) -> tuple[int, int] | None:
    """
    Check a C{Content-Length} that ends the body at C{body_end}.

    @return: C{(end, next)} of the message if it is consistent, else
        C{None}.
    """
    limit = source.limit
    if body_end > limit:
        return None
    if body_end == limit:
        # As when the length ends on a C{From } line: it may have counted
        # the separating empty line.
        return _before_separator(source, header_start, limit), limit
    after = source.read(body_end, 7)
    for line_end in (b"\n", b"\r\n"):
        if after.startswith(line_end + b"From "):
            return body_end, body_end + len(line_end)
        if after == line_end and body_end + len(line_end) == limit:
            return body_end, limit
    if (
        after.startswith(b"From ")
        and body_end > header_start
        and source.read(body_end - 1, 1) == b"\n"
    ):
        # The length counted the separating empty line too.
        return _before_separator(source, header_start, body_end), body_end
    return None


def _before_separator(source: _Source, header_start: int, next_start: int) -> int:
    """
    Where a message that runs up to C{next_start} ends: before one empty
    line, if it ends with one.  The envelope line's own LF counts as the end
    of a line before it.
    """
    low = header_start - 1
    tail = source.read(max(low, next_start - 3), next_start - max(low, next_start - 3))
    if tail.endswith(b"\n\r\n"):
        return next_start - 2
    if tail.endswith(b"\n\n"):
        return next_start - 1
    return next_start


def _trimmed_end(source: _Source, low: int, end: int) -> int:
    """
    C{end} moved back over the line breaks that end the message.
    """
    step = 256
    while end > low:
        chunk = source.read(max(low, end - step), end - max(low, end - step))
        kept = chunk.rstrip(b"\r\n")
        if kept:
            return end - (len(chunk) - len(kept))
        end -= len(chunk)
    return end


def _digest(
    source: _Source,
    envelope: bytes,
    header_start: int,
    end: int,
    header_block: bytes,
    body_start: int | None,
) -> bytes:
    """
    The hash a derived UID comes from (see the module docstring).
    """
    digest = hashlib.sha256(envelope)
    trimmed = _trimmed_end(source, header_start, end)
    position = header_start
    if body_start is not None and header_start + body_start <= trimmed:
        digest.update(_stable_headers(header_block))
        position = header_start + body_start
    for _, data in source.chunks(position, trimmed):
        digest.update(data)
    return digest.digest()


def _stable_headers(header_block: bytes) -> bytes:
    """
    C{header_block} without the headers mail readers rewrite in place.
    """
    kept = []
    skipping = False
    for line in header_block.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().lower()
        skipping = b":" in line and name in _MUTABLE_HEADERS
        if not skipping:
            kept.append(line)
    return b"".join(kept)


def _served_size(source: _Source, content: int, end: int, variant: str) -> int:
    """
    The CRLF size of C{[content, end)} with the quoting undone.
    """
    unquoter = Unquoter(variant)
    counter = WireSizeCounter()
    for _, data in source.chunks(content, end):
        counter.feed(unquoter.feed(data))
    counter.feed(unquoter.flush())
    return counter.size


def assign_uids(messages: Iterable[MboxMessage]) -> list[str]:
    """
    The UIDs of C{messages}, in file order (see the module docstring).
    """
    taken: set[str] = set()
    seen: dict[bytes, int] = {}
    uids = []
    for message in messages:
        earlier = seen.get(message.digest, 0)
        seen[message.digest] = earlier + 1
        uid = message.uidl
        if uid is None or uid in taken:
            base = message.digest.hex()[:40]
            uid = base if earlier == 0 else f"{base}.{earlier}"
            extra = 0
            while uid in taken:
                # Only an X-UIDL forged to look derived can get here.
                extra += 1
                uid = f"{base}.{earlier}.{extra}"
        taken.add(uid)
        uids.append(uid)
    return uids


class MessageReader(io.RawIOBase):
    """
    A binary file over C{[start, end)} of an mbox that undoes the quoting as
    it reads, one chunk at a time.  It owns C{fd} and closes it.
    """

    def __init__(
        self,
        fd: int,
        start: int,
        end: int,
        variant: str = "mboxrd",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self._fd = fd
        self._position = start
        self._end = end
        self._unquoter = Unquoter(variant)
        self._chunk_size = chunk_size or CHUNK_SIZE
        self._buffer = memoryview(b"")
        self._finished = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("I/O operation on closed file")
        while not self._buffer and not self._finished:
            self._buffer = memoryview(self._next_chunk())
        count = min(len(buffer), len(self._buffer))
        buffer[:count] = self._buffer[:count]
        self._buffer = self._buffer[count:]
        return count

    def _next_chunk(self) -> bytes:
        if self._position >= self._end:
            self._finished = True
            return self._unquoter.flush()
        length = min(self._chunk_size, self._end - self._position)
        data = os.pread(self._fd, length, self._position)
        if len(data) != length:
            raise MboxTruncatedError()
        self._position += length
        return self._unquoter.feed(data)

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._fd)
            finally:
                super().close()


def line_ending(head: bytes) -> bytes:
    """
    The line ending of the first line of a message: CRLF or LF.
    """
    newline = head.find(b"\n")
    return b"\r\n" if newline > 0 and head[newline - 1 : newline] == b"\r" else b"\n"


def envelope_sender(head: bytes) -> bytes:
    """
    The sender for the envelope line: the address of the first
    C{Return-Path:} header in the header block at the start of C{head}, or
    C{MAILER-DAEMON} when there is none, it is empty (a bounce), or it
    would not fit an envelope line.
    """
    end = _body_start(head)
    header_block = head[:end] if end is not None else head
    match = _RETURN_PATH.search(header_block)
    if match:
        address = match.group(1).strip()
        if _ENVELOPE_SENDER.fullmatch(address):
            return address
    return b"MAILER-DAEMON"


def popd_lines(uid: str, eol: bytes, head: bytes, *, unterminated: bool) -> bytes:
    """
    popd's own leading header lines for a message it delivers, which starts
    with C{head}.  A message that itself starts with an
    C{X-Popd-Unterminated} line gets an explicit C{X-Popd-Unterminated: 0}
    first, so that its own line is never taken for popd's.
    """
    lines = b"X-UIDL: " + uid.encode("ascii") + eol
    if unterminated:
        lines += b"X-Popd-Unterminated: 1" + eol
    elif _UNTERMINATED_NAME.match(head):
        lines += b"X-Popd-Unterminated: 0" + eol
    return lines


def is_valid_uid(uid: object) -> bool:
    """
    Whether C{uid} is a str of 1 to 70 characters in 0x21-0x7E.
    """
    return (
        isinstance(uid, str) and uid.isascii() and bool(_UIDL.fullmatch(uid.encode()))
    )


def copy_range(
    source_fd: int,
    start: int,
    stop: int,
    write: Callable[[bytes], None],
    chunk_size: int | None = None,
) -> None:
    """
    Copy C{[start, stop)} of C{source_fd} through C{write}.

    @raise MboxTruncatedError: the file is shorter than C{stop}.
    """
    source = _Source(source_fd, stop, chunk_size or CHUNK_SIZE)
    for _, data in source.chunks(start, stop):
        write(data)
