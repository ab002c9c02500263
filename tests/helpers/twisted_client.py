"""
Fetch a POP3 maildrop with Twisted's own client, as a program would.

    python twisted_client.py HOST PORT USER PASSWORD CA_FILE OUT_DIR

Connects over TCP, reads CAPA, starts TLS with STLS (verifying the server
as C{localhost} against CA_FILE), logs in with USER/PASS, lists the
messages and retrieves each, then QUITs.  Message N is written to
C{OUT_DIR/N.eml} (its lines joined with CRLF) and C{OUT_DIR/uidl.txt}
holds C{N UID} lines.  Exits non-zero on any failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.internet.defer import ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import react
from twisted.mail.pop3client import POP3Client

TIMEOUT = 30


async def fetch(reactor, host, port, user, password, ca_file, out_dir) -> None:
    endpoint = TCP4ClientEndpoint(reactor, host, int(port), timeout=TIMEOUT)
    client = POP3Client()
    client.timeout = TIMEOUT
    await connectProtocol(endpoint, client)
    capabilities = await client.capabilities(useCache=False)
    if b"STLS" not in capabilities:
        raise SystemExit(f"no STLS in CAPA: {capabilities!r}")
    trust = Certificate.loadPEM(Path(ca_file).read_bytes())
    await client.startTLS(optionsForClientTLS("localhost", trustRoot=trust))
    if not client.startedTLS:
        raise SystemExit("TLS did not start")
    await client.login(user.encode(), password.encode())
    sizes = await client.listSize()
    uids = await client.listUID()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "uidl.txt").write_text(
        "".join(f"{index + 1} {uid.decode()}\n" for index, uid in enumerate(uids))
    )
    for index in range(len(sizes)):
        lines = await client.retrieve(index)
        (out / f"{index + 1}.eml").write_bytes(
            b"".join(line + b"\r\n" for line in lines)
        )
    await client.quit()


def main(reactor, *arguments: str):
    return ensureDeferred(fetch(reactor, *arguments))


if __name__ == "__main__":
    if len(sys.argv) != 7:
        raise SystemExit(__doc__)
    react(main, sys.argv[1:])
