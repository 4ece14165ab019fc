"""Zero-install end to end: roles started on a host whose Python lacks asyncdist (issue 8, item 4).

The host is the loopback sshd (``SSH_TEST_*``); its bare Python is Debian's
``/usr/bin/python3`` (package ``python3``), which has no asyncdist. ``spawn`` and
``SSHCluster`` ship asyncdist there in a temporary venv, run the roles from it, and
remove it when they stop. The host is this machine, so the test sees that directory.
"""

from __future__ import annotations

import glob
import os
import subprocess
from dataclasses import replace

import pytest
from _ssh import SKIP_REASON, hosts_from_environment
from _util import SCALE, alive, eventually

import asyncdist
from asyncdist.spawn import Host, spawn

BARE_PYTHON = "/usr/bin/python3"
HOSTS = [h for h in hosts_from_environment() if not h.netns]


def _bare_python_lacks_asyncdist() -> bool:
    try:
        done = subprocess.run([BARE_PYTHON, "-c", "import asyncdist"], capture_output=True, timeout=30)
    except OSError:
        return False
    return done.returncode != 0


pytestmark = [
    pytest.mark.skipif(not HOSTS, reason=SKIP_REASON),
    pytest.mark.skipif(
        not _bare_python_lacks_asyncdist(),
        reason=f"{BARE_PYTHON} without asyncdist is needed (Debian: python3)",
    ),
    pytest.mark.timeout(240),  # the first wheelhouse build fetches wheels; later ones use the cache
]


def _ours() -> set[str]:
    return set(glob.glob("/tmp/asyncdist-*"))


async def test_a_spawned_role_runs_from_a_temporary_venv_removed_on_stop() -> None:
    host = HOSTS[0].host
    bare = Host(
        host.host,
        port=host.port,
        username=host.username,
        python=BARE_PYTHON,
        connect_options=host.connect_options,
    )
    before = _ours()
    lines: list[str] = []
    proc = await spawn(
        bare,
        "ns",
        "--port",
        "0",
        secret="zero-install-secret-0123456789",
        output=lambda h, stream, line: lines.append(line),
        connect_timeout=30 * SCALE,
    )
    try:
        made = _ours() - before
        assert len(made) == 1, made
        tempdir = made.pop()
        assert proc.python == f"{tempdir}/venv/bin/python"
        assert proc.role_pid is not None
        with open(f"/proc/{proc.role_pid}/cmdline", "rb") as f:
            assert f.read().split(b"\0")[0].decode() == f"{tempdir}/venv/bin/python"
        await eventually(lambda: any("name server at" in line for line in lines), "the ns did not start")
    finally:
        assert await proc.stop() == 0
    assert not alive(proc.role_pid)
    assert not os.path.exists(tempdir)
    assert _ours() == before


async def test_an_ssh_cluster_ships_asyncdist_once_per_host_and_removes_it() -> None:
    host = HOSTS[0].host
    before = _ours()
    async with asyncdist.SSHCluster(
        [replace(host, python=BARE_PYTHON)],
        workers_per_host=2,
        paradigms=("futures",),
        connect_timeout=30 * SCALE,
    ) as cluster:
        made = _ours() - before
        assert len(made) == 1, made  # one venv for the host's two workers
        async with cluster.pool() as pool:
            assert set(await pool.map(lambda _: __import__("sys").executable, range(8))) == {
                f"{made.pop()}/venv/bin/python"
            }
    assert _ours() == before
