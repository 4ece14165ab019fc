"""asyncdist._deploy: the wheelhouse built here, and asyncdist shipped to a host's bare Python over SSH.

The host is the loopback sshd of ``.ci/ssh-test-host.sh start`` (``SSH_TEST_*``); its
Python without asyncdist is Debian's ``/usr/bin/python3`` (packages ``python3`` and
``python3-venv``). The host is this machine, so the test can look at the remote
directories in its own file system too. Without the host, or without that Python,
the SSH tests are skipped. The first wheelhouse build fetches wheels with pip
(PyPI); later runs find them in ``~/.cache/asyncdist``.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import time
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncssh
import pytest
from _ssh import SKIP_REASON, hosts_from_environment
from _util import SCALE, eventually

import asyncdist
from asyncdist._deploy import (
    RemoteEnv,
    _check_interpreter,
    _platform_fits,
    _record_hash,
    _repack_installed,
    build_wheelhouse,
    cleanup_remote,
    ensure_remote_python,
    remote_python,
    wheelhouse_dir,
)
from asyncdist.errors import DeployError
from asyncdist.spawn import connect_host

pytestmark = pytest.mark.timeout(int(60 * SCALE))

HOSTS = [h for h in hosts_from_environment() if not h.netns]
BARE_PYTHON = "/usr/bin/python3"
#: The distributions a deployed asyncdist needs here (the closure of its requirements, and pip).
EXPECTED = {"asyncdist", "msgpack", "uvloop", "cryptography", "asyncssh", "cloudpickle", "tqdm", "cffi"}
EXPECTED |= {"pycparser", "typing-extensions", "pip"}
#: The first build downloads ~12 MB of wheels: the test that pays for it gets more time.
BUILD_TIMEOUT = int(240 * SCALE)
DEPLOY_TIMEOUT = 90 * SCALE


def _python_works(*modules: str) -> bool:
    if not os.access(BARE_PYTHON, os.X_OK):
        return False
    code = "; ".join(f"import {m}" for m in modules)
    done = subprocess.run([BARE_PYTHON, "-c", code], capture_output=True, cwd="/", check=False)
    return done.returncode == 0


BARE_SKIP = f"{BARE_PYTHON} with venv (Debian: apt-get install python3 python3-venv) is needed"
needs_bare_python = pytest.mark.skipif(not _python_works("venv"), reason=BARE_SKIP)


def _canonical(filename: str) -> str:
    return filename.split("-")[0].replace("_", "-").lower()


@pytest.fixture(scope="session")
def wheelhouse() -> list[Path]:
    """The wheelhouse of this environment (built once, then cached in ~/.cache/asyncdist)."""
    return build_wheelhouse()


@pytest.fixture
async def conn() -> AsyncIterator[asyncssh.SSHClientConnection]:
    """An SSH connection to the loopback test host; skip when there is none."""
    if not HOSTS:
        pytest.skip(SKIP_REASON)
    connection = await connect_host(HOSTS[0].host, connect_timeout=10 * SCALE)
    try:
        yield connection
    finally:
        connection.close()
        await connection.wait_closed()


async def _sh(conn: asyncssh.SSHClientConnection, command: str) -> asyncssh.SSHCompletedProcess:
    return await conn.run(command, check=False, encoding="utf-8")


async def _our_tempdirs(conn: asyncssh.SSHClientConnection) -> set[str]:
    done = await _sh(conn, 'for d in "${TMPDIR:-/tmp}"/asyncdist-*; do [ -d "$d" ] && echo "$d"; done')
    return {d for d in str(done.stdout).split() if re.fullmatch(r".*/asyncdist-[A-Za-z0-9]{10}", d)}


# -- the wheelhouse ------------------------------------------------------------------------------------


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_wheelhouse_has_asyncdist_and_every_dependency(wheelhouse: list[Path]) -> None:
    names = [_canonical(w.name) for w in wheelhouse]
    assert set(names) == EXPECTED
    assert len(names) == len(set(names))
    assert all(w.parent == wheelhouse_dir() and w.is_file() for w in wheelhouse)
    tag = f"cp{sys.version_info[0]}{sys.version_info[1]}"
    for compiled in ("msgpack", "uvloop", "cryptography", "cffi"):
        (wheel,) = [w for w in wheelhouse if _canonical(w.name) == compiled]
        assert f"-{tag}-" in wheel.name, wheel.name
        assert "manylinux" in wheel.name, wheel.name
    for wheel in wheelhouse:  # each in the version installed here
        name = _canonical(wheel.name)
        if name != "asyncdist":
            assert wheel.name.split("-")[1] == importlib.metadata.version(name)


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_own_wheel_is_the_running_source_with_every_subpackage(wheelhouse: list[Path]) -> None:
    (own,) = [w for w in wheelhouse if w.name.startswith("asyncdist-")]
    assert own.name == f"asyncdist-{asyncdist.__version__}-py3-none-any.whl"
    package = Path(asyncdist.__file__).parent
    with zipfile.ZipFile(own) as archive:
        names = set(archive.namelist())
        for sub in ("futures", "objects", "naming", "csp", "mapreduce", "rpc"):
            assert f"asyncdist/{sub}/__init__.py" in names
        assert "asyncdist/py.typed" in names
        assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
        assert archive.read("asyncdist/spawn.py") == (package / "spawn.py").read_bytes()
        info = f"asyncdist-{asyncdist.__version__}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
        assert "Requires-Dist: msgpack" in metadata
        assert "Requires-Dist: asyncssh" in metadata
        assert "asyncdist.cli:main" in archive.read(f"{info}/entry_points.txt").decode()
        _check_record(archive, info)


def _check_record(archive: zipfile.ZipFile, info: str) -> None:
    rows = [line.split(",") for line in archive.read(f"{info}/RECORD").decode().splitlines()]
    listed = {row[0] for row in rows}
    assert listed == set(archive.namelist())
    for name, digest, size in rows:
        if name != f"{info}/RECORD":
            data = archive.read(name)
            assert (digest, int(size)) == (_record_hash(data), len(data)), name


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_second_build_comes_from_the_cache(wheelhouse: list[Path], tmp_path: Path) -> None:
    stamps = {w: w.stat().st_mtime_ns for w in wheelhouse}
    started = time.perf_counter()
    again = build_wheelhouse()
    assert time.perf_counter() - started < 5 * SCALE
    assert again == wheelhouse
    assert {w: w.stat().st_mtime_ns for w in again} == stamps  # nothing fetched or rewritten
    copies = build_wheelhouse(tmp_path / "house")  # another directory: linked from the cache
    assert sorted(c.name for c in copies) == sorted(w.name for w in wheelhouse)
    assert all(c.parent == tmp_path / "house" for c in copies)
    for copy in copies:
        original = wheelhouse_dir() / copy.name
        assert copy.read_bytes() == original.read_bytes()


def test_repack_an_installed_compiled_distribution(tmp_path: Path) -> None:
    """The fallback when pip cannot download a wheel: the installed files, with their tags."""
    dist = importlib.metadata.distribution("msgpack")
    wheel = _repack_installed(dist, tmp_path)
    assert wheel.name.startswith(f"msgpack-{dist.version}-cp3")
    assert "manylinux" in wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert any(n.startswith("msgpack/") and n.endswith(".so") for n in names)
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        assert not [n for n in names if n.endswith((".pyc", "/INSTALLER", "/direct_url.json"))]
        _check_record(archive, info)
    assert _repack_installed(dist, tmp_path).read_bytes() == wheel.read_bytes()  # reproducible


def test_platform_tags_against_the_host_libc() -> None:
    glibc236 = ("glibc", (2, 36))
    assert _platform_fits("any", "x86_64", glibc236)
    assert _platform_fits("manylinux_2_34_x86_64", "x86_64", glibc236)
    assert not _platform_fits("manylinux_2_34_x86_64", "x86_64", ("glibc", (2, 31)))
    assert _platform_fits("manylinux2014_x86_64", "x86_64", ("glibc", (2, 17)))
    assert not _platform_fits("manylinux2014_x86_64", "aarch64", glibc236)
    assert not _platform_fits("manylinux_2_17_x86_64", "x86_64", ("", ()))  # musl, say


def test_a_python_of_another_version_is_refused_before_any_upload() -> None:
    info = {"implementation": sys.implementation.name, "version": [3, 99], "machine": "x86_64"}
    with pytest.raises(DeployError) as caught:
        _check_interpreter("node7", "/opt/py/bin/python3", info)
    assert caught.value.host == "node7"
    assert "3.99" in caught.value.reason
    assert "install asyncdist on the host" in caught.value.reason


# -- over SSH ------------------------------------------------------------------------------------------


@needs_bare_python
@pytest.mark.timeout(BUILD_TIMEOUT)
async def test_ships_asyncdist_to_a_bare_python_and_removes_it(
    conn: asyncssh.SSHClientConnection, wheelhouse: list[Path]
) -> None:
    assert not _python_works("asyncdist")  # run from /: the bare Python really lacks it
    before = await _our_tempdirs(conn)
    assert wheelhouse  # built: ensure_remote_python finds it in the cache (in a thread)
    env = await ensure_remote_python(conn, "loopback", BARE_PYTHON, DEPLOY_TIMEOUT)
    assert env.deployed
    assert env.host == "loopback"
    assert env.tempdir is not None
    assert env.python == f"{env.tempdir}/venv/bin/python"
    assert await _our_tempdirs(conn) == before | {env.tempdir}
    assert oct(os.stat(env.tempdir).st_mode & 0o777) == "0o700"
    code = "import asyncdist, uvloop, msgpack, cryptography, asyncssh; print(asyncdist.__version__)"
    done = await _sh(conn, f"cd / && {shlex.quote(env.python)} -c {shlex.quote(code)}")
    assert (done.exit_status, str(done.stdout).strip()) == (0, asyncdist.__version__), done.stderr
    base = await _sh(conn, f"{shlex.quote(env.python)} -c 'import sys; print(sys.base_prefix)'")
    assert str(base.stdout).strip() == "/usr"  # Debian's Python, not this venv's

    await cleanup_remote(conn, env)
    assert await _our_tempdirs(conn) == before
    assert (await _sh(conn, f"test -e {shlex.quote(env.tempdir)}")).exit_status == 1
    await cleanup_remote(conn, env)  # idempotent


async def test_a_python_that_has_asyncdist_is_used_as_it_is(conn: asyncssh.SSHClientConnection) -> None:
    before = await _our_tempdirs(conn)
    env = await ensure_remote_python(conn, "loopback", sys.executable, 30 * SCALE, wheelhouse=[])
    assert env == RemoteEnv(sys.executable, None, "loopback")
    assert not env.deployed
    assert await _our_tempdirs(conn) == before  # nothing made, nothing uploaded
    await cleanup_remote(conn, env)  # nothing to do


async def test_a_missing_interpreter_is_a_deploy_error_naming_the_host(
    conn: asyncssh.SSHClientConnection,
) -> None:
    with pytest.raises(DeployError) as caught:
        await ensure_remote_python(conn, "node-x", "/nonexistent/bin/python3", 30 * SCALE, wheelhouse=[])
    assert caught.value.host == "node-x"
    assert caught.value.reason.startswith("no Python at /nonexistent/bin/python3")
    assert str(caught.value).startswith("node-x: no Python at")
    with pytest.raises(ValueError, match="absolute path"):
        await ensure_remote_python(conn, "node-x", "python3", 30 * SCALE)


@needs_bare_python
@pytest.mark.timeout(BUILD_TIMEOUT)
async def test_no_ensurepip_is_needed(
    conn: asyncssh.SSHClientConnection, wheelhouse: list[Path], tmp_path: Path
) -> None:
    """A Python without ensurepip (Debian without python3-venv) gets a venv all the same."""
    hidden = tmp_path / "hide" / "ensurepip"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('ensurepip is not installed here')\n")
    wrapper = tmp_path / "python3"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={tmp_path / "hide"} exec {BARE_PYTHON} "$@"\n')
    wrapper.chmod(0o755)
    assert (await _sh(conn, f"{wrapper} -c 'import ensurepip'")).exit_status == 1
    async with remote_python(conn, "loopback", str(wrapper), DEPLOY_TIMEOUT, wheelhouse=wheelhouse) as env:
        assert env.deployed
        assert env.tempdir is not None
        done = await _sh(conn, f"{shlex.quote(env.python)} -c 'import asyncdist.futures'")
        assert done.exit_status == 0, done.stderr
    assert not os.path.exists(env.tempdir)


@needs_bare_python
@pytest.mark.timeout(BUILD_TIMEOUT)
async def test_a_failed_install_names_the_step_and_leaves_nothing(
    conn: asyncssh.SSHClientConnection, wheelhouse: list[Path]
) -> None:
    before = await _our_tempdirs(conn)
    incomplete = [w for w in wheelhouse if _canonical(w.name) != "msgpack"]
    with pytest.raises(DeployError) as caught:
        await ensure_remote_python(conn, "node-y", BARE_PYTHON, DEPLOY_TIMEOUT, wheelhouse=incomplete)
    assert caught.value.host == "node-y"
    assert "pip install asyncdist failed" in caught.value.reason
    assert "msgpack" in caught.value.reason
    assert await _our_tempdirs(conn) == before


@needs_bare_python
@pytest.mark.skipif(not _python_works("ensurepip"), reason=BARE_SKIP)
@pytest.mark.timeout(BUILD_TIMEOUT)
async def test_without_a_pip_wheel_the_venv_gets_pip_from_ensurepip(
    conn: asyncssh.SSHClientConnection, wheelhouse: list[Path]
) -> None:
    no_pip = [w for w in wheelhouse if _canonical(w.name) != "pip"]
    async with remote_python(conn, "loopback", BARE_PYTHON, DEPLOY_TIMEOUT, wheelhouse=no_pip) as env:
        done = await _sh(conn, f"{shlex.quote(env.python)} -m pip --version")
        assert done.exit_status == 0
        assert env.tempdir is not None
        assert env.tempdir in str(done.stdout)


async def test_cleanup_refuses_a_directory_it_did_not_make(
    conn: asyncssh.SSHClientConnection, tmp_path: Path
) -> None:
    (tmp_path / "keep").write_text("precious")
    with pytest.raises(DeployError, match="refusing"):
        await cleanup_remote(conn, RemoteEnv("/x/bin/python", str(tmp_path), "loopback"))
    made = await _sh(conn, 'mktemp -d "${TMPDIR:-/tmp}/asyncdist-XXXXXXXXXX"')  # our name, no marker
    unmarked = str(made.stdout).strip()
    try:
        with pytest.raises(DeployError, match="marker") as caught:
            await cleanup_remote(conn, RemoteEnv("/x/bin/python", unmarked, "loopback"))
        assert caught.value.host == "loopback"
        assert os.path.isdir(unmarked)
    finally:
        os.rmdir(unmarked)
    with pytest.raises(DeployError, match="refusing"):
        await cleanup_remote(conn, RemoteEnv("/x/bin/python", "/tmp/asyncdist-abcdefghij/../x", "h"))
    assert (tmp_path / "keep").read_text() == "precious"


async def test_a_host_that_does_not_answer_in_time(conn: asyncssh.SSHClientConnection) -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(DeployError, match="probing /usr/bin/python3: not done within") as caught:
        await ensure_remote_python(conn, "slow", BARE_PYTHON, 0.001, wheelhouse=[])
    assert caught.value.host == "slow"
    assert asyncio.get_running_loop().time() - started < 5 * SCALE


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


@needs_bare_python
@pytest.mark.timeout(BUILD_TIMEOUT)
async def test_a_step_that_hangs_is_killed_and_its_directory_removed(
    conn: asyncssh.SSHClientConnection, wheelhouse: list[Path], tmp_path: Path
) -> None:
    """On timeout the step under way is killed there (its process group), then the directory goes."""
    wrapper = tmp_path / "python3"
    wrapper.write_text(
        f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = venv ]; then sleep 60; fi\nexec {BARE_PYTHON} "$@"\n'
    )
    wrapper.chmod(0o755)
    before = await _our_tempdirs(conn)
    bound = 4 * SCALE
    started = asyncio.get_running_loop().time()
    with pytest.raises(DeployError) as caught:
        await ensure_remote_python(conn, "node-z", str(wrapper), bound, wheelhouse=wheelhouse)
    assert caught.value.host == "node-z"
    assert caught.value.reason == f"creating a venv: not done within {bound:g} s"
    assert asyncio.get_running_loop().time() - started < bound + 5 * SCALE
    assert await _our_tempdirs(conn) == before
    await eventually(lambda: not _processes_mentioning(str(wrapper)), "the hung step still runs there")
