"""
Certificates: the self-signed pair of the embedded defaults, loading PEM
files with clear errors, and the TLS 1.2 minimum.
"""

from __future__ import annotations

import ssl
import stat
import warnings

import pytest
from OpenSSL import SSL

from popd.config import ConfigError
from popd.tls import create_self_signed, load_certificate_options


@pytest.fixture
def pair(tmp_path):
    certificate, key = tmp_path / "tls" / "cert.pem", tmp_path / "tls" / "key.pem"
    create_self_signed(certificate, key, "pop.example")
    return certificate, key


def handshake(options, client: ssl.SSLContext) -> str:
    """
    Run a TLS handshake in memory between popd's context and C{client};
    return the negotiated version.
    """
    server = SSL.Connection(options.getContext(), None)
    server.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="pop.example")
    for _ in range(20):
        try:
            tls.do_handshake()
            return tls.version()
        except ssl.SSLWantReadError:
            pass
        server.bio_write(outgoing.read())
        try:
            server.do_handshake()
        except SSL.WantReadError:
            pass
        try:
            incoming.write(server.bio_read(65536))
        except SSL.WantReadError:
            pass
    raise AssertionError("handshake did not finish")


def test_self_signed_pair_is_usable_and_key_private(pair):
    certificate, key = pair
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    client = ssl.create_default_context(cafile=str(certificate))
    assert handshake(load_certificate_options(certificate, key), client) in (
        "TLSv1.2",
        "TLSv1.3",
    )


def tls_1_1_client() -> ssl.SSLContext:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        client.minimum_version = ssl.TLSVersion.TLSv1_1
        client.maximum_version = ssl.TLSVersion.TLSv1_1
    client.set_ciphers("ALL:@SECLEVEL=0")
    return client


def test_tls_below_1_2_refused(pair):
    # First prove this machine's OpenSSL can speak TLS 1.1 at all, so the
    # refusal below is popd's and not the client's.
    permissive = SSL.Context(SSL.TLS_METHOD)
    permissive.set_min_proto_version(SSL.TLS1_1_VERSION)
    permissive.set_cipher_list(b"ALL:@SECLEVEL=0")
    permissive.use_certificate_file(str(pair[0]))
    permissive.use_privatekey_file(str(pair[1]))
    try:
        assert handshake(Options(permissive), tls_1_1_client()) == "TLSv1.1"
    except (ssl.SSLError, SSL.Error):
        pytest.skip("this machine's OpenSSL cannot negotiate TLS 1.1 at all")
    with pytest.raises((ssl.SSLError, SSL.Error)):
        handshake(load_certificate_options(*pair), tls_1_1_client())


class Options:
    def __init__(self, context: SSL.Context) -> None:
        self.context = context

    def getContext(self) -> SSL.Context:
        return self.context


def test_tls_1_3_minimum(pair):
    client = ssl.create_default_context(cafile=str(pair[0]))
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, SSL.Error)):
        handshake(load_certificate_options(*pair, min_version="TLSv1.3"), client)


def test_missing_file_is_named(tmp_path, pair):
    with pytest.raises(ConfigError, match="cannot read .*nope.pem"):
        load_certificate_options(tmp_path / "nope.pem", pair[1])


def test_garbage_certificate_and_key(tmp_path, pair):
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        load_certificate_options(junk, pair[1])
    with pytest.raises(ConfigError, match="holds no usable PEM private key"):
        load_certificate_options(pair[0], junk)


def test_key_of_another_certificate(tmp_path, pair):
    other_cert, other_key = tmp_path / "o.pem", tmp_path / "o.key"
    create_self_signed(other_cert, other_key, "other.example")
    with pytest.raises(ConfigError, match="does not match"):
        load_certificate_options(pair[0], other_key)
