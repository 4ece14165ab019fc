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
``listen_host`` (by default the local address the first host routes to,
found without sending anything) and authenticated by one shared secret
(random unless given). It then starts, on every host at once over SSH
(:mod:`asyncdist.spawn`), ``workers_per_host`` futures workers (one per
core of that host by default) and one MapReduce slave, which connect back.
Leaving stops the remote roles first (their stdin closes; their process
groups are killed if they linger), then the local servers. It needs only a
running event loop, so it works from a notebook too.

A host that cannot be reached or started raises
:class:`~asyncdist.errors.DeployError` naming it; with
``on_host_error="skip"`` that host is left out (and listed in
``cluster.failed``) and the others go on, as long as one host started.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import socket
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import asyncssh

from .csp import ChannelServer
from .errors import DeployError
from .futures import Pool, serve_broker
from .mapreduce import Master
from .naming import NameServerDaemon
from .server import Server
from .spawn import Host, RemoteProcess, connect_host, spawn

__all__ = ["SSHCluster"]

log = logging.getLogger("asyncdist.cluster")


def local_address_towards(host: str, port: int = 22) -> str:
    """The local IP address this machine uses to reach ``host`` (no packet is sent)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except OSError as exc:
        raise DeployError(host, f"cannot resolve: {exc}") from exc
    family, _, _, _, address = infos[0]
    ip = str(address[0])
    if ipaddress.ip_address(ip).is_loopback:
        return ip
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(address)  # UDP: only picks the route
        local: str = sock.getsockname()[0]
    return local


class SSHCluster:
    """A broker, a MapReduce master, a name server and a CSP server here; workers and slaves there.

    ``hosts`` are host names or ``[user@]host[:port]`` strings, or
    :class:`~asyncdist.spawn.Host` objects (for a per-host Python, working
    directory or environment). ``connect_options`` are given to
    :func:`asyncssh.connect` for every host given as a string (keys,
    ``known_hosts``, ``config``...). ``python`` is the interpreter on the
    hosts given as strings (an absolute path; default: this interpreter's
    path). ``workers_per_host`` futures workers run on each host (default:
    that host's core count).
    """

    def __init__(
        self,
        hosts: Iterable[str | Host],
        workers_per_host: int | None = None,
        connect_options: Mapping[str, Any] | None = None,
        *,
        python: str | None = None,
        secret: str | bytes | None = None,
        listen_host: str | None = None,
        slots: int = 1,
        data_dir: str = "/tmp/asyncdist-mapreduce",
        connect_timeout: float = 10.0,
        on_host_error: Literal["raise", "skip"] = "raise",
    ) -> None:
        defaults: dict[str, Any] = {"connect_options": dict(connect_options or {})}
        if python is not None:
            defaults["python"] = python
        self.hosts: list[Host] = [h if isinstance(h, Host) else Host.parse(h, **defaults) for h in hosts]
        if not self.hosts:
            raise ValueError("an SSHCluster needs at least one host")
        if workers_per_host is not None and workers_per_host < 1:
            raise ValueError("workers_per_host must be at least 1")
        if on_host_error not in ("raise", "skip"):
            raise ValueError("on_host_error is 'raise' or 'skip'")
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
        self._broker_server: Server | None = None
        self._master: Master | None = None
        self._ns: NameServerDaemon | None = None
        self._csp: ChannelServer | None = None
        self._pools: list[Pool] = []
        self._connections: list[asyncssh.SSHClientConnection] = []

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
        listen = self.listen_host or local_address_towards(self.hosts[0].host, self.hosts[0].port or 22)
        self.listen_host = listen
        _, self._broker_server = await serve_broker(listen, 0, secret=self.secret)
        self._master = await Master.start(listen, 0, secret=self.secret)
        self._ns = NameServerDaemon(listen, 0, self.secret)
        await self._ns.start()
        self._csp = await ChannelServer.start(listen, 0, secret=self.secret)
        results = await asyncio.gather(*(self._start_host(h) for h in self.hosts), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if not isinstance(error, DeployError) or self.on_host_error == "raise":
                raise error
            log.warning("leaving out %s", error)
            self.failed.append(error)
        if not self.processes:
            raise DeployError(", ".join(str(h) for h in self.hosts), "no host could be started")

    async def _start_host(self, host: Host) -> None:
        conn = await connect_host(host, self.connect_timeout)
        started: list[RemoteProcess] = []
        try:
            count = self.workers_per_host or await self._cores(conn, host)
            roles: list[Sequence[str]] = [
                ("worker", "--broker", self.broker, "--slots", str(self.slots), "--name", f"{host}/{i}")
                for i in range(count)
            ]
            roles.append(("slave", "--master", self.master, "--data-dir", self.data_dir, "--host", host.host))
            for role in roles:
                started.append(
                    await spawn(
                        host,
                        role[0],
                        *role[1:],
                        secret=self.secret,
                        connect_timeout=self.connect_timeout,
                        connection=conn,
                    )
                )
        except BaseException:
            await asyncio.gather(*(p.stop(timeout=2.0) for p in started), return_exceptions=True)
            conn.close()
            raise
        self.processes[str(host)] = started
        self._connections.append(conn)

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
