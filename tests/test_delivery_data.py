"""
The DATA decoder (popd.delivery.data) at every chunk size.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from popd.delivery.data import DataDecoder


def decode(wire: bytes, chunk: int, limit: int | None = None):
    out: list[bytes] = []
    decoder = DataDecoder(out.append, limit)
    rest = None
    for start in range(0, len(wire), chunk):
        rest = decoder.feed(wire[start : start + chunk])
        if rest is not None:
            # The caller takes back what followed the end.
            rest += wire[start + chunk :]
            break
    return b"".join(out), rest, decoder


def stuffed(lines: list[bytes]) -> bytes:
    """
    CRLF lines dot-stuffed and terminated, the way a client sends them.
    """
    return (
        b"".join(
            (b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines
        )
        + b".\r\n"
    )


def reference(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


CASES = [
    [],
    [b""],
    [b"Subject: x", b"", b"body"],
    [b".", b"..", b"...", b". x", b".x"],
    [b"a\rb", b"\r", b"x\nnot a line end", b"\n.", b"end"],
    [b"line without anything special " * 50],
    [b"\r\r", b"."],
]


@pytest.mark.parametrize("lines", CASES)
@pytest.mark.parametrize("chunk", [1, 2, 3, 4, 5, 7, 64, 10**6])
def test_decodes_at_every_chunk_size(lines, chunk):
    wire = stuffed(lines) + b"NOOP\r\n"
    data, rest, decoder = decode(wire, chunk)
    assert data == reference(lines)
    assert decoder.done
    # What followed the end comes back, whatever chunk it was in.
    assert rest == b"NOOP\r\n"
    assert decoder.size == sum(len(line) + 2 for line in lines)


line_strategy = st.lists(
    st.binary(max_size=12).map(lambda b: b.replace(b"\r\n", b"\r")), max_size=12
)


@given(lines=line_strategy, chunk=st.integers(min_value=1, max_value=40))
def test_decodes_any_lines(lines, chunk):
    # A line may hold a bare CR or LF, but not CRLF (that would end it).
    lines = [line for line in lines if not line.endswith(b"\r")]
    data, rest, decoder = decode(stuffed(lines), chunk)
    assert decoder.done and rest == b""
    assert data == reference(lines)


def test_end_is_only_crlf_dot_crlf():
    data, rest, decoder = decode(b"a\n.\nb\r\n.\r\n", 3)
    assert data == b"a\n.\nb\n" and decoder.done


def test_no_end_yet():
    data, rest, decoder = decode(b"Subject: x\r\n\r\nbody\r\n.", 4)
    assert rest is None and not decoder.done
    assert data == b"Subject: x\n\nbody\n"


@pytest.mark.parametrize("chunk", [1, 5, 1000])
def test_limit_reads_to_the_end_without_storing(chunk):
    lines = [b"x" * 30] * 10
    data, rest, decoder = decode(stuffed(lines) + b"QUIT\r\n", chunk, limit=100)
    assert decoder.too_large and decoder.done
    assert len(data) <= 100
    assert rest == b"QUIT\r\n"


def test_limit_is_inclusive():
    lines = [b"x" * 8]  # 10 octets with CRLF
    assert not decode(stuffed(lines), 3, limit=10)[2].too_large
    assert decode(stuffed(lines), 3, limit=9)[2].too_large


def test_feeding_after_the_end_returns_the_data():
    decoder = DataDecoder(lambda data: None, None)
    assert decoder.feed(b".\r\n") == b""
    assert decoder.feed(b"more") == b"more"


def test_big_input_is_fast_enough():
    line = b"0123456789" * 7 + b"\r\n"
    wire = line * 200_000 + b".\r\n"
    out: list[bytes] = []
    decoder = DataDecoder(out.append, None)
    for start in range(0, len(wire), 65536):
        decoder.feed(wire[start : start + 65536])
    assert decoder.done
    assert len(b"".join(out)) == len(line) * 200_000 - 200_000
    assert re.fullmatch(rb"(?:[0-9]{70}\n)+", b"".join(out))
