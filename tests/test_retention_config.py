"""
Per-user retention from the passwd-file's expire= extra field.
"""

from __future__ import annotations

import pytest

from popd.config import load_settings
from popd.service import build_policy, passwd_file_expire
from popd.testing import stop_reactor_threadpool, wait_for


@pytest.fixture(autouse=True, scope="module")
def _threads():
    yield
    stop_reactor_threadpool()


def test_user_expire_field(tmp_path):
    (tmp_path / "passwd").write_text(
        "alice:{PLAIN}pw::::::expire=7\n"
        "bob:{PLAIN}pw::::::expire=NEVER\n"
        "carol:{PLAIN}pw\n"
        "dave:{PLAIN}pw::::::expire=soon\n"
    )
    config = tmp_path / "popd.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n[pop3]\nexpire = "30"\n')
    settings = load_settings(config)
    lookup = passwd_file_expire(settings)
    found = {
        user: wait_for(lookup(user)) for user in ("alice", "bob", "carol", "dave", "x")
    }
    assert found == {
        "alice": "7",
        "bob": "NEVER",
        "carol": None,
        "dave": None,
        "x": None,
    }
    assert build_policy(settings).per_user_expire


def test_no_passwd_file_no_lookup(tmp_path):
    config = tmp_path / "popd.toml"
    config.write_text('[auth]\ncheckers = ["memory:alice:pw"]\n')
    settings = load_settings(config)
    assert passwd_file_expire(settings) is None
    assert not build_policy(settings).per_user_expire


def test_user_expire_answered_at_once_once_read(tmp_path):
    (tmp_path / "passwd").write_text("alice:{PLAIN}pw::::::expire=7\n")
    config = tmp_path / "popd.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path}"\n')
    lookup = passwd_file_expire(load_settings(config))
    first = lookup("alice")
    assert not first.called, "the file is first read in a thread"
    assert wait_for(first) == "7"
    again, stranger = lookup("alice"), lookup("nobody")
    assert again.called and stranger.called, "fresh answers come at once"
    assert wait_for(again) == "7" and wait_for(stranger) is None
