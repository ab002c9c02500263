"""
End to end with Twisted's POP3Client (C{twisted.mail.pop3client}) against
a real C{twistd -n popd}: STLS verified against the test CA, USER/PASS,
LIST, UIDL and RETR of every message, byte for byte.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.popd_e2e import HOST, MESSAGES, downloaded, popd_env

pytestmark = pytest.mark.e2e

CLIENT = Path(__file__).resolve().parent / "helpers" / "twisted_client.py"
PASSWORD = "tw1sted pass"


@pytest.fixture(scope="module")
def server(popd_factory):
    return popd_factory("twisted-client")


def run_client(server, pki, user: str, password: str, out: Path):
    return subprocess.run(
        [
            sys.executable,
            str(CLIENT),
            HOST,
            str(server.pop3_port),
            user,
            password,
            str(pki.ca_file),
            str(out),
        ],
        env=popd_env(),
        capture_output=True,
        timeout=120,
        check=False,
    )


def test_stls_login_retrieve_all(server, pki, tmp_path):
    server.add_user("tess", PASSWORD)
    messages = list(MESSAGES.values())
    uids = server.deliver_all([("tess", message) for message in messages])
    expected = dict(zip(uids, messages, strict=True))

    result = run_client(server, pki, "tess", PASSWORD, tmp_path)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()

    numbers = {}
    for line in (tmp_path / "uidl.txt").read_text().splitlines():
        number, uid = line.split()
        numbers[int(number)] = uid
    assert sorted(numbers.values()) == sorted(expected)
    for number, uid in numbers.items():
        got = (tmp_path / f"{number}.eml").read_bytes()
        assert got == downloaded(expected[uid]), f"message {number}"

    # The client QUIT without DELE: everything is still there.
    again = run_client(server, pki, "tess", PASSWORD, tmp_path / "again")
    assert again.returncode == 0, again.stderr.decode()
    assert (tmp_path / "again" / "uidl.txt").read_text() == (
        tmp_path / "uidl.txt"
    ).read_text()


def test_wrong_password_fails(server, pki, tmp_path):
    server.add_plain_user("tom", "right")
    result = run_client(server, pki, "tom", "wrong", tmp_path)
    assert result.returncode != 0
    assert b"[AUTH]" in result.stdout + result.stderr
