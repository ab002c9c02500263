"""
End to end, with two worker processes: a Maildir's snapshot kept between
sessions (in each worker's memory and in C{popd-index}) never hides a
delivery, a deletion or another program's change, whichever worker serves
the next login.  The test waits for the Maildir to settle
(L{SETTLE_SECONDS}) where popd would reuse a snapshot.
"""

from __future__ import annotations

import re
import time

import pytest
from helpers.ops_e2e import wait_for
from helpers.popd_e2e import MESSAGES, RawPOP3

from popd.maildrops.maildir import INDEX_FILE
from popd.maildrops.snapshot_cache import SETTLE_SECONDS

#: Enough logins that both workers serve some.
LOGINS = 6


def settle() -> None:
    time.sleep(SETTLE_SECONDS + 0.5)


def listing(port: int, delete: int | None = None) -> tuple[list[str], list[bytes]]:
    """
    Log in as sam: the UIDs, and each message as RETR sends it; then DELE
    message C{delete} if given, and QUIT.
    """
    with RawPOP3(port) as client:
        assert client.command("USER sam").startswith(b"+OK")
        assert client.command("PASS snap-pass").startswith(b"+OK")
        assert client.command("UIDL").startswith(b"+OK")
        lines = client.body().splitlines()[:-1]
        uids = [line.split()[1].decode() for line in lines]
        bodies = []
        for number in range(1, len(uids) + 1):
            assert client.command(f"RETR {number}").startswith(b"+OK")
            bodies.append(client.body())
        if delete is not None:
            assert client.command(f"DELE {delete}").startswith(b"+OK")
        assert client.command("QUIT").startswith(b"+OK")
    return uids, bodies


def every_login_sees(port: int, uids: list[str]) -> None:
    for _ in range(LOGINS):
        seen, bodies = listing(port)
        assert seen == uids
        assert all(b"Subject: " in body for body in bodies)


@pytest.mark.parametrize(
    "maildrop",
    ["", "[maildrop]\ncache_messages = 0\nindex = false\n"],
    ids=["snapshots kept", "snapshots off"],
)
def test_snapshots_follow_every_change(popd_factory, maildrop: str):
    server = popd_factory(
        "snapshots", plaintext="always", server_extra="workers = 2", extra=maildrop
    )
    wait_for(lambda: server.output().count("POP3 accepting on") >= 2, timeout=30)
    server.add_plain_user("sam", "snap-pass")
    maildir = server.directory / "data" / "mail" / "sam" / "Maildir"
    first = server.deliver("sam", MESSAGES["plain"])
    settle()
    every_login_sees(server.pop3_port, [first])
    if maildrop:
        assert not (maildir / INDEX_FILE).exists()
    else:
        wait_for(lambda: (maildir / INDEX_FILE).exists())

    # A delivery by another process, seen at once and once settled.
    second = server.deliver("sam", MESSAGES["dots"])
    every_login_sees(server.pop3_port, [first, second])
    settle()
    every_login_sees(server.pop3_port, [first, second])

    # A session's own deletion.
    assert listing(server.pop3_port, delete=1)[0] == [first, second]
    every_login_sees(server.pop3_port, [second])

    # Another program marks the message seen (new/ to cur/), then removes it.
    settle()
    every_login_sees(server.pop3_port, [second])
    (name,) = [path.name for path in (maildir / "new").iterdir()]
    (maildir / "new" / name).rename(maildir / "cur" / (name + ":2,S"))
    every_login_sees(server.pop3_port, [second])
    settle()
    every_login_sees(server.pop3_port, [second])
    (maildir / "cur" / (name + ":2,S")).unlink()
    every_login_sees(server.pop3_port, [])
    served_by = set(re.findall(r"session end user=sam .* pid=(\d+)", server.output()))
    assert len(served_by) == 2, "both workers served sam"
    if maildrop:
        assert not (maildir / INDEX_FILE).exists()
