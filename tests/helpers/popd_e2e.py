"""
A real popd for the end-to-end tests.

  - L{make_pki} writes a test CA and a server certificate for C{localhost}
    and 127.0.0.1 signed by it, so that clients verify the server for real.
  - L{PopdServer} runs C{twistd -n popd --config FILE} as a subprocess on
    ephemeral loopback ports, learns the ports from the C{listening} log
    lines and stops the process again; its output is kept for failures.
  - L{run_cli} runs the C{popd} admin command (C{python -m popd.cli}).
  - L{MESSAGES} are the messages the tests deliver, and L{downloaded},
    L{wire_form} and L{top_form} say, independently of popd's own code,
    what a client must receive for each.
  - L{RawPOP3} is a bare socket client for the exact bytes on the wire.

Every wait is bounded, and every server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import os
import poplib
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
CLI_TIMEOUT = 60.0
CLIENT_TIMEOUT = 30.0

#: The log line popd writes for each listener.
LISTENING = re.compile(r"\b(POP3S?) listening on (\S+):(\d+) \(")

#: What in a server's output means something went wrong inside it.
SERVER_ERRORS = ("Traceback (most recent call last)", "Unhandled Error")

T = TypeVar("T")


def popd_env(**extra: str) -> dict[str, str]:
    """
    The environment for popd subprocesses: this checkout first on the path,
    so that its C{popd} package and its C{twisted/plugins} dropin are used.
    """
    env = dict(os.environ)
    path = [str(REPO)]
    if env.get("PYTHONPATH"):
        path.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(path)
    env.update(extra)
    return env


def twistd_command(*arguments: str) -> list[str]:
    """
    C{twistd -n popd ...} run by this interpreter, with no pid file.
    """
    return [
        sys.executable,
        "-c",
        "from twisted.scripts.twistd import run; run()",
        "-n",
        "--pidfile",
        "",
        "popd",
        *arguments,
    ]


# Certificates


@dataclass(frozen=True)
class Pki:
    """
    A test CA and a server certificate it signed.

    @ivar ca_file: the CA certificate, the one trust anchor clients get.
    @ivar cert_file: the server certificate (C{localhost}, 127.0.0.1).
    @ivar key_file: the server's private key.
    """

    ca_file: Path
    cert_file: Path
    key_file: Path

    def client_context(self) -> ssl.SSLContext:
        """
        A verifying client context that trusts only the test CA.
        """
        return ssl.create_default_context(cafile=str(self.ca_file))


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "popd tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool,
) -> x509.Certificate:
    """
    A certificate for C{key}, valid from an hour ago for two days, signed
    by C{issuer} (a certificate and its key) or self-signed; a leaf is for
    C{localhost} and 127.0.0.1.
    """
    now = datetime.datetime.now(datetime.UTC)
    name = _name(subject)
    issuer_name, signing_key = (
        (issuer[0].subject, issuer[1]) if issuer is not None else (name, key)
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=1 if ca else None), critical=True
        )
        .add_extension(_key_usage(ca=ca), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    if not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        ).add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def make_pki(directory: Path, *, intermediate: bool = False) -> Pki:
    """
    Write a test CA and a server certificate for C{localhost} and
    127.0.0.1 into C{directory}.

    @param intermediate: sign the server certificate with an intermediate
        CA (itself signed by the test CA), which the certificate file then
        holds after the server's own, as servers are set up in practice.
    """
    directory.mkdir(parents=True, exist_ok=True)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate("popd test CA", root_key, None, ca=True)
    issuer, chain = (root, root_key), []
    if intermediate:
        middle_key = ec.generate_private_key(ec.SECP256R1())
        middle = _certificate("popd test intermediate CA", middle_key, issuer, ca=True)
        issuer, chain = (middle, middle_key), [middle]
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate("localhost", key, issuer, ca=False)

    pki = Pki(
        ca_file=directory / "ca.pem",
        cert_file=directory / "server.pem",
        key_file=directory / "server.key",
    )
    pki.ca_file.write_bytes(_pem(root))
    pki.cert_file.write_bytes(b"".join(_pem(c) for c in [leaf, *chain]))
    pki.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pki.key_file.chmod(0o600)
    return pki


# The admin command


def run_cli(
    *arguments: str,
    cwd: Path,
    stdin: bytes = b"",
    check: bool = True,
) -> subprocess.CompletedProcess:
    """
    Run C{python -m popd.cli ARGUMENTS} in C{cwd} with C{stdin} as input.

    @raise AssertionError: with the command's output if C{check} and it
        failed.
    """
    command = [sys.executable, "-m", "popd.cli", *arguments]
    result = subprocess.run(
        command,
        cwd=cwd,
        env=popd_env(),
        input=stdin,
        capture_output=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{command[2:]} exited with {result.returncode}:\n"
            f"stdout: {result.stdout.decode(errors='replace')}\n"
            f"stderr: {result.stderr.decode(errors='replace')}"
        )
    return result


def parallel(function: Callable[..., T], argument_lists: Iterable[Sequence]) -> list[T]:
    """
    C{function(*arguments)} for each argument list, four at a time, results
    in the order of the argument lists.
    """
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(function, *arguments) for arguments in argument_lists]
        return [future.result() for future in futures]


_DELIVERED = re.compile(rb"delivered (\S+) to ")


# The server


class ServerFailed(AssertionError):
    """
    The popd process did not start, died, or logged an internal error.
    """


class PopdServer:
    """
    One C{twistd -n popd --config FILE} subprocess.

    @ivar directory: the server's working directory (its config, its data).
    @ivar config: the TOML configuration file.
    @ivar ports: C{{"POP3": [port, ...], "POP3S": [port, ...]}} from the log.
    """

    def __init__(
        self, directory: Path, config: Path | None, arguments: Sequence[str] = ()
    ):
        self.directory = directory
        self.config = config
        self._extra_arguments = list(arguments)
        self.arguments = list(arguments)
        if config is not None:
            self.arguments = ["--config", str(config), *self.arguments]
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, list[int]] = {"POP3": [], "POP3S": []}
        self._lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None
        self._ended_on_purpose = False

    # Life cycle

    def start(self, listeners: Sequence[str] = ("POP3", "POP3S")) -> PopdServer:
        """
        Start twistd and wait (bounded) until each label in C{listeners}
        has logged its C{listening} line.

        @raise ServerFailed: with the server's output if it exits or does not
            listen in time.
        """
        self.process = subprocess.Popen(
            twistd_command(*self.arguments),
            cwd=self.directory,
            env=popd_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
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

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace")
            with self._changed:
                self._lines.append(line)
                match = LISTENING.search(line)
                if match:
                    self.ports[match.group(1)].append(int(match.group(3)))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def output(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def stop(self) -> str:
        """
        Terminate the process (killing it if it lingers) and return its
        whole output.
        """
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self._reader is not None:
            self._reader.join(STOP_TIMEOUT)
        return self.output()

    def kill(self, signal: int) -> str:
        """
        Send C{signal} to the server and wait (bounded) for it to exit.

        @return: its whole output.
        """
        assert self.process is not None
        self._ended_on_purpose = True
        self.process.send_signal(signal)
        self.process.wait(STOP_TIMEOUT)
        return self.stop()

    def restarted(self) -> PopdServer:
        """
        A new server process on the same directory and configuration.
        """
        return PopdServer(self.directory, self.config, self._extra_arguments).start()

    def finish(self) -> None:
        """
        Stop the server at the end of its tests.

        @raise ServerFailed: if it had died before, or logged a traceback
            or an unhandled error while it ran.
        """
        died = not self.alive and not self._ended_on_purpose
        output = self.stop()
        if died:
            raise ServerFailed(
                f"popd died during the tests (exit status "
                f"{self.process.returncode if self.process else None}):\n{output}"
            )
        errors = [marker for marker in SERVER_ERRORS if marker in output]
        if errors:
            raise ServerFailed(f"popd logged {errors[0]!r}:\n{output}")

    # Addresses

    @property
    def pop3_port(self) -> int:
        return self.ports["POP3"][0]

    @property
    def pop3s_port(self) -> int:
        return self.ports["POP3S"][0]

    # Administration, through the popd command

    def cli(self, *arguments: str, stdin: bytes = b"", check: bool = True):
        """
        Run the admin command with this server's C{--config}.
        """
        options = ["--config", str(self.config)] if self.config else []
        return run_cli(
            *options, *arguments, cwd=self.directory, stdin=stdin, check=check
        )

    def add_user(self, user: str, password: str, scheme: str | None = None) -> None:
        """
        C{popd adduser USER --password-stdin} (ARGON2ID unless C{scheme}).
        """
        extra = ["--scheme", scheme] if scheme else []
        self.cli(
            "adduser", user, "--password-stdin", *extra, stdin=password.encode() + b"\n"
        )

    @property
    def passwd_file(self) -> Path:
        return self.data_dir / "passwd"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data" if self.config else self.directory / "popd-data"

    def add_plain_user(self, user: str, password: str) -> None:
        """
        Write C{user:{PLAIN}password} into the passwd-file directly, the
        way an administrator edits it.
        """
        self._append_users({user: "{PLAIN}" + password})

    def add_hashed_users(self, users: dict[str, str]) -> None:
        """
        Hash each password with C{popd hash --password-stdin} (ARGON2ID),
        several at a time, and write the users into the passwd-file.

        Quicker than one C{adduser} after another, which must not run
        concurrently: each rewrites the whole file.
        """
        names = list(users)
        hashes = parallel(
            lambda name: (
                self.cli("hash", "--password-stdin", stdin=users[name].encode() + b"\n")
                .stdout.decode()
                .strip()
            ),
            [(name,) for name in names],
        )
        self._append_users(dict(zip(names, hashes, strict=True)))

    def _append_users(self, entries: dict[str, str]) -> None:
        """
        Add C{user:stored} lines, replacing the file atomically.
        """
        path = self.passwd_file
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        old = path.read_bytes() if path.exists() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        lines = "".join(f"{user}:{stored}\n" for user, stored in entries.items())
        new = path.with_name(path.name + ".new")
        new.write_bytes(old + lines.encode())
        new.chmod(0o600)
        os.replace(new, path)

    def deliver(self, user: str, message: bytes) -> str:
        """
        C{popd deliver -v USER < message}.

        @return: the UID of the new message, from the command's output.
        """
        result = self.cli("deliver", "-v", user, stdin=message)
        match = _DELIVERED.search(result.stdout)
        assert match, f"no UID in the output of deliver: {result.stdout!r}"
        return match.group(1).decode()

    def deliver_all(self, deliveries: Iterable[tuple[str, bytes]]) -> list[str]:
        """
        Deliver C{(user, message)} pairs, several at a time.

        @return: the UIDs, in the order of C{deliveries}.
        """
        return parallel(self.deliver, deliveries)

    # Clients

    def poplib(self, source: str | None = None) -> poplib.POP3:
        """
        A plain POP3 connection from loopback, from the address C{source}
        (see L{fresh_loopback}) if given.
        """
        if source is None:
            return poplib.POP3(HOST, self.pop3_port, timeout=CLIENT_TIMEOUT)
        return _POP3From(source, HOST, self.pop3_port, timeout=CLIENT_TIMEOUT)

    def poplib_ssl(self, context: ssl.SSLContext) -> poplib.POP3_SSL:
        """
        An implicit-TLS connection verifying the server with C{context}.
        """
        return poplib.POP3_SSL(
            HOST, self.pop3s_port, timeout=CLIENT_TIMEOUT, context=context
        )


def config_text(
    pki: Pki | None,
    *,
    plaintext: str = "tls-only",
    trusted_networks: Sequence[str] = ("127.0.0.0/8", "::1/128"),
    apop: bool = False,
    min_version: str | None = None,
    pop3_listen: Sequence[str] = ("tcp:0:interface=127.0.0.1",),
    lmtp_listen: Sequence[str] = (),
    smtp_listen: Sequence[str] = (),
    extra: str = "",
    server_extra: str = "",
    pop3s_listen: Sequence[str] = ("tcp:0:interface=127.0.0.1",),
) -> str:
    """
    A test configuration: both listeners on ephemeral loopback ports, the
    data in C{data/} next to the file, the test certificate.  The LMTP
    listener of the embedded defaults (127.0.0.1:24024) is off unless
    C{lmtp_listen} says where, so that servers never compete for its port.
    C{server_extra} is added to C{[server]} (C{extra} comes after
    C{[auth]}, so it can open further sections).
    """
    lines = [
        "[server]",
        'data_dir = "data"',
        server_extra,
        "[pop3]",
        f"listen = {json.dumps(list(pop3_listen))}",
        "[pop3s]",
        f"listen = {json.dumps(list(pop3s_listen))}",
        "[lmtp]",
        f"listen = {json.dumps(list(lmtp_listen))}",
        "[smtp]",
        f"listen = {json.dumps(list(smtp_listen))}",
    ]
    if pki is not None:
        lines += [
            "[tls]",
            f"certificate = {json.dumps(str(pki.cert_file))}",
            f"key = {json.dumps(str(pki.key_file))}",
        ]
        if min_version is not None:
            lines.append(f"min_version = {json.dumps(min_version)}")
    lines += [
        "[auth]",
        f"plaintext = {json.dumps(plaintext)}",
        f"trusted_networks = {json.dumps(list(trusted_networks))}",
        f"apop = {'true' if apop else 'false'}",
    ]
    return "\n".join(lines) + "\n" + extra


# Messages


def _big_message() -> bytes:
    """
    About 2 MB of short lines, with dot lines sprinkled through it.
    """
    lines = [
        b"From: bulk@example.org\n",
        b"To: alice@example.org\n",
        b"Subject: a big message\n",
        b"\n",
    ]
    for number in range(26000):
        if number % 97 == 0:
            lines.append(b".\n")
        elif number % 31 == 0:
            lines.append(b".%07d leading dot line\n" % number)
        else:
            lines.append(
                b"%07d " % number
                + b"abcdefghijklmnopqrstuvwxyz" * 2
                + b"0123456789-=+\n"
            )
    return b"".join(lines)


MESSAGES: dict[str, bytes] = {
    "plain": (
        b"From: Bob <bob@example.org>\n"
        b"To: Alice <alice@example.org>\n"
        b"Subject: plain text\n"
        b"Message-ID: <plain@example.org>\n"
        b"\n"
        b"Hello Alice,\n"
        b"\n"
        b"this is a plain text message.\n"
        b"Bye.\n"
    ),
    "dots": (
        b"From: dots@example.org\n"
        b"Subject: dots\n"
        b"\n"
        b".a line starting with a dot\n"
        b"..two dots\n"
        b".\n"
        b"the line above was a lone dot\n"
        b". dot space\n"
        b"...\n"
        b"end\n"
    ),
    "eight_bit": (
        "From: 8bit@example.org\n"
        "Subject: 8-bit\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "Content-Transfer-Encoding: 8bit\n"
        "\n"
        "UTF-8: Grüße, naïve café, Ελληνικά, 日本語, 🦆\n"
    ).encode()
    + b"Latin-1: caf\xe9, na\xefve, \xa9 \xff\n"
    + b"control-ish: \x01\x7f\x80\x9f\n",
    "bare_cr": (
        b"From: cr@example.org\n"
        b"Subject: a bare CR\n"
        b"\n"
        b"before\rafter a bare CR\n"
        b"two\r\rbare CRs\n"
    ),
    "no_final_newline": (
        b"From: nonl@example.org\n"
        b"Subject: no final newline\n"
        b"\n"
        b"first line\n"
        b"last line without a newline"
    ),
    "empty_body": b"From: empty@example.org\nSubject: empty body\n\n",
    "crlf": (
        b"From: crlf@example.org\r\n"
        b"Subject: stored with CRLF\r\n"
        b"\r\n"
        b"line one\r\n"
        b".dot line\r\n"
        b".\r\n"
        b"line four\r\n"
    ),
    "empty": b"",
    "big": _big_message(),
}


def to_crlf(message: bytes) -> bytes:
    """
    C{message} with each LF not preceded by CR turned into CRLF.
    """
    return re.sub(rb"(?<!\r)\n", b"\r\n", message)


def downloaded(message: bytes) -> bytes:
    """
    What a client has after RETR of the stored C{message}: CRLF line ends,
    dot-stuffing undone, and a CRLF ending a last line that had none.
    """
    crlf = to_crlf(message)
    if crlf and not crlf.endswith(b"\r\n"):
        crlf += b"\r\n"
    return crlf


def dot_stuffed(text: bytes) -> bytes:
    """
    CRLF lines C{text} as a multi-line reply body: a C{.} added to each
    line that starts with one, then the terminating lone-dot line.
    """
    lines = text.split(b"\r\n")[:-1]
    stuffed = ((b"." + line if line.startswith(b".") else line) for line in lines)
    return b"".join(line + b"\r\n" for line in stuffed) + b".\r\n"


def wire_form(message: bytes) -> bytes:
    """
    The exact octets after RETR's C{+OK} line: dot-stuffed, terminated.
    """
    return dot_stuffed(downloaded(message))


def top_form(message: bytes, body_lines: int) -> bytes:
    """
    What a client has after C{TOP n body_lines}: the header lines, the
    empty line and that many lines of the body (RFC 1939 section 7).
    """
    lines = [line + b"\r\n" for line in downloaded(message).split(b"\r\n")[:-1]]
    if b"\r\n" not in lines:
        return b"".join(lines)
    end = lines.index(b"\r\n") + 1 + body_lines
    return b"".join(lines[:end])


def joined(lines: Iterable[bytes]) -> bytes:
    """
    A message from a client's list of lines (without their CRLF).
    """
    return b"".join(line + b"\r\n" for line in lines)


# Clients


_loopback_numbers = itertools.count(0)


def fresh_loopback() -> str:
    """
    A loopback address (127.0.x.y, x >= 1) that no other client of this
    test run connects from.

    popd answers failed logins later and later the more there were from
    one client address (L{popd.auth.throttle}); tests that fail logins on
    purpose connect from addresses of their own, so that the penalty one
    earns does not slow the others down.  Linux routes all of 127.0.0.0/8
    to the loopback interface.
    """
    number = next(_loopback_numbers)
    return f"127.0.{1 + number // 250}.{1 + number % 250}"


class _POP3From(poplib.POP3):
    """
    poplib's client, connecting from a given local address.
    """

    def __init__(self, source: str, *arguments, **keywords) -> None:
        self._source = source
        super().__init__(*arguments, **keywords)

    def _create_socket(self, timeout: float) -> socket.socket:
        return socket.create_connection(
            (self.host, self.port), timeout, source_address=(self._source, 0)
        )


class RawPOP3:
    """
    POP3 over a bare socket, to see the exact bytes the server sends.
    """

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext | None = None,
        source: str | None = None,
    ) -> None:
        sock = socket.create_connection(
            (HOST, port),
            timeout=CLIENT_TIMEOUT,
            source_address=(source, 0) if source else None,
        )
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=HOST)
        self.sock = sock
        self.file = sock.makefile("rb")
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """
        One line with its line ending.

        @raise EOFError: the server closed the connection.
        """
        line = self.file.readline(1 << 20)
        if not line:
            raise EOFError("the server closed the connection")
        return line

    def command(self, command: str | bytes) -> bytes:
        """
        Send one command; return its status line.
        """
        if isinstance(command, str):
            command = command.encode()
        self.send(command + b"\r\n")
        return self.line()

    def body(self) -> bytes:
        """
        The rest of a multi-line reply, terminator included, as sent.
        """
        parts = []
        while True:
            line = self.line()
            parts.append(line)
            if line == b".\r\n":
                return b"".join(parts)

    def stls(self, context: ssl.SSLContext) -> bytes:
        """
        STLS, then the TLS handshake verifying the server with C{context}.
        """
        reply = self.command("STLS")
        if reply.startswith(b"+OK"):
            self.file.close()
            self.sock = context.wrap_socket(self.sock, server_hostname=HOST)
            self.file = self.sock.makefile("rb")
        return reply

    def at_eof(self) -> bool:
        """
        Whether the server has closed the connection (with nothing unread).
        """
        return self.file.read(1) == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> RawPOP3:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def login_when_unlocked(
    connect: Callable[[], poplib.POP3], user: str, password: str, timeout: float = 10.0
) -> poplib.POP3:
    """
    Connect and log in, trying again (bounded) while the maildrop is still
    locked by a session that has just ended: its lock is released when the
    server notices the connection is gone, a moment after the client closes.
    """
    deadline = time.monotonic() + timeout
    while True:
        client = connect()
        client.user(user)
        try:
            client.pass_(password)
        except poplib.error_proto as error:
            client.close()
            if "[IN-USE]" not in str(error) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        return client


def messages_by_number(
    client: poplib.POP3, expected: dict[str, bytes]
) -> dict[int, bytes]:
    """
    Message number -> the stored bytes it must be, matched by UIDL with the
    UIDs that C{popd deliver} printed (C{expected}: UID -> message).
    """
    _reply, lines, _octets = client.uidl()
    numbers = {}
    for line in lines:
        number, uid = line.decode().split()
        numbers[int(number)] = expected[uid]
    return numbers
