"""
Tests for L{popd.maildrops.snapshot_cache}: the bounded LRU cache, the
settling rule and file stamps.
"""

import os
import threading
from pathlib import Path

import pytest

from popd.maildrops import snapshot_cache
from popd.maildrops.snapshot_cache import (
    SETTLE_SECONDS,
    BoundedCache,
    file_stamp,
    is_settled,
)


def weighed_by_length(capacity: int) -> BoundedCache[str, str]:
    return BoundedCache(capacity, len)


# BoundedCache


def test_get_missing_is_none() -> None:
    cache = weighed_by_length(10)
    assert cache.get("nothing") is None
    assert len(cache) == 0 and cache.weight == 0


def test_put_and_get() -> None:
    cache = weighed_by_length(10)
    cache.put("a", "xx")
    cache.put("b", "yyy")
    assert cache.get("a") == "xx"
    assert cache.get("b") == "yyy"
    assert len(cache) == 2 and cache.weight == 5


def test_evicts_least_recently_put_first() -> None:
    cache = weighed_by_length(6)
    cache.put("a", "aa")
    cache.put("b", "bb")
    cache.put("c", "cc")
    cache.put("d", "d")
    assert cache.get("a") is None
    assert [cache.get(key) for key in "bcd"] == ["bb", "cc", "d"]
    assert cache.weight == 5


def test_get_refreshes_recency() -> None:
    cache = weighed_by_length(6)
    cache.put("a", "aa")
    cache.put("b", "bb")
    cache.put("c", "cc")
    assert cache.get("a") == "aa"
    cache.put("d", "dd")
    assert cache.get("b") is None, "b was the least recently used"
    assert cache.get("a") == "aa"
    assert cache.get("c") == "cc"
    assert cache.get("d") == "dd"


def test_evicts_as_many_as_needed_for_the_weight() -> None:
    cache = weighed_by_length(6)
    for key in "abc":
        cache.put(key, key * 2)
    cache.put("big", "x" * 5)
    assert [cache.get(key) for key in "abc"] == [None, None, None]
    assert cache.get("big") == "xxxxx"
    assert len(cache) == 1 and cache.weight == 5


def test_capacity_is_inclusive() -> None:
    cache = weighed_by_length(4)
    cache.put("a", "aa")
    cache.put("b", "bb")
    assert cache.weight == 4
    assert cache.get("a") == "aa" and cache.get("b") == "bb"


def test_entry_heavier_than_capacity_not_kept() -> None:
    cache = weighed_by_length(4)
    cache.put("a", "aa")
    cache.put("huge", "x" * 5)
    assert cache.get("huge") is None
    assert cache.get("a") == "aa", "a too heavy entry evicts nothing"
    assert cache.weight == 2


def test_too_heavy_replacement_drops_the_old_value() -> None:
    """
    A key's old value is stale once a new one is put, even if the new one
    cannot be kept.
    """
    cache = weighed_by_length(4)
    cache.put("a", "aa")
    cache.put("a", "x" * 5)
    assert cache.get("a") is None
    assert len(cache) == 0 and cache.weight == 0


def test_replacing_a_key_adjusts_weight() -> None:
    cache = weighed_by_length(10)
    cache.put("a", "aaaa")
    cache.put("b", "bb")
    cache.put("a", "a")
    assert cache.get("a") == "a"
    assert len(cache) == 2 and cache.weight == 3
    cache.put("a", "a" * 8)
    assert cache.get("a") == "a" * 8
    assert cache.weight == 10 and cache.get("b") == "bb"


def test_replacing_makes_the_key_most_recent() -> None:
    cache = weighed_by_length(4)
    cache.put("a", "a")
    cache.put("b", "b")
    cache.put("a", "aa")
    cache.put("c", "c")  # weight 4: nothing goes yet
    cache.put("d", "d")  # weight 5: the least recent, b, goes
    assert cache.get("b") is None
    assert [cache.get(key) for key in "acd"] == ["aa", "c", "d"]


def test_discard() -> None:
    cache = weighed_by_length(10)
    cache.put("a", "aaa")
    cache.put("b", "bb")
    cache.discard("a")
    cache.discard("missing")
    assert cache.get("a") is None
    assert cache.get("b") == "bb"
    assert len(cache) == 1 and cache.weight == 2
    cache.discard("b")
    assert len(cache) == 0 and cache.weight == 0


def test_zero_weight_entries() -> None:
    cache: BoundedCache[str, str] = BoundedCache(1, lambda value: 0)
    for key in "abc":
        cache.put(key, key)
    assert [cache.get(key) for key in "abc"] == ["a", "b", "c"]
    assert cache.weight == 0


def test_concurrent_use_keeps_weight_consistent() -> None:
    cache: BoundedCache[int, int] = BoundedCache(50, lambda value: value)
    errors = []

    def work(offset: int) -> None:
        try:
            for i in range(2000):
                key = (i * 7 + offset) % 40
                cache.put(key, i % 5 + 1)
                cache.get((key + 3) % 40)
                if i % 11 == 0:
                    cache.discard((key + 1) % 40)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    kept = [cache.get(key) for key in range(40)]
    assert cache.weight == sum(value for value in kept if value is not None)
    assert cache.weight <= 50


# is_settled


def test_settled_boundary() -> None:
    looked_at = 100.0
    limit = int((looked_at - SETTLE_SECONDS) * 1e9)
    before = (1, 10, limit - 1, limit - 1)
    assert is_settled([before], looked_at)
    assert not is_settled([(1, 10, limit, limit - 1)], looked_at)
    assert not is_settled([(1, 10, limit - 1, limit)], looked_at), "ctime counts"
    assert not is_settled([(1, 10, limit + 10**9, limit + 10**9)], looked_at)


def test_settled_needs_all_sources_settled() -> None:
    old = (1, 10, 0, 0)
    recent = (2, 10, 99 * 10**9, 99 * 10**9)
    assert is_settled([old, old], 100.0)
    assert not is_settled([old, recent], 100.0)
    assert not is_settled([recent, old], 100.0)


def test_missing_sources_are_settled() -> None:
    assert is_settled([None, None], 100.0)
    assert is_settled([], 100.0)
    assert is_settled([None, (1, 10, 0, 0)], 100.0)
    assert not is_settled([None, (1, 10, 99 * 10**9, 0)], 100.0)


def test_settle_seconds_read_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    recent = (1, 10, 99 * 10**9, 99 * 10**9)
    assert not is_settled([recent], 100.0)
    monkeypatch.setattr(snapshot_cache, "SETTLE_SECONDS", 0.5)
    assert is_settled([recent], 100.0)


def test_a_file_just_written_is_not_settled(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    stamp = file_stamp(str(path))
    assert stamp is not None
    changed = max(stamp[2], stamp[3]) / 1e9
    assert not is_settled([stamp], changed)
    assert not is_settled([stamp], changed + SETTLE_SECONDS - 0.01)
    assert is_settled([stamp], changed + SETTLE_SECONDS + 0.01)


# file_stamp


def test_file_stamp_of_missing_file(tmp_path: Path) -> None:
    assert file_stamp(str(tmp_path / "missing")) is None


def test_file_stamp_other_errors_raise(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError):
        file_stamp(str(tmp_path / "file" / "child"))


def test_file_stamp_fields(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"12345")
    st = os.stat(path)
    assert file_stamp(str(path)) == (
        st.st_ino,
        5,
        st.st_mtime_ns,
        st.st_ctime_ns,
    )
    assert file_stamp(str(path)) == file_stamp(str(path))


def test_file_stamp_changes_when_replaced_by_rename(tmp_path: Path) -> None:
    """
    popd replaces its files by renaming over them: even with the same size
    and (coarse) times, the new inode shows.
    """
    path = tmp_path / "popd-retrieved"
    path.write_bytes(b"same\n")
    before = file_stamp(str(path))
    tmp = tmp_path / "popd-retrieved.tmp"
    tmp.write_bytes(b"same\n")
    os.utime(tmp, ns=(before[2], before[2]))
    os.replace(tmp, path)
    after = file_stamp(str(path))
    assert after is not None and after != before
    assert after[0] != before[0]
    assert after[1] == before[1] and after[2] == before[2]


def test_file_stamp_changes_when_a_directory_gains_an_entry(tmp_path: Path) -> None:
    directory = tmp_path / "new"
    directory.mkdir()
    os.utime(directory, (0, 0))
    before = file_stamp(str(directory))
    (directory / "1.msg").write_bytes(b"m\n")
    assert file_stamp(str(directory)) != before


def test_file_stamp_follows_symbolic_links(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"abc")
    link = tmp_path / "link"
    link.symlink_to(target)
    assert file_stamp(str(link)) == file_stamp(str(target))
    target.unlink()
    assert file_stamp(str(link)) is None
