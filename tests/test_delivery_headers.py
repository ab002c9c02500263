"""
The trace fields every delivery path adds (popd.delivery.headers).
"""

from __future__ import annotations

import datetime

import pytest

from popd.delivery.headers import (
    header_value,
    needs_separator,
    received_header,
    trace_headers,
)

WHEN = datetime.datetime(2024, 1, 2, 10, 0, tzinfo=datetime.UTC)


def test_return_path_comes_first():
    received = received_header(
        protocol="LMTP",
        helo="mx.example.test",
        peer="127.0.0.1",
        by="pop.example.test",
        transaction_id="abc",
        recipient="alice@example.test",
        when=WHEN,
    )
    assert trace_headers(
        sender="bob@example.org",
        recipient="alice@example.test",
        received=received,
        head=b"Subject: x\n",
    ) == (
        b"Return-Path: <bob@example.org>\n"
        b"Delivered-To: alice@example.test\n"
        b"Received: from mx.example.test ([127.0.0.1])\n"
        b"\tby pop.example.test (popd) with LMTP id abc\n"
        b"\tfor <alice@example.test>; Tue, 02 Jan 2024 10:00:00 +0000\n"
    )


def test_received_without_recipient():
    field = received_header(
        protocol="ESMTP", helo=None, peer=None, by="h", transaction_id="1", when=WHEN
    )
    assert field == (
        b"Received: from unknown\n\tby h (popd) with ESMTP id 1;\n"
        b"\tTue, 02 Jan 2024 10:00:00 +0000\n"
    )


def test_null_sender_and_no_sender():
    assert trace_headers(sender="", recipient=None) == b"Return-Path: <>\n"
    assert trace_headers(sender=None, recipient="alice") == b"Delivered-To: alice\n"
    assert trace_headers(sender=None, recipient=None, head=b"body") == b""


def test_control_characters_cannot_start_a_field():
    fields = trace_headers(sender="evil\r\nBcc: x@y", recipient="a\nb", head=b"X: y")
    assert fields == b"Return-Path: <evilBcc: x@y>\nDelivered-To: ab\n"
    assert header_value("bj\u00f6rn\x00") == "bj\u00f6rn".encode()


@pytest.mark.parametrize(
    ("head", "separate"),
    [
        (b"Subject: x\n", False),
        (b"X-Weird-Name!: y", False),
        (b"Subject : obsolete space\n", False),
        (b"", False),
        (b"\nbody after an empty header", False),
        (b"\r\nbody", False),
        (b"just a body line\n", True),
        (b"From bob Tue Jan 2\n", True),
        (b" continuation first\n", True),
        (b"\xc3\xa9: not ASCII\n", True),
    ],
)
def test_needs_separator(head, separate):
    assert needs_separator(head) is separate
    fields = trace_headers(sender="", recipient=None, head=head)
    assert fields.endswith(b"\n\n") is separate
