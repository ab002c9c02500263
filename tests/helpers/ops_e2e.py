"""
Helpers for the end-to-end tests of running popd for real: TLS reloads, SNI,
the PROXY protocol, limits, workers, metrics, systemd and privileges.

  - L{named_certificate} writes a self-signed certificate for given names.
  - L{peer_common_name} says which certificate a server presented.
  - L{LaunchedPopd} is a L{PopdServer} started by any command line (twistd
    options before C{popd}, a launcher that sets up systemd's sockets).
  - L{wait_for} polls a condition, bounded.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from helpers.popd_e2e import (
    HOST,
    STARTUP_TIMEOUT,
    PopdServer,
    ServerFailed,
    popd_env,
)

SESSION_END = re.compile(r"session end user=(\S+) client=(\S+) .* end=(.+?) pid=(\d+)")


def named_certificate(
    directory: Path, common_name: str, names: Sequence[str] = ()
) -> tuple[Path, Path]:
    """
    A self-signed certificate for C{common_name} (and C{names}, and
    127.0.0.1) with its key, as C{(certificate, key)} files.
    """
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    alternatives = [x509.DNSName(n) for n in {common_name, *names}]
    alternatives.append(x509.IPAddress(ipaddress.ip_address(HOST)))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(alternatives), critical=False)
        .sign(key, hashes.SHA256())
    )
    slug = re.sub(r"[^a-z0-9]+", "-", common_name.lower())
    cert_file, key_file = directory / f"{slug}.pem", directory / f"{slug}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def insecure_client() -> ssl.SSLContext:
    """
    A client context that accepts any certificate: the tests look at which
    certificate came, not whether it verifies.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def common_name_of(der: bytes) -> str:
    certificate = x509.load_der_x509_certificate(der)
    (attribute,) = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return attribute.value


def peer_common_name(port: int, server_name: str | None = None) -> str:
    """
    Connect to POP3S on C{port} asking for C{server_name} (SNI); return the
    common name of the certificate the server presented.
    """
    with socket.create_connection((HOST, port), timeout=10) as raw:
        with insecure_client().wrap_socket(raw, server_hostname=server_name) as tls:
            return common_name_of(tls.getpeercert(binary_form=True))


def wait_for(
    condition: Callable[[], object], timeout: float = 15.0, interval: float = 0.05
):
    """
    Poll C{condition} until it returns something true (returned), for at
    most C{timeout} seconds.

    @raise AssertionError: if it never did.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        time.sleep(interval)


class LaunchedPopd(PopdServer):
    """
    A popd started by an arbitrary command (which must end up running
    twistd popd), read and stopped like any L{PopdServer}.
    """

    def __init__(
        self,
        directory: Path,
        config: Path,
        command: Sequence[str],
        env: dict[str, str] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        super().__init__(directory, config)
        self.command = list(command)
        self.env = env if env is not None else popd_env()
        self.pass_fds = tuple(pass_fds)

    def start(self, listeners: Sequence[str] = ("POP3", "POP3S")) -> LaunchedPopd:
        self.process = subprocess.Popen(
            self.command,
            cwd=self.directory,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            pass_fds=self.pass_fds,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        with self._changed:
            while not all(self.ports[label] for label in listeners):
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._changed.wait(min(remaining, 1.0))
            ready = all(self.ports[label] for label in listeners)
        if not ready:
            output = self.stop()
            raise ServerFailed(
                f"popd did not start listening on {list(listeners)} "
                f"(exit status {self.process.returncode}):\n{output}"
            )
        return self

    def wait_for_output(self, pattern: str, timeout: float = 15.0) -> re.Match:
        """
        The first match of C{pattern} in the output, waiting (bounded).
        """
        compiled = re.compile(pattern)
        return wait_for(lambda: compiled.search(self.output()), timeout)


def session_ends(server: PopdServer) -> list[tuple[str, str, str, int]]:
    """
    C{(user, client, end, pid)} of every C{session end} line so far.
    """
    return [
        (m.group(1), m.group(2), m.group(3), int(m.group(4)))
        for m in SESSION_END.finditer(server.output())
    ]
