"""
Fuzzing the command-line parser (L{popd.parser.LineParser}) with arbitrary
bytes in arbitrary chunks, against a reference split written here: every
input gives exactly the lines the reference says whatever the chunking,
never raises, and never holds more than its limit in memory.

Budget: the C{ci} profile (the default) runs a few hundred examples per
test; C{POPD_HYPOTHESIS_PROFILE=long python -m pytest tests/test_fuzz_*.py}
runs many thousands.
"""

from __future__ import annotations

from helpers.pop3_wire import hypothesis_settings
from hypothesis import given
from hypothesis import strategies as st

from popd.parser import MAX_BUFFERED_LINE, Line, LineParser, OverlongLine

SETTINGS = hypothesis_settings(ci={"max_examples": 300}, long={"max_examples": 20000})

# Bytes that matter to a line parser, and long runs, mixed with anything.
_PIECES = [b"\r", b"\n", b"\r\n", b"\n\r", b"\0", b"\xff", b" ", b"A", b"."]
chunks_of_input = st.lists(
    st.one_of(
        st.binary(max_size=64),
        st.sampled_from(_PIECES),
        st.builds(lambda n, c: c * n, st.integers(1, 300), st.sampled_from(_PIECES)),
    ),
    max_size=40,
).map(b"".join)
limits = st.sampled_from([1, 2, 5, 16, 255, MAX_BUFFERED_LINE])


def reference(data: bytes, limit: int) -> list[Line | OverlongLine]:
    """
    The lines C{data} holds: each LF ends one; a line whose octets (LF
    included) exceed C{limit} is over-long; one CR before the LF is part
    of the terminator.
    """
    lines: list[Line | OverlongLine] = []
    for piece in data.split(b"\n")[:-1]:
        octets = len(piece) + 1
        if octets > limit:
            lines.append(OverlongLine())
        else:
            lines.append(Line(piece[:-1] if piece.endswith(b"\r") else piece, octets))
    return lines


def feed(parser: LineParser, data: bytes, sizes: list[int], limit: int) -> list:
    lines, start = [], 0
    for size in [*sizes, len(data)]:
        lines += parser.feed(data[start : start + size])
        start += size
        # Memory stays bounded whatever arrives.
        assert len(parser._buffer) <= limit
        if start >= len(data):
            break
    return lines


@SETTINGS
@given(chunks_of_input, st.lists(st.integers(0, 50), max_size=80), limits)
def test_lines_are_the_reference_split_in_any_chunking(data, sizes, limit):
    parser = LineParser(limit)
    assert feed(parser, data, sizes, limit) == reference(data, limit)


@SETTINGS
@given(chunks_of_input, chunks_of_input, st.lists(st.integers(1, 9)), limits)
def test_reset_forgets_exactly_the_partial_line(before, after, sizes, limit):
    """
    After L{LineParser.reset} (STLS), what came before it no longer
    matters: the parser answers as a new one would.
    """
    parser = LineParser(limit)
    feed(parser, before, sizes, limit)
    parser.reset()
    assert feed(parser, after, sizes, limit) == reference(after, limit)


@SETTINGS
@given(st.binary(max_size=2000), st.integers(1, 64))
def test_every_line_fits_its_limit(data, limit):
    for line in LineParser(limit).feed(data + b"\n"):
        if isinstance(line, Line):
            assert line.octets <= limit
            assert b"\n" not in line.text
            assert line.octets in (len(line.text) + 1, len(line.text) + 2)


def test_a_megabyte_without_a_newline_keeps_memory_bounded():
    parser = LineParser()
    for _ in range(128):
        assert parser.feed(b"x" * 8192) == []
        assert len(parser._buffer) <= MAX_BUFFERED_LINE
    assert parser.feed(b"\r\nNOOP\r\n") == [OverlongLine(), Line(b"NOOP", 6)]
