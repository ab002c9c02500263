"""
End to end, TLS as configured in C{[tls]}: a certificate file holding the
server's certificate and an intermediate CA (clients trust only the root),
and C{min_version}, on both STLS and POP3S.
"""

from __future__ import annotations

import poplib
import ssl

import pytest
from helpers.popd_e2e import MESSAGES, RawPOP3, downloaded, joined, make_pki

pytestmark = pytest.mark.e2e

PASSWORD = "tls-pass"


@pytest.fixture(scope="module")
def chain_pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("chain-pki"), intermediate=True)


@pytest.fixture(scope="module")
def chain_server(popd_factory, chain_pki):
    server = popd_factory("tls-chain", certificates=chain_pki)
    server.add_plain_user("ivy", PASSWORD)
    server.deliver("ivy", MESSAGES["plain"])
    return server


@pytest.fixture(scope="module")
def tls13_server(popd_factory):
    return popd_factory("tls13", min_version="TLSv1.3")


def retrieve_first(client: poplib.POP3) -> bytes:
    client.user("ivy")
    client.pass_(PASSWORD)
    return joined(client.retr(1)[1])


def test_intermediate_sent_on_pop3s(chain_server, chain_pki):
    client = chain_server.poplib_ssl(chain_pki.client_context())
    try:
        assert retrieve_first(client) == downloaded(MESSAGES["plain"])
    finally:
        client.quit()


def test_intermediate_sent_after_stls(chain_server, chain_pki):
    client = chain_server.poplib()
    try:
        client.stls(context=chain_pki.client_context())
        assert retrieve_first(client) == downloaded(MESSAGES["plain"])
    finally:
        client.quit()


def tls12_only(pki) -> ssl.SSLContext:
    context = pki.client_context()
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


def test_min_version_refuses_older_clients_on_pop3s(tls13_server, pki):
    with pytest.raises(ssl.SSLError):
        RawPOP3(tls13_server.pop3s_port, tls12_only(pki))
    with RawPOP3(tls13_server.pop3s_port, pki.client_context()) as raw:
        assert raw.sock.version() == "TLSv1.3"
        assert raw.command("QUIT").startswith(b"+OK")


def test_min_version_refuses_older_clients_after_stls(tls13_server, pki):
    with RawPOP3(tls13_server.pop3_port) as raw:
        with pytest.raises(ssl.SSLError):
            raw.stls(tls12_only(pki))
    with RawPOP3(tls13_server.pop3_port) as raw:
        assert raw.stls(pki.client_context()).startswith(b"+OK")
        assert raw.sock.version() == "TLSv1.3"
        assert raw.command("QUIT").startswith(b"+OK")
