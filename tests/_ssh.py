"""Helpers for the tests that talk to real OpenSSH servers (``tests/test_spawn.py``).

The hosts come from the variables that ``.ci/ssh-test-host.sh start`` (``SSH_TEST_*``:
one sshd on 127.0.0.1) and ``.ci/netns-hosts.sh up N`` (``NETNS_HOSTS_*``: one sshd per
network namespace, each with its own IP) export. Every "host" runs on this machine, so
a remote process id can be checked in ``/proc``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from _util import SCALE, alive, all_pids, eventually, pids_with_env, read_proc

from asyncdist.spawn import Host

SKIP_REASON = (
    "no SSH test hosts: run `bash .ci/ssh-test-host.sh start --port auto` (SSH_TEST_*) "
    "or `bash .ci/netns-hosts.sh up N` (NETNS_HOSTS_*) and eval what it prints"
)


@dataclass(frozen=True)
class SSHHost:
    """A test host: how to reach it (``host``) and how its processes reach this one."""

    id: str
    #: What to pass to spawn(): address, port, user, client key, known_hosts (real host-key check).
    host: Host
    #: The address of this (test) process as seen from that host (for roles that connect back).
    local_ip: str
    #: The directory of the sshd's files (its log is ``log``).
    log: str
    #: True for a network-namespace host (its own network and UTS namespace).
    netns: bool

    @property
    def ip(self) -> str:
        """The host's own address: roles listen there, and the test process reaches them there."""
        return self.host.host


def _options(key: str, known_hosts: str) -> dict[str, object]:
    # Only this client key (no agent), and the host key checked against this known_hosts file.
    return {"client_keys": [key], "known_hosts": known_hosts, "agent_path": None}


def hosts_from_environment() -> list[SSHHost]:
    """The loopback host (``SSH_TEST_*``) first, then one host per namespace IP (``NETNS_HOSTS_*``)."""
    e = os.environ
    hosts: list[SSHHost] = []
    if "SSH_TEST_HOST" in e:
        hosts.append(
            SSHHost(
                id="loopback",
                host=Host(
                    e["SSH_TEST_HOST"],
                    port=int(e["SSH_TEST_PORT"]),
                    username=e["SSH_TEST_USER"],
                    connect_options=_options(e["SSH_TEST_KEY"], e["SSH_TEST_KNOWN_HOSTS"]),
                ),
                local_ip=e["SSH_TEST_HOST"],
                log=e.get("SSH_TEST_LOG", ""),
                netns=False,
            )
        )
    if "NETNS_HOSTS_IPS" in e:
        names = e.get("NETNS_HOSTS_NAMES", "").split()
        for i, ip in enumerate(e["NETNS_HOSTS_IPS"].split()):
            name = names[i] if i < len(names) else ip
            hosts.append(
                SSHHost(
                    id=name,
                    host=Host(
                        ip,
                        port=int(e["NETNS_HOSTS_PORT"]),
                        username=e["NETNS_HOSTS_USER"],
                        connect_options=_options(e["NETNS_HOSTS_KEY"], e["NETNS_HOSTS_KNOWN_HOSTS"]),
                    ),
                    local_ip=e["NETNS_HOSTS_ROOT_IP"],
                    log=os.path.join(e.get("NETNS_HOSTS_DIR", ""), name, "sshd.log"),
                    netns=True,
                )
            )
    return hosts


# -- processes, by pid (the remote side is this machine) ----------------------------------------


def stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name: [state, ppid, pgrp, session, ...] ([] if gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()
    except OSError:
        return []


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def environ(pid: int) -> dict[str, str]:
    out = {}
    for item in read_proc(pid, "environ").split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    found = []
    for pid in all_pids():
        f = stat_fields(pid)
        if len(f) > 2 and f[2] == str(pgid) and f[0] != "Z":
            found.append(pid)
    return found


async def gone(pids: list[int] | int, what: str, timeout: float = 5.0) -> None:
    """Wait (scaled) until none of ``pids`` is alive."""
    pids = [pids] if isinstance(pids, int) else pids
    await eventually(lambda: not any(alive(p) for p in pids), f"{what} still running: {pids}", timeout)


def identity(pid: int) -> tuple[int, str]:
    """``(pid, start time)``: names one process even if its pid is reused later."""
    f = stat_fields(pid)
    return pid, (f[19] if len(f) > 19 else "")


def still_there(ident: tuple[int, str]) -> bool:
    """The process ``identity()`` named is still alive (not a zombie, not a reused pid)."""
    return alive(ident[0]) and identity(ident[0]) == ident


def kill_if_alive(idents: list[tuple[int, str]]) -> list[int]:
    """SIGKILL each process still alive (a safety net); return the pids of those that were."""
    left = [ident for ident in idents if still_there(ident)]
    for pid, _ in left:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    return [pid for pid, _ in left]


# -- output ---------------------------------------------------------------------------------------


class Lines:
    """An ``output=`` callback for spawn(): keeps (host, stream, line) and lets a test wait for one."""

    def __init__(self) -> None:
        self.seen: list[tuple[Host, str, str]] = []

    def __call__(self, host: Host, stream: str, line: str) -> None:
        self.seen.append((host, stream, line))

    def lines(self, stream: str | None = None) -> list[str]:
        return [line for _, s, line in self.seen if stream is None or s == stream]

    def find(self, pattern: str) -> re.Match[str] | None:
        for _, _, line in self.seen:
            m = re.search(pattern, line)
            if m is not None:
                return m
        return None

    async def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        await eventually(
            lambda: self.find(pattern), f"no output line matching {pattern!r}: {self.seen}", timeout
        )
        m = self.find(pattern)
        assert m is not None
        return m


def bound(seconds: float) -> float:
    """A time bound, scaled for slow machines."""
    return seconds * SCALE


async def run_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` for up to ``timeout`` s (scaled); its last value (no failure)."""
    try:
        async with asyncio.timeout(timeout * SCALE):
            while not predicate():
                await asyncio.sleep(0.02)
    except TimeoutError:
        return predicate()
    return True


# -- hosts by name, through an OpenSSH client config (the launcher's --ssh-config) ------------------


@dataclass(frozen=True)
class SSHSite:
    """A set of test hosts reachable by their ``Host`` aliases in one OpenSSH client config."""

    id: str
    #: The ``Host`` aliases (what ``--hosts`` and a hostfile name).
    names: list[str]
    #: Each host's address (the server address in its sessions' ``SSH_CONNECTION``).
    ips: list[str]
    #: What ``socket.gethostname()`` says on each host.
    hostnames: list[str]
    config: str
    netns: bool

    def name_of_ip(self, ip: str) -> str:
        return self.names[self.ips.index(ip)]


def config_aliases(path: str) -> list[str]:
    """The ``Host`` aliases an OpenSSH client config defines (wildcards left out)."""
    aliases: list[str] = []
    with open(path) as f:
        for line in f:
            words = line.split()
            if len(words) > 1 and words[0].lower() == "host":
                aliases += [w for w in words[1:] if not any(c in w for c in "*?!")]
    return aliases


def sites_from_environment() -> list[SSHSite]:
    """The loopback sshd (``SSH_TEST_*``) and the namespace hosts (``NETNS_HOSTS_*``), by alias."""
    e = os.environ
    sites: list[SSHSite] = []
    if "SSH_TEST_CONFIG" in e and "SSH_TEST_HOST" in e:
        import socket

        alias = config_aliases(e["SSH_TEST_CONFIG"])[:1]
        sites.append(
            SSHSite(
                "loopback", alias, [e["SSH_TEST_HOST"]], [socket.gethostname()], e["SSH_TEST_CONFIG"], False
            )
        )
    if "NETNS_HOSTS_CONFIG" in e and "NETNS_HOSTS_NAMES" in e:
        names = e["NETNS_HOSTS_NAMES"].split()
        sites.append(
            SSHSite("netns", names, e["NETNS_HOSTS_IPS"].split(), names, e["NETNS_HOSTS_CONFIG"], True)
        )
    return sites


# -- remote processes found by a mark in their environment ------------------------------------------


def is_guard(pid: int, role: str | None = None) -> bool:
    """``pid`` is a spawn guard (``python -m asyncdist.spawn --child ROLE ...``), of ``role`` if given."""
    words = read_proc(pid, "cmdline").split(b"\0")
    if b"asyncdist.spawn" not in words or b"--child" not in words:
        return False
    i = words.index(b"--child")
    return role is None or words[i + 1 : i + 2] == [role.encode()]


def ssh_server_ip(pid: int) -> str | None:
    """The server address of the SSH session ``pid`` runs in (which host started it)."""
    words = environ(pid).get("SSH_CONNECTION", "").split()
    return words[2] if len(words) == 4 else None


def settle(name: str, value: str, timeout: float = 10.0) -> None:
    """Wait (scaled, blocking: for fixture teardowns) until no process carries ``NAME=VALUE``.

    A test that failed may leave roles whose SSH connection just closed: they end by
    themselves within their guard's grace period, which a teardown gives them before it
    kills what is left.
    """
    deadline = time.monotonic() + timeout * SCALE
    while pids_with_env(name, value) and time.monotonic() < deadline:
        time.sleep(0.05)
