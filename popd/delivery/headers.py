"""
The trace header fields a final delivery agent puts on top of a message,
shared by LMTP, SMTP and the C{deliver} pipe so that a message looks the
same whichever way it came:

    Return-Path: <sender@example.org>
    Delivered-To: alice@example.test
    Received: from mx.example.test (localhost [127.0.0.1])
            by pop.example.test (popd) with LMTP id 3f2a...
            for <alice@example.test>; Tue, 2 Jan 2024 10:00:00 +0100

C{Return-Path} comes first (RFC 5321 section 4.4), as Postfix's local(8)
and Dovecot's LDA write it.  Lines end in a bare LF, the way messages are
stored.  Values come from the network or the command line, so every control
character (a CR or LF would start a header field of the sender's choosing)
is dropped from them.
"""

from __future__ import annotations

import re
from email.utils import format_datetime, localtime

__all__ = [
    "header_value",
    "needs_separator",
    "received_header",
    "trace_headers",
]

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
# An RFC 5322 field name: printable US-ASCII except the colon, then a colon
# (obsolete syntax allows white space before it).
_FIELD_START = re.compile(rb"[!-9;-~]+[ \t]*:")


def header_value(value: str | bytes) -> bytes:
    """
    C{value} as header field bytes: UTF-8, control characters removed.
    """
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    return _CONTROL.sub(b"", value)


def needs_separator(head: bytes) -> bool:
    """
    Whether the message starting with C{head} has no header section, so
    that an empty line must come between added fields and its first line,
    or that line would read as one more header field (as Twisted's SMTP
    server does, too).

    An empty message needs none: the added fields are its whole header.
    """
    if not head or head.startswith((b"\n", b"\r\n")):
        return False
    return _FIELD_START.match(head) is None


def received_header(
    *,
    protocol: str,
    helo: str | bytes | None,
    peer: str | bytes | None,
    by: str | bytes,
    transaction_id: str,
    recipient: str | bytes | None = None,
    when=None,
) -> bytes:
    """
    A C{Received:} field (RFC 5321 section 4.4), folded over three lines.

    @param protocol: the C{with} keyword: C{LMTP}, C{SMTP} or C{ESMTP}
        (RFC 3848).
    @param helo: what the client said in LHLO/EHLO/HELO.
    @param peer: the client's address (an IP address or a UNIX socket).
    @param by: this host's name.
    @param recipient: the one recipient of this copy, or C{None}.
    @param when: an aware C{datetime}; the current local time by default.
    """
    origin = header_value(helo or b"unknown")
    if peer:
        origin += b" ([" + header_value(peer) + b"])"
    stamp = format_datetime(when or localtime()).encode("ascii")
    lines = [
        b"Received: from " + origin,
        b"\tby "
        + header_value(by)
        + b" (popd) with "
        + header_value(protocol)
        + b" id "
        + header_value(transaction_id),
    ]
    if recipient is not None:
        lines.append(b"\tfor <" + header_value(recipient) + b">; " + stamp)
    else:
        lines[-1] += b";"
        lines.append(b"\t" + stamp)
    return b"\n".join(lines) + b"\n"


def trace_headers(
    *,
    sender: str | bytes | None,
    recipient: str | bytes | None,
    received: bytes = b"",
    head: bytes = b"",
) -> bytes:
    """
    The fields to put on top of one recipient's copy of a message.

    @param sender: the envelope sender (C{""} for the null sender C{<>}), or
        C{None} when it is not known (no C{Return-Path} then).
    @param recipient: the envelope recipient for C{Delivered-To}, or
        C{None}.
    @param received: a field from L{received_header}, or nothing.
    @param head: the first bytes of the message, to tell whether an empty
        line must separate the added fields from it (L{needs_separator}).
    """
    fields = b""
    if sender is not None:
        fields += b"Return-Path: <" + header_value(sender) + b">\n"
    if recipient is not None:
        fields += b"Delivered-To: " + header_value(recipient) + b"\n"
    fields += received
    if fields and needs_separator(head):
        fields += b"\n"
    return fields
