"""
From a recipient address to a user and folder (popd.delivery.recipients).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.internet.defer import maybeDeferred

from popd.delivery.recipients import (
    PasswdFileUsers,
    Recipient,
    RecipientResolver,
    candidates,
)
from popd.interfaces import MaildropUnavailable, NoSuchUser
from popd.testing import MemoryMaildropProvider, wait_for


@pytest.mark.parametrize(
    ("address", "mode", "delimiter", "expected"),
    [
        (
            "alice@example.test",
            "auto",
            "+",
            [("alice@example.test", None), ("alice", None)],
        ),
        (
            "alice+lists@example.test",
            "auto",
            "+",
            [
                ("alice+lists@example.test", None),
                ("alice@example.test", "lists"),
                ("alice+lists", None),
                ("alice", "lists"),
            ],
        ),
        ("alice+x@example.test", "full", "", [("alice+x@example.test", None)]),
        ("alice-x@example.test", "local", "-", [("alice-x", None), ("alice", "x")]),
        ("alice", "full", "+", [("alice", None)]),
        ("alice", "auto", "+", [("alice", None)]),
        ("+x@example.test", "local", "+", [("+x", None)]),
        ("alice+@example.test", "local", "+", [("alice+", None), ("alice", None)]),
    ],
)
def test_candidates(address, mode, delimiter, expected):
    assert candidates(address, mode, delimiter) == expected


def resolver(provider=None, **options) -> RecipientResolver:
    users = {"alice": "alice", "bob@example.test": "bob@example.test"}
    return RecipientResolver(
        lambda name: users.get(name.lower()),
        provider or MemoryMaildropProvider(),
        run_blocking=maybeDeferred,
        **options,
    )


def test_resolve():
    assert wait_for(resolver().resolve("Alice@Example.Test")) == Recipient(
        "Alice@Example.Test", "alice", None
    )
    assert wait_for(resolver().resolve("bob@example.test")).avatar_id == (
        "bob@example.test"
    )
    with pytest.raises(NoSuchUser):
        wait_for(resolver().resolve("bob@other.test"))
    with pytest.raises(NoSuchUser):
        wait_for(resolver(mode="full").resolve("alice@example.test"))


def test_detail_folder_matches_an_existing_one():
    provider = MemoryMaildropProvider()
    wait_for(provider.deliver("alice", b"x\n", "Lists"))
    with_folders = resolver(provider, detail_folders=True)
    assert wait_for(with_folders.resolve("alice+lists@x")).folder == "Lists"
    assert wait_for(with_folders.resolve("alice+Lists@x")).folder == "Lists"
    assert wait_for(with_folders.resolve("alice+inbox@x")).folder is None
    assert wait_for(with_folders.resolve("alice+other@x")).folder is None
    assert wait_for(resolver(provider).resolve("alice+Lists@x")).folder is None


def test_passwd_file_users(tmp_path):
    path = tmp_path / "passwd"
    users = PasswdFileUsers(path)
    assert users("alice") is None  # a missing file has no users
    path.write_text("Alice:{PLAIN}pw\n")
    assert users("ALICE") == "alice"
    assert users("bob") is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_passwd_file_is_temporary(tmp_path):
    path = tmp_path / "passwd"
    path.write_text("alice:{PLAIN}pw\n")
    path.chmod(0)
    with pytest.raises(MaildropUnavailable):
        PasswdFileUsers(path)("alice")


def test_unreadable_passwd_file_is_temporary_even_for_root(tmp_path):
    path = tmp_path / "passwd"
    path.mkdir()  # reading a directory fails for everyone
    with pytest.raises(MaildropUnavailable):
        PasswdFileUsers(path)("alice")


def test_several_passwd_files_in_order(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    first.write_text("alice:{PLAIN}pw\n")
    second.write_text("bob:{PLAIN}pw\nalice:{PLAIN}other\n")
    users = PasswdFileUsers(tmp_path / "missing", first, second)
    assert (users("alice"), users("bob"), users("carol")) == ("alice", "bob", None)


def test_user_files_follow_the_checkers(tmp_path):
    from popd.config import load_settings
    from popd.delivery.agent import user_files

    config = tmp_path / "popd.toml"
    config.write_text(
        '[auth]\ncheckers = ["passwd-file:users", "pam:popd", "passwd-file:/x/b"]\n'
    )
    assert user_files(load_settings(config)) == [tmp_path / "users", Path("/x/b")]
    config.write_text('[auth]\npasswd_file = "p"\n')
    assert user_files(load_settings(config)) == [tmp_path / "p"]
