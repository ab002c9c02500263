"""
How long does opening a big Maildir take, the first time and after?

Fills a temporary Maildir with N small messages (some named with Dovecot's
C{,W=} size, the rest without, so their sizes must be read once and are then
cached), then times opening it with L{MaildirProvider}, synchronously: first, then
again from a new provider (another worker process, with nothing in memory)
and from the same one (its snapshot in memory).

Run from the repository root::

    python -m bench.maildir_open -n 100000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

from twisted.python.failure import Failure

from popd.maildrops.maildir import MaildirMaildrop, MaildirProvider
from popd.maildrops.snapshot_cache import SETTLE_SECONDS
from popd.testing.immediate import ImmediateReactor, ImmediateThreadPool

MESSAGE = b"From: a@example.com\nTo: b@example.com\nSubject: bench\n\n" + (
    b"Some body text that goes on for a while.\n" * 50
)


def fill(maildir: str, count: int, without_w: float) -> None:
    """
    Write C{count} messages straight into C{cur/}; every message whose index
    falls in the first C{without_w} fraction of each hundred has no C{,W=}
    (the first open reads those and caches their sizes).
    """
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), 0o700)
    crlf_size = len(MESSAGE.replace(b"\n", b"\r\n"))
    start = int(time.time()) - count
    for i in range(count):
        name = f"{start + i}.M{i % 1_000_000:06d}P1Q{i}.bench,S={len(MESSAGE)}"
        if i % 100 >= without_w * 100:
            name += f",W={crlf_size}"
        with open(os.path.join(maildir, "cur", name + ":2,S"), "wb") as message:
            message.write(MESSAGE)


def timed_open(provider: MaildirProvider) -> tuple[float, int]:
    """
    Open and release bob's maildrop; return the seconds it took to open and
    the number of messages.
    """
    outcome: list[Any] = []
    started = time.perf_counter()
    provider.open("bob").addBoth(outcome.append)
    elapsed = time.perf_counter() - started
    if isinstance(outcome[0], Failure):
        outcome[0].raiseException()
    drop: MaildirMaildrop = outcome[0]
    drop.release()
    return elapsed, len(drop.messages)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=100_000)
    parser.add_argument(
        "--without-w",
        type=float,
        default=0.5,
        help="fraction of messages named without ,W= (default 0.5)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="popd-bench-") as root:
        started = time.perf_counter()
        fill(os.path.join(root, "bob", "Maildir"), args.messages, args.without_w)
        print(
            f"filled {args.messages} messages in {time.perf_counter() - started:.2f} s"
        )
        template = os.path.join(root, "%u", "Maildir")

        def new_provider() -> MaildirProvider:
            return MaildirProvider(
                template, reactor=ImmediateReactor(), threadpool=ImmediateThreadPool()
            )

        # As a Maildir delivered to a while ago: its snapshot may be reused.
        time.sleep(SETTLE_SECONDS + 0.5)
        provider = new_provider()
        elapsed, count = timed_open(provider)
        print(f"first open: {elapsed:.3f} s for {count} messages")
        for label, opener in (
            ("second open, another process (popd-index)", new_provider()),
            ("second open, same process", provider),
            ("third open, same process", provider),
        ):
            elapsed, count = timed_open(opener)
            print(f"{label}: {elapsed:.3f} s for {count} messages")


if __name__ == "__main__":
    main()
