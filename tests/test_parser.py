"""
The line parser: the same lines whatever the chunking, and bounded memory.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from popd.parser import Line, LineParser, OverlongLine


def feed_in_chunks(data: bytes, sizes: list[int], max_length: int = 8192) -> list:
    parser = LineParser(max_length)
    lines, start = [], 0
    for size in sizes:
        lines += parser.feed(data[start : start + size])
        start += size
    return lines + parser.feed(data[start:])


def test_crlf_and_bare_lf():
    assert LineParser().feed(b"USER a\r\nPASS b c\nQUIT") == [
        Line(b"USER a", 8),
        Line(b"PASS b c", 9),
    ]


def test_partial_line_waits_for_its_end():
    parser = LineParser()
    assert parser.feed(b"ST") == []
    assert parser.feed(b"AT\r") == []
    assert parser.feed(b"\n") == [Line(b"STAT", 6)]


def test_only_one_cr_is_removed():
    assert LineParser().feed(b"X\r\r\n") == [Line(b"X\r", 4)]


def test_overlong_line_is_dropped_and_reported_once():
    parser = LineParser(max_length=10)
    assert parser.feed(b"A" * 50) == []
    assert parser._buffer == b""
    assert parser.feed(b"B" * 50 + b"\r\nNOOP\r\n") == [
        OverlongLine(),
        Line(b"NOOP", 6),
    ]


def test_line_of_exactly_the_limit_is_kept():
    assert LineParser(max_length=6).feed(b"ABCD\r\nABCDE\r\n") == [
        Line(b"ABCD", 6),
        OverlongLine(),
    ]


def test_reset_forgets_partial_line():
    parser = LineParser()
    parser.feed(b"USER inj")
    parser.reset()
    assert parser.feed(b"ected\r\n") == [Line(b"ected", 7)]


@given(
    st.lists(st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")), max_size=20),
    st.lists(st.integers(min_value=1, max_value=17), max_size=60),
)
def test_chunking_never_changes_the_lines(lines, sizes):
    data = b"".join(line + b"\r\n" for line in lines)
    whole = LineParser(32).feed(data)
    assert feed_in_chunks(data, sizes, 32) == whole
    assert len(whole) == len(lines)
