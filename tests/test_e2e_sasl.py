"""
SASL end to end: real clients against a real C{twistd -n popd}.

  - curl: C{--login-options AUTH=PLAIN|LOGIN|CRAM-MD5|EXTERNAL} (SCRAM only
    where curl is built with GNU SASL, which this curl says in C{curl -V});
  - poplib: AUTH by hand (C{_shortcmd}), with the SCRAM client of the tests;
  - mpop (GNU SASL): C{--auth=scram-sha-256|scram-sha-1|cram-md5|plain|login}
    and EXTERNAL with a client certificate;
  - secrets made by C{popd adduser --scheme SCRAM-SHA-256} and by Dovecot's
    C{doveadm pw} (where installed) log in with SCRAM.
"""

from __future__ import annotations

import base64
import datetime
import json
import os
import poplib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers.popd_e2e import (
    HOST,
    MESSAGES,
    PopdServer,
    RawPOP3,
    ServerFailed,
    config_text,
    downloaded,
)
from helpers.scram_client import ScramClient

pytestmark = pytest.mark.e2e

PASSWORD = "sasl-s3cret"
MESSAGE = MESSAGES["plain"]


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def run(command: list[str], home: Path, check: bool = True):
    result = subprocess.run(
        command,
        capture_output=True,
        env={**os.environ, "HOME": str(home), "LC_ALL": "C"},
        timeout=120,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command[0]} exited with {result.returncode}:\n"
            f"{result.stdout.decode(errors='replace')}\n"
            f"{result.stderr.decode(errors='replace')}"
        )
    return result


# Certificates for EXTERNAL: a client CA of its own, not the server's.


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _certificate(subject: str, issuer: str, key, signer, ca: bool, emails=()):
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if emails:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.RFC822Name(e) for e in emails]),
            critical=False,
        )
    return builder.sign(signer, hashes.SHA256())


def _write_pem(path: Path, item) -> Path:
    if isinstance(item, x509.Certificate):
        path.write_bytes(item.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(
            item.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory):
    """
    A client CA and a client certificate for "erik" (CN) and
    erik@example.org (e-mail SAN); paths of the CA, certificate and key.
    """
    directory = tmp_path_factory.mktemp("client-pki")
    ca_key = _key()
    ca = _certificate("popd client CA", "popd client CA", ca_key, ca_key, True)
    key = _key()
    certificate = _certificate(
        "erik", "popd client CA", key, ca_key, False, emails=["erik@example.org"]
    )
    return {
        "ca": _write_pem(directory / "client-ca.pem", ca),
        "cert": _write_pem(directory / "erik.pem", certificate),
        "key": _write_pem(directory / "erik.key", key),
    }


# The servers


def _configuration(pki, client_ca=None, trusted=("127.0.0.0/8", "::1/128")) -> str:
    text = config_text(pki, trusted_networks=trusted)
    if client_ca is not None:
        # config_text writes [tls] and [auth] once; add to them in place.
        text = text.replace(
            "[tls]\n", f"[tls]\nclient_ca = {json.dumps(str(client_ca))}\n", 1
        ).replace("[auth]\n", "[auth]\nexternal = true\n", 1)
    return text


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    started: list[PopdServer] = []

    def start(name: str, text: str) -> PopdServer:
        directory = tmp_path_factory.mktemp(name)
        config = directory / "popd.toml"
        config.write_text(text)
        server = PopdServer(directory, config).start()
        started.append(server)
        return server

    yield start
    problems = []
    for server in reversed(started):
        try:
            server.finish()
        except ServerFailed as error:
            problems.append(str(error))
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)


def append_users(server: PopdServer, entries: dict[str, str]) -> None:
    path = server.passwd_file
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with path.open("a") as file:
        for user, stored in entries.items():
            file.write(f"{user}:{stored}\n")


@pytest.fixture(scope="module")
def server(servers, pki, client_pki):
    """
    One popd with EXTERNAL on and users stored every way SASL cares about:
    alice {PLAIN}, scott SCRAM-SHA-256 and sam SCRAM-SHA-1 (popd adduser),
    carl CRAM-MD5, hank a hash only, erik for certificates only, and, where
    doveadm is installed, dora with Dovecot's own SCRAM-SHA-256 and dirk with
    its CRAM-MD5.
    """
    server = servers("sasl", _configuration(pki, client_pki["ca"]))
    server.add_user("scott", PASSWORD, "SCRAM-SHA-256")
    server.add_user("sam", PASSWORD, "SCRAM-SHA-1")
    server.add_user("carl", PASSWORD, "CRAM-MD5")
    server.add_user("hank", PASSWORD)  # ARGON2ID
    entries = {"alice": "{PLAIN}" + PASSWORD, "erik": "*"}
    doveadm = shutil.which("doveadm")
    if doveadm is not None:
        for user, scheme in (("dora", "SCRAM-SHA-256"), ("dirk", "CRAM-MD5")):
            made = subprocess.run(
                [doveadm, "pw", "-s", scheme, "-p", PASSWORD],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            entries[user] = made.stdout.strip()
    append_users(server, entries)
    for user in ("alice", "scott", "sam", "carl", "hank", "erik", "dora", "dirk"):
        server.deliver(user, MESSAGE)
    return server


def dovecot_user(name: str) -> str:
    if shutil.which("doveadm") is None:
        pytest.skip("doveadm (Dovecot) is not installed: no Dovecot-made secrets")
    return name


# CAPA from real sockets


def sasl_capability(client: RawPOP3) -> list[bytes]:
    assert client.command("CAPA").startswith(b"+OK")
    for line in client.body().split(b"\r\n"):
        if line.startswith(b"SASL "):
            return line.split()[1:]
    return []


def test_capa_lists_what_the_users_can_use(server, pki):
    with RawPOP3(server.pop3_port) as client:
        # Loopback is trusted: plaintext mechanisms too; no EXTERNAL
        # without TLS and a certificate.
        assert sasl_capability(client) == [
            b"SCRAM-SHA-256",
            b"SCRAM-SHA-1",
            b"CRAM-MD5",
            b"PLAIN",
            b"LOGIN",
        ]


def test_capa_before_tls_from_an_untrusted_network(servers, pki):
    server = servers("untrusted", _configuration(pki, trusted=()))
    append_users(server, {"alice": "{PLAIN}" + PASSWORD})
    with RawPOP3(server.pop3_port) as client:
        assert sasl_capability(client) == [
            b"SCRAM-SHA-256",
            b"SCRAM-SHA-1",
            b"CRAM-MD5",
        ]
        reply = client.command("AUTH PLAIN " + plain("alice", PASSWORD))
        assert reply.startswith(b"-ERR [AUTH] Plaintext authentication disallowed")
        assert client.stls(pki.client_context()).startswith(b"+OK")
        assert b"PLAIN" in sasl_capability(client)
        assert client.command("AUTH PLAIN " + plain("alice", PASSWORD)).startswith(
            b"+OK Logged in"
        )


def test_capa_with_a_client_certificate_offers_external(server, pki, client_pki):
    context = pki.client_context()
    context.load_cert_chain(str(client_pki["cert"]), str(client_pki["key"]))
    with RawPOP3(server.pop3s_port, context) as client:
        assert sasl_capability(client)[-1] == b"EXTERNAL"
        assert client.command("AUTH EXTERNAL =").startswith(b"+OK Logged in")
    # Without a certificate, TLS still works, without EXTERNAL.
    with RawPOP3(server.pop3s_port, pki.client_context()) as client:
        assert b"EXTERNAL" not in sasl_capability(client)
        reply = client.command("AUTH PLAIN " + plain("alice", PASSWORD))
        assert reply.startswith(b"+OK Logged in")


# curl


def plain(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def curl(*arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [program("curl"), "--silent", "--show-error", *arguments],
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


def curl_features() -> str:
    return subprocess.run(
        [program("curl"), "-V"], capture_output=True, text=True, timeout=30
    ).stdout


@pytest.mark.parametrize(
    "mechanism, user",
    [
        ("PLAIN", "alice"),
        ("PLAIN", "hank"),
        ("LOGIN", "scott"),
        ("CRAM-MD5", "alice"),
        ("CRAM-MD5", "carl"),
    ],
)
def test_curl(server, mechanism, user):
    result = curl(
        f"pop3://{HOST}:{server.pop3_port}/1",
        "-u",
        f"{user}:{PASSWORD}",
        "--login-options",
        f"AUTH={mechanism}",
    )
    assert result.stdout == downloaded(MESSAGE)


def test_curl_cram_md5_with_dovecots_context(server):
    user = dovecot_user("dirk")
    result = curl(
        f"pop3://{HOST}:{server.pop3_port}/1",
        "-u",
        f"{user}:{PASSWORD}",
        "--login-options",
        "AUTH=CRAM-MD5",
    )
    assert result.stdout == downloaded(MESSAGE)


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
def test_curl_wrong_password(server, mechanism):
    result = curl(
        f"pop3://{HOST}:{server.pop3_port}/",
        "-u",
        f"alice:{PASSWORD}x",
        "--login-options",
        f"AUTH={mechanism}",
        check=False,
    )
    assert result.returncode == 67  # CURLE_LOGIN_DENIED


def test_curl_plain_with_initial_response_over_pop3s(server, pki):
    result = curl(
        f"pop3s://localhost:{server.pop3s_port}/1",
        "--cacert",
        str(pki.ca_file),
        "--resolve",
        f"localhost:{server.pop3s_port}:{HOST}",
        "-u",
        f"alice:{PASSWORD}",
        "--login-options",
        "AUTH=PLAIN",
        "--sasl-ir",
    )
    assert result.stdout == downloaded(MESSAGE)


def test_curl_external_with_a_client_certificate(server, pki, client_pki):
    for user in ("erik", ""):
        result = curl(
            f"pop3s://localhost:{server.pop3s_port}/1",
            "--cacert",
            str(pki.ca_file),
            "--resolve",
            f"localhost:{server.pop3s_port}:{HOST}",
            "--cert",
            str(client_pki["cert"]),
            "--key",
            str(client_pki["key"]),
            "-u",
            f"{user}:",
            "--login-options",
            "AUTH=EXTERNAL",
        )
        assert result.stdout == downloaded(MESSAGE)


def test_curl_scram(server):
    if "gsasl" not in curl_features().lower():
        pytest.skip("this curl is built without GNU SASL: no SCRAM in curl")
    result = curl(
        f"pop3://{HOST}:{server.pop3_port}/1",
        "-u",
        f"scott:{PASSWORD}",
        "--login-options",
        "AUTH=SCRAM-SHA-256",
    )
    assert result.stdout == downloaded(MESSAGE)


# poplib, AUTH by hand


def scram_with_poplib(client: poplib.POP3, algorithm: str, user: str) -> bytes:
    scram = ScramClient(algorithm, user, PASSWORD.encode())
    first = base64.b64encode(scram.first()).decode()
    reply = client._shortcmd(f"AUTH SCRAM-{algorithm} {first}")
    assert reply.startswith(b"+ "), reply
    final = scram.final(base64.b64decode(reply[2:]))
    reply = client._shortcmd(base64.b64encode(final).decode())
    assert reply.startswith(b"+ "), reply
    assert scram.verify(base64.b64decode(reply[2:]))
    return client._shortcmd("")


@pytest.mark.parametrize(
    "algorithm, user",
    [("SHA-256", "alice"), ("SHA-1", "alice"), ("SHA-256", "scott"), ("SHA-1", "sam")],
)
def test_poplib_scram(server, algorithm, user):
    client = server.poplib()
    try:
        assert scram_with_poplib(client, algorithm, user).startswith(b"+OK Logged in")
        assert b"".join(line + b"\r\n" for line in client.retr(1)[1]) == downloaded(
            MESSAGE
        )
    finally:
        client.quit()


def test_poplib_scram_with_dovecots_secret_over_pop3s(server, pki):
    user = dovecot_user("dora")
    client = server.poplib_ssl(pki.client_context())
    try:
        assert scram_with_poplib(client, "SHA-256", user).startswith(b"+OK")
        assert client.stat()[0] == 1
    finally:
        client.quit()


def test_poplib_scram_refusals(server):
    for user, password in (("scott", "wrong"), ("nobody", PASSWORD), ("hank", "")):
        client = server.poplib()
        try:
            scram = ScramClient("SHA-256", user, password.encode())
            first = base64.b64encode(scram.first()).decode()
            reply = client._shortcmd(f"AUTH SCRAM-SHA-256 {first}")
            final = base64.b64encode(scram.final(base64.b64decode(reply[2:])))
            with pytest.raises(poplib.error_proto) as error:
                client._shortcmd(final.decode())
            assert str(error.value) == "b'-ERR [AUTH] Authentication failed.'"
            assert scram.iterations == 4096 and len(scram.salt) == 16
            reply = client._shortcmd("AUTH PLAIN " + plain("alice", PASSWORD))
            assert reply.startswith(b"+OK")
        finally:
            client.quit()


def test_poplib_cancel_and_garbage_keep_the_session(server):
    client = server.poplib()
    try:
        assert client._shortcmd("AUTH SCRAM-SHA-1") == b"+ "
        with pytest.raises(poplib.error_proto, match="cancelled"):
            client._shortcmd("*")
        assert client._shortcmd("AUTH LOGIN").startswith(b"+ ")
        with pytest.raises(poplib.error_proto, match="Invalid base64"):
            client._shortcmd("%%%")
        client._putcmd("AUTH PLAIN")
        assert client._getresp() == b"+ "
        client._putline(b"A" * 9000)
        with pytest.raises(poplib.error_proto, match="SASL response too long"):
            client._getresp()
        reply = client._shortcmd("AUTH PLAIN " + plain("alice", PASSWORD))
        assert reply.startswith(b"+OK Logged in")
    finally:
        client.quit()


# mpop (GNU SASL)


def mpop(server, pki, tmp_path: Path, user: str, auth: str, **options) -> int:
    """
    Run C{mpop --status-only} (authenticate, count, log out); its exit code.
    """
    starttls = options.get("starttls", True)
    config = tmp_path / f"mpoprc-{user}-{auth}"
    lines = [
        "defaults",
        "tls on",
        f"tls_starttls {'on' if starttls else 'off'}",
        f"tls_trust_file {pki.ca_file}",
        "account test",
        f"host {HOST}",
        f"port {server.pop3_port if starttls else server.pop3s_port}",
        f"auth {auth}",
        f"user {user}",
        f"passwordeval echo {options.get('password', PASSWORD)}",
        f"uidls_file {tmp_path / 'uidls'}",
        f"delivery mbox {tmp_path / 'mbox'}",
        "keep on",
    ]
    if "cert" in options:
        lines += [f"tls_cert_file {options['cert']}", f"tls_key_file {options['key']}"]
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o600)
    result = run(
        [program("mpop"), "-C", str(config), "--status-only", "test"],
        tmp_path,
        check=False,
    )
    if result.returncode != 0:
        print(result.stdout.decode(errors="replace"))
        print(result.stderr.decode(errors="replace"))
    return result.returncode


@pytest.mark.parametrize(
    "auth, user",
    [
        ("scram-sha-256", "alice"),
        ("scram-sha-256", "scott"),
        ("scram-sha-1", "sam"),
        ("scram-sha-1", "alice"),
        ("cram-md5", "carl"),
        ("cram-md5", "alice"),
        ("plain", "hank"),
        ("login", "scott"),
    ],
)
def test_mpop(server, pki, tmp_path, auth, user):
    assert mpop(server, pki, tmp_path, user, auth) == 0


def test_mpop_scram_over_pop3s_with_dovecots_secret(server, pki, tmp_path):
    user = dovecot_user("dora")
    assert mpop(server, pki, tmp_path, user, "scram-sha-256", starttls=False) == 0


def test_mpop_wrong_password(server, pki, tmp_path):
    for auth in ("scram-sha-256", "cram-md5"):
        assert mpop(server, pki, tmp_path, "scott", auth, password="nope") != 0


def test_mpop_external(server, pki, tmp_path, client_pki):
    code = mpop(
        server,
        pki,
        tmp_path,
        "erik",
        "external",
        cert=client_pki["cert"],
        key=client_pki["key"],
    )
    assert code == 0
