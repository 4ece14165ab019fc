"""SSHCluster: one cluster on several hosts, serving every paradigm (an edge module).

::

    async with asyncdist.SSHCluster(hosts=["node1", "node2"]) as cluster:
        async with cluster.pool() as pool:               # distributed futures
            print(await pool.map(square, range(100)))
        job = await Job(master=cluster.master).run(...)  # MapReduce, a slave per host
        ns = locate_ns(*cluster.ns_address, secret=cluster.secret)   # remote objects
        chan = csp.Channel("A", connect=cluster.csp_address)          # CSP channels

On entering, the cluster starts on the launching machine a futures broker,
a MapReduce master, a name server and a CSP channel server, all bound to
``listen_host`` (by default this machine's address on its SSH connection
to the first host) and authenticated by one shared secret
(random unless given). It then starts, on every host at once over SSH
(:mod:`asyncdist.spawn`), ``workers_per_host`` futures workers (one per
core of that host by default) and one MapReduce slave, which connect back.
A host whose Python lacks this version of asyncdist gets it in a temporary
venv, shipped over SFTP and removed on leaving (zero-install, see
:func:`asyncdist.spawn.prepare_python`). Leaving stops the remote roles
first (their stdin closes; their process groups are killed if they linger),
then the local servers. It needs only a
running event loop, so it works from a notebook too.

A host that cannot be reached or started raises
:class:`~asyncdist.errors.DeployError` naming it; with
``on_host_error="skip"`` that host is left out (and listed in
``cluster.failed``) and the others go on, as long as one host started.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Final, Literal

import asyncssh

from ._deploy import RemoteEnv, cleanup_remote
from ._log import get_logger
from .csp import ChannelServer
from .errors import ConfigurationError, DeployError
from .futures import Pool, serve_broker
from .futures._broker import Broker
from .mapreduce import Master
from .naming import NameServerDaemon
from .server import Server
from .spawn import Host, RemoteProcess, connect_host, prepare_python, spawn

__all__ = ["PARADIGMS", "SSHCluster", "hosts_from_environment", "parse_hostfile"]

#: What an SSHCluster can serve (``paradigms=``); futures always.
PARADIGMS: Final = ("futures", "mapreduce", "objects", "csp")

log = get_logger("asyncdist.cluster")


class SSHCluster:
    """A broker, a MapReduce master, a name server and a CSP server here; workers and slaves there.

    ``hosts`` are host names or ``[user@]host[:port]`` strings, or
    :class:`~asyncdist.spawn.Host` objects (for a per-host Python, working
    directory or environment). ``connect_options`` are given to
    :func:`asyncssh.connect` for every host given as a string (keys,
    ``known_hosts``, ``config``...). ``python`` is the interpreter on the
    hosts given as strings (an absolute path; default: this interpreter's
    path). ``workers_per_host`` futures workers run on each host (an int,
    or a mapping from ``str(host)`` to a count; default: that host's core
    count). ``paradigms`` chooses what the cluster serves besides futures;
    ``tunnel=True`` serves everything on this machine's loopback and gives
    each host's workers a remote port forward to the broker, for hosts that
    cannot reach this machine (futures only, not MapReduce). Workers import
    ``worker_main`` first (the launcher's script, at the same path there).
    """

    def __init__(
        self,
        hosts: Iterable[str | Host],
        workers_per_host: int | Mapping[str, int] | None = None,
        connect_options: Mapping[str, Any] | None = None,
        *,
        python: str | None = None,
        secret: str | bytes | None = None,
        listen_host: str | None = None,
        slots: int = 1,
        data_dir: str = "/tmp/asyncdist-mapreduce",
        connect_timeout: float = 10.0,
        on_host_error: Literal["raise", "skip"] = "raise",
        paradigms: Collection[str] = PARADIGMS,
        tunnel: bool = False,
        worker_main: str | None = None,
    ) -> None:
        defaults: dict[str, Any] = {"connect_options": dict(connect_options or {})}
        if python is not None:
            defaults["python"] = python
        self.hosts: list[Host] = [h if isinstance(h, Host) else Host.parse(h, **defaults) for h in hosts]
        if not self.hosts:
            raise ValueError("an SSHCluster needs at least one host")
        labels = [str(h) for h in self.hosts]
        if len(set(labels)) != len(labels):
            twice = sorted({label for label in labels if labels.count(label) > 1})
            raise ValueError(f"hosts listed twice: {', '.join(twice)} (give workers_per_host instead)")
        counts = workers_per_host.values() if isinstance(workers_per_host, Mapping) else [workers_per_host]
        if any(c is not None and c < 0 for c in counts):
            raise ValueError("workers_per_host must not be negative")
        if on_host_error not in ("raise", "skip"):
            raise ValueError("on_host_error is 'raise' or 'skip'")
        unknown = set(paradigms) - set(PARADIGMS)
        if unknown or "futures" not in paradigms:
            raise ValueError(f"paradigms is a subset of {PARADIGMS} with 'futures' in it")
        if tunnel and "mapreduce" in paradigms:
            raise ConfigurationError(
                "MapReduce slaves fetch from each other directly, which SSH tunnels do not carry: "
                "with tunnel=True, leave 'mapreduce' out of paradigms"
            )
        self.paradigms = frozenset(paradigms)
        self.tunnel = tunnel
        self.worker_main = worker_main
        self.workers_per_host = workers_per_host
        self.secret: str = (
            secret.decode() if isinstance(secret, bytes) else secret or secrets.token_urlsafe(32)
        )
        self.listen_host = listen_host
        self.slots = slots
        self.data_dir = data_dir
        self.connect_timeout = connect_timeout
        self.on_host_error = on_host_error
        #: Hosts left out (on_host_error="skip"), with why.
        self.failed: list[DeployError] = []
        #: The remote roles, per host.
        self.processes: dict[str, list[RemoteProcess]] = {}
        self._broker: Broker | None = None
        self._worker_names: list[str] = []
        self._broker_server: Server | None = None
        self._master: Master | None = None
        self._ns: NameServerDaemon | None = None
        self._csp: ChannelServer | None = None
        self._pools: list[Pool] = []
        self._connections: list[asyncssh.SSHClientConnection] = []
        self._deployed: list[tuple[asyncssh.SSHClientConnection, RemoteEnv]] = []

    # -- addresses -----------------------------------------------------------------------

    @property
    def broker(self) -> str:
        """``HOST:PORT`` of the futures broker (for ``Pool(broker=..., secret=cluster.secret)``)."""
        assert self._broker_server is not None, "the cluster is not started"
        host, port = self._broker_server.tcp_address
        return f"{host}:{port}"

    @property
    def master(self) -> str:
        """``HOST:PORT`` of the MapReduce master (``Job(master=cluster.master)``)."""
        assert self._master is not None, "the cluster is not started"
        host, port = self._master.address
        return f"{host}:{port}"

    @property
    def ns_address(self) -> tuple[str, int]:
        """``(host, port)`` of the name server (``locate_ns(host, port, secret=...)``)."""
        assert self._ns is not None, "the cluster is not started"
        return self._ns.server.tcp_address

    @property
    def csp_address(self) -> tuple[str, int]:
        """``(host, port)`` of the CSP channel server (``csp.Channel(name, connect=...)``)."""
        assert self._csp is not None, "the cluster is not started"
        return self._csp.address

    def pool(self, **options: Any) -> Pool:
        """A futures :class:`~asyncdist.futures.Pool` on this cluster's workers."""
        pool = Pool(broker=self.broker, secret=self.secret, **options)
        self._pools.append(pool)
        return pool

    # -- life ----------------------------------------------------------------------------

    async def __aenter__(self) -> SSHCluster:
        try:
            await self._start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _start(self) -> None:
        # Connect first: the local end of the first connection is the address the hosts reach.
        results = await asyncio.gather(
            *(connect_host(h, self.connect_timeout) for h in self.hosts), return_exceptions=True
        )
        connected: list[tuple[Host, asyncssh.SSHClientConnection]] = []
        for host, result in zip(self.hosts, results, strict=True):
            if isinstance(result, asyncssh.SSHClientConnection):
                self._connections.append(result)  # all of them first: aclose() closes them
                connected.append((host, result))
        for result in results:
            if not isinstance(result, asyncssh.SSHClientConnection):
                self._host_failed(result)
        if not connected:
            raise DeployError(", ".join(str(h) for h in self.hosts), "no host could be reached")
        if self.tunnel:
            listen = "127.0.0.1"  # the hosts reach it through their SSH connection
        else:
            listen = self.listen_host or str(connected[0][1].get_extra_info("sockname")[0])
        self.listen_host = listen
        self._broker, self._broker_server = await serve_broker(listen, 0, secret=self.secret)
        if "mapreduce" in self.paradigms:
            self._master = await Master.start(listen, 0, secret=self.secret)
        if "objects" in self.paradigms:
            self._ns = NameServerDaemon(listen, 0, self.secret)
            await self._ns.start()
        if "csp" in self.paradigms:
            self._csp = await ChannelServer.start(listen, 0, secret=self.secret)
        outcomes = await asyncio.gather(
            *(self._start_host(h, c) for h, c in connected), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                self._host_failed(outcome)
        if not self.processes:
            raise DeployError(", ".join(str(h) for h in self.hosts), "no host could be started")
        await self._wait_for_workers()

    async def _wait_for_workers(self) -> None:
        """Until every remote worker joined the broker: a host whose workers cannot connect back
        (a firewall, a wrong address) is a DeployError now, not a map that waits forever."""
        assert self._broker is not None
        expected = set(self._worker_names)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self._broker.wait_for_workers(len(expected))
        except TimeoutError:
            joined = {w["name"] for w in self._broker.status()["workers"]}
            missing = sorted(expected - joined)
            hosts = sorted({name.rpartition("/")[0] for name in missing})
            raise DeployError(
                ", ".join(hosts),
                f"workers did not connect back to the broker at {self.broker} within "
                f"{self.connect_timeout:g} s (can the hosts reach this machine? else tunnel=True)",
            ) from None

    def _host_failed(self, error: BaseException) -> None:
        if not isinstance(error, DeployError) or self.on_host_error == "raise":
            raise error
        log.warning("leaving out %s", error)
        self.failed.append(error)

    async def _start_host(self, host: Host, conn: asyncssh.SSHClientConnection) -> None:
        started: list[RemoteProcess] = []
        label = str(host)
        host, deployed = await prepare_python(conn, host)  # zero-install, once per host
        self._deployed.append((conn, deployed))
        try:
            wanted = self.workers_per_host
            count = wanted.get(str(host)) if isinstance(wanted, Mapping) else wanted
            if count is None:
                count = await self._cores(conn, host)
            broker = self.broker
            if self.tunnel:
                assert self._broker_server is not None
                listener = await conn.forward_remote_port("127.0.0.1", 0, *self._broker_server.tcp_address)
                broker = f"127.0.0.1:{listener.get_port()}"
            worker = ["worker", "--broker", broker, "--slots", str(self.slots)]
            if self.worker_main:
                worker += ["--main", self.worker_main]
            names = [f"{label}/{i}" for i in range(count)]
            roles: list[Sequence[str]] = [[*worker, "--name", name] for name in names]
            if self._master is not None:
                # The slave serves its data on the address this machine reached the host at.
                address = str(conn.get_extra_info("peername")[0])
                # One directory per host: hosts may share a file system (NFS homes, or test hosts).
                data_dir = f"{self.data_dir}/{re.sub(r'[^A-Za-z0-9_.-]', '_', str(host))}"
                roles.append(("slave", "--master", self.master, "--data-dir", data_dir, "--host", address))
            for role in roles:
                started.append(
                    await spawn(
                        host,
                        role[0],
                        *role[1:],
                        secret=self.secret,
                        connect_timeout=self.connect_timeout,
                        connection=conn,
                        install=False,
                    )
                )
        except BaseException:
            await asyncio.gather(*(p.stop(timeout=2.0) for p in started), return_exceptions=True)
            raise
        self.processes[label] = started
        self._worker_names.extend(names)

    @staticmethod
    async def _cores(conn: asyncssh.SSHClientConnection, host: Host) -> int:
        try:
            result = await conn.run("nproc", check=True, timeout=10)
            return max(1, int(str(result.stdout).strip()))
        except Exception as exc:
            raise DeployError(str(host), f"cannot count its cores (nproc): {exc}") from exc

    async def aclose(self) -> None:
        """Stop the remote roles, then the local servers. Idempotent."""
        for pool in self._pools:
            with contextlib.suppress(Exception):
                await pool.aclose()
        self._pools.clear()
        procs = [p for ps in self.processes.values() for p in ps]
        await asyncio.gather(*(p.stop() for p in procs), return_exceptions=True)
        self.processes.clear()
        self._worker_names.clear()
        deployed, self._deployed = self._deployed, []
        await asyncio.gather(*(cleanup_remote(c, d) for c, d in deployed), return_exceptions=True)
        for conn in self._connections:
            conn.close()
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5.0):
                    await conn.wait_closed()
        self._connections = []
        if self._csp is not None:
            await self._csp.aclose()
            self._csp = None
        if self._ns is not None:
            await self._ns.aclose()
            self._ns = None
        if self._master is not None:
            await self._master.aclose()
            self._master = None
        if self._broker_server is not None:
            await self._broker_server.aclose()
            self._broker_server = None
            self._broker = None


def parse_hostfile(text: str) -> list[tuple[str, int | None]]:
    """SCOOP's hostfile: ``host [count]`` per line; ``#`` starts a comment."""
    hosts: list[tuple[str, int | None]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        words = raw.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2 or (len(words) == 2 and not words[1].isdigit()):
            raise ConfigurationError(f"hostfile line {number}: expected 'host [count]', got {raw.strip()!r}")
        hosts.append((words[0], int(words[1]) if len(words) == 2 else None))
    return hosts


def _expand_slurm(nodelist: str) -> list[str]:
    """``node[01-03,7],gpu1`` -> node01 node02 node03 node7 gpu1 (SLURM's compressed host list)."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if m is None:
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for item in ranges.split(","):
            lo, _, hi = item.partition("-")
            if hi:
                width = len(lo)
                hosts += [f"{prefix}{i:0{width}d}{suffix}" for i in range(int(lo), int(hi) + 1)]
            else:
                hosts.append(f"{prefix}{lo}{suffix}")
    return hosts


def hosts_from_environment(environ: Mapping[str, str]) -> list[tuple[str, int | None]] | None:
    """The hosts of the batch job this process runs in (SLURM, PBS/Torque or SGE), or None.

    Counts are the slots the scheduler gave each host.
    """
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if nodelist:
        names = _expand_slurm(nodelist)
        tasks = environ.get("SLURM_TASKS_PER_NODE", "")
        counts: list[int | None] = []
        for item in tasks.split(","):  # "2(x3),1" -> 2 2 2 1
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
            if m:
                counts += [int(m[1])] * int(m[2] or 1)
        return [(n, counts[i] if i < len(counts) else None) for i, n in enumerate(names)]
    if "PBS_NODEFILE" in environ:
        with open(environ["PBS_NODEFILE"]) as f:
            lines = [line.strip() for line in f if line.strip()]
        return [(n, lines.count(n)) for n in dict.fromkeys(lines)]
    if "PE_HOSTFILE" in environ:
        with open(environ["PE_HOSTFILE"]) as f:
            rows = [line.split() for line in f if line.strip()]
        return [(row[0], int(row[1])) for row in rows if len(row) >= 2 and row[1].isdigit()]
    return None
