"""
End to end with curl against a real C{twistd -n popd}: LIST, RETR byte for
byte over plain POP3 (SASL PLAIN from loopback), STLS (C{--ssl-reqd}) and
POP3S, and DELE.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from helpers.popd_e2e import MESSAGES, downloaded, to_crlf

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed"),
]

PASSWORD = "curl-s3cret"
# curl (7.88) writes a CRLF for a zero-octet message, whose whole reply is
# ".\r\n": a curl quirk, so the empty message is left to the other clients.
CURL_MESSAGES = [name for name in MESSAGES if name != "empty"]


def curl(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [shutil.which("curl") or "curl", "--silent", "--show-error", *arguments],
        capture_output=True,
        timeout=60,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"curl {arguments} exited with {result.returncode}: "
            f"{result.stderr.decode(errors='replace')}"
        )
    return result


@pytest.fixture(scope="module")
def server(popd_factory):
    server = popd_factory("curl")
    server.add_hashed_users({"carl": PASSWORD, "dora": PASSWORD})
    return server


@pytest.fixture(scope="module")
def carl(server) -> dict[str, bytes]:
    """
    carl's mail, UID -> message.
    """
    messages = [MESSAGES[name] for name in CURL_MESSAGES]
    uids = server.deliver_all([("carl", message) for message in messages])
    return dict(zip(uids, messages, strict=True))


def url(server, path: str = "", *, tls: bool = False) -> str:
    if tls:
        return f"pop3s://localhost:{server.pop3s_port}/{path}"
    return f"pop3://127.0.0.1:{server.pop3_port}/{path}"


def tls_options(server, pki, port: int) -> list[str]:
    return ["--cacert", str(pki.ca_file), "--resolve", f"localhost:{port}:127.0.0.1"]


def numbered(server, user: str, expected: dict[str, bytes]) -> dict[int, bytes]:
    """
    Message number -> stored message, from curl's UIDL.
    """
    listing = curl(url(server), "-u", f"{user}:{PASSWORD}", "-X", "UIDL").stdout
    numbers = {}
    for line in listing.decode().splitlines():
        number, uid = line.split()
        numbers[int(number)] = expected[uid]
    return numbers


def retrieve_all(
    tmp_path: Path, numbers: list[int], base_url: str, *options: str
) -> dict[int, bytes]:
    """
    Fetch messages with one curl run (one connection), each to its file.
    """
    arguments = []
    for number in numbers:
        arguments += [f"{base_url}{number}", "-o", str(tmp_path / f"{number}.eml")]
    curl(*options, *arguments)
    return {number: (tmp_path / f"{number}.eml").read_bytes() for number in numbers}


def test_list(server, carl):
    listing = curl(url(server), "-u", f"carl:{PASSWORD}").stdout
    assert listing.endswith(b"\r\n")
    sizes = dict(line.split() for line in listing.decode().splitlines())
    numbers = numbered(server, "carl", carl)
    assert (
        sorted(int(n) for n in sizes)
        == sorted(numbers)
        == list(range(1, len(carl) + 1))
    )
    for number, message in numbers.items():
        assert int(sizes[str(number)]) in (
            len(to_crlf(message)),
            len(downloaded(message)),
        )


def test_retr_plain(server, carl, tmp_path):
    numbers = numbered(server, "carl", carl)
    got = retrieve_all(tmp_path, sorted(numbers), url(server), "-u", f"carl:{PASSWORD}")
    for number, message in numbers.items():
        assert got[number] == downloaded(message), f"message {number}"


def test_retr_stls_ssl_reqd(server, pki, carl, tmp_path):
    numbers = numbered(server, "carl", carl)
    got = retrieve_all(
        tmp_path,
        sorted(numbers),
        f"pop3://localhost:{server.pop3_port}/",
        "-u",
        f"carl:{PASSWORD}",
        "--ssl-reqd",
        *tls_options(server, pki, server.pop3_port),
    )
    for number, message in numbers.items():
        assert got[number] == downloaded(message), f"message {number}"


def test_retr_pop3s(server, pki, carl, tmp_path):
    numbers = numbered(server, "carl", carl)
    got = retrieve_all(
        tmp_path,
        sorted(numbers),
        url(server, tls=True),
        "-u",
        f"carl:{PASSWORD}",
        *tls_options(server, pki, server.pop3s_port),
    )
    for number, message in numbers.items():
        assert got[number] == downloaded(message), f"message {number}"


def test_pop3s_certificate_is_verified(server, carl):
    # Without the test CA curl must refuse the server: the TLS tests above
    # really verify the certificate.
    result = curl(
        url(server, "1", tls=True),
        "-u",
        f"carl:{PASSWORD}",
        "--resolve",
        f"localhost:{server.pop3s_port}:127.0.0.1",
        check=False,
    )
    assert result.returncode == 60, result  # CURLE_PEER_FAILED_VERIFICATION


def test_wrong_password_fails(server, carl):
    result = curl(url(server), "-u", "carl:wrong", check=False)
    assert result.returncode == 67, result  # CURLE_LOGIN_DENIED


def test_dele(server):
    messages = [MESSAGES["plain"], MESSAGES["dots"]]
    uids = server.deliver_all([("dora", message) for message in messages])
    expected = dict(zip(uids, messages, strict=True))
    numbers = numbered(server, "dora", expected)
    doomed = next(uid for uid, message in expected.items() if message == numbers[1])

    curl(url(server, "1"), "-u", f"dora:{PASSWORD}", "-X", "DELE", "-I")

    listing = curl(url(server), "-u", f"dora:{PASSWORD}", "-X", "UIDL").stdout.decode()
    uids_left = [line.split()[1] for line in listing.splitlines()]
    assert sorted(uids_left) == sorted(uid for uid in uids if uid != doomed)
