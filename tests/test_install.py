"""
popd as installed by C{pip install .}: twistd finds its plugin from any
directory, without this checkout on the path, and the install does not
take over Twisted's C{twisted.plugins} package with an C{__init__.py}.

Skipped unless popd is installed (not editable) in the environment the
tests run in, as README's test command does.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parent.parent
PLUGIN = "twisted/plugins/popd_plugin.py"


def installed_files() -> list[str]:
    """
    The files of the installed popd distribution, or a skip.
    """
    try:
        recorded = importlib.metadata.distribution("popd").files or []
    except importlib.metadata.PackageNotFoundError:
        recorded = []
    # An editable install records no twisted/plugins/popd_plugin.py.
    files = [str(path).replace(os.sep, "/") for path in recorded]
    if PLUGIN not in files:
        pytest.skip("popd is not installed (run README's test command)")
    return files


def clean_env() -> dict[str, str]:
    """
    The environment without PYTHONPATH, so only the install is seen.
    """
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def run(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        arguments,
        cwd=cwd,
        env=clean_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_twistd_lists_popd(tmp_path):
    installed_files()
    twistd = Path(sys.prefix) / "bin" / "twistd"
    result = run([str(twistd), "--help"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    commands = re.findall(r"^ {4}(\S+)\s", result.stdout, re.MULTILINE)
    assert "popd" in commands, result.stdout
    # Twisted's own plugins are still found next to popd's.
    assert "web" in commands, result.stdout


def test_twistd_popd_help_from_install(tmp_path):
    installed_files()
    twistd = Path(sys.prefix) / "bin" / "twistd"
    result = run([str(twistd), "popd", "--help"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "--config" in result.stdout and "--data-dir" in result.stdout


def test_install_is_not_this_checkout(tmp_path):
    installed_files()
    result = run([sys.executable, "-c", "import popd; print(popd.__file__)"], tmp_path)
    assert result.returncode == 0, result.stderr
    installed = Path(result.stdout.strip()).resolve()
    # The virtual environment may live inside the checkout (README's
    # .venv), so compare with the checkout's package, not the checkout.
    assert installed.parent != REPO / "popd", installed
    assert "site-packages" in installed.parts, installed


def test_no_init_in_twisted_plugins():
    files = installed_files()
    assert "twisted/plugins/__init__.py" not in files
    assert "twisted/__init__.py" not in files
    shipped = [path for path in files if path.startswith("twisted/")]
    assert all(
        path == PLUGIN or path.startswith("twisted/plugins/__pycache__/popd_plugin.")
        for path in shipped
    ), shipped
