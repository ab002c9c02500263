"""
Fixtures for the end-to-end tests: a test CA, and real popd servers
(C{twistd -n popd}) listening on ephemeral loopback ports.

The code behind them is in C{tests/helpers/popd_e2e.py}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The helpers package sits next to this file; make it importable whatever
# import mode pytest runs in.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from helpers.popd_e2e import (  # noqa: E402
    Pki,
    PopdServer,
    ServerFailed,
    config_text,
    make_pki,
)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """
    A test CA and a server certificate for localhost and 127.0.0.1.
    """
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def popd_factory(tmp_path_factory: pytest.TempPathFactory, pki: Pki):
    """
    Start popd servers that live until the end of the module.

    C{popd_factory(name, **options)} writes a configuration from
    L{config_text} C{options} (C{plaintext}, C{trusted_networks}, C{apop},
    C{extra}) with the test certificate (or C{certificates=}), starts
    C{twistd -n popd --config} and returns the running L{PopdServer}.  At
    the end of the module each server is stopped; one that died or logged a
    traceback fails the test that was running then.
    """
    servers: list[PopdServer] = []

    def start(name: str = "popd", *, certificates: Pki | None = None, **options):
        directory = tmp_path_factory.mktemp(name)
        config = directory / "popd.toml"
        # No failure delay unless a test asks (config_text's [auth] is last).
        delay = options.pop("failure_delay", 0)
        options["extra"] = f"failure_delay = {delay}\n" + options.get("extra", "")
        config.write_text(config_text(certificates or pki, **options))
        server = PopdServer(directory, config).start()
        servers.append(server)
        return server

    yield start

    problems = []
    for server in reversed(servers):
        try:
            server.finish()
        except ServerFailed as error:
            problems.append(str(error))
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)
