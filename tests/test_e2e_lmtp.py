"""
End to end: Python's smtplib delivering into a real C{twistd -n popd} over
LMTP (TCP and a UNIX socket) and SMTP, and poplib downloading the result.
"""

from __future__ import annotations

import shutil
import smtplib
import tempfile
from pathlib import Path

import pytest
from helpers.delivery_e2e import (
    assert_same_message,
    delivery_listeners,
    download_all,
    field,
    split_trace,
)
from helpers.popd_e2e import HOST, MESSAGES, downloaded, to_crlf

pytestmark = pytest.mark.e2e

PASSWORD = "lmtp-test-pass"
MAX_SIZE = 3_000_000
TIMEOUT = 30
SENDER = "sender@example.org"


@pytest.fixture(scope="module")
def socket_dir():
    # Short, whatever the temporary directory: sun_path holds 108 bytes.
    directory = Path(tempfile.mkdtemp(prefix="popd-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def server(popd_factory, socket_dir):
    server = popd_factory(
        "lmtp",
        lmtp_listen=["tcp:0:interface=127.0.0.1", f"unix:{socket_dir}/lmtp"],
        smtp_listen=["tcp:0:interface=127.0.0.1"],
        extra=f"[delivery]\nmax_message_size = {MAX_SIZE}\ndetail_folders = true\n",
    )
    for user in ("alice", "bob", "carol", "dave", "erin", "smtp1", "smtp2"):
        server.add_plain_user(user, PASSWORD)
    return server


@pytest.fixture(scope="module")
def ports(server) -> dict[str, list[str]]:
    listeners = delivery_listeners(server)
    assert len(listeners["LMTP"]) == 2 and len(listeners["SMTP"]) == 1, listeners
    return listeners


def lmtp(ports) -> smtplib.LMTP:
    client = smtplib.LMTP(HOST, int(ports["LMTP"][0]), timeout=TIMEOUT)
    code, _ = client.ehlo("mta.example.test")
    assert code == 250
    return client


def test_lhlo_advertises_the_lmtp_extensions(ports):
    client = lmtp(ports)
    try:
        for name in ("pipelining", "enhancedstatuscodes", "8bitmime", "size"):
            assert client.has_extn(name), client.esmtp_features
        assert client.esmtp_features["size"] == str(MAX_SIZE)
    finally:
        client.quit()


def wire(name: str) -> bytes:
    """
    A test message as an MTA sends it: CRLF lines (smtplib sends bytes as
    they are, and a bare LF is no line end in SMTP).
    """
    return to_crlf(MESSAGES[name])


def test_per_recipient_replies(server, ports):
    message = wire("plain")
    client = lmtp(ports)
    try:
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("alice@example.test")[0] == 250
        code, text = client.rcpt("nobody@example.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        assert client.rcpt("bob@example.test")[0] == 250
        # smtplib reads only the first of LMTP's replies after DATA.
        first = client.data(message)
        second = client.getreply()
        assert first[0] == 250 and first[1].startswith(b"2.0.0 <alice@example.test>")
        assert second[0] == 250 and second[1].startswith(b"2.0.0 <bob@example.test>")
        assert client.noop()[0] == 250
    finally:
        client.quit()
    for user in ("alice", "bob"):
        (stored,) = download_all(server, user, PASSWORD).values()
        fields, rest = split_trace(stored)
        assert rest == downloaded(message)
        assert field(fields, b"Return-Path") == [f"<{SENDER}>".encode()]
        assert field(fields, b"Delivered-To") == [f"{user}@example.test".encode()]
        (received,) = field(fields, b"Received")
        assert b" with LMTP id " in received
        assert f"for <{user}@example.test>".encode() in received
        # Return-Path first, as local delivery agents write it.
        assert fields[0].startswith(b"Return-Path: ")


@pytest.mark.parametrize("name", ["dots", "crlf", "eight_bit", "empty_body", "big"])
def test_messages_arrive_byte_for_byte(server, ports, name):
    user = "carol"
    before = set(download_all(server, user, PASSWORD))
    client = lmtp(ports)
    try:
        refused = client.sendmail(SENDER, [f"{user}@example.test"], wire(name))
        assert refused == {}
    finally:
        client.quit()
    after = download_all(server, user, PASSWORD)
    (new,) = set(after) - before
    assert_same_message(after[new], downloaded(MESSAGES[name]))


def test_unknown_recipient_is_refused_at_rcpt(ports):
    client = lmtp(ports)
    try:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as error:
            client.sendmail(SENDER, ["ghost@example.test"], wire("plain"))
        (code, text) = error.value.recipients["ghost@example.test"]
        assert code == 550 and text.startswith(b"5.1.1")
    finally:
        client.close()


def test_oversize_is_552(server, ports):
    client = lmtp(ports)
    try:
        code, text = client.mail(SENDER, [f"SIZE={MAX_SIZE + 1}"])
        assert (code, text[:5]) == (552, b"5.3.4")
        assert client.rset()[0] == 250
        assert client.mail(SENDER)[0] == 250
        assert client.rcpt("dave@example.test")[0] == 250
        assert client.rcpt("erin@example.test")[0] == 250
        big = b"Subject: too big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 3100
        first = client.data(big)
        second = client.getreply()
        assert first[0] == 552 and first[1].startswith(b"5.3.4")
        assert second[0] == 552 and second[1].startswith(b"5.3.4")
        assert client.noop()[0] == 250
    finally:
        client.quit()
    assert download_all(server, "dave", PASSWORD) == {}
    assert download_all(server, "erin", PASSWORD) == {}


def test_lmtp_over_a_unix_socket(server, ports):
    client = smtplib.LMTP(ports["LMTP"][1], timeout=TIMEOUT)
    try:
        client.ehlo("mta.example.test")
        refused = client.sendmail(SENDER, ["alice+nosuchfolder"], wire("dots"))
        assert refused == {}
    finally:
        client.quit()
    messages = download_all(server, "alice", PASSWORD)
    assert any(
        split_trace(stored)[1] == downloaded(MESSAGES["dots"])
        for stored in messages.values()
    )


def test_smtp_delivers_to_every_recipient(server, ports):
    client = smtplib.SMTP(HOST, int(ports["SMTP"][0]), timeout=TIMEOUT)
    try:
        client.ehlo("relay.example.test")
        assert client.has_extn("size") and client.has_extn("pipelining")
        refused = client.sendmail(
            "", ["smtp1@example.test", "ghost@example.test", "smtp2"], wire("plain")
        )
        assert list(refused) == ["ghost@example.test"]
    finally:
        client.quit()
    for user, address in (("smtp1", "smtp1@example.test"), ("smtp2", "smtp2")):
        (stored,) = download_all(server, user, PASSWORD).values()
        fields, rest = split_trace(stored)
        assert rest == downloaded(MESSAGES["plain"])
        assert field(fields, b"Return-Path") == [b"<>"]
        assert field(fields, b"Delivered-To") == [address.encode()]
        assert b" with ESMTP id " in field(fields, b"Received")[0]
