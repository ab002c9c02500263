"""
End to end: real C{twistd -n popd} servers whose users come from checker
plug-ins, given with C{--auth} or C{[auth] checkers}, and poplib logging in
through them: Twisted's own C{file:} and C{memory:}, popd's C{sql},
C{checkpassword} and C{pam}, several in a chain, and a site's own plug-in
installed as a dropin on the server's PYTHONPATH (the one in README.md).
"""

from __future__ import annotations

import json
import os
import poplib
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from helpers.popd_e2e import (
    REPO,
    PopdServer,
    ServerFailed,
    config_text,
    popd_env,
    twistd_command,
)

from popd.auth.schemes import hash_password

CHEAP = {"scheme": "SHA512-CRYPT", "rounds": 1000}


def cheap_hash(password: str) -> str:
    return hash_password(password.encode(), **CHEAP)


@pytest.fixture
def start(tmp_path, pki, monkeypatch):
    """
    C{start(extra_auth_lines, *arguments, pythonpath=None)}: a popd with
    the test certificate, no failure delay, and C{extra_auth_lines} in its
    [auth] section; stopped (and checked for tracebacks) at the end.
    """
    servers: list[PopdServer] = []

    def start_server(auth: str = "", *arguments: str, pythonpath: str | None = None):
        directory = tmp_path / f"server{len(servers)}"
        directory.mkdir()
        config = directory / "popd.toml"
        config.write_text(config_text(pki, extra="failure_delay = 0\n" + auth))
        if pythonpath is not None:
            monkeypatch.setenv("PYTHONPATH", pythonpath)
        server = PopdServer(directory, config, arguments).start()
        servers.append(server)
        return server

    yield start_server
    problems = []
    for server in servers:
        try:
            server.finish()
        except ServerFailed as error:
            problems.append(str(error))
    assert not problems, "\n\n".join(problems)


def login(server: PopdServer, user: str, password: str) -> bytes:
    """
    USER/PASS from loopback (a trusted network); the PASS reply.
    """
    client = server.poplib()
    try:
        client.user(user)
        reply = client.pass_(password)
        client.stat()
        client.quit()
        return reply
    finally:
        client.close()


def refused(server: PopdServer, user: str, password: str) -> str:
    client = server.poplib()
    try:
        client.user(user)
        with pytest.raises(poplib.error_proto) as error:
            client.pass_(password)
        return error.value.args[0].decode()
    finally:
        client.close()


# Twisted's own checkers


def test_twisted_file_checker_with_auth_option(start, tmp_path):
    users = tmp_path / "users.txt"
    users.write_text("alice:secret\n")
    server = start("", "--auth", f"file:{users}")
    assert login(server, "alice", "secret").startswith(b"+OK Logged in, 0 messages")
    assert refused(server, "alice", "wrong") == "-ERR [AUTH] Authentication failed."


def test_auth_option_replaces_the_configured_checkers(start, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text(f"carol:{cheap_hash('carol-pw')}\n")
    server = start(
        f"checkers = [{json.dumps('passwd-file:' + str(passwd))}]\n",
        "--auth",
        "memory:alice:secret",
        "--auth",
        "memory:bob:hunter2",
    )
    assert login(server, "alice", "secret").startswith(b"+OK Logged in")
    assert login(server, "bob", "hunter2").startswith(b"+OK Logged in")
    assert refused(server, "carol", "carol-pw").startswith("-ERR [AUTH]")


# popd's checkers from the configuration, in a chain


def test_passwd_file_then_sql(start, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.write_text(f"alice:{cheap_hash('alice-pw')}\n")
    database = tmp_path / "users.db"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE users (username TEXT, password TEXT)")
        db.execute("INSERT INTO users VALUES ('bob', ?)", (cheap_hash("bob-pw"),))
    server = start(
        f"checkers = [{json.dumps('passwd-file:' + str(passwd))}, 'sql']\n"
        f"sql_dsn = {json.dumps(f'sqlite:///{database}')}\n"
    )
    assert login(server, "alice", "alice-pw").startswith(b"+OK Logged in")
    assert login(server, "bob", "bob-pw").startswith(b"+OK Logged in")
    for user, password in [("alice", "bob-pw"), ("bob", "x"), ("eve", "alice-pw")]:
        assert refused(server, user, password) == "-ERR [AUTH] Authentication failed."
    assert "users from passwd-file, sql" in server.output()


CHECKPASSWORD = """\
#!{python}
import os, sys
user, password, stamp = os.read(3, 512).split(b"\\0")[:3]
if user == b"busy":
    sys.exit(111)
if (user, password) == (b"alice", b"from-checkpassword"):
    os.execvp(sys.argv[1], sys.argv[1:])
sys.exit(1)
"""


def test_checkpassword(start, tmp_path):
    program = tmp_path / "checkpassword"
    program.write_text(CHECKPASSWORD.format(python=sys.executable))
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    server = start(f"checkers = [{json.dumps(f'checkpassword:{program}')}]\n")
    assert login(server, "alice", "from-checkpassword").startswith(b"+OK Logged in")
    assert refused(server, "alice", "wrong") == "-ERR [AUTH] Authentication failed."
    assert refused(server, "busy", "x") == (
        "-ERR [SYS/TEMP] Authentication is temporarily unavailable."
    )


def test_pam(start, tmp_path):
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to make a PAM service and a user")
    try:
        import pamela  # noqa: F401
    except (ImportError, OSError) as error:
        pytest.skip(f"pamela or libpam is missing: {error}")
    service = f"popd-e2e-{uuid.uuid4().hex[:8]}"
    user = f"popde{uuid.uuid4().hex[:8]}"
    pam_file = Path("/etc/pam.d") / service
    pam_file.write_text(
        "auth required pam_unix.so nodelay\naccount required pam_unix.so\n"
    )
    try:
        subprocess.run(
            ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
            check=True,
            capture_output=True,
            timeout=60,
        )
        subprocess.run(
            ["chpasswd"],
            input=f"{user}:pam e2e pw\n",
            text=True,
            check=True,
            capture_output=True,
            timeout=60,
        )
        server = start("", "--auth", f"pam:{service}")
        assert login(server, user, "pam e2e pw").startswith(b"+OK Logged in")
        assert refused(server, user, "wrong").startswith("-ERR [AUTH]")
        assert refused(server, user + "x", "pam e2e pw").startswith("-ERR [AUTH]")
    finally:
        subprocess.run(["userdel", user], capture_output=True, timeout=60)
        pam_file.unlink(missing_ok=True)


# A site's own plug-in


def readme_dropin() -> str:
    """
    The dropin of README.md's "Write your own checker" section.
    """
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Write your own checker", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert "twisted/plugins/site_checker.py" in code
    return code


def test_site_checker_dropin_from_the_readme(start, tmp_path):
    site = tmp_path / "site"
    plugins = site / "twisted" / "plugins"
    plugins.mkdir(parents=True)
    (plugins / "site_checker.py").write_text(readme_dropin())
    users = tmp_path / "users.json"
    users.write_text(json.dumps({"alice": cheap_hash("site-pw")}))
    server = start("", "--auth", f"site:{users}", pythonpath=str(site))
    assert login(server, "alice", "site-pw").startswith(b"+OK Logged in, 0 messages")
    assert refused(server, "alice", "wrong") == "-ERR [AUTH] Authentication failed."
    assert refused(server, "bob", "site-pw") == "-ERR [AUTH] Authentication failed."
    # Listing the plug-ins shows the site's next to popd's.
    listing = subprocess.run(
        twistd_command("--help-auth"),
        cwd=tmp_path,
        env={**popd_env(), "PYTHONPATH": f"{REPO}{os.pathsep}{site}"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert re.search(r"^\s+site\s", listing.stdout, re.MULTILINE), listing
    assert re.search(r"^\s+passwd-file\s", listing.stdout, re.MULTILINE)


# Mistakes


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--auth", "nosuch:x"], "popd: --auth: no checker plug-in named 'nosuch'"),
        (["--auth", "anonymous"], "popd: --auth: anonymous does not check passwords"),
        (["--auth", "passwd-file:"], "popd: --auth 'passwd-file:': passwd-file needs"),
    ],
)
def test_bad_auth_option_is_one_line(tmp_path, arguments, message):
    result = subprocess.run(
        twistd_command(*arguments),
        cwd=tmp_path,
        env=popd_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert message in output, output
    assert "Traceback" not in output and "Usage:" not in output
