"""The command line: python -m asyncdist and the asyncdist entry points (real subprocesses)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import asyncdist
from asyncdist.cli import main


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "asyncdist", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"asyncdist {asyncdist.__version__}"


def test_certs_writes_a_usable_pki(tmp_path: Path) -> None:
    result = _run("certs", str(tmp_path / "pki"), "--hostname", "node1", "--hostname", "127.0.0.1")
    assert result.returncode == 0, result.stderr
    assert "node1, 127.0.0.1" in result.stdout
    for name in ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"):
        assert (tmp_path / "pki" / name).exists()
    again = _run("certs", str(tmp_path / "pki"))
    assert again.returncode == 1
    assert "refusing to overwrite" in again.stderr


def test_secret_prints_or_writes_a_0600_file(tmp_path: Path) -> None:
    printed = _run("secret")
    assert printed.returncode == 0
    assert len(printed.stdout.strip()) >= 32
    target = tmp_path / "cluster.secret"
    assert main(["secret", "--file", str(target)]) == 0
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert len(target.read_text().strip()) >= 32


def test_no_command_prints_help() -> None:
    result = _run()
    assert result.returncode == 2
    assert "usage: asyncdist" in result.stdout
