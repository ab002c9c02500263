"""
The store contract of L{popd.interfaces} as pytest tests: any maildrop store,
popd's own or a third party's, proves it keeps the contract with one
subclass.

Recipe
======

In a test module (the class name must start with C{Test}; the kit's own
class does not, so pytest only runs it through subclasses)::

    import textwrap
    from pathlib import Path

    from popd.testing.contract import MaildropContract
    from mystore import MyProvider


    class TestMyStoreContract(MaildropContract):
        # Capability flags: declare what the store cannot do; each check
        # that needs it is skipped, saying why.  The defaults are the full
        # contract (see "Capability flags" below).
        streams = True

        def make_provider(self, directory: Path):
            # A fresh, empty store for one test.  Keep everything it writes
            # under `directory` (an empty directory of its own); the kit
            # checks that hostile user and folder names create nothing
            # outside it.
            return MyProvider(str(directory / "%u" / "Maildir"))

        # Optional hooks:

        def close_provider(self, provider):
            # Called after each test; may return a Deferred.  An adbapi
            # store closes its ConnectionPool here.
            return provider.pool.close()

        def subprocess_provider_code(self, directory: Path) -> str | None:
            # Python source for another process: it must define
            # `make_provider()` returning a provider over the SAME storage
            # (and may define `close_provider(provider)`).  The kit runs it
            # with the test's sys.path as PYTHONPATH to check [IN-USE]
            # across processes.  None (the default) skips that check.
            template = str(directory / "%u" / "Maildir")
            return textwrap.dedent(f'''
                from mystore import MyProvider

                def make_provider():
                    return MyProvider({template!r})
            ''')

        def vanish(self, provider, avatar_id, uid, folder=None):
            # Remove one message behind the store's back, the way another
            # program would (default: skip the checks that need it).
            ...

        def seed(self, provider, avatar_id, message, folder=None):
            # How tests put a message in (default: provider.deliver); must
            # return its UID or a Deferred firing with it.  Override it
            # when supports_deliver = False.
            return provider.deliver(avatar_id, message, folder)

Then run pytest on that module.  The kit's fixtures are C{directory} (the
store's empty directory, C{tmp_path / "store"}) and C{provider}; do not
reuse those names for other fixtures in the subclass.

Store methods may return Deferreds that fire from threads: the kit waits
for them with L{popd.testing.wait_for}, which starts the global reactor's
thread pool and turns the reactor with C{reactor.iterate()} until they
fire (see L{popd.testing.reactor}); the pool is stopped again after each
test class.  A store built on C{twisted.enterprise.adbapi} calls
C{pool.start()} in C{make_provider} (the reactor never runs, so the pool
would not start by itself) and C{pool.close()} in C{close_provider}.  A
store that must be given a reactor gets the global one (C{from
twisted.internet import reactor}); a test clock would never advance.

Capability flags
================

  - C{streams} (default C{False}): C{read()} gives a file that reads the
    message from storage as it goes; the kit then checks that opening and
    reading an 8 MB message a chunk at a time allocates far less than 8 MB
    and that the file is not a C{BytesIO}.
  - C{exact_bytes} (C{True}): C{read()} gives back exactly the delivered
    octets.  A store that normalises line endings sets it to C{False}; the
    kit then compares the CRLF wire form of both (every LF not preceded by
    CR made CRLF, as L{popd.stream} sends it), which must still be equal.
    Either way the size of what is read, in wire form, must equal the size
    the snapshot reports.
  - C{supports_deliver} (C{True}): C{deliver()} works.  A store that cannot
    deliver sets it to C{False} and overrides L{MaildropContract.seed} to
    place messages some other way.
  - C{supports_deliver_uid} (C{True}): C{deliver(..., uid=...)} keeps a
    given UID and refuses an invalid or duplicate one with C{ValueError}.
  - C{supports_folders} (C{True}): folders can be delivered into, listed
    and opened.  Without it the kit still checks that hostile folder names
    are refused and that an unknown folder is L{NoSuchFolder}.
  - C{creates_folders_on_open} (C{False}): opening an unknown folder makes
    it instead of failing with L{NoSuchFolder}.
  - C{supports_retrieved_at} (C{True}): C{commit(deleted, retrieved)}
    records first-retrieval times, shown as C{MessageInfo.retrieved_at} in
    later snapshots.
  - C{keeps_delivery_order} (C{True}): a snapshot lists messages in the
    order they were delivered, oldest first.
  - C{large_message_size} (8 MiB): the size of the large message.
  - C{timeout} (30): seconds to wait for any one Deferred.

What it checks
==============

The rules it holds stores to, where the interface leaves room:

  - Failures may be raised at once or come through the Deferred; both are
    accepted.  Invalid or duplicate given UIDs fail with C{ValueError};
    everything else with L{MaildropError} or a subclass.
  - Hostile user names (empty, C{.}, C{..}, with C{/}, NUL or LF) fail
    C{open} and C{deliver} with L{MaildropError} (L{NoSuchUser} is meant);
    C{folders} fails so or lists nothing.  Hostile folder names fail with
    L{MaildropError} (L{NoSuchFolder} is meant).  Nothing may appear next
    to C{directory}, nor at the paths they point at.
  - Opening a folder never delivered into is L{NoSuchFolder}, and does not
    create it.  C{INBOX}, in any case, names the default folder (the
    protocol offers it), which C{folders()} does not list.
  - UIDs belong to one maildrop: another user may be given the same UID.
  - C{retrieved_at} may be rounded to the second (the kit allows 2 s).

Snapshot stability (a delivery during a session is invisible to it, shows
in the next one and is never lost, even when the session deletes); sizes are
the octets in CRLF form (LF, CRLF, mixed, bare CR, no final newline, 8-bit
and NUL octets, dot lines); reading gives back what was delivered, in
chunks; UIDs are 1-70 characters in 0x21-0x7E, unique (also for identical
messages) and stable across sessions, deletions and deliveries; deletions
happen only on commit, never on release; commit tolerates a message that
vanished; a second open is L{MaildropInUse}, in this process and from
another one, while delivery goes on; C{deliver(uid=...)}; retrieval times;
folders; hostile user and folder names are refused and create nothing; a
large message is read as a stream.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import selectors
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import maybeDeferred
from zope.interface.verify import verifyObject

from popd.interfaces import (
    IMaildrop,
    IMaildropProvider,
    MaildropError,
    MaildropInUse,
    MessageInfo,
    NoSuchFolder,
)
from popd.stream import wire_size
from popd.testing.reactor import stop_reactor_threadpool, wait_for

__all__ = ["MaildropContract", "SAMPLES", "wire_form"]

#: Messages whose CRLF size and content a store must get right, by name.
SAMPLES: dict[str, bytes] = {
    "lf": b"Subject: lf\n\nbody line\nsecond line\n",
    "crlf": b"Subject: crlf\r\n\r\nbody line\r\nsecond line\r\n",
    "mixed": b"Subject: mixed\r\nX: y\n\nLF line\nCRLF line\r\nend\n",
    "bare-cr": b"Subject: bare CR\r\n\r\na\rb\r\rc\n\r",
    "no-final-newline": b"Subject: none\n\nno newline at the end",
    "8bit": b"Subject: =?utf-8?q?=C3=A4?=\n\nK\xc3\xb6rper \xff\xfe\x80 latin-1 \xe9\n",
    "nul": b"Subject: nul\n\na\x00b\x00\n",
    "dot-lines": b"Subject: dots\n\n.\n..two\n.\r\n. \nend\n",
    "long-line": b"Subject: long\n\n" + b"x" * 20000 + b"\n",
    "one-octet": b"x",
}

_UIDL = re.compile(r"[!-~]{1,70}")
_BARE_LF = re.compile(rb"(?<!\r)\n")

#: Names of users and folders that must never become paths.
_HOSTILE_NAMES = (
    "",
    ".",
    "..",
    "a/b",
    "../escape-{tag}",
    "../../escape-{tag}",
    "/tmp/popd-escape-{tag}",
    "../../../../../../../../../../tmp/popd-escape-{tag}",
    "x\x00y",
    "line\nbreak",
)

_HOLDER = """\
import runpy, sys
from popd.testing.contract import _hold_in_subprocess
_hold_in_subprocess(runpy.run_path(sys.argv[1]), sys.argv[2], sys.argv[3] or None)
"""


def wire_form(data: bytes) -> bytes:
    """
    C{data} in CRLF form, as L{popd.stream} sends it (before dot-stuffing):
    every LF not preceded by CR becomes CRLF; a bare CR stays.
    """
    return _BARE_LF.sub(b"\r\n", data)


def _large_message(size: int) -> bytes:
    line = b"Line %08d of a large message, with some text to fill it up.\n"
    count = size // len(line % 0) + 1
    header = b"Subject: large\nFrom: a@example.org\n\n"
    return header + b"".join(line % n for n in range(count))


class MaildropContract:
    """
    The store contract as pytest tests; see the module docstring for how to
    subclass it.
    """

    streams: bool = False
    exact_bytes: bool = True
    supports_deliver: bool = True
    supports_deliver_uid: bool = True
    supports_folders: bool = True
    creates_folders_on_open: bool = False
    supports_retrieved_at: bool = True
    keeps_delivery_order: bool = True
    large_message_size: int = 8 * 1024 * 1024
    timeout: float = 30.0

    # Hooks for the subclass

    def make_provider(self, directory: Path) -> Any:
        """
        A fresh, empty store that keeps everything under C{directory}.
        """
        raise NotImplementedError(
            f"{type(self).__name__} must define make_provider(self, directory)"
        )

    def close_provider(self, provider: Any) -> Any:
        """
        Clean up after one test; may return a L{Deferred}.
        """
        return None

    def seed(
        self, provider: Any, avatar_id: str, message: bytes, folder: str | None = None
    ) -> Any:
        """
        Put one message into a maildrop for a test and return its UID (or a
        L{Deferred} firing with it).  The default delivers it.
        """
        return provider.deliver(avatar_id, message, folder)

    def vanish(
        self, provider: Any, avatar_id: str, uid: str, folder: str | None = None
    ) -> Any:
        """
        Remove the message C{uid} behind the store's back, as another
        program would, even while a session holds the maildrop.  The default
        raises C{NotImplementedError}, which skips the checks that need it.
        """
        raise NotImplementedError

    def subprocess_provider_code(self, directory: Path) -> str | None:
        """
        Python source defining C{make_provider()} (and optionally
        C{close_provider(provider)}) for another process, over the same
        storage as C{make_provider(directory)}; C{None} skips the
        cross-process lock checks.
        """
        return None

    # Fixtures

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def _reactor_threadpool(cls) -> Iterable[None]:
        yield
        stop_reactor_threadpool()

    @pytest.fixture
    def directory(self, tmp_path: Path) -> Path:
        """
        The store's own directory, inside the test's C{tmp_path}.
        """
        directory = tmp_path / "store"
        directory.mkdir()
        return directory

    @pytest.fixture
    def provider(self, directory: Path) -> Iterable[Any]:
        provider = self.make_provider(directory)
        yield provider
        self.wait(self.close_provider(provider))

    # Helpers (not tests)

    def wait(self, d: Any) -> Any:
        return wait_for(d, self.timeout)

    def put(
        self, provider: Any, avatar_id: str, message: bytes, folder: str | None = None
    ) -> str:
        uid = self.wait(maybeDeferred(self.seed, provider, avatar_id, message, folder))
        assert isinstance(uid, str), f"seed/deliver gave {uid!r}, not a str UID"
        return uid

    def open(self, provider: Any, avatar_id: str, folder: str | None = None) -> Any:
        return self.wait(maybeDeferred(provider.open, avatar_id, folder))

    def read_all(self, drop: Any, index: int) -> bytes:
        """
        Read one message in chunks of at most 64 KiB, checking that the
        file honours the size asked for.
        """
        message = self.wait(maybeDeferred(drop.read, index))
        chunks = []
        try:
            while True:
                chunk = message.read(65536)
                assert isinstance(chunk, bytes), f"read() gave {type(chunk)}"
                assert len(chunk) <= 65536, "read(65536) returned more"
                if not chunk:
                    break
                chunks.append(chunk)
        finally:
            message.close()
        return b"".join(chunks)

    def contents(
        self, provider: Any, avatar_id: str, folder: str | None = None
    ) -> dict[str, bytes]:
        """
        Open a maildrop, read every message and release it.

        @return: the messages by UID, in snapshot order.
        """
        drop = self.open(provider, avatar_id, folder)
        try:
            return {
                info.uid: self.read_all(drop, index)
                for index, info in enumerate(drop.messages)
            }
        finally:
            self.wait(drop.release())

    def infos(
        self, provider: Any, avatar_id: str, folder: str | None = None
    ) -> list[MessageInfo]:
        drop = self.open(provider, avatar_id, folder)
        try:
            return list(drop.messages)
        finally:
            self.wait(drop.release())

    def index_of(self, drop: Any, uid: str) -> int:
        uids = [info.uid for info in drop.messages]
        assert uid in uids, f"UID {uid!r} is not in the snapshot {uids!r}"
        return uids.index(uid)

    def assert_same_message(self, read: bytes, delivered: bytes) -> None:
        if self.exact_bytes:
            assert read == delivered, "read() did not give back the delivered octets"
        else:
            assert wire_form(read) == wire_form(delivered), (
                "read() did not give back the delivered message (in wire form)"
            )

    def fails_with(
        self, expected: type[BaseException] | tuple, call: Callable, *args: Any
    ) -> BaseException:
        """
        Call C{call(*args)}, wait, and check it failed with C{expected}
        (raised at once or through the Deferred).  A maildrop it opened by
        mistake is released.
        """
        try:
            outcome = self.wait(maybeDeferred(call, *args))
        except expected as e:
            return e
        if IMaildrop.providedBy(outcome):
            self.wait(outcome.release())
        pytest.fail(f"{call.__name__}{args!r} gave {outcome!r}, not {expected}")

    def require(self, flag: str, why: str) -> None:
        if not getattr(self, flag):
            pytest.skip(f"{type(self).__name__} declares {flag} = False: {why}")

    def in_subprocess(self, directory: Path, avatar_id: str, folder: str | None):
        """
        Start another process that opens the maildrop and holds it until
        told to release it; C{None} if the subclass gives no code.
        """
        code = self.subprocess_provider_code(directory)
        if code is None:
            return None
        script = directory.parent / "contract_subprocess_provider.py"
        script.write_text(code)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(p) for p in sys.path if p])
        return _Holder(
            subprocess.Popen(
                [sys.executable, "-c", _HOLDER, str(script), avatar_id, folder or ""],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
            ),
            self.timeout,
        )

    # The contract

    def test_provides_interfaces(self, provider: Any) -> None:
        assert verifyObject(IMaildropProvider, provider)
        self.put(provider, "alice", SAMPLES["lf"])
        drop = self.open(provider, "alice")
        try:
            assert verifyObject(IMaildrop, drop)
            assert all(isinstance(info, MessageInfo) for info in drop.messages)
        finally:
            self.wait(drop.release())

    def test_empty_maildrop(self, provider: Any) -> None:
        """
        A user who never got mail has an empty maildrop (or none at all).
        """
        try:
            drop = self.open(provider, "nobody-yet")
        except MaildropError:
            return
        try:
            assert list(drop.messages) == []
        finally:
            self.wait(drop.release())

    def test_deliver_returns_the_listed_uid(self, provider: Any) -> None:
        self.require("supports_deliver", "the store cannot deliver")
        uid = self.wait(provider.deliver("alice", SAMPLES["lf"]))
        assert isinstance(uid, str)
        assert [info.uid for info in self.infos(provider, "alice")] == [uid]

    def test_deliver_from_file(self, provider: Any) -> None:
        self.require("supports_deliver", "the store cannot deliver")
        data = SAMPLES["mixed"] * 1000
        source = io.BytesIO(data)
        uid = self.wait(provider.deliver("alice", source))
        self.assert_same_message(self.contents(provider, "alice")[uid], data)

    @pytest.mark.parametrize("sample", sorted(SAMPLES))
    def test_size_is_crlf_octets(self, provider: Any, sample: str) -> None:
        data = SAMPLES[sample]
        uid = self.put(provider, "alice", data)
        drop = self.open(provider, "alice")
        try:
            info = drop.messages[self.index_of(drop, uid)]
            assert info.size == wire_size(data) == len(wire_form(data)), (
                f"{sample}: size {info.size}, on the wire {len(wire_form(data))}"
            )
        finally:
            self.wait(drop.release())

    @pytest.mark.parametrize("sample", sorted(SAMPLES))
    def test_read_gives_back_the_message(self, provider: Any, sample: str) -> None:
        data = SAMPLES[sample]
        uid = self.put(provider, "alice", data)
        drop = self.open(provider, "alice")
        try:
            index = self.index_of(drop, uid)
            read = self.read_all(drop, index)
            self.assert_same_message(read, data)
            assert wire_size(read) == drop.messages[index].size, (
                "the size of what read() gives, in wire form, is not the size listed"
            )
            # A message can be read again in the same session.
            assert self.read_all(drop, index) == read
        finally:
            self.wait(drop.release())

    def test_delivery_order(self, provider: Any) -> None:
        self.require("keeps_delivery_order", "the snapshot order is not defined")
        uids = [self.put(provider, "alice", b"n: %d\n" % n) for n in range(12)]
        assert [info.uid for info in self.infos(provider, "alice")] == uids

    def test_snapshot_is_stable_and_delivery_never_lost(self, provider: Any) -> None:
        first = self.put(provider, "alice", SAMPLES["lf"])
        second = self.put(provider, "alice", SAMPLES["crlf"])
        drop = self.open(provider, "alice")
        try:
            before = list(drop.messages)
            late = self.put(provider, "alice", b"Subject: late\n\narrived meanwhile\n")
            assert list(drop.messages) == before
            assert [info.uid for info in before] == [first, second] or (
                not self.keeps_delivery_order
                and sorted(info.uid for info in before) == sorted([first, second])
            )
            # Every message of the snapshot can still be read.
            for index in range(len(before)):
                self.read_all(drop, index)
        finally:
            self.wait(drop.release())
        self.assert_same_message(
            self.contents(provider, "alice")[late],
            b"Subject: late\n\narrived meanwhile\n",
        )

        # A session deleting all it saw keeps what arrived during it.
        drop = self.open(provider, "alice")
        late_too = self.put(provider, "alice", b"Subject: later\n\nstill here\n")
        self.wait(drop.commit(range(len(drop.messages))))
        assert list(self.contents(provider, "alice")) == [late_too]

    def test_uids_are_valid_unique_and_stable(self, provider: Any) -> None:
        same = b"Subject: twins\n\nidentical\n"
        uids = [self.put(provider, "alice", same) for _ in range(3)]
        uids += [self.put(provider, "alice", SAMPLES[name]) for name in sorted(SAMPLES)]
        assert len(set(uids)) == len(uids), f"UIDs repeat: {uids!r}"
        listed = [info.uid for info in self.infos(provider, "alice")]
        assert sorted(listed) == sorted(uids)
        for uid in listed:
            assert isinstance(uid, str) and _UIDL.fullmatch(uid), f"bad UID {uid!r}"
        assert [info.uid for info in self.infos(provider, "alice")] == listed

        # Deleting some and delivering more changes no other message's UID.
        drop = self.open(provider, "alice")
        self.wait(drop.commit([0, 2]))
        newer = self.put(provider, "alice", same)
        assert newer not in uids, "a UID was reused for another message"
        after = [info.uid for info in self.infos(provider, "alice")]
        expected = [uid for i, uid in enumerate(listed) if i not in (0, 2)] + [newer]
        if self.keeps_delivery_order:
            assert after == expected
        else:
            assert sorted(after) == sorted(expected)

    def test_users_are_kept_apart(self, provider: Any) -> None:
        alice = self.put(provider, "alice", b"Subject: a\n\nfor alice\n")
        bob = self.put(provider, "bob", b"Subject: b\n\nfor bob\n")
        assert list(self.contents(provider, "alice")) == [alice]
        assert list(self.contents(provider, "bob")) == [bob]

    def test_release_deletes_nothing(self, provider: Any) -> None:
        uids = [self.put(provider, "alice", SAMPLES[n]) for n in ("lf", "crlf", "8bit")]
        drop = self.open(provider, "alice")
        self.wait(drop.release())
        drop = self.open(provider, "alice")
        self.wait(drop.commit([]))
        assert sorted(self.contents(provider, "alice")) == sorted(uids)

    def test_commit_deletes_exactly_those_given(self, provider: Any) -> None:
        names = ("lf", "crlf", "8bit", "bare-cr")
        uids = [self.put(provider, "alice", SAMPLES[name]) for name in names]
        drop = self.open(provider, "alice")
        doomed = {self.index_of(drop, uids[1]), self.index_of(drop, uids[3])}
        self.wait(drop.commit(doomed))
        left = self.contents(provider, "alice")
        assert sorted(left) == sorted([uids[0], uids[2]])
        self.assert_same_message(left[uids[0]], SAMPLES["lf"])
        self.assert_same_message(left[uids[2]], SAMPLES["8bit"])

    def test_commit_accepts_deleted_alone_and_generators(self, provider: Any) -> None:
        uid = self.put(provider, "alice", SAMPLES["lf"])
        keep = self.put(provider, "alice", SAMPLES["crlf"])
        drop = self.open(provider, "alice")
        self.wait(drop.commit(i for i in [self.index_of(drop, uid)]))
        assert list(self.contents(provider, "alice")) == [keep]

    def test_commit_tolerates_a_vanished_message(self, provider: Any) -> None:
        gone = self.put(provider, "alice", SAMPLES["lf"])
        doomed = self.put(provider, "alice", SAMPLES["crlf"])
        kept = self.put(provider, "alice", SAMPLES["8bit"])
        drop = self.open(provider, "alice")
        try:
            self.wait(maybeDeferred(self.vanish, provider, "alice", gone))
        except NotImplementedError:
            self.wait(drop.release())
            pytest.skip(f"{type(self).__name__} defines no vanish() hook")
        gone_index = self.index_of(drop, gone)
        self.fails_with(MaildropError, drop.read, gone_index)
        self.wait(drop.commit([gone_index, self.index_of(drop, doomed)], [gone_index]))
        assert list(self.contents(provider, "alice")) == [kept]

    def test_second_open_is_in_use(self, provider: Any) -> None:
        self.put(provider, "alice", SAMPLES["lf"])
        drop = self.open(provider, "alice")
        try:
            self.fails_with(MaildropInUse, provider.open, "alice", None)
            # Another user's maildrop is not affected.
            self.wait(self.open(provider, "bob").release())
            # Delivery does not wait for the session.
            self.put(provider, "alice", SAMPLES["crlf"])
            self.fails_with(MaildropInUse, provider.open, "alice", None)
        finally:
            self.wait(drop.release())
        drop = self.open(provider, "alice")
        assert len(drop.messages) == 2
        self.wait(drop.commit([]))
        # commit released the lock too.
        self.wait(self.open(provider, "alice").release())

    def test_in_use_across_processes(self, provider: Any, directory: Path) -> None:
        self.put(provider, "alice", SAMPLES["lf"])
        holder = self.in_subprocess(directory, "alice", None)
        if holder is None:
            pytest.skip(
                f"{type(self).__name__} gives no subprocess_provider_code(), so "
                "the lock cannot be checked across processes"
            )
        with holder:
            holder.expect("LOCKED")
            self.fails_with(MaildropInUse, provider.open, "alice", None)
            late = self.put(provider, "alice", SAMPLES["crlf"])
            holder.release()
        assert late in self.contents(provider, "alice")

        drop = self.open(provider, "alice")
        try:
            with self.in_subprocess(directory, "alice", None) as holder:
                holder.expect("IN-USE")
        finally:
            self.wait(drop.release())

    def test_deliver_keeps_a_given_uid(self, provider: Any) -> None:
        self.require("supports_deliver", "the store cannot deliver")
        self.require("supports_deliver_uid", "the store cannot keep a given UID")
        given = ["imported-1", "X", "!" + "~" * 68 + "!", f"{7:08X}{1700000000:08X}"]
        natural = self.wait(provider.deliver("alice", b"Subject: new\n\nnew\n"))
        for n, uid in enumerate(given):
            assert self.wait(provider.deliver("alice", b"n: %d\n" % n, uid=uid)) == uid
        for _ in range(2):
            messages = self.contents(provider, "alice")
            assert sorted(messages) == sorted([natural, *given])
            for n, uid in enumerate(given):
                self.assert_same_message(messages[uid], b"n: %d\n" % n)
        # A new delivery never takes a UID that was given.
        another = self.wait(provider.deliver("alice", b"Subject: new\n\nagain\n"))
        assert another not in given
        # Another user may have the same UID.
        assert self.wait(provider.deliver("bob", b"x\n", uid="imported-1")) == (
            "imported-1"
        )

    def test_deliver_refuses_duplicate_and_invalid_uids(self, provider: Any) -> None:
        self.require("supports_deliver", "the store cannot deliver")
        self.require("supports_deliver_uid", "the store cannot keep a given UID")
        natural = self.wait(provider.deliver("alice", SAMPLES["lf"]))
        self.wait(provider.deliver("alice", SAMPLES["crlf"], uid="given-1"))
        refused = [natural, "given-1", "", "has space", "x" * 71, "caf\xe9"]
        refused += ["tab\there", "del\x7f", "nul\x00", "line\n"]
        for uid in refused:
            self.fails_with(ValueError, provider.deliver, "alice", b"dup\n", None, uid)
        assert sorted(self.contents(provider, "alice")) == sorted([natural, "given-1"])

    def test_retrieved_at_recorded_once(self, provider: Any) -> None:
        self.require("supports_retrieved_at", "the store keeps no retrieval times")
        first = self.put(provider, "alice", SAMPLES["lf"])
        second = self.put(provider, "alice", SAMPLES["crlf"])
        third = self.put(provider, "alice", SAMPLES["8bit"])
        assert [i.retrieved_at for i in self.infos(provider, "alice")] == [None] * 3

        drop = self.open(provider, "alice")
        before = time.time()
        self.wait(drop.commit([], [self.index_of(drop, first)]))
        after = time.time()

        drop = self.open(provider, "alice")
        times = {info.uid: info.retrieved_at for info in drop.messages}
        assert times[second] is None and times[third] is None
        recorded = times[first]
        assert recorded is not None, "commit(retrieved=...) recorded nothing"
        assert before - 2 <= recorded <= after + 2, (before, recorded, after)
        # A later retrieval does not move the first time.
        time.sleep(1.1)
        self.wait(
            drop.commit([], [self.index_of(drop, first), self.index_of(drop, second)])
        )

        drop = self.open(provider, "alice")
        times = {info.uid: info.retrieved_at for info in drop.messages}
        assert times[first] == recorded
        assert times[second] is not None and times[third] is None
        # Deleting and retrieving at once is fine; release records nothing.
        self.wait(
            drop.commit([self.index_of(drop, first)], [self.index_of(drop, first)])
        )
        drop = self.open(provider, "alice")
        self.wait(drop.release())
        times = {info.uid: info.retrieved_at for info in self.infos(provider, "alice")}
        assert sorted(times) == sorted([second, third]) and times[third] is None

    def test_retrieved_ignored_when_unsupported(self, provider: Any) -> None:
        if self.supports_retrieved_at:
            pytest.skip("the store records retrieval times (checked elsewhere)")
        uid = self.put(provider, "alice", SAMPLES["lf"])
        drop = self.open(provider, "alice")
        self.wait(drop.commit([], [0]))
        assert [(i.uid, i.retrieved_at) for i in self.infos(provider, "alice")] == [
            (uid, None)
        ]

    def test_folders(self, provider: Any) -> None:
        self.require("supports_folders", "the store has no folders")
        inbox = self.put(provider, "alice", SAMPLES["lf"])
        assert list(self.wait(provider.folders("alice"))) == []
        archived = self.put(provider, "alice", SAMPLES["crlf"], "Archive")
        sent = self.put(provider, "alice", SAMPLES["8bit"], "Sent")
        assert sorted(self.wait(provider.folders("alice"))) == ["Archive", "Sent"]
        assert list(self.contents(provider, "alice")) == [inbox]
        assert list(self.contents(provider, "alice", "Archive")) == [archived]
        assert list(self.contents(provider, "alice", "Sent")) == [sent]
        # Each folder is locked on its own.
        drop = self.open(provider, "alice")
        try:
            folder = self.open(provider, "alice", "Archive")
            self.fails_with(MaildropInUse, provider.open, "alice", "Archive")
            self.wait(folder.commit([0]))
        finally:
            self.wait(drop.release())
        assert list(self.contents(provider, "alice", "Archive")) == []
        assert list(self.contents(provider, "alice")) == [inbox]
        # Another user sees none of them.
        assert list(self.wait(provider.folders("bob"))) == []

    def test_inbox_is_the_default_folder(self, provider: Any) -> None:
        """
        The protocol lists C{INBOX} among the folders a user may open, and
        passes it on as it is.
        """
        uid = self.put(provider, "alice", SAMPLES["lf"])
        for name in ("INBOX", "inbox", "Inbox"):
            assert list(self.contents(provider, "alice", name)) == [uid]
        drop = self.open(provider, "alice")
        try:
            self.fails_with(MaildropInUse, provider.open, "alice", "INBOX")
        finally:
            self.wait(drop.release())
        assert "INBOX" not in self.wait(provider.folders("alice"))

    def test_unknown_folder(self, provider: Any) -> None:
        if self.creates_folders_on_open:
            pytest.skip(
                f"{type(self).__name__} declares creates_folders_on_open = True"
            )
        self.put(provider, "alice", SAMPLES["lf"])
        self.fails_with(NoSuchFolder, provider.open, "alice", "Nope")
        assert "Nope" not in self.wait(provider.folders("alice"))
        self.fails_with(NoSuchFolder, provider.open, "alice", "Nope")

    def test_hostile_user_names(self, provider: Any, directory: Path) -> None:
        tag = os.urandom(4).hex()
        for template in _HOSTILE_NAMES:
            name = template.format(tag=tag)
            self.fails_with(MaildropError, provider.open, name, None)
            if self.supports_deliver:
                self.fails_with(MaildropError, provider.deliver, name, b"x\n", None)
            try:
                listed = self.wait(maybeDeferred(provider.folders, name))
            except MaildropError:
                pass
            else:
                assert list(listed) == [], f"folders({name!r}) gave {listed!r}"
        self.assert_nothing_outside(directory, tag)

    def test_hostile_folder_names(self, provider: Any, directory: Path) -> None:
        tag = os.urandom(4).hex()
        self.put(provider, "alice", SAMPLES["lf"])
        for template in _HOSTILE_NAMES[1:]:
            name = template.format(tag=tag)
            self.fails_with(MaildropError, provider.open, "alice", name)
            if self.supports_deliver:
                self.fails_with(MaildropError, provider.deliver, "alice", b"x\n", name)
        assert list(self.wait(provider.folders("alice"))) == []
        assert len(self.contents(provider, "alice")) == 1
        self.assert_nothing_outside(directory, tag)

    def assert_nothing_outside(self, directory: Path, tag: str) -> None:
        outside = sorted(p.name for p in directory.parent.iterdir())
        assert outside == [directory.name], f"created outside the store: {outside}"
        for path in (
            Path("/tmp") / f"popd-escape-{tag}",
            directory.parent.parent / f"escape-{tag}",
            directory.parent.parent.parent / f"escape-{tag}",
        ):
            assert not os.path.lexists(path), f"{path} was created"

    def test_large_message_is_streamed(self, provider: Any) -> None:
        data = _large_message(self.large_message_size)
        if self.supports_deliver:
            uid = self.wait(provider.deliver("alice", io.BytesIO(data)))
        else:
            uid = self.put(provider, "alice", data)
        drop = self.open(provider, "alice")
        try:
            index = self.index_of(drop, uid)
            assert drop.messages[index].size == wire_size(data)
            if self.streams:
                tracemalloc.start()
                try:
                    message = self.wait(drop.read(index))
                    first = message.read(65536)
                    peak = tracemalloc.get_traced_memory()[1]
                finally:
                    tracemalloc.stop()
                try:
                    assert not isinstance(message, io.BytesIO), (
                        "streams = True, but read() gave a BytesIO"
                    )
                    assert len(data) // 4 > peak, (
                        f"streams = True, but reading 64 KiB allocated {peak} octets"
                    )
                    assert 0 < len(first) <= 65536
                finally:
                    message.close()
            read = self.read_all(drop, index)
        finally:
            self.wait(drop.release())
        if self.exact_bytes:
            assert hashlib.sha256(read).digest() == hashlib.sha256(data).digest()
        else:
            assert wire_form(read) == wire_form(data)


class _Holder:
    """
    Another process holding (or failing to open) a maildrop; see
    L{_hold_in_subprocess}.
    """

    def __init__(self, process: subprocess.Popen, timeout: float) -> None:
        self.process = process
        self.timeout = timeout

    def expect(self, word: str) -> None:
        line = self._line()
        assert line == word, f"the other process said {line!r}, not {word!r}"

    def release(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"\n")
        self.process.stdin.flush()
        self.expect("RELEASED")

    def _line(self) -> str:
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            if not selector.select(self.timeout):
                raise AssertionError("the other process said nothing in time")
        line = self.process.stdout.readline().decode("utf-8", "replace").strip()
        if not line:
            _, err = self.process.communicate(timeout=self.timeout)
            raise AssertionError(
                "the other process failed:\n" + err.decode("utf-8", "replace")
            )
        return line

    def __enter__(self) -> _Holder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self.process.poll() is None:
            try:
                self.process.communicate(b"\n", timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.communicate()


def _hold_in_subprocess(
    namespace: dict[str, Any], avatar_id: str, folder: str | None
) -> None:
    """
    The other process of the cross-process lock check: open the maildrop
    with the subclass's provider code, say C{LOCKED} (or C{IN-USE}), wait for
    a line on stdin, release it and say C{RELEASED}.
    """
    provider = namespace["make_provider"]()
    try:
        try:
            drop = wait_for(maybeDeferred(provider.open, avatar_id, folder))
        except MaildropInUse:
            print("IN-USE", flush=True)
            return
        print("LOCKED", flush=True)
        sys.stdin.readline()
        wait_for(drop.release())
        print("RELEASED", flush=True)
    finally:
        close = namespace.get("close_provider")
        if close is not None:
            wait_for(close(provider))
        stop_reactor_threadpool()
