"""
Several certificates chosen by SNI (C{[tls] sni}): one per domain, the
default certificate for clients that name none or another host, each with
the same protocol versions, ciphers and client-certificate request.
"""

from __future__ import annotations

import pytest
from helpers.ops_e2e import named_certificate, peer_common_name
from helpers.popd_e2e import Pki
from OpenSSL import SSL
from test_tls_reload import handshake_name

from popd.config import ConfigError, SNICertificate, load_settings
from popd.tls import _sni_matches, server_tls


@pytest.fixture
def certificates(tmp_path):
    return {
        name: named_certificate(tmp_path / name, name)
        for name in ("default.example", "pop.example.org", "wild.example.net")
    }


def sni_entries(certificates) -> tuple[SNICertificate, ...]:
    return (
        SNICertificate(("pop.example.org",), *certificates["pop.example.org"]),
        SNICertificate(("*.example.net",), *certificates["wild.example.net"]),
    )


def test_chosen_by_name(certificates):
    tls = server_tls(*certificates["default.example"], sni=sni_entries(certificates))
    assert handshake_name(tls, "pop.example.org") == "pop.example.org"
    assert handshake_name(tls, "POP.Example.ORG") == "pop.example.org"
    assert handshake_name(tls, "mail.example.net") == "wild.example.net"


def test_default_without_a_match(certificates):
    tls = server_tls(*certificates["default.example"], sni=sni_entries(certificates))
    assert handshake_name(tls) == "default.example"
    assert handshake_name(tls, "other.example.com") == "default.example"
    # A wildcard covers one label, not the domain itself nor two labels.
    assert handshake_name(tls, "example.net") == "default.example"
    assert handshake_name(tls, "a.b.example.net") == "default.example"


def test_wildcard_matching():
    assert _sni_matches("*.example.net", "pop.example.net")
    assert not _sni_matches("*.example.net", "example.net")
    assert not _sni_matches("*.example.net", ".example.net")
    assert not _sni_matches("*.example.net", "a.b.example.net")
    assert _sni_matches("pop.example.org", "pop.example.org")
    assert not _sni_matches("pop.example.org", "xpop.example.org")


def test_reload_reads_the_sni_certificates_again(certificates, tmp_path):
    tls = server_tls(*certificates["default.example"], sni=sni_entries(certificates))
    renewed = named_certificate(tmp_path / "renewed", "renewed.example.org")
    for new, old in zip(renewed, certificates["pop.example.org"], strict=True):
        old.write_bytes(new.read_bytes())
    assert tls.reload()
    assert handshake_name(tls, "pop.example.org") == "renewed.example.org"


def test_broken_sni_entry_names_it(certificates, tmp_path):
    entries = (
        SNICertificate(
            ("pop.example.org",),
            certificates["pop.example.org"][0],
            tmp_path / "missing.key",
        ),
    )
    with pytest.raises(ConfigError, match=r"\[tls\] sni pop.example.org: key"):
        server_tls(*certificates["default.example"], sni=entries)


def test_every_context_has_the_same_policy(certificates, tmp_path):
    ca = certificates["default.example"][0]
    tls = server_tls(
        *certificates["default.example"],
        min_version="TLSv1.3",
        client_ca=ca,
        sni=sni_entries(certificates),
    )
    for name in (None, "pop.example.org", "x.example.net"):
        context = tls.context_for(name)
        # Client certificates requested (for SASL EXTERNAL), not required.
        mode = context.get_verify_mode()
        assert mode & SSL.VERIFY_PEER
        assert not mode & SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    without = server_tls(
        *certificates["default.example"], sni=sni_entries(certificates)
    )
    assert without.context_for("pop.example.org").get_verify_mode() == SSL.VERIFY_NONE


def test_both_configuration_forms(certificates, tmp_path):
    pop, wild = certificates["pop.example.org"], certificates["wild.example.net"]
    table = tmp_path / "table.toml"
    table.write_text(
        "[tls.sni]\n"
        f'"pop.example.org" = {{ certificate = "{pop[0]}", key = "{pop[1]}" }}\n'
        f'"*.example.net" = {{ certificate = "{wild[0]}", key = "{wild[1]}" }}\n'
    )
    array = tmp_path / "array.toml"
    array.write_text(
        "[[tls.sni]]\n"
        'name = "pop.example.org"\n'
        f'certificate = "{pop[0]}"\nkey = "{pop[1]}"\n'
        "[[tls.sni]]\n"
        'names = ["*.example.net"]\n'
        f'certificate = "{wild[0]}"\nkey = "{wild[1]}"\n'
    )
    assert load_settings(table).tls_sni == load_settings(array).tls_sni
    assert load_settings(table).tls_sni == (
        SNICertificate(("pop.example.org",), *pop),
        SNICertificate(("*.example.net",), *wild),
    )


# End to end


def test_popd_serves_the_certificate_asked_for(popd_factory, certificates):
    default = certificates["default.example"]
    pop, wild = certificates["pop.example.org"], certificates["wild.example.net"]
    server = popd_factory(
        "sni",
        certificates=Pki(ca_file=default[0], cert_file=default[0], key_file=default[1]),
        extra=(
            '[tls.sni."pop.example.org"]\n'
            f'certificate = "{pop[0]}"\nkey = "{pop[1]}"\n'
            '[tls.sni."*.example.net"]\n'
            f'certificate = "{wild[0]}"\nkey = "{wild[1]}"\n'
        ),
    )
    port = server.pop3s_port
    assert peer_common_name(port, "pop.example.org") == "pop.example.org"
    assert peer_common_name(port, "imap.example.net") == "wild.example.net"
    assert peer_common_name(port, "unknown.example") == "default.example"
    assert peer_common_name(port) == "default.example"
