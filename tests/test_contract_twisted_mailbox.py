"""
The store contract (L{popd.testing.contract}) run against the
L{popd.maildrops.twisted_mailbox} adapter serving Twisted's own
C{twisted.mail.maildir.MaildirMailbox}, a real C{pop3.IMailbox}.
"""

import hashlib
import io
import os
from hashlib import md5
from pathlib import Path

import pytest
from twisted.internet.defer import succeed
from twisted.mail.maildir import MaildirMailbox, StringListMailbox
from twisted.mail.pop3 import IMailbox
from zope.interface import implementer

from popd.interfaces import MaildropError, MaildropInUse, NoSuchFolder, NoSuchUser
from popd.maildrops.paths import UnsafeNameError, expand_path
from popd.maildrops.twisted_mailbox import MailboxProvider
from popd.testing import stop_reactor_threadpool, wait_for
from popd.testing.contract import MaildropContract


class TrashingMaildirMailbox(MaildirMailbox):
    """
    Twisted's C{MaildirMailbox}, with C{deleteMessage} mended: Twisted 26's
    joins its C{bytes} path with C{str} C{".Trash"} and raises C{TypeError}
    (the contract kit found it).
    """

    def deleteMessage(self, i):
        source = self.list[i]
        trash = os.path.join(self.path, b".Trash", b"cur", os.path.basename(source))
        os.rename(source, trash)
        self.deleted[source] = trash
        self.list[i] = 0


class TestTwistedMailboxContract(MaildropContract):
    # MaildirMailbox hands out real files, read through their binary buffer.
    streams = True
    # What an IMailbox cannot do:
    supports_deliver_uid = False  # appendMessage takes no UID
    supports_folders = False  # one mailbox per avatar
    supports_retrieved_at = False  # IMailbox has nowhere to keep them

    def make_provider(self, directory: Path) -> MailboxProvider:
        self.directory = directory
        template = str(directory / "%u" / "Maildir")

        def mailbox_for(user: str) -> MaildirMailbox:
            try:
                path = expand_path(template, user)
            except UnsafeNameError as e:
                raise LookupError(str(e)) from None
            # initializeMaildir makes the Maildir, not its parents.
            os.makedirs(os.path.dirname(path), exist_ok=True)
            return TrashingMaildirMailbox(os.fsencode(path))

        return MailboxProvider(mailbox_for)

    def vanish(self, provider, avatar_id, uid, folder=None):
        # MaildirMailbox's UIDL is the MD5 of the file name.
        root = self.directory / avatar_id / "Maildir"
        for sub in ("new", "cur"):
            for path in (root / sub).iterdir():
                if hashlib.md5(os.fsencode(path.name)).hexdigest() == uid:
                    path.unlink()
                    return
        raise AssertionError(f"no file for {uid!r}")


# What the adapter itself does, beyond the contract


@pytest.fixture(autouse=True)
def _stop_threads():
    yield
    stop_reactor_threadpool()


def test_text_files_and_duplicate_uids() -> None:
    """
    Twisted's in-memory C{StringListMailbox} hashes content for UIDs, so
    identical messages share one; the adapter keeps UIDs unique and stable.
    """
    messages = [b"same\n", b"same\n", b"other\r\n\xe9\n"]
    provider = MailboxProvider(lambda user: StringListMailbox(list(messages)))
    drop = wait_for(provider.open("alice"))
    uids = [info.uid for info in drop.messages]
    assert len(set(uids)) == 3 and uids[0] == md5(b"same\n").hexdigest()
    assert [info.size for info in drop.messages] == [6, 6, 10]
    with wait_for(drop.read(2)) as message:
        assert message.read() == messages[2]
    wait_for(drop.release())
    again = wait_for(provider.open("alice"))
    assert [info.uid for info in again.messages] == uids
    wait_for(again.release())


@implementer(IMailbox)
class TextMailbox:
    """
    An IMailbox handing out text files, as old code written for Python 2
    does, with invalid UIDs, recording what popd asks of it.
    """

    def __init__(self, texts):
        self.texts = texts
        self.calls = []

    def listMessages(self, i=None):
        return [len(text) for text in self.texts] if i is None else len(self.texts[i])

    def getMessage(self, i):
        return io.StringIO(self.texts[i])

    def getUidl(self, i):
        return f"uid with space {i}"

    def deleteMessage(self, i):
        self.calls.append(("delete", i))
        if i == 1:
            raise FileNotFoundError("gone")

    def undeleteMessages(self):
        self.calls.append(("undelete",))

    def sync(self):
        self.calls.append(("sync",))


def test_text_mailbox() -> None:
    mailbox = TextMailbox(["caf\xe9\n", "b\n", "c"])
    provider = MailboxProvider(lambda user: succeed(mailbox))
    drop = wait_for(provider.open("alice"))
    assert [info.size for info in drop.messages] == [7, 3, 1]
    assert drop.messages[0].uid == hashlib.sha1(b"uid with space 0").hexdigest()
    with wait_for(drop.read(0)) as message:
        assert message.read(2) == b"ca" and message.read() == b"f\xc3\xa9\n"
    # A message already gone does not fail the commit; sync follows.
    wait_for(drop.commit([1, 0], [2]))
    assert mailbox.calls == [("delete", 0), ("delete", 1), ("sync",)]
    with pytest.raises(MaildropError, match="cannot take deliveries"):
        wait_for(provider.deliver("alice", b"x\n"))
    # commit released the lock; release undeletes.
    drop = wait_for(provider.open("alice"))
    with pytest.raises(MaildropInUse):
        wait_for(provider.open("alice"))
    wait_for(drop.release())
    assert mailbox.calls[-1] == ("undelete",)


def test_sizes_trusted_when_told() -> None:
    mailbox = TextMailbox(["a\n", "b\n"])
    mailbox.getMessage = None  # never called
    provider = MailboxProvider(lambda user: mailbox, sizes_are_crlf=True)
    drop = wait_for(provider.open("alice"))
    assert [info.size for info in drop.messages] == [2, 2]
    wait_for(drop.release())


def test_mailbox_lookup_failure_is_no_such_user() -> None:
    def mailbox_for(user):
        raise KeyError(user)

    provider = MailboxProvider(mailbox_for)
    for _ in range(2):  # the failed open did not keep the lock
        with pytest.raises(NoSuchUser):
            wait_for(provider.open("alice"))
    with pytest.raises(NoSuchUser):
        wait_for(provider.deliver("alice", b"x\n"))


def test_no_folders_and_no_given_uids() -> None:
    provider = MailboxProvider(lambda user: StringListMailbox([]))
    assert wait_for(provider.folders("alice")) == []
    with pytest.raises(NoSuchFolder):
        wait_for(provider.open("alice", "Sent"))
    with pytest.raises(NoSuchFolder):
        wait_for(provider.deliver("alice", b"x\n", "Sent"))
    with pytest.raises(MaildropError):
        wait_for(provider.deliver("alice", b"x\n", None, "kept"))
    drop = wait_for(provider.open("alice", "INBOX"))
    assert drop.messages == ()
    wait_for(drop.release())


class AppendingStringListMailbox(StringListMailbox):
    """
    Twisted's in-memory mailbox, taking deliveries the IMAP way.
    """

    def addMessage(self, message, flags=(), date=None):
        self.msgs.append(message.read())
        return succeed(None)


def test_delivered_uid_is_the_listed_one() -> None:
    """
    A delivery identical to a message already there gets the UID the next
    snapshot lists for it, not the content hash they share.
    """
    mailbox = AppendingStringListMailbox([b"same\n"])
    provider = MailboxProvider(lambda user: mailbox)
    uid = wait_for(provider.deliver("alice", b"same\n"))
    drop = wait_for(provider.open("alice"))
    assert [info.uid for info in drop.messages][1] == uid
    assert uid != md5(b"same\n").hexdigest()
    wait_for(drop.release())
