"""
The three servers the benchmark compares, each started on 127.0.0.1 over
the same Maildir tree and passwd-file (C{{PLAIN}} passwords):

  - popd: C{twistd -n --pidfile= popd --config FILE};
  - Dovecot: a separate instance (its own configuration, base_dir,
    state_dir, index and control directories in a temporary directory),
    C{dovecot -F -c FILE}, installed from Debian's packages if absent;
  - C{twisted.mail.pop3}: L{bench.twisted_pop3}.

Each listens on two free ports, plain POP3 and implicit TLS, and runs in a
process group of its own, which L{Server.stop} ends (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import datetime
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import maildata, proctree

REPO = Path(__file__).resolve().parent.parent
OPEN_FILES = 65536


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_open_files(limit: int = OPEN_FILES) -> int:
    """
    Raise RLIMIT_NOFILE to C{limit} (root may raise the hard limit too),
    or as far as the hard limit allows; return the soft limit in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, max(limit, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def make_certificate(cert: Path, key: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
        .sign(private_key, hashes.SHA256())
    )
    key.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


class Workspace:
    """
    The shared mail tree, passwd-file and TLS pair (kept between runs under
    C{root}), and a fresh directory for this run's server configurations,
    logs and Dovecot's indexes (removed by L{cleanup}).
    """

    def __init__(self, root: Path, layout: maildata.Layout, log=print) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.layout = layout
        # Dovecot refuses mail access as root by default (first_valid_uid);
        # the tree belongs to Debian's "mail" user, which popd and twistd
        # (running as root) read all the same.
        self.uid, self.gid = _mail_user()
        self.mail_root = maildata.build(root, layout, self.uid, self.gid, log=log)
        self.passwd = root / "passwd"
        self.cert = root / "cert.pem"
        self.key = root / "key.pem"
        if not (self.cert.exists() and self.key.exists()):
            make_certificate(self.cert, self.key)
        runs = root / "runs"
        runs.mkdir(exist_ok=True)
        self.run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=runs))
        # Dovecot's mail processes (as the mail user) keep indexes in here.
        self.run_dir.chmod(0o755)

    def cleanup(self, keep_logs: bool = False) -> None:
        if keep_logs:
            return
        shutil.rmtree(self.run_dir, ignore_errors=True)


def _mail_user() -> tuple[int, int]:
    import pwd

    try:
        entry = pwd.getpwnam("mail")
    except KeyError:
        return os.getuid(), os.getgid()
    return entry.pw_uid, entry.pw_gid


def _preexec() -> None:
    raise_open_files()


class Server:
    """
    One server process group listening on C{port} (POP3) and C{tls_port}
    (POP3 over implicit TLS).
    """

    name = "server"
    label = "server"

    def __init__(self, workspace: Workspace) -> None:
        self.ws = workspace
        self.dir = workspace.run_dir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls_port = free_port()
        self.process: subprocess.Popen | None = None
        self.log_path = self.dir / "server.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 60.0) -> None:
        self.configure()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                cwd=self.dir,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_preexec,
            )
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        time.sleep(1.0)
        self.resting = len(proctree.tree_pids(self.pid))

    def configure(self) -> None:
        pass

    def restart(self) -> None:
        """
        A fresh process on the same ports (for memory figures that earlier
        scenarios' high-water marks do not hide).
        """
        self.stop()
        time.sleep(0.5)
        self.start()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.label} exited with {self.process.returncode}:\n"
                    + self.log_tail()
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), 1) as sock:
                    sock.settimeout(5)
                    if sock.recv(512).startswith(b"+OK"):
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.label} did not greet in {timeout}s:\n" + self.log_tail()
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            if process.poll() is not None:
                break
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        # Whatever of the group outlived its leader (never a broad name).
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def forget(self, user: str) -> None:
        """
        Drop what this server remembers about C{user}'s maildrop, so that
        the next login is a first login.
        """


class Popd(Server):
    name = "popd"
    label = "popd"

    def configure(self) -> None:
        ws = self.ws
        config = f"""\
[server]
data_dir = "{self.dir / "data"}"
# One worker process per core, as Dovecot runs one process per core here.
workers = "auto"

[pop3]
listen = ["tcp:{self.port}:interface=127.0.0.1"]

[pop3s]
listen = ["tcp:{self.tls_port}:interface=127.0.0.1"]

[tls]
certificate = "{ws.cert}"
key = "{ws.key}"

[auth]
passwd_file = "{ws.passwd}"
plaintext = "always"

[maildrop]
type = "maildir"
path = "{ws.mail_root}/%u/Maildir"

[limits]
auth_timeout = 3600
transaction_timeout = 3600
max_bad_commands = 1000
max_auth_failures = 1000
# No connection limits (0): the idle scenario holds 10,000 from 127.0.0.1.
max_connections = 0
max_connections_per_ip = 0

[lmtp]
listen = []
"""
        self.config = self.dir / "popd.toml"
        self.config.write_text(config)

    def command(self) -> list[str]:
        twistd = Path(sys.executable).with_name("twistd")
        return [str(twistd), "-n", "--pidfile=", "popd", "--config", str(self.config)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        return env

    def forget(self, user: str) -> None:
        maildir = maildata.maildir_of(self.ws.mail_root, user)
        for name in ("popd-sizes", "popd-retrieved", "popd-uids", "popd-index"):
            (maildir / name).unlink(missing_ok=True)
        # The workers keep snapshots in memory too.
        self.restart()

    def start(self, timeout: float = 60.0) -> None:
        logged = self.log_path.stat().st_size if self.log_path.exists() else 0
        super().start(timeout)
        self.wait_workers(logged)

    def wait_workers(self, logged: int, timeout: float = 30.0) -> None:
        """
        Wait until every worker is running (says so in the log after
        offset C{logged}): one still starting up would take a core from the
        first trial.
        """
        expected = os.cpu_count() or 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path, "rb") as log:
                log.seek(logged)
                text = log.read().decode(errors="replace")
            started = sum(
                f"worker {index} running" in text for index in range(1, expected + 1)
            )
            if started >= expected:
                return
            time.sleep(0.1)
        raise RuntimeError("popd's workers did not all start:\n" + self.log_tail())


class TwistedPOP3(Server):
    name = "twisted"
    label = "twisted.mail.pop3"

    def command(self) -> list[str]:
        ws = self.ws
        return [
            sys.executable,
            str(Path(__file__).with_name("twisted_pop3.py")),
            "--port",
            str(self.port),
            "--tls-port",
            str(self.tls_port),
            "--passwd",
            str(ws.passwd),
            "--mail-root",
            str(ws.mail_root),
            "--cert",
            str(ws.cert),
            "--key",
            str(ws.key),
        ]


def ensure_dovecot() -> str:
    """
    The path of C{dovecot}, installing C{dovecot-pop3d} from Debian's
    packages first if it is absent.
    """
    found = shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None
    )
    if found and os.path.exists("/usr/lib/dovecot/pop3"):
        return found
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "dovecot-pop3d"],
        check=True,
        env=env,
    )
    # Debian's package starts the system instance where it can; ours is
    # separate and never touches it.
    return shutil.which("dovecot") or "/usr/sbin/dovecot"


class Dovecot(Server):
    """
    Dovecot as a site tuned for throughput runs it: login processes serve
    many connections (C{service_count = 0}) and mail processes are reused
    by the next session (all users share one UID), one spare of each per
    core (Dovecot's "high-performance mode").  L{DovecotDefault} keeps
    Dovecot's default: a new login process and a new pop3 process for
    every session, which costs two fork+exec per session.
    """

    name = "dovecot"
    label = "Dovecot"
    process_limit = 12_000
    reuse_processes = True

    def configure(self) -> None:
        self.binary = ensure_dovecot()
        ws = self.ws
        base = self.dir / "base"
        state = self.dir / "state"
        self.index_root = self.dir / "index"
        for path in (base, state, self.index_root):
            path.mkdir(parents=True, exist_ok=True)
        os.chown(self.index_root, ws.uid, ws.gid)
        limit = self.process_limit
        mail_location = (
            f"maildir:{ws.mail_root}/%u/Maildir"
            f":INDEX={self.index_root}/%u:CONTROL={self.index_root}/%u"
        )
        cores = os.cpu_count() or 1
        reuse = ""
        # The pop3 service has a process_limit of its own (1024 by default).
        pop3_service = f"  process_limit = {limit}\n"
        if self.reuse_processes:
            reuse = f"  service_count = 0\n  process_min_avail = {cores}\n"
            # Spare pop3 processes left by the idle scenario go after 10 s.
            pop3_service += f"{reuse}  idle_kill = 10 secs\n"
        pop3_service = f"service pop3 {{\n{pop3_service}}}\n"
        config = f"""\
# A separate Dovecot instance for the popd benchmark; nothing of the
# system's /etc/dovecot is read.
instance_name = popd-bench-{self.port}
base_dir = {base}
state_dir = {state}
protocols = pop3
listen = 127.0.0.1
log_path = {self.dir / "dovecot.log"}
ssl = yes
ssl_cert = <{ws.cert}
ssl_key = <{ws.key}
disable_plaintext_auth = no
auth_mechanisms = plain
first_valid_uid = {ws.uid}
first_valid_gid = {ws.gid}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {ws.passwd}
}}
userdb {{
  driver = passwd-file
  args = username_format=%u {ws.passwd}
}}
# Indexes and uidlists outside the shared tree, so that popd and
# twisted.mail.pop3 see only the messages.
mail_location = {mail_location}
# Room for the idle scenario's sessions (one pop3 process each).
default_process_limit = {limit}
default_client_limit = {limit * 2}
default_vsz_limit = 512M
service pop3-login {{
{reuse}  inet_listener pop3 {{
    address = 127.0.0.1
    port = {self.port}
  }}
  inet_listener pop3s {{
    address = 127.0.0.1
    port = {self.tls_port}
    ssl = yes
  }}
}}
{pop3_service}service anvil {{
  client_limit = {limit * 3}
}}
service auth {{
  client_limit = {limit * 3}
}}
"""
        self.config = self.dir / "dovecot.conf"
        self.config.write_text(config)

    def command(self) -> list[str]:
        return [self.binary, "-F", "-c", str(self.config)]

    def log_tail(self, lines: int = 20) -> str:
        tail = super().log_tail(lines)
        try:
            text = (self.dir / "dovecot.log").read_text(errors="replace")
        except OSError:
            return tail
        return tail + "\n" + "\n".join(text.splitlines()[-lines:])

    def forget(self, user: str) -> None:
        shutil.rmtree(self.index_root / user, ignore_errors=True)


class DovecotDefault(Dovecot):
    name = "dovecot-default"
    label = "Dovecot (defaults)"
    reuse_processes = False


SERVERS = (Popd, Dovecot, TwistedPOP3, DovecotDefault)
