"""
Tests for L{popd.maildrops.mbox} and L{popd.maildrops.mboxfile}, run without
a reactor: the provider is given a thread pool that runs work at once and a
reactor that calls back at once, so every L{Deferred} has fired when the
call returns.  Other processes play the MTA and a killed popd.
"""

import hashlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from zope.interface.verify import verifyObject

from popd.interfaces import (
    IMaildrop,
    IMaildropProvider,
    MaildropError,
    MaildropInUse,
    MaildropUnavailable,
    NoSuchFolder,
    NoSuchUser,
)
from popd.maildrops import mbox as mbox_module
from popd.maildrops import mboxfile
from popd.maildrops.dotlock import dot_lock_path, locked_mailbox
from popd.maildrops.mbox import LOCK_SUFFIX, RETRIEVED_SUFFIX, MboxProvider
from popd.maildrops.mboxfile import (
    MessageReader,
    Quoter,
    Unquoter,
    assign_uids,
    quote,
    scan,
    unquote,
)
from popd.stream import wire_size
from popd.testing.immediate import ImmediateReactor, ImmediateThreadPool
from popd.testing.immediate import fired_result as result

REPO = Path(__file__).resolve().parents[1]
ENVELOPE = b"From sender@example.org Thu Jan  1 00:00:00 2026\n"


def make_provider(root: Path, **kwargs) -> MboxProvider:
    kwargs.setdefault("folder_dir_template", str(root / "folders" / "%u"))
    kwargs.setdefault("lock_timeout", 5)
    return MboxProvider(
        str(root / "mail" / "%u"),
        reactor=ImmediateReactor(),
        threadpool=ImmediateThreadPool(),
        **kwargs,
    )


@pytest.fixture
def provider(tmp_path: Path) -> MboxProvider:
    return make_provider(tmp_path)


@pytest.fixture
def mbox(tmp_path: Path) -> Path:
    """
    Bob's mbox (not created yet), in an existing spool directory.
    """
    (tmp_path / "mail").mkdir()
    return tmp_path / "mail" / "bob"


def envelope(n: int = 0) -> bytes:
    return b"From sender%d@example.org Thu Jan  1 00:00:%02d 2026\n" % (n, n % 60)


def mta_mbox(*messages: bytes, eol: bytes = b"\n") -> bytes:
    """
    An mbox as Postfix writes it: envelope, message, empty line.
    """
    return b"".join(
        envelope(n).replace(b"\n", eol) + message + eol
        for n, message in enumerate(messages)
    )


def served(provider: MboxProvider, user: str = "bob", folder=None) -> list[bytes]:
    """
    Every message of a maildrop as read, after opening and releasing it.
    """
    drop = result(provider.open(user, folder))
    try:
        return [read_message(drop, index) for index in range(len(drop.messages))]
    finally:
        result(drop.release())


def read_message(drop, index: int, chunk: int = 65536) -> bytes:
    message = result(drop.read(index))
    try:
        return b"".join(iter(lambda: message.read(chunk), b""))
    finally:
        message.close()


def uids(provider: MboxProvider, user: str = "bob") -> list[str]:
    drop = result(provider.open(user))
    try:
        return [info.uid for info in drop.messages]
    finally:
        result(drop.release())


def scan_bytes(data: bytes, tmp_path: Path, variant: str = "mboxrd"):
    """
    Scan C{data} as a file; return the messages and their served octets.
    """
    path = tmp_path / "scanned"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        messages = scan(fd, len(data), variant)
        contents = []
        for message in messages:
            reader = MessageReader(os.dup(fd), message.content, message.end, variant)
            with reader:
                contents.append(reader.read())
        return messages, contents
    finally:
        os.close(fd)


# Quoting


def reference_quote(data: bytes, variant: str) -> bytes:
    if variant == "mboxrd":
        return re.sub(rb"(?m)^(>*From )", rb">\1", data)
    return re.sub(rb"(?m)^From ", rb">From ", data)


def reference_unquote(data: bytes, variant: str) -> bytes:
    if variant == "mboxrd":
        return re.sub(rb"(?m)^>(>*From )", rb"\1", data)
    return re.sub(rb"(?m)^>From ", rb"From ", data)


_QUOTING_ALPHABET = st.lists(
    st.sampled_from(
        [b">", b"From ", b"From", b"F", b"rom ", b"\n", b"\r\n", b"x", b" "]
    ),
    max_size=40,
).map(b"".join)


def chunked(rewriter, data: bytes, cuts: list[int]) -> bytes:
    pieces = []
    position = 0
    for cut in sorted(set(cuts)):
        pieces.append(rewriter.feed(data[position:cut]))
        position = cut
    pieces.append(rewriter.feed(data[position:]))
    pieces.append(rewriter.flush())
    return b"".join(pieces)


@settings(max_examples=400, deadline=None)
@given(
    data=_QUOTING_ALPHABET,
    cuts=st.lists(st.integers(0, 200), max_size=12),
    variant=st.sampled_from(["mboxrd", "mboxo"]),
)
def test_quoting_matches_the_reference_at_any_chunking(
    data: bytes, cuts: list[int], variant: str
) -> None:
    cuts = [cut for cut in cuts if cut <= len(data)]
    assert chunked(Quoter(variant), data, cuts) == reference_quote(data, variant)
    assert chunked(Unquoter(variant), data, cuts) == reference_unquote(data, variant)


@settings(max_examples=300, deadline=None)
@given(data=_QUOTING_ALPHABET)
def test_mboxrd_quoting_is_reversible(data: bytes) -> None:
    quoted = quote(data)
    assert unquote(quoted) == data
    assert not re.search(rb"(?m)^From ", quoted)


def test_quoting_examples() -> None:
    body = b"From a\n>From b\n>>From c\nFrom\nFromage\n x From y\n"
    assert quote(body) == b">From a\n>>From b\n>>>From c\nFrom\nFromage\n x From y\n"
    assert (
        quote(body, "mboxo")
        == b">From a\n>From b\n>>From c\nFrom\nFromage\n x From y\n"
    )
    assert unquote(b">From a\n>>From b\n>>>From c\n") == b"From a\n>From b\n>>From c\n"
    # mboxo is ambiguous: only one level is ever undone.
    assert unquote(b">From a\n>>From b\n", "mboxo") == b"From a\n>>From b\n"
    with pytest.raises(ValueError):
        Quoter("mboxcl2")


# Parsing


def test_mboxrd_unquoting_at_depths(tmp_path: Path) -> None:
    message = b"Subject: q\n\n>From one\n>>From two\n>>>From three\n>From\n>Fromage\n"
    _, contents = scan_bytes(mta_mbox(message), tmp_path)
    assert contents == [
        b"Subject: q\n\nFrom one\n>From two\n>>From three\n>From\n>Fromage\n"
    ]


def test_mboxo_variant(tmp_path: Path) -> None:
    message = b"Subject: q\n\n>From one\n>>From two\n"
    messages, contents = scan_bytes(mta_mbox(message), tmp_path, "mboxo")
    assert contents == [b"Subject: q\n\nFrom one\n>>From two\n"]
    assert messages[0].size == wire_size(contents[0])


def test_sizes_are_of_the_served_message(tmp_path: Path) -> None:
    message = b"Subject: q\r\n\r\n>From one\n>>From two\r\nbare\rcr\n"
    messages, contents = scan_bytes(mta_mbox(message), tmp_path)
    assert messages[0].size == wire_size(contents[0]) == wire_size(message) - 2


def test_separator_is_not_part_of_the_message(tmp_path: Path) -> None:
    one = b"Subject: 1\n\nbody one\n"
    two = b"Subject: 2\n\nbody two\n\n"  # ends with an empty line of its own
    _, contents = scan_bytes(mta_mbox(one, two), tmp_path)
    assert contents == [one, two]


def test_unquoted_from_line_starts_a_message(tmp_path: Path) -> None:
    data = ENVELOPE + b"Subject: 1\n\nbody\nFrom x Thu Jan  1 00:00:00 2026\nmore\n"
    _, contents = scan_bytes(data, tmp_path)
    assert contents == [b"Subject: 1\n\nbody\n", b"more\n"]


def test_crlf_mbox(tmp_path: Path) -> None:
    one = b"Subject: 1\r\n\r\nbody\r\n>From quoted\r\n"
    two = b"Subject: 2\r\n\r\nlast\r\n"
    messages, contents = scan_bytes(mta_mbox(one, two, eol=b"\r\n"), tmp_path)
    assert contents == [one.replace(b">From", b"From"), two]
    assert [m.size for m in messages] == [len(c) for c in contents]


def test_no_newline_at_end_of_file(tmp_path: Path) -> None:
    data = mta_mbox(b"Subject: 1\n\none\n") + envelope(1) + b"Subject: 2\n\nno end"
    _, contents = scan_bytes(data, tmp_path)
    assert contents == [b"Subject: 1\n\none\n", b"Subject: 2\n\nno end"]


def test_envelope_line_cut_off(tmp_path: Path) -> None:
    data = mta_mbox(b"Subject: 1\n\none\n") + b"From cut-off"
    messages, contents = scan_bytes(data, tmp_path)
    assert contents == [b"Subject: 1\n\none\n", b""]
    assert messages[1].size == 0


def test_messages_without_separating_lines(tmp_path: Path) -> None:
    data = ENVELOPE + b"a: 1\n\nx\n" + ENVELOPE + b"a: 2\n\ny\n"
    _, contents = scan_bytes(data, tmp_path)
    assert contents == [b"a: 1\n\nx\n", b"a: 2\n\ny\n"]


def test_empty_message(tmp_path: Path) -> None:
    data = ENVELOPE + b"\n" + ENVELOPE + b"a: 2\n\ny\n\n"
    _, contents = scan_bytes(data, tmp_path)
    assert contents == [b"", b"a: 2\n\ny\n"]


def test_content_length_honoured(tmp_path: Path) -> None:
    body = b"line\nFrom inside the body\n"
    first = b"Content-Length: %d\n\n" % len(body) + body
    data = mta_mbox(first, b"Subject: 2\n\nnext\n")
    messages, contents = scan_bytes(data, tmp_path)
    assert contents == [first, b"Subject: 2\n\nnext\n"]
    # The last message, at the end of the file, with and without the
    # separating line.
    _, contents = scan_bytes(mta_mbox(first), tmp_path)
    assert contents == [first]
    _, contents = scan_bytes(ENVELOPE + first, tmp_path)
    assert contents == [first]


def test_content_length_counting_the_separator(tmp_path: Path) -> None:
    body = b"line\nFrom inside\n"
    first = b"Content-Length: %d\n\n" % (len(body) + 1) + body
    data = ENVELOPE + first + b"\n" + ENVELOPE + b"a: 2\n\nnext\n"
    _, contents = scan_bytes(data, tmp_path)
    assert contents == [first, b"a: 2\n\nnext\n"]


def test_content_length_crlf(tmp_path: Path) -> None:
    body = b"line\r\nFrom inside\r\n"
    first = b"Content-Length: %d\r\n\r\n" % len(body) + body
    data = mta_mbox(first, b"a: 2\r\n\r\nnext\r\n", eol=b"\r\n")
    _, contents = scan_bytes(data, tmp_path)
    assert contents == [first, b"a: 2\r\n\r\nnext\r\n"]


@pytest.mark.parametrize("delta", [-7, -1, 2, 3, 10_000])
def test_wrong_content_length_is_ignored(tmp_path: Path, delta: int) -> None:
    body = b"line\nFrom inside\nmore\n"
    first = b"Content-Length: %d\n\n" % (len(body) + delta) + body
    data = mta_mbox(first, b"a: 2\n\nnext\n")
    _, contents = scan_bytes(data, tmp_path)
    head, _, tail = first.partition(b"From inside\n")
    assert contents == [head, b"more\n", b"a: 2\n\nnext\n"]


def test_two_content_lengths_are_ignored(tmp_path: Path) -> None:
    body = b"line\nFrom inside\n"
    first = b"Content-Length: %d\nContent-Length: %d\n\n" % (len(body), len(body))
    _, contents = scan_bytes(mta_mbox(first + body), tmp_path)
    assert len(contents) == 2


def test_not_an_mbox(tmp_path: Path) -> None:
    with pytest.raises(mboxfile.MboxFormatError):
        scan_bytes(b"Subject: not an mbox\n\nbody\n", tmp_path)
    with pytest.raises(mboxfile.MboxFormatError):
        scan_bytes(b"From", tmp_path)


def test_reader_at_every_chunk_size(tmp_path: Path) -> None:
    message = b"Subject: q\r\n\r\n" + b">From a\n>>From b\n>x\r\n" * 5 + b"end\n"
    data = mta_mbox(message)
    path = tmp_path / "m"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        (found,) = scan(fd, len(data), "mboxrd", chunk_size=3)
        expected = unquote(message)
        for chunk_size in range(1, 40):
            reader = MessageReader(
                os.dup(fd), found.content, found.end, chunk_size=chunk_size
            )
            with reader:
                pieces = list(iter(lambda r=reader: r.read(5), b""))
            assert b"".join(pieces) == expected
            assert all(0 < len(piece) <= 5 for piece in pieces)
    finally:
        os.close(fd)


# Messages that also start like popd's own leading lines, or end anyhow.
_MESSAGES = st.lists(
    st.sampled_from(
        [
            b">",
            b"From ",
            b"\n",
            b"\r\n",
            b"\r",
            b"x",
            b"X-UIDL: forged\n",
            b"X-Popd-Unterminated: 1\n",
            b"x-popd-unterminated:0\r\n",
            b"Content-Length: 3\n",
            b"\n\nFrom x\n\n",
        ]
    ),
    max_size=30,
).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(
    messages=st.lists(_MESSAGES, min_size=1, max_size=5),
    chunk_size=st.integers(6, 40),
)
def test_delivered_messages_read_back_exactly(
    tmp_path_factory: pytest.TempPathFactory, messages: list[bytes], chunk_size: int
) -> None:
    root = tmp_path_factory.mktemp("prop")
    provider = make_provider(root)
    delivered = {result(provider.deliver("bob", data)): data for data in messages}
    old = mboxfile.CHUNK_SIZE
    mboxfile.CHUNK_SIZE = chunk_size
    try:
        drop = result(provider.open("bob"))
        try:
            assert [info.uid for info in drop.messages] == list(delivered)
            for index, info in enumerate(drop.messages):
                assert read_message(drop, index, 7) == delivered[info.uid]
                assert info.size == wire_size(delivered[info.uid])
        finally:
            result(drop.release())
    finally:
        mboxfile.CHUNK_SIZE = old


# UIDs


def test_x_uidl_honoured(mbox: Path, provider: MboxProvider) -> None:
    mbox.write_bytes(
        mta_mbox(
            b"Subject: 1\nX-UIDL: old-server-1\n\none\n",
            b"Subject: 2\nX-UIDL: old-server-1\n\ncopy\n",
            b"X-UIDL: bad uid with spaces\n\nthree\n",
        )
    )
    listed = uids(provider)
    assert listed[0] == "old-server-1"
    assert listed[1] != "old-server-1" and re.fullmatch("[0-9a-f]{40}", listed[1])
    assert re.fullmatch("[0-9a-f]{40}", listed[2])
    # An X-UIDL that is not popd's leading line is served.
    assert served(provider)[0] == b"Subject: 1\nX-UIDL: old-server-1\n\none\n"


def test_identical_messages_get_different_uids(
    mbox: Path, provider: MboxProvider
) -> None:
    same = ENVELOPE + b"Subject: twin\n\nsame\n\n"
    mbox.write_bytes(same * 3)
    listed = uids(provider)
    assert len(set(listed)) == 3
    assert listed[1] == listed[0] + ".1" and listed[2] == listed[0] + ".2"
    assert uids(provider) == listed


def test_uids_survive_deleting_earlier_messages(
    mbox: Path, provider: MboxProvider
) -> None:
    mbox.write_bytes(
        mta_mbox(*(b"Subject: %d\n\nbody %d\n" % (n, n) for n in range(6)))
    )
    before = uids(provider)
    drop = result(provider.open("bob"))
    result(drop.commit([0, 1, 3]))
    assert uids(provider) == [before[2], before[4], before[5]]


def test_identical_corner_case(mbox: Path, provider: MboxProvider) -> None:
    """
    The documented corner case: of identical messages without X-UIDL,
    deleting an earlier one gives a later one the deleted one's UID.
    """
    same = ENVELOPE + b"Subject: twin\n\nsame\n\n"
    mbox.write_bytes(same * 2)
    first, second = uids(provider)
    drop = result(provider.open("bob"))
    result(drop.commit([0]))
    assert uids(provider) == [first]
    assert mbox.read_bytes() == same


def test_uid_ignores_headers_readers_rewrite(
    mbox: Path, provider: MboxProvider
) -> None:
    mbox.write_bytes(mta_mbox(b"Subject: 1\nFrom: a@b\n\nbody\n"))
    (before,) = uids(provider)
    mbox.write_bytes(
        mta_mbox(
            b"Subject: 1\nStatus: RO\nX-Status: A\n  continued\nFrom: a@b\n\nbody\n"
        )
    )
    assert uids(provider) == [before]
    mbox.write_bytes(mta_mbox(b"Subject: 1\nFrom: a@b\n\nbody changed\n"))
    assert uids(provider) != [before]


def test_uid_ignores_trailing_line_breaks(mbox: Path, provider: MboxProvider) -> None:
    mbox.write_bytes(ENVELOPE + b"Subject: 1\n\nno end")
    (before,) = uids(provider)
    result(provider.deliver("bob", b"Subject: 2\n\nnext\n"))
    assert uids(provider)[0] == before
    assert served(provider)[0] == b"Subject: 1\n\nno end\n"


def test_assign_uids_against_forged_x_uidl() -> None:
    digest = hashlib.sha256(b"x").digest()
    forged = digest.hex()[:40]
    message = mboxfile.MboxMessage(0, 0, 0, 0, 0, digest, None)
    other = mboxfile.MboxMessage(0, 0, 0, 0, 0, b"\1" * 32, forged)
    listed = assign_uids([other, message])
    assert listed[0] == forged and listed[1] != forged
    assert len(set(listed)) == 2


# The provider


def test_provides_interfaces(provider: MboxProvider) -> None:
    assert verifyObject(IMaildropProvider, provider)
    drop = result(provider.open("bob"))
    assert verifyObject(IMaildrop, drop)
    result(drop.release())


def test_missing_mbox_is_empty(tmp_path: Path, provider: MboxProvider) -> None:
    assert served(provider) == []
    assert not (tmp_path / "mail" / "bob").exists()
    drop = result(provider.open("bob"))
    result(drop.commit([]))
    assert not (tmp_path / "mail" / "bob").exists()


def test_missing_mbox_without_create(tmp_path: Path) -> None:
    provider = make_provider(tmp_path, create=False)
    with pytest.raises(NoSuchUser):
        result(provider.open("bob"))
    with pytest.raises(NoSuchUser):
        result(provider.deliver("bob", b"x\n"))
    assert not (tmp_path / "mail").exists()
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "bob").write_bytes(b"")
    assert served(provider) == []
    result(provider.deliver("bob", b"x\n"))
    assert served(provider) == [b"x\n"]


def test_empty_mbox(mbox: Path, provider: MboxProvider) -> None:
    mbox.write_bytes(b"")
    assert served(provider) == []


def test_not_an_mbox_is_refused(mbox: Path, provider: MboxProvider) -> None:
    mbox.write_bytes(b"Subject: hello\n\nnot an mbox\n")
    with pytest.raises(MaildropError) as caught:
        result(provider.open("bob"))
    assert not isinstance(caught.value, MaildropUnavailable)
    with pytest.raises(MaildropError):
        result(provider.deliver("bob", b"x\n"))
    assert mbox.read_bytes() == b"Subject: hello\n\nnot an mbox\n"
    # The session lock was released.
    mbox.write_bytes(b"")
    assert served(provider) == []


def test_os_errors_are_unavailable(mbox: Path, provider: MboxProvider) -> None:
    mbox.mkdir()
    with pytest.raises(MaildropUnavailable):
        result(provider.open("bob"))
    with pytest.raises(MaildropUnavailable):
        result(provider.deliver("bob", b"x\n"))


@pytest.mark.parametrize("name", ["", "..", "a/b", "bob.lock", "bob.popd-lock", "x\n"])
def test_unsafe_user_names(tmp_path: Path, provider: MboxProvider, name: str) -> None:
    with pytest.raises(NoSuchUser):
        result(provider.open(name))
    with pytest.raises(NoSuchUser):
        result(provider.deliver(name, b"x\n"))


def test_deliver_writes_envelope_uidl_and_quotes(
    mbox: Path, provider: MboxProvider
) -> None:
    message = b"Return-Path: <alice@example.org>\nSubject: hi\n\nFrom me\n>From you\n"
    uid = result(provider.deliver("bob", message))
    data = mbox.read_bytes()
    envelope_line, rest = data.split(b"\n", 1)
    assert re.fullmatch(
        rb"From alice@example\.org \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4}",
        envelope_line,
    )
    assert rest == b"X-UIDL: %s\n" % uid.encode() + quote(message) + b"\n"
    assert b"\n>From me\n>>From you\n" in rest
    assert stat.S_IMODE(mbox.stat().st_mode) == 0o600
    assert served(provider) == [message]


@pytest.mark.parametrize(
    ("header", "sender"),
    [
        (b"Return-Path: <>\n", b"MAILER-DAEMON"),
        (b"", b"MAILER-DAEMON"),
        (b"Return-Path: <a b@c>\n", b"MAILER-DAEMON"),
        (b"return-path:<x@y>\n", b"x@y"),
    ],
)
def test_envelope_sender(
    mbox: Path, provider: MboxProvider, header: bytes, sender: bytes
) -> None:
    result(provider.deliver("bob", header + b"Subject: s\n\nbody\n"))
    assert mbox.read_bytes().startswith(b"From " + sender + b" ")


def test_deliver_crlf_message(mbox: Path, provider: MboxProvider) -> None:
    message = b"Subject: crlf\r\n\r\nFrom here\r\n"
    result(provider.deliver("bob", message))
    result(provider.deliver("bob", message))
    data = mbox.read_bytes()
    assert data.count(b"\r\n\r\nFrom MAILER-DAEMON ") == 1
    assert b"\n>From here\r\n" in data
    assert served(provider) == [message, message]


def test_deliver_after_a_message_without_final_newline(
    mbox: Path, provider: MboxProvider
) -> None:
    mbox.write_bytes(ENVELOPE + b"Subject: 1\n\nno end")
    result(provider.deliver("bob", b"Subject: 2\n\nsecond\n"))
    assert served(provider) == [b"Subject: 1\n\nno end\n", b"Subject: 2\n\nsecond\n"]
    mbox.write_bytes(ENVELOPE + b"Subject: 1\n\none line end\n")
    result(provider.deliver("bob", b"Subject: 2\n\nsecond\n"))
    assert served(provider) == [
        b"Subject: 1\n\none line end\n",
        b"Subject: 2\n\nsecond\n",
    ]


def test_deliver_keeps_a_given_uid(mbox: Path, provider: MboxProvider) -> None:
    assert result(provider.deliver("bob", b"x\n", uid="kept-1")) == "kept-1"
    assert b"\nX-UIDL: kept-1\n" in mbox.read_bytes()
    with pytest.raises(ValueError):
        result(provider.deliver("bob", b"y\n", uid="kept-1"))
    # A UID derived from an MTA's message counts as taken too.
    with mbox.open("ab") as out:
        out.write(mta_mbox(b"Subject: mta\n\nmta\n"))
    derived = uids(provider)[1]
    with pytest.raises(ValueError):
        result(provider.deliver("bob", b"y\n", uid=derived))
    for bad in ["", "sp ace", "x" * 71, "caf\xe9"]:
        with pytest.raises(ValueError):
            result(provider.deliver("bob", b"y\n", uid=bad))
    assert uids(provider) == ["kept-1", derived]


def test_deliver_from_a_file_in_chunks(mbox: Path, provider: MboxProvider) -> None:
    message = b"Subject: big\n\n" + b"From line\n>From line\n" * 100_000
    uid = result(provider.deliver("bob", io.BytesIO(message)))
    drop = result(provider.open("bob"))
    try:
        assert drop.messages[0].uid == uid
        assert drop.messages[0].size == wire_size(message)
        assert read_message(drop, 0, 1000) == message
    finally:
        result(drop.release())


def test_delivery_is_durable_before_it_fires(
    mbox: Path, provider: MboxProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(mbox_module.os, "fsync", fsync)
    result(provider.deliver("bob", b"x\n"))
    # The append's record (a new file: then its directory), the new mbox,
    # then the directory that got a new entry.
    journal = str(mbox.parent / f".{mbox.name}.popd-append")
    assert synced == [journal, str(mbox.parent), str(mbox), str(mbox.parent)]
    synced.clear()
    result(provider.deliver("bob", b"y\n"))
    assert synced == [journal, str(mbox)]


def test_failed_delivery_leaves_the_mbox_as_it_was(
    mbox: Path, provider: MboxProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    result(provider.deliver("bob", b"Subject: 1\n\nfirst\n"))
    before = mbox.read_bytes()
    real = os.pwrite
    calls = []

    def failing(fd, data, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(mbox_module.os, "pwrite", failing)
    with pytest.raises(MaildropUnavailable):
        result(provider.deliver("bob", b"Subject: 2\n\nsecond\n"))
    monkeypatch.undo()
    assert mbox.read_bytes() == before
    assert not Path(dot_lock_path(str(mbox))).exists()


def test_delivery_waits_for_the_mta_lock(mbox: Path, provider: MboxProvider) -> None:
    lock = Path(dot_lock_path(str(mbox)))
    lock.write_bytes(b"")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys, time; time.sleep(0.5); os.unlink(sys.argv[1])",
            str(lock),
        ]
    )
    try:
        started = time.monotonic()
        result(provider.deliver("bob", b"x\n"))
        assert time.monotonic() - started >= 0.3
    finally:
        holder.wait(timeout=30)
    assert served(provider) == [b"x\n"]


def test_fresh_mta_lock_times_out(mbox: Path, tmp_path: Path) -> None:
    provider = make_provider(tmp_path, lock_timeout=0.3)
    mbox.write_bytes(mta_mbox(b"a: 1\n\none\n"))
    Path(dot_lock_path(str(mbox))).write_bytes(b"")
    with pytest.raises(MaildropUnavailable):
        result(provider.deliver("bob", b"x\n"))
    with pytest.raises(MaildropUnavailable):
        result(provider.open("bob"))
    # The failed open released its session lock.
    Path(dot_lock_path(str(mbox))).unlink()
    assert served(provider) == [b"a: 1\n\none\n"]


def test_stale_mta_lock_is_broken(mbox: Path, tmp_path: Path) -> None:
    provider = make_provider(tmp_path, stale_lock_seconds=60, lock_timeout=0.5)
    lock = Path(dot_lock_path(str(mbox)))
    lock.write_bytes(b"")
    old = time.time() - 61
    os.utime(lock, (old, old))
    result(provider.deliver("bob", b"x\n"))
    assert not lock.exists()


def test_session_lock(tmp_path: Path, mbox: Path, provider: MboxProvider) -> None:
    drop = result(provider.open("bob"))
    try:
        with pytest.raises(MaildropInUse):
            result(provider.open("bob"))
        assert (tmp_path / "mail" / ("bob" + LOCK_SUFFIX)).exists()
        # The MTA lock is free during the session.
        with locked_mailbox(str(mbox), create=True, timeout=0.5) as box:
            assert box.fd >= 0
        result(provider.deliver("bob", b"x\n"))
    finally:
        result(drop.release())
    result(provider.open("bob")).release()


# Snapshots, changes by others, commit


def test_snapshot_ignores_later_mail_and_commit_keeps_it(
    mbox: Path, provider: MboxProvider
) -> None:
    mbox.write_bytes(mta_mbox(b"a: 1\n\none\n", b"a: 2\n\ntwo\n"))
    drop = result(provider.open("bob"))
    late = result(provider.deliver("bob", b"a: 3\n\nlate\n"))
    with mbox.open("ab") as out:
        out.write(mta_mbox(b"a: 4\n\nfrom the MTA\n"))
    assert len(drop.messages) == 2
    assert read_message(drop, 1) == b"a: 2\n\ntwo\n"
    result(drop.commit([0, 1]))
    assert served(provider) == [b"a: 3\n\nlate\n", b"a: 4\n\nfrom the MTA\n"]
    assert uids(provider)[0] == late


def test_commit_without_deletions_leaves_the_file(
    mbox: Path, provider: MboxProvider
) -> None:
    mbox.write_bytes(mta_mbox(b"a: 1\n\none\n"))
    inode = mbox.stat().st_ino
    drop = result(provider.open("bob"))
    result(drop.commit([], [0]))
    assert mbox.stat().st_ino == inode


def test_commit_keeps_mode_and_owner(mbox: Path, provider: MboxProvider) -> None:
    mbox.write_bytes(mta_mbox(b"a: 1\n\none\n", b"a: 2\n\ntwo\n"))
    os.chmod(mbox, 0o660)
    if os.geteuid() == 0:
        os.chown(mbox, 4321, 8765)
    drop = result(provider.open("bob"))
    result(drop.commit([0]))
    status = mbox.stat()
    assert stat.S_IMODE(status.st_mode) == 0o660
    if os.geteuid() == 0:
        assert (status.st_uid, status.st_gid) == (4321, 8765)
    assert sorted(p.name for p in mbox.parent.iterdir()) == ["bob", "bob" + LOCK_SUFFIX]
    assert served(provider) == [b"a: 2\n\ntwo\n"]


def test_commit_copies_octet_for_octet(mbox: Path, provider: MboxProvider) -> None:
    parts = [
        ENVELOPE + b"a: 1\n\n>From one\n\n",
        envelope(1) + b"Content-Length: 18\n\nFrom unquoted\nxy\n\n",
        envelope(2) + b"a: 3\r\n\r\nthree\r\n\r\n",
        envelope(3) + b"a: 4\n\nfour",
    ]
    mbox.write_bytes(b"".join(parts))
    drop = result(provider.open("bob"))
    assert len(drop.messages) == 4
    result(drop.commit([2]))
    assert mbox.read_bytes() == parts[0] + parts[1] + parts[3]
    drop = result(provider.open("bob"))
    result(drop.commit([2]))
    assert mbox.read_bytes() == parts[0] + parts[1]
    assert served(provider)[1] == b"Content-Length: 18\n\nFrom unquoted\nxy\n"


def test_leftover_new_file_is_replaced(mbox: Path, provider: MboxProvider) -> None:
    mbox.write_bytes(mta_mbox(b"a: 1\n\none\n", b"a: 2\n\ntwo\n"))
    leftover = mbox.with_name(".bob.popd-new")
    leftover.write_bytes(b"garbage from a crash")
    drop = result(provider.open("bob"))
    result(drop.commit([0]))
    assert not leftover.exists()
    assert served(provider) == [b"a: 2\n\ntwo\n"]


def rewrite_without(mbox: Path, doomed: int, *, in_place: bool) -> None:
    """
    Remove one message as a mail reader would, under the MTA locks.
    """
    with locked_mailbox(str(mbox)) as box:
        size = os.fstat(box.fd).st_size
        messages = scan(box.fd, size)
        kept = b"".join(
            os.pread(box.fd, m.next - m.start, m.start)
            for n, m in enumerate(messages)
            if n != doomed
        )
        if in_place:
            os.pwrite(box.fd, kept, 0)
            os.ftruncate(box.fd, len(kept))
        else:
            mbox.with_name("new").write_bytes(kept)
            os.rename(mbox.with_name("new"), mbox)


@pytest.mark.parametrize("in_place", [True, False])
def test_reads_follow_changes_by_other_programs(
    mbox: Path, provider: MboxProvider, in_place: bool
) -> None:
    messages = [b"a: %d\n\nbody %d\n" % (n, n) for n in range(4)]
    mbox.write_bytes(mta_mbox(*messages))
    drop = result(provider.open("bob"))
    try:
        assert read_message(drop, 3) == messages[3]
        rewrite_without(mbox, 1, in_place=in_place)
        with pytest.raises(MaildropError):
            result(drop.read(1))
        assert [read_message(drop, n) for n in (0, 2, 3)] == [
            messages[0],
            messages[2],
            messages[3],
        ]
        # A message whose size changed is not served with the wrong size.
        data = mbox.read_bytes().replace(b"body 3", b"body three")
        mbox.write_bytes(data)
        with pytest.raises(MaildropError):
            result(drop.read(3))
    finally:
        result(drop.commit([1, 2]))
    assert served(provider) == [messages[0], b"a: 3\n\nbody three\n"]


def test_commit_after_the_mbox_vanished(mbox: Path, provider: MboxProvider) -> None:
    mbox.write_bytes(mta_mbox(b"a: 1\n\none\n"))
    drop = result(provider.open("bob"))
    mbox.unlink()
    with pytest.raises(MaildropError):
        result(drop.read(0))
    result(drop.commit([0], [0]))
    assert not mbox.exists()


def test_read_after_close(mbox: Path, provider: MboxProvider) -> None:
    mbox.write_bytes(mta_mbox(b"a: 1\n\none\n"))
    drop = result(provider.open("bob"))
    reader = result(drop.read(0))
    result(drop.release())
    # A file already handed out still reads.
    assert reader.read() == b"a: 1\n\none\n"
    reader.close()
    with pytest.raises(MaildropError):
        result(drop.read(0))
    with pytest.raises(IndexError):
        drop.read(1)
    result(drop.release())
    result(drop.commit([0]))
    assert served(provider) == [b"a: 1\n\none\n"]


# Retrieval times


def test_retrieved_times_file(mbox: Path, provider: MboxProvider) -> None:
    mbox.write_bytes(mta_mbox(b"a: 1\n\none\n", b"a: 2\n\ntwo\n", b"a: 3\n\nthree\n"))
    first, second, third = uids(provider)
    side = mbox.with_name("bob" + RETRIEVED_SUFFIX)
    drop = result(provider.open("bob"))
    before = time.time()
    result(drop.commit([], [0, 1]))
    lines = side.read_bytes().split(b"\n")
    assert lines[0] == b"popd-retrieved 1"
    times = dict(line.split(b" ") for line in lines[1:-1])
    assert sorted(times) == sorted([first.encode(), second.encode()])
    assert all(before - 1 <= float(t) <= time.time() + 1 for t in times.values())
    # Deleting drops the entry; an empty table removes the file.
    drop = result(provider.open("bob"))
    result(drop.commit([0]))
    assert first.encode() not in side.read_bytes()
    drop = result(provider.open("bob"))
    assert [info.retrieved_at is not None for info in drop.messages] == [True, False]
    result(drop.commit([0]))
    assert not side.exists()
    assert uids(provider) == [third]


def test_malformed_retrieved_file_is_ignored(
    mbox: Path, provider: MboxProvider
) -> None:
    mbox.write_bytes(mta_mbox(b"a: 1\n\none\n"))
    (uid,) = uids(provider)
    side = mbox.with_name("bob" + RETRIEVED_SUFFIX)
    side.write_bytes(b"popd-retrieved 1\n%s not-a-number\n" % uid.encode())
    drop = result(provider.open("bob"))
    assert drop.messages[0].retrieved_at is None
    result(drop.commit([], [0]))
    drop = result(provider.open("bob"))
    assert drop.messages[0].retrieved_at is not None
    result(drop.release())


# Folders


def test_folders(tmp_path: Path, provider: MboxProvider) -> None:
    assert result(provider.folders("bob")) == []
    result(provider.deliver("bob", b"a: 1\n\nsent\n", "Sent"))
    result(provider.deliver("bob", b"a: 2\n\nlist\n", "Lists.python"))
    result(provider.deliver("bob", b"a: 3\n\ninbox\n", "INBOX"))
    drop = result(provider.open("bob", "Sent"))
    result(drop.commit([], [0]))
    folder_dir = tmp_path / "folders" / "bob"
    (folder_dir / "subdir").mkdir()
    (folder_dir / "link").symlink_to(folder_dir / "Sent")
    (folder_dir / "Other.lock").write_bytes(b"")
    assert sorted(p.name for p in folder_dir.iterdir()) == [
        ".Lists.python.popd-append",
        ".Sent.popd-append",
        "Lists.python",
        "Other.lock",
        "Sent",
        "Sent.popd-lock",
        "Sent.popd-retrieved",
        "link",
        "subdir",
    ]
    assert result(provider.folders("bob")) == ["Lists.python", "Sent"]
    assert served(provider, "bob", "Sent") == [b"a: 1\n\nsent\n"]
    assert served(provider, "bob", "inbox") == [b"a: 3\n\ninbox\n"]
    for name in [
        "Nope",
        "Sent.lock",
        "Sent.popd-lock",
        ".hidden",
        "a/b",
        "..",
        "subdir",
    ]:
        with pytest.raises(MaildropError):
            result(provider.open("bob", name))
    with pytest.raises(NoSuchFolder):
        result(provider.deliver("bob", b"x\n", "x.popd-retrieved"))


def test_no_folder_directory(tmp_path: Path) -> None:
    provider = make_provider(tmp_path, folder_dir_template=None)
    assert result(provider.folders("bob")) == []
    with pytest.raises(NoSuchFolder):
        result(provider.open("bob", "Sent"))
    with pytest.raises(NoSuchFolder):
        result(provider.deliver("bob", b"x\n", "Sent"))
    result(provider.deliver("bob", b"x\n", "INBOX"))
    assert served(provider) == [b"x\n"]


# Another process appending like an MTA while sessions come and go

APPENDER = r"""
import fcntl, os, sys, time
path, count, tag = sys.argv[1], int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 60
for n in range(count):
    while True:
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            os.close(os.open(path + ".lock", flags, 0o600))
            break
        except FileExistsError:
            if time.monotonic() > deadline:
                sys.exit("no dot-lock within 60 seconds")
            time.sleep(0.001)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        fcntl.lockf(fd, fcntl.LOCK_EX)
        os.write(fd, b"From mta@example.org Thu Jan  1 00:00:00 2026\n")
        os.write(fd, b"Subject: %s %d\n\n" % (tag.encode(), n))
        time.sleep(0.002)
        os.write(fd, b">From the body of %d\n" % n + b"line\n" * 50)
        os.write(fd, b"end of %d\n\n" % n)
        os.fsync(fd)
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)
    finally:
        os.unlink(path + ".lock")
    time.sleep(0.003)
print("done", flush=True)
"""


def appended(tag: str, n: int) -> bytes:
    return (
        b"Subject: %s %d\n\n" % (tag.encode(), n)
        + b"From the body of %d\n" % n
        + b"line\n" * 50
        + b"end of %d\n" % n
    )


def test_concurrent_mta_never_loses_mail(mbox: Path, provider: MboxProvider) -> None:
    initial = [b"Subject: initial %d\n\nbody %d\n" % (n, n) for n in range(30)]
    mbox.write_bytes(mta_mbox(*initial))
    count = 60
    appender = subprocess.Popen(
        [sys.executable, "-c", APPENDER, str(mbox), str(count), "mta"],
        stdout=subprocess.PIPE,
    )
    deleted: set[bytes] = set()
    delivered = []
    deadline = time.monotonic() + 60
    try:
        sessions = 0
        while (
            appender.poll() is None and time.monotonic() < deadline and sessions < 200
        ):
            sessions += 1
            drop = result(provider.open("bob"))
            contents = [read_message(drop, n) for n in range(len(drop.messages))]
            for content in contents:
                assert content in initial or content.startswith(
                    (b"Subject: mta ", b"Subject: popd ")
                ), content[:80]
            delivered.append(b"Subject: popd %d\n\nFrom popd\n" % sessions)
            result(provider.deliver("bob", delivered[-1]))
            doomed = [
                n for n, content in enumerate(contents) if content in initial[:sessions]
            ][:2]
            deleted.update(contents[n] for n in doomed)
            result(drop.commit(doomed))
        assert appender.wait(timeout=60) == 0
    finally:
        if appender.poll() is None:
            appender.kill()
        appender.communicate()
    assert sessions >= 2
    final = served(provider)
    expected = [c for c in initial if c not in deleted]
    assert [c for c in final if c.startswith(b"Subject: initial")] == expected
    assert sorted(c for c in final if c.startswith(b"Subject: mta")) == sorted(
        appended("mta", n) for n in range(count)
    )
    assert [c for c in final if c.startswith(b"Subject: popd")] == delivered


# Crash safety: a commit killed at any point loses nothing

CRASH_DRIVER = r"""
import hashlib, json, os, random, signal, sys, time

from twisted.python.failure import Failure
from popd.maildrops import mboxfile
from popd.maildrops.mbox import MboxProvider

class Pool:
    def callInThreadWithCallback(self, on_result, function, *args):
        try:
            value = function(*args)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, value)

class Reactor:
    def callFromThread(self, function, *args):
        function(*args)

def fired(d):
    out = []
    d.addBoth(out.append)
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]

template, mode, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
deleted = json.loads(sys.argv[4])
mboxfile.CHUNK_SIZE = 61
provider = MboxProvider(template, reactor=Reactor(), threadpool=Pool(), lock_timeout=10)
path = provider.mbox_path("bob")
with open(path, "rb") as f:
    original = f.read()
COUNTED = ("write", "pwrite", "fsync", "rename", "replace", "unlink", "ftruncate",
           "fchmod", "fchown", "open", "close", "link", "utime")

def commit_and_die_at(step):
    drop = fired(provider.open("bob"))
    count = [0]
    for name in COUNTED:
        real = getattr(os, name)
        def wrapper(*args, _real=real, **kwargs):
            count[0] += 1
            if count[0] == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return _real(*args, **kwargs)
        setattr(os, name, wrapper)
    fired(drop.commit(deleted, [0]))
    os._exit(0)

started = time.monotonic()
whole = None
for n in range(1, limit + 1):
    if time.monotonic() - started > 120:
        break
    began = time.monotonic()
    pid = os.fork()
    if pid == 0:
        try:
            if mode == "steps":
                commit_and_die_at(n)
            else:
                commit_and_die_at(0)
        finally:
            os._exit(1)
    if mode == "random" and whole is not None:
        # Anywhere in a whole commit, as long as the first one took.
        time.sleep(random.Random(n).uniform(0, 1.5 * whole))
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    if whole is None:
        whole = time.monotonic() - began
    finished = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    with open(path, "rb") as f:
        state = f.read()
    # The next session must open (a dead popd's dot-lock is broken at once).
    drop = fired(provider.open("bob"))
    served = []
    for index in range(len(drop.messages)):
        reader = fired(drop.read(index))
        served.append(hashlib.sha256(reader.read()).hexdigest())
        reader.close()
    fired(drop.release())
    print(json.dumps({
        "step": n, "finished": finished,
        "state": hashlib.sha256(state).hexdigest(), "served": served,
    }), flush=True)
    with open(path, "wb") as f:
        f.write(original)
    if mode == "steps" and finished:
        break
"""


def run_crash_driver(tmp_path: Path, mode: str, limit: int, messages, deleted):
    mbox = tmp_path / "mail" / "bob"
    mbox.parent.mkdir(exist_ok=True)
    original = mta_mbox(*messages)
    mbox.write_bytes(original)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            CRASH_DRIVER,
            str(tmp_path / "mail" / "%u"),
            mode,
            str(limit),
            json.dumps(deleted),
        ],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    runs = [json.loads(line) for line in done.stdout.splitlines()]
    kept = [m for n, m in enumerate(messages) if n not in deleted]
    every = {
        "state": hashlib.sha256(original).hexdigest(),
        "served": [hashlib.sha256(unquote(m)).hexdigest() for m in messages],
    }
    after = {
        "state": hashlib.sha256(mta_mbox_kept(messages, deleted)).hexdigest(),
        "served": [hashlib.sha256(unquote(m)).hexdigest() for m in kept],
    }
    for run in runs:
        outcome = {"state": run["state"], "served": run["served"]}
        assert outcome in (every, after), f"step {run['step']}: mail lost or damaged"
        if run["finished"]:
            assert outcome == after
    assert (
        sorted(p.name for p in mbox.parent.iterdir() if p.name.endswith(".lock")) == []
    )
    return runs, every, after


def mta_mbox_kept(messages, deleted) -> bytes:
    return b"".join(
        envelope(n) + message + b"\n"
        for n, message in enumerate(messages)
        if n not in deleted
    )


def test_commit_killed_at_every_step(tmp_path: Path) -> None:
    messages = [
        b"Subject: %d\n\n" % n + b">From line %d\n" % n + b"x" * (40 * n) + b"\n"
        for n in range(8)
    ]
    runs, every, after = run_crash_driver(tmp_path, "steps", 400, messages, [0, 3, 7])
    assert runs[-1]["finished"], "the commit never finished within the step bound"
    states = [{"state": r["state"], "served": r["served"]} for r in runs]
    # The kills landed both before and after the rename.
    assert every in states and after in states
    assert len(runs) > 20


def test_commit_killed_at_random_moments(tmp_path: Path) -> None:
    messages = [b"Subject: %d\n\n" % n + b"y" * 3000 + b"\n" for n in range(40)]
    runs, every, after = run_crash_driver(
        tmp_path, "random", 30, messages, [1, 2, 20, 39]
    )
    assert len(runs) == 30
    states = [{"state": r["state"], "served": r["served"]} for r in runs]
    assert every in states[1:] and after in states[1:]
