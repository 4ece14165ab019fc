"""asyncdist.SSHCluster against real OpenSSH servers, and the host lists it is given.

The hosts are made by ``.ci/ssh-test-host.sh start`` (an sshd on 127.0.0.1, ``SSH_TEST_*``)
and ``.ci/netns-hosts.sh up N`` (one sshd per network namespace, each with its own IP and
hostname, ``NETNS_HOSTS_*``); the tests that need them are skipped without. Every "host" is
this machine, so a remote process is checked by its pid in ``/proc``; each test marks the
roles it starts with an environment variable (``Host.env``) and fails if a marked process
is still alive after it (it kills them first).

The task functions are sent by value (cloudpickle): the hosts cannot import this module.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncssh
import pytest
from _ssh import (
    SKIP_REASON,
    SSHHost,
    bound,
    gone,
    group_members,
    hosts_from_environment,
    identity,
    is_guard,
    kill_if_alive,
    pids_with_env,
    read_proc,
    settle,
    ssh_server_ip,
    still_there,
)
from _util import SCALE, eventually, free_port

import asyncdist
from asyncdist import csp, locate_ns
from asyncdist.cluster import SSHCluster, parse_hostfile
from asyncdist.cluster import hosts_from_environment as scheduler_hosts
from asyncdist.errors import ConfigurationError, DeployError
from asyncdist.mapreduce import Job, kvgroup, result_iterator
from asyncdist.spawn import Host

pytestmark = pytest.mark.timeout(int(60 * SCALE))

HOSTS = hosts_from_environment()
LOOPBACK = [h for h in HOSTS if not h.netns]
NETNS = [h for h in HOSTS if h.netns]
#: The environment variable that marks the remote roles of a test (its value is per test).
MARK = "ASYNCDIST_CLUSTER_TEST_MARK"
NETNS_SKIP = "no network-namespace test hosts: run `bash .ci/netns-hosts.sh up 3` and eval its output"


# -- fixtures and helpers ----------------------------------------------------------------------------


@pytest.fixture
def loopback() -> list[SSHHost]:
    """The loopback sshd (``SSH_TEST_*``); skip without it."""
    if not LOOPBACK:
        pytest.skip(SKIP_REASON)
    return LOOPBACK


@pytest.fixture
def netns() -> list[SSHHost]:
    """The namespace hosts (``NETNS_HOSTS_*``), at least 3; skip without them."""
    if len(NETNS) < 3:
        pytest.skip(NETNS_SKIP)
    return NETNS


@pytest.fixture
def mark() -> Iterator[str]:
    """A value for :data:`MARK`: no process may carry it after the test (leftovers are killed)."""
    value = uuid.uuid4().hex
    yield value
    settle(MARK, value)
    left = [identity(p) for p in pids_with_env(MARK, value)]
    killed = kill_if_alive(left)
    assert not killed, f"remote role processes left running (now killed): {killed}"


def marked(hosts: list[SSHHost], value: str, **changes: Any) -> list[Host]:
    """The hosts' ``Host`` objects, with the roles marked ``MARK=value``."""
    return [replace(h.host, env={**h.host.env, MARK: value}, **changes) for h in hosts]


def hostname_of(h: SSHHost) -> str:
    """What ``socket.gethostname()`` says on that host (a namespace host has its own)."""
    return h.id if h.netns else socket.gethostname()


def unused_netns_ip() -> str:
    """An address on the namespace hosts' network where no host is up."""
    e = os.environ
    taken = {*e["NETNS_HOSTS_IPS"].split(), e["NETNS_HOSTS_ROOT_IP"]}
    return next(ip for i in range(250, 200, -1) if (ip := f"{e['NETNS_HOSTS_NET']}.{i}") not in taken)


def open_ssh_connections() -> list[asyncssh.SSHClientConnection]:
    gc.collect()
    return [c for c in gc.get_objects() if isinstance(c, asyncssh.SSHClientConnection) and not c.is_closed()]


@contextlib.asynccontextmanager
async def no_stray_connections() -> AsyncIterator[None]:
    """Fail if the block leaves an SSH connection open (it is closed first, for the leak check)."""
    before = {id(c) for c in open_ssh_connections()}
    yield
    stray = [c for c in open_ssh_connections() if id(c) not in before]
    for c in stray:
        c.abort()
    for c in stray:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(c.wait_closed(), 5)
    assert not stray, f"SSH connections left open: {stray}"


async def no_pending_tasks() -> None:
    """No other asyncio task is still pending (asyncio.run would cancel them silently)."""
    current = asyncio.current_task()

    def settled() -> bool:
        return not [t for t in asyncio.all_tasks() if t is not current and not t.done()]

    await eventually(settled, f"asyncio tasks still pending: {asyncio.all_tasks()}", timeout=2.0)


class Sampler:
    """Records, every 20 ms, the processes that carry a mark (what a cluster has started so far)."""

    def __init__(self, value: str) -> None:
        self.value = value
        #: pid -> the server address of its SSH session (which host started it).
        self.seen: dict[int, str | None] = {}
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for pid in pids_with_env(MARK, self.value):
                if pid not in self.seen:
                    self.seen[pid] = ssh_server_ip(pid)
            await asyncio.sleep(0.02)

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def _tasks() -> SimpleNamespace:
    """Functions the remote workers and slaves run. Defined in a function: sent by value."""

    def whoami(delay: float) -> tuple[int, str]:
        time.sleep(delay)
        return os.getpid(), socket.gethostname()

    def fmap(line: str, params: Any) -> Iterator[tuple[str, int]]:
        yield "@host:" + socket.gethostname(), 1  # where the map ran
        for word in line.split():
            yield word, 1

    def freduce(pairs: Iterator[tuple[str, int]], params: Any) -> Iterator[tuple[str, int]]:
        for word, counts in kvgroup(pairs):
            yield word, sum(counts)

    async def via_name_server(ns_host: str, ns_port: int, secret: str, name: str, i: int) -> str:
        """Register a name (call ``i``) from this host, then call the object registered as ``name``."""
        me = socket.gethostname()
        async with locate_ns(ns_host, ns_port, secret) as ns:
            await ns.register(f"{name}.from.{me}.{i}", f"adist:w{os.getpid()}@{me}:1")
        async with asyncdist.Proxy(f"adistname:{name}@{ns_host}:{ns_port}", secret=secret) as greeter:
            greeting: str = await greeter.greet(me)
        return greeting

    def csp_echo(address: list[Any], secret: str, down: str, up: str) -> None:
        """On its own event loop: read a value from channel ``down``, send (hostname, 2 * value) on ``up``."""

        async def main() -> None:
            try:
                value = await csp.Channel(down, connect=(address[0], address[1]), secret=secret).reader()()
                reply = csp.Channel(up, connect=(address[0], address[1]), secret=secret).writer()
                await reply((socket.gethostname(), 2 * value))
            finally:
                await csp.shutdown()

        asyncio.run(main())

    return SimpleNamespace(
        whoami=whoami, fmap=fmap, freduce=freduce, via_name_server=via_name_server, csp_echo=csp_echo
    )


R = _tasks()


@asyncdist.expose
class Greeter:
    def greet(self, name: str) -> str:
        return f"hello {name}"


def worker_hosts(cluster: SSHCluster, hosts: list[SSHHost]) -> dict[int, SSHHost]:
    """The futures workers' role pids, each with its host."""
    by_key = {str(h.host): h for h in hosts}
    return {
        p.role_pid: by_key[key]
        for key, procs in cluster.processes.items()
        for p in procs
        if p.role_pid is not None and is_guard(p.pid or 0, "worker")
    }


async def all_joined(pool: asyncdist.Pool, pids: set[int]) -> None:
    async def joined() -> bool:
        return {w["pid"] for w in (await pool.status())["workers"]} == pids

    await eventually(joined, f"the workers {sorted(pids)} did not all join the broker", timeout=15.0)


# -- one cluster, every paradigm ---------------------------------------------------------------------

WORKERS = 2
TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "the dog sleeps",
    "a fox is quick and a dog is lazy",
    "over and over and over",
    "the end",
    "",
]


async def exercise(cluster: SSHCluster, hosts: list[SSHHost], tag: str) -> list[tuple[int, str]]:
    """Use every paradigm of a started cluster; return the identities of its remote processes."""
    assert cluster.listen_host == hosts[0].local_ip  # its address on the SSH connection to the first host
    assert cluster.broker.startswith(f"{hosts[0].local_ip}:")
    by_key = {str(h.host): h for h in hosts}
    assert set(cluster.processes) == set(by_key)
    idents: list[tuple[int, str]] = []
    for key, procs in cluster.processes.items():
        h = by_key[key]
        assert [is_guard(p.pid or 0, "worker") for p in procs] == [True] * WORKERS + [False]
        assert is_guard(procs[-1].pid or 0, "slave")  # one MapReduce slave per host, last
        for p in procs:
            assert p.pid is not None
            assert p.role_pid is not None
            assert p.returncode is None
            assert ssh_server_ip(p.pid) == h.ip  # started by that host's sshd
            idents += [identity(p.pid), identity(p.role_pid)]
    workers = worker_hosts(cluster, hosts)
    assert len(workers) == WORKERS * len(hosts)
    names = {hostname_of(h) for h in hosts}

    async with cluster.pool() as pool:
        # Futures: the tasks run in the workers on the hosts.
        await all_joined(pool, set(workers))
        results = await pool.map(R.whoami, [0.1 * SCALE] * (3 * len(workers)))
        assert {pid for pid, _ in results} == set(workers), "not every worker ran a task"
        assert all(name == hostname_of(workers[pid]) for pid, name in results), results

        # Remote objects: a worker finds, through the cluster's name server, an object served here.
        ns_host, ns_port = cluster.ns_address
        async with (
            asyncdist.Daemon(cluster.listen_host, 0, cluster.secret) as daemon,
            locate_ns(ns_host, ns_port, cluster.secret) as ns,
        ):
            await ns.register(f"{tag}.greeter", daemon.register(Greeter))
            calls = [
                pool.submit(R.via_name_server, ns_host, ns_port, cluster.secret, f"{tag}.greeter", i)
                for i in range(len(hosts))
            ]
            greetings = await asyncio.gather(*calls)
            assert {g.removeprefix("hello ") for g in greetings} <= names, greetings
            prefix = f"{tag}.greeter.from."
            registered = await ns.list(prefix=prefix)
            assert len(registered) == len(hosts)
            for name, uri in registered.items():
                assert await ns.lookup(name) == uri
                assert name.removeprefix(prefix).rpartition(".")[0] in names

        # CSP: a worker reads from a channel of the cluster's channel server and answers on another.
        down = csp.Channel(f"{tag}-down", connect=cluster.csp_address, secret=cluster.secret)
        up = csp.Channel(f"{tag}-up", connect=cluster.csp_address, secret=cluster.secret)
        out, inp = down.writer(), up.reader()
        echo = pool.submit(R.csp_echo, list(cluster.csp_address), cluster.secret, down.name, up.name)
        async with asyncio.timeout(bound(20)):
            await out(21)
            where, doubled = await inp()
            await echo
        assert doubled == 42
        assert where in names
        await out.retire()
        await inp.retire()

    # MapReduce: a word count through the cluster's master, maps and reduces on the hosts' slaves.
    async with asyncio.timeout(bound(30)):
        job = await Job(name=f"wc-{tag}", master=cluster.master, secret=cluster.secret).run(
            input=[f"raw://{line}" for line in TEXT], map=R.fmap, reduce=R.freduce
        )
        counts = dict([kv async for kv in result_iterator(await job.wait())])
        await job.purge()
    ran_on = {k.removeprefix("@host:") for k in counts if k.startswith("@host:")}
    words = {k: v for k, v in counts.items() if not k.startswith("@host:")}
    assert words == collections.Counter(w for line in TEXT for w in line.split())
    assert ran_on, counts
    assert ran_on <= names
    return idents


async def session(hosts: list[SSHHost], value: str, data_dir: Path, tag: str) -> list[tuple[int, str]]:
    """Start a cluster on ``hosts``, use it, leave it: return the identities of its remote processes."""
    async with no_stray_connections():
        async with SSHCluster(
            marked(hosts, value), workers_per_host=WORKERS, data_dir=str(data_dir), connect_timeout=bound(10)
        ) as cluster:
            idents = await exercise(cluster, hosts, tag)
            pgids = [p.pgid for ps in cluster.processes.values() for p in ps]
        assert cluster.processes == {}
        await gone([pid for pid, _ in idents], "remote roles after leaving the cluster", timeout=1.0)
        assert not any(still_there(i) for i in idents)
        assert all(group_members(pgid) == [] for pgid in pgids if pgid is not None)
        assert pids_with_env(MARK, value) == []
    await no_pending_tasks()
    return idents


def test_cluster_on_the_loopback_host_from_plain_asyncio_run_twice(
    loopback: list[SSHHost], mark: str, tmp_path: Path
) -> None:
    """Each asyncio.run is a new event loop: the cluster works in both, and leaves nothing behind."""
    first = asyncio.run(session(loopback, mark, tmp_path, "first"))
    second = asyncio.run(session(loopback, mark, tmp_path, "second"))
    assert not set(first) & set(second)  # new remote processes each time
    assert not any(still_there(i) for i in first + second)


async def test_cluster_on_the_namespace_hosts(netns: list[SSHHost], mark: str, tmp_path: Path) -> None:
    await session(netns, mark, tmp_path, "netns")


# -- a host that cannot be reached or started ----------------------------------------------------------


async def expect_deploy_error(
    hosts: list[Host], bad: Host, timeout: float, **options: Any
) -> tuple[DeployError, float]:
    """Starting a cluster on ``hosts`` raises a DeployError naming ``bad``, within ``timeout`` (+1 s)."""
    t0 = time.monotonic()
    async with no_stray_connections():
        with pytest.raises(DeployError) as info:
            async with SSHCluster(hosts, workers_per_host=1, connect_timeout=timeout, **options):
                pass
    elapsed = time.monotonic() - t0
    assert info.value.host == str(bad), info.value
    assert elapsed < timeout + bound(1.0), elapsed
    return info.value, elapsed


async def test_closed_port_with_raise_is_a_deploy_error_naming_the_host(
    loopback: list[SSHHost], mark: str
) -> None:
    [good] = marked(loopback, mark)
    bad = replace(good, host="127.0.0.1", port=free_port())
    err, elapsed = await expect_deploy_error([good, bad], bad, bound(3), on_host_error="raise")
    assert "cannot connect" in err.reason
    assert elapsed < bound(1.0)
    assert pids_with_env(MARK, mark) == []


async def test_closed_port_first_with_raise_closes_the_other_connections(
    loopback: list[SSHHost], mark: str
) -> None:
    """The failed host comes first: the connections made to the hosts after it are closed too."""
    [good] = marked(loopback, mark)
    bad = replace(good, host="127.0.0.1", port=free_port())
    await expect_deploy_error([bad, good], bad, bound(3), on_host_error="raise")


async def test_unreachable_namespace_host_with_raise_is_a_deploy_error_within_the_timeout(
    netns: list[SSHHost], mark: str
) -> None:
    good = marked(netns[:2], mark)
    bad = replace(good[0], host=unused_netns_ip())
    err, _ = await expect_deploy_error([*good, bad], bad, bound(2), on_host_error="raise")
    assert "within 2 s" in err.reason or "cannot connect" in err.reason, err.reason
    assert pids_with_env(MARK, mark) == []


async def test_workers_that_cannot_connect_back_are_a_deploy_error(netns: list[SSHHost], mark: str) -> None:
    """Listening on 127.0.0.1 here, the namespace hosts' workers connect to their own loopback:
    entering fails, naming the hosts, instead of a first map that waits forever."""
    hosts = marked(netns[:2], mark)
    t0 = time.monotonic()
    with pytest.raises(DeployError) as caught:
        async with SSHCluster(
            hosts,
            workers_per_host=1,
            paradigms=("futures",),
            listen_host="127.0.0.1",
            connect_timeout=bound(3),
        ):
            pass
    assert "did not connect back" in caught.value.reason
    assert {str(h) for h in hosts} == set(caught.value.host.split(", "))
    assert time.monotonic() - t0 < bound(3) * 2 + bound(5)
    assert pids_with_env(MARK, mark) == []


async def test_host_that_cannot_start_with_raise_stops_the_others(netns: list[SSHHost], mark: str) -> None:
    """The good hosts' roles had started when the bad host failed: leaving the failed start stops them."""
    good = marked(netns[:2], mark)
    [bad] = marked(netns[2:3], mark, python="/nonexistent/python3")
    async with Sampler(mark) as sampler:
        err, _ = await expect_deploy_error([*good, bad], bad, bound(10), on_host_error="raise")
    assert "no Python at /nonexistent/python3" in err.reason
    started = set(sampler.seen.values()) - {None}
    assert started >= {h.host for h in good}, f"the good hosts' roles were never seen: {started}"
    await gone(sorted(sampler.seen), "the good hosts' roles after the failed start", timeout=2.0)
    assert pids_with_env(MARK, mark) == []


async def test_closed_port_with_skip_leaves_the_host_out(loopback: list[SSHHost], mark: str) -> None:
    [good] = marked(loopback, mark)
    bad = replace(good, host="127.0.0.1", port=free_port())
    async with no_stray_connections():
        async with SSHCluster(
            [bad, good], workers_per_host=1, on_host_error="skip", paradigms=("futures",)
        ) as cluster:
            assert [e.host for e in cluster.failed] == [str(bad)]
            assert isinstance(cluster.failed[0], DeployError)
            assert list(cluster.processes) == [str(good)]
            async with cluster.pool() as pool:
                [pid] = worker_hosts(cluster, loopback)
                assert {p for p, _ in await pool.map(R.whoami, [0.0] * 4)} == {pid}
        # ... and when no host is left, it is an error all the same.
        with pytest.raises(DeployError, match="no host could be reached"):
            async with SSHCluster([bad], on_host_error="skip", connect_timeout=bound(3)):
                pass
    await gone(pid, "the worker")
    assert pids_with_env(MARK, mark) == []


async def test_unreachable_and_broken_hosts_with_skip_leave_them_out(netns: list[SSHHost], mark: str) -> None:
    good = marked(netns[:2], mark)
    [broken] = marked(netns[2:3], mark, python="/nonexistent/python3")
    unreachable = replace(good[0], host=unused_netns_ip())
    t0 = time.monotonic()
    async with (
        no_stray_connections(),
        SSHCluster(
            [unreachable, *good, broken],
            workers_per_host=1,
            on_host_error="skip",
            connect_timeout=bound(2),
            paradigms=("futures",),
        ) as cluster,
    ):
        assert time.monotonic() - t0 < bound(2) + bound(5)
        failed = {e.host: e.reason for e in cluster.failed}
        assert set(failed) == {str(unreachable), str(broken)}
        assert "no Python" in failed[str(broken)]
        assert set(cluster.processes) == {str(h) for h in good}
        workers = worker_hosts(cluster, netns[:2])
        async with cluster.pool() as pool:
            await all_joined(pool, set(workers))
            names = {name for _, name in await pool.map(R.whoami, [0.1 * SCALE] * 6)}
        assert names == {hostname_of(h) for h in netns[:2]}
    await gone(sorted(workers), "the workers")
    assert pids_with_env(MARK, mark) == []


async def test_wrong_host_key_is_a_deploy_error(loopback: list[SSHHost], mark: str, tmp_path: Path) -> None:
    [h] = marked(loopback, mark)
    other = asyncssh.generate_private_key("ssh-ed25519")
    name = h.host if h.port in (None, 22) else f"[{h.host}]:{h.port}"
    known = tmp_path / "known_hosts"
    known.write_text(f"{name} {other.export_public_key().decode().strip()}\n")
    h = replace(h, connect_options={**h.connect_options, "known_hosts": str(known)})
    err, _ = await expect_deploy_error([h], h, bound(5), on_host_error="raise")
    assert "host key not verified" in err.reason
    assert pids_with_env(MARK, mark) == []


def test_host_listed_twice_is_refused() -> None:
    """Its roles would be started twice but tracked once (processes are per str(host)): refused."""
    h = Host("host.invalid", port=1)  # never contacted: the check comes first
    with pytest.raises(ValueError, match=r"listed twice: host\.invalid:1"):
        SSHCluster([h, Host("other.invalid"), replace(h, python="/usr/bin/python3")])
    with pytest.raises(ValueError, match="listed twice"):
        SSHCluster(["node1", "node2", "node1"])
    SSHCluster(["node1", "node1:2222"])  # another port is another sshd


# -- tunnel=True ----------------------------------------------------------------------------------------


async def test_tunnel_workers_reach_a_loopback_broker_through_ssh(netns: list[SSHHost], mark: str) -> None:
    async with (
        no_stray_connections(),
        SSHCluster(marked(netns, mark), workers_per_host=1, tunnel=True, paradigms=("futures",)) as cluster,
    ):
        assert cluster.listen_host == "127.0.0.1"
        host, _ = cluster.broker.rsplit(":", 1)
        assert host == "127.0.0.1"
        workers = worker_hosts(cluster, netns)
        assert len(workers) == len(netns)
        for ps in cluster.processes.values():
            [p] = ps
            assert p.pid is not None
            words = read_proc(p.pid, "cmdline").split(b"\0")
            broker = words[words.index(b"--broker") + 1].decode()
            # Each worker talks to 127.0.0.1 in its own network namespace: a port its sshd forwards.
            assert broker.startswith("127.0.0.1:")
            assert broker != cluster.broker
            assert os.readlink(f"/proc/{p.pid}/ns/net") != os.readlink("/proc/self/ns/net")
        async with cluster.pool() as pool:
            await all_joined(pool, set(workers))
            results = await pool.map(R.whoami, [0.1 * SCALE] * (3 * len(workers)))
        assert {name for _, name in results} == {hostname_of(h) for h in netns}
        assert {pid for pid, _ in results} <= set(workers)
    await gone(sorted(workers), "the workers")
    assert pids_with_env(MARK, mark) == []


def test_tunnel_with_mapreduce_is_a_configuration_error() -> None:
    nowhere = Host("host.invalid", port=1)  # never contacted: the check comes first
    with pytest.raises(ConfigurationError, match="mapreduce"):
        SSHCluster([nowhere], tunnel=True)
    with pytest.raises(ConfigurationError, match="mapreduce"):
        SSHCluster([nowhere], tunnel=True, paradigms=("futures", "mapreduce"))
    SSHCluster([nowhere], tunnel=True, paradigms=("futures", "objects", "csp"))


def test_bad_arguments_are_refused_before_connecting() -> None:
    nowhere = Host("host.invalid", port=1)
    with pytest.raises(ValueError, match="at least one host"):
        SSHCluster([])
    with pytest.raises(ValueError, match="negative"):
        SSHCluster([nowhere], workers_per_host=-1)
    with pytest.raises(ValueError, match="negative"):
        SSHCluster([nowhere], workers_per_host={"host.invalid:1": -2})
    with pytest.raises(ValueError, match="on_host_error"):
        SSHCluster([nowhere], on_host_error="ignore")  # type: ignore[arg-type,unused-ignore]
    with pytest.raises(ValueError, match="paradigms"):
        SSHCluster([nowhere], paradigms=("objects",))
    with pytest.raises(ValueError, match="paradigms"):
        SSHCluster([nowhere], paradigms=("futures", "rpc"))


# -- host lists: SCOOP's hostfile and batch schedulers (no SSH) ----------------------------------------


def test_parse_hostfile() -> None:
    text = (
        "# the cluster\n"
        "node1 4\n"
        "\n"
        "   node2   # no count: its core count\n"
        "root@node3:2222 2 # a user and a port\n"
        "\tnode4\t0\t\n"
        "node1 1\n"  # repeated: kept as written (the launcher adds them up)
        "#node5 9\n"
    )
    assert parse_hostfile(text) == [
        ("node1", 4),
        ("node2", None),
        ("root@node3:2222", 2),
        ("node4", 0),
        ("node1", 1),
    ]
    assert parse_hostfile("") == []
    assert parse_hostfile("# nothing\n\n   \n") == []


@pytest.mark.parametrize(
    ("text", "line"),
    [("node1 two\n", 1), ("ok 1\nnode1 2 3\n", 2), ("ok\n\nnode1 -1\n", 3), ("a 1\nb 1.5", 2)],
)
def test_parse_hostfile_refuses_bad_lines(text: str, line: int) -> None:
    with pytest.raises(ConfigurationError, match=f"hostfile line {line}: expected 'host \\[count\\]'"):
        parse_hostfile(text)


def test_hosts_from_slurm() -> None:
    env = {"SLURM_JOB_NODELIST": "node[01-03,7]", "SLURM_TASKS_PER_NODE": "2(x3),1"}
    assert scheduler_hosts(env) == [("node01", 2), ("node02", 2), ("node03", 2), ("node7", 1)]
    env = {"SLURM_JOB_NODELIST": "gpu[9-10],login,cpu[098-101]-ib", "SLURM_TASKS_PER_NODE": "4,1(x2)"}
    assert scheduler_hosts(env) == [
        ("gpu9", 4),
        ("gpu10", 1),
        ("login", 1),
        ("cpu098-ib", None),  # fewer counts than hosts: the rest get their core count
        ("cpu099-ib", None),
        ("cpu100-ib", None),
        ("cpu101-ib", None),
    ]
    # The older variable, and no task counts at all.
    assert scheduler_hosts({"SLURM_NODELIST": "n[1-2]"}) == [("n1", None), ("n2", None)]
    assert scheduler_hosts({"SLURM_JOB_NODELIST": "single"}) == [("single", None)]


def test_hosts_from_pbs_nodefile(tmp_path: Path) -> None:
    nodefile = tmp_path / "nodes"
    nodefile.write_text("n2\nn2\nn1\n\nn2\nn3\n")  # one line per slot
    assert scheduler_hosts({"PBS_NODEFILE": str(nodefile)}) == [("n2", 3), ("n1", 1), ("n3", 1)]


def test_hosts_from_sge_pe_hostfile(tmp_path: Path) -> None:
    hostfile = tmp_path / "pe_hostfile"
    hostfile.write_text("n1 4 all.q@n1 UNDEFINED\nn2 2 all.q@n2 UNDEFINED\n\n")
    assert scheduler_hosts({"PE_HOSTFILE": str(hostfile)}) == [("n1", 4), ("n2", 2)]


def test_hosts_from_no_scheduler() -> None:
    assert scheduler_hosts({}) is None
    assert scheduler_hosts({"HOME": "/root", "SLURM_CONF": "/etc/slurm.conf"}) is None


def test_slurm_comes_first(tmp_path: Path) -> None:
    nodefile = tmp_path / "nodes"
    nodefile.write_text("pbs1\n")
    env = {"PBS_NODEFILE": str(nodefile), "SLURM_JOB_NODELIST": "s[1-2]", "SLURM_TASKS_PER_NODE": "1(x2)"}
    assert scheduler_hosts(env) == [("s1", 1), ("s2", 1)]
