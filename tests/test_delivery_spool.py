"""
The spool a message waits in (popd.delivery.spool).
"""

from __future__ import annotations

import os

from popd.delivery.spool import MEMORY_LIMIT, Spool


def test_small_message_stays_in_memory(tmp_path):
    with Spool(tmp_path / "spool") as spool:
        spool.write(b"Subject: x\n\nbody\n")
        assert spool.in_memory
        assert spool.reader(b"Top: 1\n").read() == b"Top: 1\nSubject: x\n\nbody\n"
    assert os.listdir(tmp_path / "spool") == []


def test_large_message_goes_to_an_unlinked_file(tmp_path):
    chunk = b"y" * 65536
    with Spool(tmp_path / "spool") as spool:
        for _ in range(MEMORY_LIMIT // len(chunk) + 2):
            spool.write(chunk)
        assert not spool.in_memory
        assert spool.stored == len(chunk) * (MEMORY_LIMIT // len(chunk) + 2)
        # Nothing is left in the directory for a crash to leave behind.
        assert os.listdir(tmp_path / "spool") == []
        for _ in range(2):
            reader = spool.reader(b"P\n")
            parts = []
            for _ in range(1000):
                data = reader.read(65536)
                if not data:
                    break
                parts.append(data)
            assert b"".join(parts) == b"P\n" + chunk * (MEMORY_LIMIT // len(chunk) + 2)


def test_reader_read_sizes(tmp_path):
    with Spool(tmp_path) as spool:
        spool.write(b"abcdef")
        reader = spool.reader(b"123")
        assert reader.read(2) == b"12"
        assert reader.read(3) == b"3ab"
        assert reader.read() == b"cdef"
        assert reader.read(5) == b""
        assert spool.reader().read(None) == b"abcdef"


def test_head_is_the_start(tmp_path):
    with Spool(tmp_path) as spool:
        spool.write(b"a" * 600)
        spool.write(b"b" * 600)
        assert spool.head == b"a" * 600 + b"b" * 424
