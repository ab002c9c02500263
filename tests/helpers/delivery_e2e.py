"""
What the delivery end-to-end tests share: the ports of a popd's LMTP and
SMTP listeners, and a downloaded message taken apart into the trace fields
added on the way and the message as it was sent.
"""

from __future__ import annotations

import re

from helpers.popd_e2e import PopdServer, login_when_unlocked

#: The log line of a delivery listener.
DELIVERY_LISTENING = re.compile(r"\b(LMTP|SMTP) listening on (\S+?)(?::(\d+))? \(")

#: Trace fields an MTA or popd puts on top of a message.
TRACE_FIELDS = (
    b"return-path",
    b"delivered-to",
    b"received",
    b"x-original-to",
)


def delivery_listeners(server: PopdServer) -> dict[str, list[str]]:
    """
    C{{"LMTP": [port or path, ...], "SMTP": [...]}} from the server's log.

    popd starts its delivery listeners before the POP3 ones, so they are
    all in the log once L{PopdServer.start} has returned.
    """
    found: dict[str, list[str]] = {"LMTP": [], "SMTP": []}
    for match in DELIVERY_LISTENING.finditer(server.output()):
        where = match.group(3) or match.group(2)
        if where.startswith(("b'", 'b"')):
            where = where[2:-1]  # a UNIX socket's path as Twisted's bytes
        found[match.group(1)].append(where)
    return found


def split_trace(message: bytes) -> tuple[list[bytes], bytes]:
    """
    The trace fields at the top of a downloaded (CRLF) message, each with
    its continuation lines, and the rest of the message.
    """
    fields: list[bytes] = []
    position = 0
    for _ in range(1000):
        end = message.find(b"\r\n", position)
        if end == -1:
            break
        line = message[position : end + 2]
        name = line.split(b":", 1)[0].lower()
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif b":" in line and name in TRACE_FIELDS:
            fields.append(line)
        else:
            break
        position = end + 2
    return fields, message[position:]


def field(fields: list[bytes], name: bytes) -> list[bytes]:
    """
    The values of the fields named C{name}, unfolded.
    """
    prefix = name.lower() + b":"
    return [
        re.sub(rb"\r\n[ \t]+", b" ", item[len(prefix) :]).strip()
        for item in fields
        if item.lower().startswith(prefix)
    ]


def download_all(server: PopdServer, user: str, password: str) -> dict[str, bytes]:
    """
    Every message of C{user} over POP3: UID -> the message as received.
    """
    client = login_when_unlocked(server.poplib, user, password)
    try:
        _reply, lines, _octets = client.uidl()
        messages = {}
        for line in lines:
            number, uid = line.decode().split()
            _reply, body, _octets = client.retr(int(number))
            messages[uid] = b"".join(part + b"\r\n" for part in body)
        return messages
    finally:
        client.quit()


def assert_same_message(downloaded_message: bytes, expected: bytes) -> None:
    """
    C{downloaded_message} is C{expected} (in its downloaded form) under
    trace fields only.
    """
    _fields, rest = split_trace(downloaded_message)
    assert rest == expected, (rest[:300], expected[:300])


__all__ = [
    "assert_same_message",
    "delivery_listeners",
    "download_all",
    "field",
    "split_trace",
]
