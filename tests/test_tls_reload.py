"""
TLS certificates reloaded on SIGHUP (L{popd.tls.ServerTLS}): new handshakes
get the new certificate, sessions already established go on, and a reload
that fails logs one error and keeps the old certificate.
"""

from __future__ import annotations

import shutil
import signal
import ssl

import pytest
from helpers.ops_e2e import (
    common_name_of,
    insecure_client,
    named_certificate,
    peer_common_name,
    wait_for,
)
from helpers.popd_e2e import MESSAGES, Pki, RawPOP3, downloaded
from OpenSSL import SSL
from twisted.logger import LogLevel, globalLogPublisher

from popd.config import ConfigError
from popd.tls import server_tls


def handshake_name(tls, server_name: str | None = None) -> str:
    """
    Run a TLS handshake in memory against C{tls}'s connection; return the
    common name of the certificate the server presented.
    """
    server = tls.serverConnectionForTLS(None)
    server.set_accept_state()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = insecure_client().wrap_bio(incoming, outgoing, server_hostname=server_name)
    for _ in range(20):
        try:
            client.do_handshake()
            return common_name_of(client.getpeercert(binary_form=True))
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


@pytest.fixture
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    yield seen
    globalLogPublisher.removeObserver(seen.append)


def install(source: tuple, target: tuple) -> None:
    """
    Copy a certificate and key over the files the server was configured
    with, as an administrator (or certbot) renewing them would.
    """
    for new, old in zip(source, target, strict=True):
        shutil.copyfile(new, old)


def test_reload_swaps_the_certificate(tmp_path, events):
    live = named_certificate(tmp_path / "live", "first.example")
    second = named_certificate(tmp_path / "second", "second.example")
    tls = server_tls(*live)
    before = tls.getContext()
    assert handshake_name(tls) == "first.example"
    install(second, live)
    # Nothing changes until the reload.
    assert handshake_name(tls) == "first.example"
    assert tls.reload() is True
    assert handshake_name(tls) == "second.example"
    assert tls.getContext() is not before
    assert any("TLS certificates reloaded" in e.get("log_format", "") for e in events)


def test_failed_reload_keeps_the_old_certificate(tmp_path, events):
    live = named_certificate(tmp_path / "live", "first.example")
    tls = server_tls(*live)
    live[1].write_text("not a key\n")
    assert tls.reload() is False
    assert handshake_name(tls) == "first.example"
    errors = [e for e in events if e.get("log_level") is LogLevel.error]
    assert len(errors) == 1
    text = errors[0]["log_format"].format(**errors[0])
    assert "TLS reload failed, keeping the current certificates" in text
    assert str(live[1]) in text


def test_mismatched_pair_is_refused_on_reload(tmp_path):
    live = named_certificate(tmp_path / "live", "first.example")
    other = named_certificate(tmp_path / "other", "other.example")
    tls = server_tls(*live)
    shutil.copyfile(other[0], live[0])  # a new certificate, the old key
    assert tls.reload() is False
    assert handshake_name(tls) == "first.example"


def test_bad_files_at_start_are_a_config_error(tmp_path):
    live = named_certificate(tmp_path / "live", "first.example")
    with pytest.raises(ConfigError, match=r"\[tls\] key"):
        server_tls(live[0], tmp_path / "missing.key")


def test_ciphers_applied_and_checked(tmp_path):
    live = named_certificate(tmp_path / "live", "first.example")
    tls = server_tls(*live, ciphers="ECDHE-ECDSA-AES256-GCM-SHA384")
    connection = tls.serverConnectionForTLS(None)
    tls12 = [c for c in connection.get_cipher_list() if not c.startswith("TLS_")]
    assert tls12 == ["ECDHE-ECDSA-AES256-GCM-SHA384"]
    with pytest.raises(ConfigError, match=r"\[tls\] ciphers"):
        server_tls(*live, ciphers="NO-SUCH-CIPHER")


def test_default_ciphers_are_safe(tmp_path):
    live = named_certificate(tmp_path / "live", "first.example")
    names = server_tls(*live).serverConnectionForTLS(None).get_cipher_list()
    assert names
    for weak in ("RC4", "DES-CBC3", "NULL", "EXPORT", "MD5", "aNULL"):
        assert not [name for name in names if weak in name], weak


# End to end: twistd popd and SIGHUP


@pytest.fixture(scope="module")
def reloading(popd_factory, tmp_path_factory):
    directory = tmp_path_factory.mktemp("reload-certs")
    live = named_certificate(directory / "live", "first.example")
    config_pki = Pki(ca_file=live[0], cert_file=live[0], key_file=live[1])
    server = popd_factory("tls-reload", certificates=config_pki, plaintext="always")
    server.add_plain_user("rita", "reload-pass")
    server.deliver("rita", MESSAGES["plain"])
    return server, live, directory


def hangup(server) -> None:
    server.process.send_signal(signal.SIGHUP)


def test_sighup_reloads_without_dropping_sessions(reloading):
    server, live, directory = reloading
    assert peer_common_name(server.pop3s_port) == "first.example"
    # An established session over POP3S, and one after STLS.
    implicit = RawPOP3(server.pop3s_port, context=insecure_client())
    started = RawPOP3(server.pop3_port)
    assert started.stls(insecure_client()).startswith(b"+OK")
    try:
        install(named_certificate(directory / "new", "second.example"), live)
        hangup(server)
        wait_for(lambda: "TLS certificates reloaded" in server.output())
        # New handshakes, on both listeners, get the new certificate.
        assert peer_common_name(server.pop3s_port) == "second.example"
        with RawPOP3(server.pop3_port) as fresh:
            assert fresh.stls(insecure_client()).startswith(b"+OK")
            assert common_name_of(fresh.sock.getpeercert(True)) == "second.example"
        # The sessions established before go on with the old one.
        for session in (implicit, started):
            assert common_name_of(session.sock.getpeercert(True)) == "first.example"
            assert session.command("USER rita").startswith(b"+OK")
            assert session.command("PASS reload-pass").startswith(b"+OK")
            assert session.command("RETR 1").startswith(b"+OK")
            body = session.body()
            assert body.replace(b"\r\n..", b"\r\n.")[:-3] == downloaded(
                MESSAGES["plain"]
            )
            assert session.command("QUIT").startswith(b"+OK")
    finally:
        implicit.close()
        started.close()


def test_failed_reload_logs_once_and_keeps_serving(reloading):
    server, live, directory = reloading
    current = peer_common_name(server.pop3s_port)
    before = server.output().count("TLS reload failed")
    live[0].write_text("-----BEGIN CERTIFICATE-----\nbroken\n")
    try:
        hangup(server)
        wait_for(lambda: server.output().count("TLS reload failed") > before)
        assert server.output().count("TLS reload failed") == before + 1
        assert server.alive
        assert peer_common_name(server.pop3s_port) == current
    finally:
        install(named_certificate(directory / "again", current), live)
