"""Start asyncdist roles on other hosts over SSH (asyncssh), and stop them for sure.

::

    proc = await spawn(Host("node1", python="/opt/venv/bin/python"),
                       "worker", "--broker", "10.0.0.1:5555", secret=b"...")
    ...
    await proc.stop()

A role (``worker``, ``slave``, ``ns``, ``broker``, ``master``, ``csp-server``,
``rpc``, ``rpc-classic``) runs remotely as ``PYTHON -m asyncdist.spawn
--child ROLE ARGS``, the ``asyncdist ROLE ARGS`` command line under a small
guard:

* the shared secret travels as the first line of the channel's stdin, never
  on a command line or in the SSH environment (OpenSSH drops most variables);
* the guard prints its process id and process group first, so that an
  explicit :meth:`RemoteProcess.stop` can kill the whole group over a second
  channel (``kill -TERM -- -PGID``, then ``-KILL``): that works for root
  logins too, where OpenSSH ignores signal requests;
* the guard leads the process group and runs the role as its child: when
  the channel's stdin closes it stops the role (SIGTERM, then SIGKILL after
  a grace period), and when the role ends it ends every other process of the
  group. Stdin closes when the launcher closes the channel, exits or loses
  the connection, so no remote process outlives its launcher (F27, F28 of
  the reliability checklist);
* remote stdout and stderr come back line by line, prefixed with the host.

Connections use asyncssh's defaults (``~/.ssh/config``, the agent, key files,
``~/.ssh/known_hosts``): host keys are verified unless the caller passes
``known_hosts=None`` in ``connect_options``, an explicit opt-out. Every
failure to reach a host, authenticate, verify it or start its Python is a
:class:`~asyncdist.errors.DeployError` naming the host, within
``connect_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import asyncssh

from ._deploy import RemoteEnv, cleanup_remote, ensure_remote_python
from .errors import DeployError

__all__ = ["ROLES", "Host", "RemoteProcess", "connect_host", "prepare_python", "spawn"]

#: The roles a host can run (``asyncdist ROLE ...``).
ROLES: Final = ("worker", "slave", "ns", "broker", "master", "csp-server", "rpc", "rpc-classic")
_MARKER: Final = "asyncdist-spawn"
_MARKER_LINE: Final = re.compile(r"^asyncdist-spawn pid=(\d+) pgid=(\d+)$")
_ROLE_LINE: Final = re.compile(r"^asyncdist-spawn role=(\d+)$")
#: Seconds a role gets to stop after SIGTERM before it is killed (remote side).
CHILD_GRACE: Final = 5.0
_ENV_NAME: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: Seconds to ship asyncdist to a host that lacks it (the wheelhouse build here not counted).
DEPLOY_TIMEOUT: Final = 120.0
#: The Python tried on a host where this interpreter's path does not exist (zero-install).
FALLBACK_PYTHON: Final = "/usr/bin/python3"


@dataclass(frozen=True)
class Host:
    """One machine to start roles on, and how to reach it.

    ``python`` is the interpreter to run there, an absolute path (the login
    shell's ``python3`` may be another one); by default the path of this
    process's own interpreter, which suits clusters with the same layout
    everywhere. ``cwd`` is the working directory there and ``env`` extra
    environment variables, set on the command line (not secrets: those go
    through ``secret=``). ``connect_options`` go to :func:`asyncssh.connect`
    (``client_keys``, ``known_hosts``, ``config``, ``agent_path``...).
    """

    host: str
    port: int | None = None
    username: str | None = None
    python: str | None = None
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    connect_options: Mapping[str, Any] = field(default_factory=dict)
    #: A shell command run first, in the same shell (``. ~/env.sh``, ``module load python``).
    prolog: str | None = None

    @classmethod
    def parse(cls, spec: str, **defaults: Any) -> Host:
        """``[user@]host[:port]``, with the other fields from ``defaults``."""
        user, _, rest = spec.rpartition("@")
        host, port = rest, None
        if rest.startswith("["):  # [v6]:port
            host, _, tail = rest[1:].partition("]")
            if tail.startswith(":"):
                port = int(tail[1:])
        elif rest.count(":") == 1:
            host, _, p = rest.partition(":")
            port = int(p)
        if not host:
            raise ValueError(f"no host name in {spec!r}")
        return cls(host, port=port, username=user or defaults.pop("username", None), **defaults)

    def __str__(self) -> str:
        return self.host if self.port is None else f"{self.host}:{self.port}"


async def connect_host(host: Host, connect_timeout: float = 10.0) -> asyncssh.SSHClientConnection:
    """An SSH connection to ``host``, or :class:`DeployError` (naming it and why) within the timeout."""
    options = dict(host.connect_options)
    if host.port is not None:
        options.setdefault("port", host.port)
    if host.username is not None:
        options.setdefault("username", host.username)
    options.setdefault("connect_timeout", connect_timeout)
    try:
        async with asyncio.timeout(connect_timeout):
            return await asyncssh.connect(host.host, **options)
    except TimeoutError:
        raise DeployError(str(host), f"no SSH connection within {connect_timeout:g} s") from None
    except asyncssh.HostKeyNotVerifiable as exc:
        raise DeployError(str(host), f"host key not verified: {exc.reason}") from exc
    except asyncssh.PermissionDenied as exc:
        raise DeployError(str(host), f"SSH authentication refused: {exc.reason}") from exc
    except asyncssh.DisconnectError as exc:
        raise DeployError(str(host), f"SSH connection refused: {exc.reason}") from exc
    except (OSError, asyncssh.Error) as exc:
        raise DeployError(str(host), f"cannot connect: {exc}") from exc


def _default_output(host: Host, stream: str, line: str) -> None:
    out = sys.stderr if stream == "stderr" else sys.stdout
    out.write(f"[{host}] {line}\n")
    out.flush()


Output = Callable[[Host, str, str], None]


class RemoteProcess:
    """A role running on a host (made by :func:`spawn`). Stop it with :meth:`stop`."""

    def __init__(
        self,
        host: Host,
        conn: asyncssh.SSHClientConnection,
        proc: asyncssh.SSHClientProcess[str],
        output: Output,
        own_connection: bool,
        deployed: RemoteEnv | None = None,
    ) -> None:
        #: The host as given to :func:`spawn`, and the Python the role runs with there.
        self.host = host
        self.python = host.python or sys.executable
        self._deployed = deployed
        self._conn = conn
        self._proc = proc
        self._output = output
        self._own_connection = own_connection
        #: The remote guard's process id, which is also the role's process group, and the
        #: role's own process id (its child), known once it started.
        self.pid: int | None = None
        self.pgid: int | None = None
        self.role_pid: int | None = None
        self._started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._readers = [
            asyncio.ensure_future(self._read(proc.stdout, "stdout")),
            asyncio.ensure_future(self._read(proc.stderr, "stderr")),
        ]
        self._stderr_tail: list[str] = []
        self._stopping = False

    @property
    def returncode(self) -> int | None:
        """The remote exit status once it ended (None while it runs, or if unknown)."""
        return self._proc.returncode

    async def _read(self, stream: asyncssh.SSHReader[str], name: str) -> None:
        try:
            async for line in stream:
                line = line.rstrip("\n")
                if name == "stdout" and self.role_pid is None and line.startswith(_MARKER):
                    if (m := _MARKER_LINE.match(line)) is not None:
                        self.pid, self.pgid = int(m[1]), int(m[2])
                        continue
                    if (m := _ROLE_LINE.match(line)) is not None:
                        self.role_pid = int(m[1])
                        if not self._started.done():
                            self._started.set_result(None)
                        continue
                if name == "stderr":
                    self._stderr_tail = [*self._stderr_tail[-19:], line]
                if line.strip():
                    self._output(self.host, name, line)
        except (asyncssh.Error, OSError):
            pass
        finally:
            if name == "stdout" and not self._started.done():
                # The exit status and the last stderr lines come after stdout's end: wait a little.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2.0):
                        await self._proc.wait_closed()
                        await self._readers[1]
                if not self._started.done():
                    self._started.set_exception(self._start_failure())

    def _start_failure(self) -> DeployError:
        tail = "\n".join(self._stderr_tail[-5:])
        code = self._proc.exit_status
        if "cd: " in tail and self.host.cwd:
            reason = f"cannot enter the working directory {self.host.cwd}"
        elif code == 127 or (code is not None and "No such file or directory" in tail):
            reason = f"no Python at {self.python}: exit status {code}"
        elif "No module named" in tail and "asyncdist" in tail:
            reason = f"asyncdist is not installed for {self.python}"
        else:
            reason = f"the role did not start (exit status {code})"
        return DeployError(str(self.host), reason + (f"\n{tail}" if tail else ""))

    async def wait_started(self, timeout: float) -> None:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._started)
        except TimeoutError:
            raise DeployError(str(self.host), f"the role did not start within {timeout:g} s") from None

    async def wait(self) -> int | None:
        """Until the remote process has ended; its exit status."""
        await self._proc.wait_closed()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return self._proc.returncode

    async def stop(self, timeout: float = 5.0) -> int | None:
        """Stop it: close its stdin (it ends itself), then kill its process group if needed.

        Returns within about ``2 * timeout`` whatever the host does; closes the
        SSH connection it opened. Idempotent.
        """
        if self._stopping:
            await self._closed()
            return self.returncode
        self._stopping = True
        try:
            with contextlib.suppress(asyncssh.Error, OSError, BrokenPipeError):
                self._proc.stdin.write_eof()
            if not await self._ended_within(timeout):
                await self._kill_group("TERM")
                if not await self._ended_within(timeout / 2):
                    await self._kill_group("KILL")
                    await self._ended_within(timeout / 2)
        finally:
            self._proc.close()
            await self._closed()
        return self.returncode

    async def _ended_within(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._proc.wait_closed()
            return True
        except TimeoutError:
            return False

    async def _kill_group(self, sig: str) -> None:
        if self.pgid is None or self._conn.is_closed():
            return
        with contextlib.suppress(asyncssh.Error, OSError, TimeoutError):
            async with asyncio.timeout(5.0):
                await self._conn.run(f"kill -{sig} -- -{self.pgid}", check=False)

    async def _closed(self) -> None:
        for reader in self._readers:
            reader.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        deployed, self._deployed = self._deployed, None
        if deployed is not None and not self._conn.is_closed():
            with contextlib.suppress(Exception):
                await cleanup_remote(self._conn, deployed)
        if self._own_connection:
            self._conn.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await self._conn.wait_closed()

    async def __aenter__(self) -> RemoteProcess:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def __repr__(self) -> str:
        return f"<RemoteProcess {self.host} pid={self.pid} returncode={self.returncode}>"


def remote_command(host: Host, role: str, args: Sequence[str]) -> str:
    """The shell command that starts ``role`` on ``host`` under the guard."""
    python = host.python or sys.executable
    if not os.path.isabs(python):
        raise ValueError(f"the Python of {host} must be an absolute path, not {python!r}")
    for name in host.env:
        if not _ENV_NAME.match(name):
            raise ValueError(f"bad environment variable name {name!r}")
    words = ["exec", "env", *(f"{k}={v}" for k, v in host.env.items())]
    words += [python, "-u", "-m", "asyncdist.spawn", "--child", role, *args]
    command = " ".join(shlex.quote(w) for w in words)
    if host.prolog:
        command = f"{host.prolog} && {command}"
    if host.cwd:
        command = f"cd {shlex.quote(host.cwd)} && {command}"
    return command


async def prepare_python(
    conn: asyncssh.SSHClientConnection, host: Host, timeout: float = DEPLOY_TIMEOUT
) -> tuple[Host, RemoteEnv]:
    """``host`` with a Python there that runs this asyncdist, and how it was found (zero-install).

    The host's own Python (``host.python``, by default this interpreter's
    path, then :data:`FALLBACK_PYTHON` if that path does not exist there)
    is used when it imports this version of asyncdist; otherwise asyncdist
    and its dependencies are shipped to a temporary venv there (see
    :mod:`asyncdist._deploy`), which :func:`cleanup_remote` removes.
    """
    python = host.python or sys.executable
    try:
        env = await ensure_remote_python(conn, str(host), python, timeout, cwd=host.cwd, env=host.env)
    except DeployError as exc:
        if host.python is not None or not exc.reason.startswith("no Python"):
            raise
        env = await ensure_remote_python(
            conn, str(host), FALLBACK_PYTHON, timeout, cwd=host.cwd, env=host.env
        )
    return replace(host, python=env.python), env


async def spawn(
    host: Host | str,
    role: str,
    *args: str,
    secret: str | bytes | None = None,
    connect_timeout: float = 10.0,
    output: Output | None = None,
    connection: asyncssh.SSHClientConnection | None = None,
    install: bool = True,
) -> RemoteProcess:
    """Start ``asyncdist ROLE ARGS`` on ``host``; return once it runs (its pid is known).

    ``secret`` is handed to the role over stdin (the role must not be given
    ``--secret-file``/``--secret-stdin`` too). ``output(host, stream, line)``
    gets each line the role prints (default: this process's stdout/stderr,
    prefixed ``[host]``). ``connection`` reuses an SSH connection (it is not
    closed on stop). With ``install`` (the default), a host whose Python
    lacks asyncdist gets it first, in a temporary venv removed on stop
    (:func:`prepare_python`). Raises :class:`DeployError` naming the host if
    it cannot be reached or the role does not start within ``connect_timeout``.
    """
    given = h = host if isinstance(host, Host) else Host.parse(host)
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; one of {', '.join(ROLES)}")
    remote_command(h, role, args)  # check the arguments before connecting
    own = connection is None
    conn = connection if connection is not None else await connect_host(h, connect_timeout)
    deployed: RemoteEnv | None = None
    try:
        if install:
            h, deployed = await prepare_python(conn, h)
        proc = await conn.create_process(remote_command(h, role, args), encoding="utf-8", errors="replace")
    except BaseException as exc:
        if deployed is not None:
            with contextlib.suppress(Exception):
                await cleanup_remote(conn, deployed)
        if own:
            conn.close()
        if isinstance(exc, asyncssh.Error | OSError):
            raise DeployError(str(h), f"cannot start a process: {exc}") from exc
        raise
    remote = RemoteProcess(given, conn, proc, output or _default_output, own, deployed)
    remote.python = h.python or sys.executable
    key = secret.encode() if isinstance(secret, str) else secret
    proc.stdin.write((key.decode() if key else "") + "\n")
    try:
        await remote.wait_started(connect_timeout)
    except BaseException:
        await remote.stop(timeout=1.0)
        raise
    return remote


# -- the remote side ---------------------------------------------------------------------------


def _read_line_from_stdin() -> str:
    data = bytearray()
    while (ch := os.read(0, 1)) and ch != b"\n":
        data += ch
    return data.decode().strip()


def _watch_stdin(closed: threading.Event) -> None:
    try:
        while os.read(0, 4096):
            pass
    except OSError:
        pass
    closed.set()


def _group_members(pgid: int) -> list[int]:
    """The other processes of process group ``pgid`` (from /proc; empty where there is none)."""
    me, found = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry))
    return found


def _end_group(pgid: int, grace: float) -> None:
    """SIGTERM every other process of the group, then SIGKILL what is left after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        members = _group_members(pgid)
        for pid in members:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while members and time.monotonic() < deadline:
            time.sleep(0.05)
            members = _group_members(pgid)
        if not members:
            return


def child_main(argv: Sequence[str]) -> int:
    """``python -m asyncdist.spawn --child ROLE ARGS``: run one role under the guard.

    The guard leads the process group and runs ``asyncdist ROLE ARGS`` as
    its child. When its stdin closes it stops the role (SIGTERM, SIGKILL
    after :data:`CHILD_GRACE`); when the role ends, for whatever reason, it
    ends every other process of the group too, so nothing the role started
    outlives it. It exits with the role's status.
    """
    import subprocess

    if not argv or argv[0] not in ROLES:
        print(f"asyncdist.spawn: --child takes a role: {', '.join(ROLES)}", file=sys.stderr)
        return 2
    with contextlib.suppress(OSError):
        if os.getpgid(0) != os.getpid():
            os.setpgid(0, 0)  # its own group, so that stop() kills it and its children together
    pgid = os.getpgid(0)
    print(f"{_MARKER} pid={os.getpid()} pgid={pgid}", flush=True)
    secret = _read_line_from_stdin()
    env = dict(os.environ)
    if secret:
        env["ASYNCDIST_SECRET"] = secret  # for the role only; never on a command line
    closed = threading.Event()
    threading.Thread(target=_watch_stdin, args=(closed,), name="asyncdist-stdin", daemon=True).start()
    role = subprocess.Popen([sys.executable, "-m", "asyncdist", *argv], stdin=subprocess.DEVNULL, env=env)
    print(f"{_MARKER} role={role.pid}", flush=True)
    try:
        while role.poll() is None:
            if closed.wait(0.1):
                role.terminate()
                try:
                    role.wait(CHILD_GRACE)
                except subprocess.TimeoutExpired:
                    role.kill()
                    role.wait()
    finally:
        if role.poll() is None:
            role.kill()
            role.wait()
        _end_group(pgid, grace=2.0)
    return role.returncode if role.returncode >= 0 else 128 - role.returncode


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(child_main(sys.argv[2:]))
    print("usage: python -m asyncdist.spawn --child ROLE [ARGS...]", file=sys.stderr)
    sys.exit(2)
