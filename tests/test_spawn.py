"""asyncdist.spawn against real OpenSSH servers: roles started on "hosts" over SSH, and stopped for sure.

The hosts are made by ``.ci/ssh-test-host.sh start`` (an sshd on 127.0.0.1) and, when
set, ``.ci/netns-hosts.sh up N`` (an sshd per network namespace, each with its own IP);
without either the tests are skipped. They are this machine, so a remote process is
checked by its pid in ``/proc``. Logins are root's: OpenSSH ignores SSH signal requests
for root, so every stop here goes through stdin EOF or the process-group kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import asyncssh
import pytest
from _ssh import (
    SKIP_REASON,
    Lines,
    SSHHost,
    bound,
    comm,
    environ,
    gone,
    group_members,
    hosts_from_environment,
    identity,
    kill_if_alive,
    read_proc,
    run_until,
    stat_fields,
)
from _util import SCALE, alive, eventually, free_port
from _util import stop as stop_subprocess

from asyncdist import AuthenticationError, NamingError, Pool, locate_ns, rpc
from asyncdist.errors import DeployError
from asyncdist.futures import serve_broker
from asyncdist.spawn import Host, RemoteProcess, connect_host, spawn

pytestmark = pytest.mark.timeout(int(40 * SCALE))

HOSTS = hosts_from_environment()
SECRET = "spawn-test-secret-0123456789abcdef-zyxw"
STOP = 2.0  # the stop() timeout the tests use: a stop returns within about 2 * STOP


# -- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture
def ssh_hosts() -> list[SSHHost]:
    """Every test host (loopback first, then the namespace hosts); skip when there is none."""
    if not HOSTS:
        pytest.skip(SKIP_REASON)
    return HOSTS


@pytest.fixture
def ssh_host(ssh_hosts: list[SSHHost]) -> SSHHost:
    """One test host (the loopback sshd when there is one)."""
    return ssh_hosts[0]


_HOST_PARAMS: list[SSHHost | None] = [*HOSTS] or [None]


@pytest.fixture(params=_HOST_PARAMS, ids=[h.id for h in HOSTS] or ["no-hosts"])
def each_host(request: pytest.FixtureRequest) -> SSHHost:
    """Each test host in turn."""
    if request.param is None:
        pytest.skip(SKIP_REASON)
    host: SSHHost = request.param
    return host


@pytest.fixture
def remote() -> Iterator[list[tuple[int, str]]]:
    """Remote processes a test started (``identity(pid)``): none may be alive after it."""
    started: list[tuple[int, str]] = []
    yield started
    left = kill_if_alive(started)
    assert not left, f"remote processes left running (now killed): {left}"


SERVICE = '''
import os, socket, subprocess, sys, time
from asyncdist.rpc import Service

if os.environ.get("SPAWNSVC_CHATTY"):
    print("first line", flush=True)
    sys.stdout.write("second ")  # one line written in two pieces
    sys.stdout.flush()
    time.sleep(0.2)
    sys.stdout.write("line\\n")
    sys.stdout.flush()
    print("a line on stderr", file=sys.stderr, flush=True)


class Svc(Service):
    def exposed_info(self):
        return {"cwd": os.getcwd(), "mark": os.environ.get("SPAWNSVC_MARK"), "pid": os.getpid(),
                "pgid": os.getpgid(0), "hostname": socket.gethostname()}

    def exposed_child(self, quiet):
        """Start a child in this role's process group; ``quiet``: it holds none of the SSH channel's pipes."""
        null = subprocess.DEVNULL
        kw = {"stdin": null, "stdout": null, "stderr": null} if quiet else {}
        return subprocess.Popen(["sleep", "300"], **kw).pid
'''


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    """A directory with the module ``spawnsvc`` (an RPC service); a role started there can import it."""
    (tmp_path / "spawnsvc.py").write_text(SERVICE)
    return tmp_path


@contextlib.asynccontextmanager
async def running(
    h: SSHHost, role: str, *args: str, remote: list[tuple[int, str]], host: Host | None = None, **kw: Any
) -> AsyncIterator[RemoteProcess]:
    """spawn() the role, remember its pid, and stop it on the way out."""
    p = await spawn(host or h.host, role, *args, **kw)
    assert p.pid is not None
    remote.append(identity(p.pid))
    try:
        yield p
    finally:
        await p.stop(timeout=bound(STOP))


async def rpc_port(lines: Lines) -> int:
    return int((await lines.wait_for(r"asyncdist rpc spawnsvc:Svc listening on [\d.]+:(\d+)"))[1])


async def stop_timed(p: RemoteProcess) -> tuple[int | None, float]:
    t0 = time.monotonic()
    code = await p.stop(timeout=bound(STOP))
    return code, time.monotonic() - t0


# -- a role runs on the host, and stop() ends it ------------------------------------------------------


async def test_role_runs_on_the_host_and_stop_ends_it(each_host: SSHHost, remote: list[Any]) -> None:
    h = each_host
    lines = Lines()
    async with running(
        h, "ns", "--host", h.ip, "--port", "0", secret=SECRET, output=lines, remote=remote
    ) as p:
        m = await lines.wait_for(rf"^asyncdist name server at (adist:\S+@{h.ip}:(\d+))")
        assert lines.seen[0][:2] == (h.host, "stdout")  # output= gets the Host, the stream, the line
        assert p.pid is not None
        assert p.pgid is not None
        assert alive(p.pid)
        cmdline = read_proc(p.pid, "cmdline").split(b"\0")
        assert cmdline[:7] == [
            sys.executable.encode(),
            b"-u",
            b"-m",
            b"asyncdist.spawn",
            b"--child",
            b"ns",
            b"--host",
        ]
        # Started by that host's sshd, as the leader of its own session and process group.
        assert comm(int(stat_fields(p.pid)[1])) == "sshd"
        assert p.pgid == p.pid == int(stat_fields(p.pid)[3])
        ssh_connection = environ(p.pid)["SSH_CONNECTION"].split()
        assert ssh_connection[2:] == [h.ip, str(h.host.port)]
        same_net = os.readlink(f"/proc/{p.pid}/ns/net") == os.readlink("/proc/self/ns/net")
        assert same_net is not h.netns
        async with locate_ns(h.ip, int(m[2]), secret=SECRET) as ns:
            assert await ns.ping() is None
            await ns.register("spawned.thing", f"adist:thing@{h.ip}:1")
            assert await ns.lookup("spawned.thing") == f"adist:thing@{h.ip}:1"
        assert p.returncode is None
        code, elapsed = await stop_timed(p)
        assert code == 0  # it stopped cleanly (SIGTERM from its guard once stdin closed)
        assert elapsed < bound(STOP), elapsed  # the stdin EOF path: no group kill was needed
        assert not alive(p.pid)
        assert group_members(p.pid) == []
        assert await p.stop() == 0  # idempotent


async def test_stop_kills_the_whole_process_group_when_children_hold_the_channel(
    ssh_host: SSHHost, service_dir: Path, remote: list[Any]
) -> None:
    """A child that keeps the channel's stdout open keeps the channel open too: stop() kills the group."""
    h = ssh_host
    lines = Lines()
    host = replace(h.host, cwd=str(service_dir))
    service = ("rpc", "--service", "spawnsvc:Svc", "--host", h.ip, "--port", "0")
    async with running(h, *service, host=host, secret=SECRET, output=lines, remote=remote) as p:
        async with rpc.connect(h.ip, await rpc_port(lines), secret=SECRET) as conn:
            children = [await conn.root.child(False), await conn.root.child(False)]
        remote.extend(identity(c) for c in children)
        assert p.pgid is not None
        assert set(group_members(p.pgid)) == {p.pid, p.role_pid, *children}
        _code, elapsed = await stop_timed(p)
        # stdin EOF ends the role; the children hold stdout, so the group is killed after STOP s.
        assert elapsed < 2 * bound(STOP) + bound(1.0), elapsed
        assert group_members(p.pgid) == []
        assert not any(alive(c) for c in [p.pid, *children])


async def test_stop_kills_the_whole_process_group_when_children_are_detached_from_the_channel(
    ssh_host: SSHHost, service_dir: Path, remote: list[Any]
) -> None:
    h = ssh_host
    lines = Lines()
    host = replace(h.host, cwd=str(service_dir))
    service = ("rpc", "--service", "spawnsvc:Svc", "--host", h.ip, "--port", "0")
    child = None
    try:
        async with running(h, *service, host=host, secret=SECRET, output=lines, remote=remote) as p:
            async with rpc.connect(h.ip, await rpc_port(lines), secret=SECRET) as conn:
                child = identity(await conn.root.child(True))
            assert p.pid is not None
            assert p.pgid is not None
            assert child[0] in group_members(p.pgid)
            await p.stop(timeout=bound(STOP))
            await gone(p.pid, "the role")
        assert await run_until(lambda: not alive(child[0]), 1.0), (
            f"child {child[0]} of the role survived stop()"
        )
    finally:
        if child is not None:
            kill_if_alive([child])


# -- the secret ---------------------------------------------------------------------------------------


async def test_secret_is_not_on_a_command_line_nor_in_the_ssh_environment(
    ssh_host: SSHHost, remote: list[Any]
) -> None:
    h = ssh_host
    lines = Lines()
    async with running(
        h, "ns", "--host", h.ip, "--port", "0", secret=SECRET, output=lines, remote=remote
    ) as p:
        port = int((await lines.wait_for(rf"name server at adist:\S+@{h.ip}:(\d+)"))[1])
        assert p.pid is not None
        secret = SECRET.encode()
        on_command_lines = [
            pid for pid in os.listdir("/proc") if pid.isdigit() and secret in read_proc(int(pid), "cmdline")
        ]
        assert on_command_lines == []
        env = environ(p.pid)
        assert "SSH_CONNECTION" in env  # this is the environment sshd gave the session
        assert "ASYNCDIST_SECRET" not in env
        assert secret not in read_proc(p.pid, "environ")
        if h.log and os.path.exists(h.log):
            assert SECRET not in Path(h.log).read_text(errors="replace")
        # ... and yet the remote name server has it: the right secret works, a wrong one does not.
        async with locate_ns(h.ip, port, secret=SECRET) as ns:
            assert await ns.ping() is None
        with pytest.raises((NamingError, AuthenticationError)) as info:
            async with locate_ns(h.ip, port, secret="a-wrong-secret-0123456789abcdef-0123"):
                pass
        assert isinstance(info.value, AuthenticationError) or isinstance(
            info.value.__cause__, AuthenticationError
        ), repr(info.value)


async def test_remote_worker_joins_a_local_broker_with_the_secret(
    ssh_host: SSHHost, remote: list[Any]
) -> None:
    """The worker role connects back to a broker in this process, authenticated by the secret from stdin."""
    h = ssh_host
    _, server = await serve_broker(h.local_ip, 0, secret=SECRET)
    try:
        address = f"{h.local_ip}:{server.port}"
        args = ("worker", "--broker", address, "--name", "spawned-worker")
        async with (
            Pool(broker=address, secret=SECRET) as pool,
            running(h, *args, secret=SECRET, output=Lines(), remote=remote) as p,
        ):

            async def joined() -> bool:
                return [w["pid"] for w in (await pool.status())["workers"]] == [p.role_pid]

            await eventually(joined, "the spawned worker did not join the broker", timeout=10.0)
            assert await pool.submit(os.getpid) == p.role_pid
            code, elapsed = await stop_timed(p)
            assert code == 0
            assert elapsed < bound(STOP), elapsed

            async def left() -> bool:
                workers: list[Any] = (await pool.status())["workers"]
                return workers == []

            await eventually(left, "the stopped worker is still joined")
    finally:
        await server.aclose()


# -- F28: the remote role does not outlive its launcher -------------------------------------------------


async def test_connection_drop_ends_the_remote_role(ssh_host: SSHHost, remote: list[Any]) -> None:
    h = ssh_host
    conn = await connect_host(h.host)
    try:
        p = await spawn(h.host, "ns", "--port", "0", connection=conn, secret=SECRET, output=Lines())
        assert p.pid is not None
        remote.append(identity(p.pid))
        t0 = time.monotonic()
        conn.abort()  # no goodbye: as if the network or the launcher went away
        await gone(p.pid, "the role after its SSH connection dropped", timeout=5.0)
        print(f"remote role gone {time.monotonic() - t0:.2f} s after the connection dropped")
        async with asyncio.timeout(bound(STOP)):
            await p.stop(timeout=bound(STOP))  # still fine to call, and quick
    finally:
        conn.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.wait_closed(), 5)


async def test_connection_drop_ends_the_roles_children_too(
    ssh_host: SSHHost, service_dir: Path, remote: list[Any]
) -> None:
    h = ssh_host
    lines = Lines()
    host = replace(h.host, cwd=str(service_dir))
    children: list[tuple[int, str]] = []
    conn = await connect_host(host)
    try:
        service = ("rpc", "--service", "spawnsvc:Svc", "--host", h.ip, "--port", "0")
        p = await spawn(host, *service, connection=conn, secret=SECRET, output=lines)
        assert p.pid is not None
        remote.append(identity(p.pid))
        async with rpc.connect(h.ip, await rpc_port(lines), secret=SECRET) as c:
            children += [identity(await c.root.child(False)), identity(await c.root.child(True))]
        conn.abort()
        await gone(p.pid, "the role after its SSH connection dropped")
        survivors = [pid for pid, _ in children]
        assert await run_until(lambda: not any(alive(pid) for pid in survivors), 2.0), (
            f"children of the role survived the dropped connection: {[p for p in survivors if alive(p)]}"
        )
        await p.stop(timeout=bound(STOP))
    finally:
        kill_if_alive(children)
        conn.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(conn.wait_closed(), 5)


LAUNCHER = """
import asyncio, json, sys
from asyncdist.spawn import Host, spawn

async def main():
    spec = json.loads(sys.argv[1])
    p = await spawn(Host(**spec), "ns", "--port", "0", secret=sys.stdin.readline().strip())
    print(f"remote-pid {p.pid}", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_launcher_killed_ends_the_remote_role(
    ssh_host: SSHHost, tmp_path: Path, remote: list[Any]
) -> None:
    h = ssh_host
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    spec = {
        "host": h.host.host,
        "port": h.host.port,
        "username": h.host.username,
        "connect_options": dict(h.host.connect_options),
    }
    launcher = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        json.dumps(spec),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert launcher.stdin is not None
        assert launcher.stdout is not None
        launcher.stdin.write(SECRET.encode() + b"\n")
        await launcher.stdin.drain()
        pid = None
        async with asyncio.timeout(bound(15)):
            while pid is None:
                line = (await launcher.stdout.readline()).decode()
                assert line, "the launcher exited before the role started"
                if line.startswith("remote-pid "):
                    pid = int(line.split()[1])
        remote.append(identity(pid))
        assert alive(pid)
        assert comm(int(stat_fields(pid)[1])) == "sshd"
        launcher.kill()  # SIGKILL: no cleanup code runs in the launcher
        assert await launcher.wait() == -9
        t0 = time.monotonic()
        await gone(pid, "the role after its launcher was SIGKILLed", timeout=5.0)
        print(f"remote role gone {time.monotonic() - t0:.2f} s after its launcher was killed")
    finally:
        await stop_subprocess(launcher)


# -- DeployError: the host named, within the connect timeout ----------------------------------------


async def deploy_error(host: Host, timeout: float = 3.0, **kw: Any) -> tuple[DeployError, float]:
    t0 = time.monotonic()
    with pytest.raises(DeployError) as info:
        await spawn(host, "ns", "--port", "0", connect_timeout=timeout, output=Lines(), **kw)
    elapsed = time.monotonic() - t0
    assert info.value.host == str(host), info.value
    assert str(info.value).startswith(f"{host}: ")
    assert elapsed < timeout + bound(1.0), elapsed
    return info.value, elapsed


async def test_wrong_host_key_is_a_deploy_error(ssh_host: SSHHost, tmp_path: Path) -> None:
    h = ssh_host.host
    other = asyncssh.generate_private_key("ssh-ed25519")
    name = h.host if h.port in (None, 22) else f"[{h.host}]:{h.port}"
    known = tmp_path / "known_hosts"
    known.write_text(f"{name} {other.export_public_key().decode().strip()}\n")
    err, _ = await deploy_error(replace(h, connect_options={**h.connect_options, "known_hosts": str(known)}))
    assert "host key not verified" in err.reason


async def test_refused_client_key_is_a_deploy_error(ssh_host: SSHHost, tmp_path: Path) -> None:
    h = ssh_host.host
    key = tmp_path / "stranger_ed25519"
    asyncssh.generate_private_key("ssh-ed25519").write_private_key(str(key))
    key.chmod(0o600)
    err, _ = await deploy_error(replace(h, connect_options={**h.connect_options, "client_keys": [str(key)]}))
    assert "authentication refused" in err.reason


async def test_closed_port_is_a_deploy_error(ssh_host: SSHHost) -> None:
    err, elapsed = await deploy_error(replace(ssh_host.host, host="127.0.0.1", port=free_port()))
    assert "cannot connect" in err.reason
    assert elapsed < bound(1.0)


async def test_silent_server_is_a_deploy_error_at_the_connect_timeout(ssh_host: SSHHost) -> None:
    """A port that accepts TCP but never speaks SSH (a hung host)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        host = replace(ssh_host.host, host="127.0.0.1", port=listener.getsockname()[1])
        err, elapsed = await deploy_error(host, timeout=1.0)
    assert "within 1 s" in err.reason
    assert elapsed >= 0.9


async def test_host_that_is_not_up_is_a_deploy_error(ssh_host: SSHHost) -> None:
    if "NETNS_HOSTS_NET" not in os.environ:
        pytest.skip(
            "needs the namespace hosts (.ci/netns-hosts.sh up N): an IP on their network that is not up"
        )
    host = replace(ssh_host.host, host=f"{os.environ['NETNS_HOSTS_NET']}.250", port=22)
    err, _ = await deploy_error(host, timeout=2.0)
    assert "within 2 s" in err.reason or "cannot connect" in err.reason, err.reason


async def test_missing_python_is_a_deploy_error(ssh_host: SSHHost) -> None:
    err, _ = await deploy_error(replace(ssh_host.host, python="/nonexistent/python3"))
    assert "no Python at /nonexistent/python3" in err.reason


async def test_python_without_asyncdist_is_a_deploy_error(ssh_host: SSHHost, tmp_path: Path) -> None:
    python = tmp_path / "python3"  # an interpreter that cannot import asyncdist
    python.write_text("#!/bin/sh\necho 'No module named asyncdist' >&2\nexit 1\n")
    python.chmod(0o755)
    # Zero-install probes it first, to ship asyncdist there: a Python that cannot even be probed
    # is reported as such, with what it printed.
    err, _ = await deploy_error(replace(ssh_host.host, python=str(python)))
    assert str(python) in err.reason
    assert "No module named asyncdist" in err.reason


async def test_missing_cwd_is_a_deploy_error(ssh_host: SSHHost) -> None:
    err, _ = await deploy_error(replace(ssh_host.host, cwd="/nonexistent-spawn-dir"))
    assert "/nonexistent-spawn-dir" in err.reason


async def test_missing_cwd_is_not_reported_as_missing_python(ssh_host: SSHHost) -> None:
    err, _ = await deploy_error(replace(ssh_host.host, cwd="/nonexistent-spawn-dir"))
    assert "no Python" not in err.reason, err.reason


async def test_bad_arguments_are_refused_before_connecting() -> None:
    nowhere = Host("host.invalid", port=1)  # never contacted: these fail first
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="absolute path"):
        await spawn(replace(nowhere, python="python3"), "ns")
    with pytest.raises(ValueError, match="absolute path"):
        await spawn(replace(nowhere, python="venv/bin/python"), "ns")
    for name in ("BAD-NAME", "1ABC", "A B", "X=Y", "", "A;rm"):
        with pytest.raises(ValueError, match="bad environment variable name"):
            await spawn(replace(nowhere, env={name: "1"}), "ns")
    with pytest.raises(ValueError, match="unknown role"):
        await spawn(nowhere, "run")
    assert time.monotonic() - t0 < 0.5


# -- cwd, env and output --------------------------------------------------------------------------------


async def test_cwd_and_env_are_applied_remotely(
    ssh_host: SSHHost, service_dir: Path, remote: list[Any]
) -> None:
    h = ssh_host
    mark = "a b 'c' \"d\" $HOME `id` ; e"  # reaches the role verbatim: no shell expansion
    host = replace(h.host, cwd=str(service_dir), env={"SPAWNSVC_MARK": mark})
    lines = Lines()
    service = ("rpc", "--service", "spawnsvc:Svc", "--host", h.ip, "--port", "0")
    async with running(h, *service, host=host, secret=SECRET, output=lines, remote=remote) as p:
        # spawnsvc is only importable from service_dir: the role found it there.
        async with rpc.connect(h.ip, await rpc_port(lines), secret=SECRET) as conn:
            info = await conn.root.info()
        assert info["cwd"] == str(service_dir)
        assert info["mark"] == mark
        assert p.pid is not None
        assert info["pid"] == p.role_pid
        assert info["pgid"] == p.pgid
        assert os.readlink(f"/proc/{p.pid}/cwd") == str(service_dir)
        assert environ(p.pid)["SPAWNSVC_MARK"] == mark
        assert (await stop_timed(p))[0] == 0


async def test_output_comes_back_line_by_line_with_the_host_prefix(
    ssh_host: SSHHost, service_dir: Path, capsys: pytest.CaptureFixture[str], remote: list[Any]
) -> None:
    h = ssh_host
    host = replace(h.host, cwd=str(service_dir), env={"SPAWNSVC_CHATTY": "1"})
    service = ("rpc", "--service", "spawnsvc:Svc", "--host", h.ip, "--port", "0")
    banner = f"asyncdist rpc spawnsvc:Svc listening on {h.ip}:"

    # The default output: this process's stdout and stderr, each line prefixed [host].
    async with running(h, *service, host=host, secret=SECRET, remote=remote):
        out, err = "", ""

        def seen(text: str) -> bool:
            nonlocal out, err
            captured = capsys.readouterr()
            out, err = out + captured.out, err + captured.err
            return text in out + err

        await eventually(lambda: seen(banner), "no banner on stdout")
        await eventually(lambda: seen("a line on stderr"), "no line on stderr")
    seen("")
    assert out.splitlines()[:2] == [f"[{host}] first line", f"[{host}] second line"]
    assert out.splitlines()[2].startswith(f"[{host}] {banner}")
    assert err.splitlines() == [f"[{host}] a line on stderr"]

    # An output callback gets (host, stream, line) per line, in order, without the newline.
    lines = Lines()
    async with running(h, *service, host=host, secret=SECRET, output=lines, remote=remote):
        await lines.wait_for(banner)
        await lines.wait_for("a line on stderr")
    assert lines.lines("stdout")[:2] == ["first line", "second line"]
    assert lines.lines("stdout")[2].startswith(banner)
    assert lines.lines("stderr") == ["a line on stderr"]
    assert all(host_ is host for host_, _, _ in lines.seen)


async def test_role_that_fails_after_starting_reports_on_stderr(
    ssh_host: SSHHost, capsys: pytest.CaptureFixture[str], remote: list[Any]
) -> None:
    h = ssh_host
    async with running(h, "rpc", "--service", "nosuchmodule_xyz:Svc", "--port", "0", remote=remote) as p:
        async with asyncio.timeout(bound(10)):
            assert await p.wait() == 1
        assert p.returncode == 1
    err = capsys.readouterr().err.splitlines()
    assert any(
        line.startswith(f"[{h.host}] asyncdist: error: --service nosuchmodule_xyz:Svc: cannot import")
        for line in err
    ), err
