"""The ``asyncdist`` command line (an edge module: it may import every layer).

::

    asyncdist --version
    asyncdist certs DIR [--hostname NAME ...] [--days N] [--force]
    asyncdist secret [--file PATH]
    asyncdist broker [--host 127.0.0.1] [--port 5555] [--secret-file F] [--insecure] [TLS]
    asyncdist worker --broker HOST:PORT [--slots N] [--secret-file F | --secret-stdin] [TLS]
    asyncdist ns [--host 127.0.0.1] [--port 9090] [--storage FILE] [--autoclean S] [TLS]
    asyncdist rpc --service MODULE:CLASS [--host 127.0.0.1] [--port 18861] [--allow-public-attrs] [TLS]
    asyncdist rpc-classic --allow-classic [--host 127.0.0.1] [--port 18812] [--secret-file F] [TLS]
    asyncdist run [-n N] script.py [args...]        (also: python -m asyncdist [-n N] script.py)
    asyncdist dashboard --broker HOST:PORT [--port 8787] [--host 127.0.0.1] [--master HOST:PORT] [...]
    asyncdist status --broker HOST:PORT [--master HOST:PORT] [--json] [--secret-file F] [TLS]
    asyncdist-worker ...                            (the same as asyncdist worker ...)

TLS options: ``--tls-ca FILE --tls-cert FILE --tls-key FILE`` (mutual TLS;
``asyncdist certs`` makes the files). ``python -m asyncdist`` runs the same
command line; when its first argument is not a command it is the launcher.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._log import configure as configure_logging
from ._version import __version__
from .errors import AsyncDistError, ConfigurationError

__all__ = ["main", "worker_main"]


def _cmd_certs(args: argparse.Namespace) -> int:
    from .security import write_certificates

    hostnames = tuple(args.hostname) if args.hostname else ("localhost", "127.0.0.1", "::1")
    paths = write_certificates(args.directory, hostnames=hostnames, days=args.days, overwrite=args.force)
    print(f"CA certificate:     {paths.ca_cert}")
    print(f"CA key:             {paths.ca_key}   (keep offline; it signs new certificates)")
    print(f"server certificate: {paths.server_cert}  key: {paths.server_key}")
    print(f"client certificate: {paths.client_cert}  key: {paths.client_key}")
    print(f"server names:       {', '.join(hostnames)}")
    return 0


def _cmd_secret(args: argparse.Namespace) -> int:
    from .security import generate_secret

    secret = generate_secret()
    if args.file:
        fd = os.open(args.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret + "\n")
        print(f"wrote a new secret to {args.file} (mode 0600)")
    else:
        print(secret)
    return 0


def _add_security(p: argparse.ArgumentParser, *, server: bool) -> None:
    g = p.add_argument_group("security")
    g.add_argument("--secret-file", help="read the shared secret from this file (else ASYNCDIST_SECRET)")
    if not server:
        g.add_argument(
            "--secret-stdin", action="store_true", help="read the shared secret from the first line of stdin"
        )
    g.add_argument("--tls-ca", help="CA certificate (PEM) that signs the peers' certificates")
    g.add_argument("--tls-cert", help="this side's certificate (PEM)")
    g.add_argument("--tls-key", help="this side's private key (PEM)")
    if server:
        g.add_argument(
            "--insecure",
            action="store_true",
            help="allow a non-loopback address without a secret or TLS (trusted networks only)",
        )


def _add_option_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a connection option, e.g. heartbeat_timeout=3 (repeatable; see asyncdist.Options)",
    )


def _ssl_context(args: argparse.Namespace, *, server: bool) -> Any:
    from .security import client_context, server_context

    if not (args.tls_ca or args.tls_cert):
        return None
    if server:
        if not args.tls_cert:
            raise ConfigurationError("--tls-cert is needed to serve TLS")
        return server_context(args.tls_cert, args.tls_key, cafile=args.tls_ca)
    if not args.tls_ca:
        raise ConfigurationError("--tls-ca is needed to verify the server")
    return client_context(args.tls_ca, args.tls_cert, args.tls_key, check_hostname=False)


def _read_secret_line() -> bytes:
    """The first line of stdin, read byte by byte (nothing after it is consumed)."""
    data = bytearray()
    while True:
        ch = os.read(0, 1)
        if not ch or ch == b"\n":
            break
        data += ch
    if not data.strip():
        raise ConfigurationError("--secret-stdin: no secret on stdin")
    return bytes(data.strip())


def _cmd_broker(args: argparse.Namespace) -> int:
    from .futures import serve_broker
    from .loop import run

    async def main() -> None:
        _, server = await serve_broker(
            args.host,
            args.port,
            secret_file=args.secret_file,
            ssl=_ssl_context(args, server=True),
            insecure=args.insecure,
            allowed_failures=args.allowed_failures,
            no_workers_timeout=args.no_workers_timeout,
            **parse_options(args.option),
        )
        await _serve_until_signal(server, f"asyncdist broker listening on {args.host}:{server.port}")

    run(main())
    return 0


async def _serve_until_signal(server: Any, banner: str) -> None:
    """Print ``banner`` (once SIGTERM and SIGINT stop the server cleanly) and serve until one comes."""
    import asyncio
    import signal

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        print(banner, flush=True)
        await stop.wait()
    finally:
        await server.aclose()


def _cmd_ns(args: argparse.Namespace) -> int:
    from .loop import run
    from .naming import NameServerDaemon

    async def main() -> None:
        nsd = NameServerDaemon(
            args.host,
            args.port,
            secret_file=args.secret_file,
            ssl=_ssl_context(args, server=True),
            insecure=args.insecure,
            storage=args.storage,
            max_entries=args.max_entries,
            autoclean=args.autoclean,
            **parse_options(args.option),
        )
        await nsd.start()
        stored = f", storage {args.storage}" if args.storage else " (in memory: not persistent)"
        await _serve_until_signal(nsd, f"asyncdist name server at {nsd.uri}{stored}")

    run(main())
    return 0


def _cmd_csp_server(args: argparse.Namespace) -> int:
    from .csp import ChannelServer
    from .loop import run

    async def main() -> None:
        server = await ChannelServer.start(
            args.host,
            args.port,
            secret=_read_secret_line() if args.secret_stdin else None,
            ssl=_ssl_context(args, server=True),
            insecure=args.insecure,
            advertise=args.advertise,
            secret_file=args.secret_file,
            **parse_options(args.option),
        )
        host, port = server.address
        await _serve_until_signal(server, f"asyncdist csp channel server listening on {host}:{port}")

    run(main())
    return 0


def _load_service(spec: str) -> Any:
    """``module:Class`` (the current directory is searched first, as by ``python -m``)."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"--service takes module:Class, not {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"--service {spec}: cannot import {module_name}: {exc}") from exc
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigurationError(f"--service {spec}: {module_name} has no {attr}")
    return obj


def _cmd_rpc(args: argparse.Namespace) -> int:
    from . import rpc
    from .loop import run

    service = _load_service(args.service)

    async def main() -> None:
        server = await rpc.serve(
            service,
            args.host,
            args.port,
            secret=_read_secret_line() if args.secret_stdin else _file_secret(args),
            ssl=_ssl_context(args, server=True),
            insecure=args.insecure,
            allow_public_attrs=args.allow_public_attrs,
            **parse_options(args.option),
        )
        await _serve_until_signal(
            server, f"asyncdist rpc {args.service} listening on {args.host}:{server.port}"
        )

    run(main())
    return 0


def _cmd_rpc_classic(args: argparse.Namespace) -> int:
    from .loop import run
    from .rpc import classic

    if not args.allow_classic:
        raise ConfigurationError(
            "classic mode lets every client run any code in this process; "
            "pass --allow-classic to serve it anyway"
        )

    async def main() -> None:
        server = await classic.serve(
            args.host,
            args.port,
            allow_classic=True,
            secret=_read_secret_line() if args.secret_stdin else _file_secret(args),
            ssl=_ssl_context(args, server=True),
            **parse_options(args.option),
        )
        banner = f"asyncdist rpc-classic listening on {args.host}:{server.port} (clients run any code here)"
        await _serve_until_signal(server, banner)

    run(main())
    return 0


def _cmd_master(args: argparse.Namespace) -> int:
    from .loop import run
    from .mapreduce import Master

    async def main() -> None:
        master = await Master.start(
            args.host,
            args.port,
            secret_file=args.secret_file,
            ssl=_ssl_context(args, server=True),
            insecure=args.insecure,
            **parse_options(args.option),
        )
        host, port = master.address
        await _serve_until_signal(master, f"asyncdist MapReduce master listening on {host}:{port}")

    run(main())
    return 0


def _cmd_slave(args: argparse.Namespace) -> int:
    import asyncio
    import signal
    import threading

    from .connection import parse_address
    from .loop import run
    from .mapreduce import Slave

    secret = _read_secret_line() if args.secret_stdin else None

    async def main() -> None:
        slave = await Slave(
            parse_address(args.master, 7878),
            args.data_dir,
            workers=args.workers,
            host=args.host,
            secret=secret if secret is not None else _file_secret(args),
            ssl_server=_ssl_context(args, server=True) if args.tls_cert else None,
            ssl_client=_ssl_context(args, server=False),
            **parse_options(args.option),
        ).start()
        host, port = slave.address
        if not args.quiet:
            print(f"asyncdist slave {slave.id} serving {args.data_dir} at {host}:{port}", flush=True)
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.watch_stdin:  # the launcher's stdin closing (it exited or died) stops this slave

            def watch() -> None:
                while os.read(0, 4096):
                    pass
                loop.call_soon_threadsafe(stop.set)

            threading.Thread(target=watch, name="stdin-watch", daemon=True).start()
        closed = asyncio.ensure_future(slave.wait_closed())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({closed, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
            stopping.cancel()
            await slave.aclose()

    run(main())
    return 0


def _file_secret(args: argparse.Namespace) -> bytes | None:
    from .security import resolve_secret

    return resolve_secret(None, secret_file=args.secret_file)


def _cmd_dashboard(args: argparse.Namespace) -> int:
    from .dashboard import Dashboard
    from .loop import run

    secret = _read_secret_line() if args.secret_stdin else _file_secret(args)
    dash = Dashboard(
        args.broker,
        host=args.host,
        port=args.port,
        master=args.master,
        interval=args.interval,
        secret=secret,
        ssl=_ssl_context(args, server=False),
        insecure=args.insecure,
        **parse_options(args.option),
    )

    async def main() -> None:
        await dash.start()
        await _serve_until_signal(dash, f"asyncdist dashboard of the broker at {args.broker}: {dash.url}")

    run(main())
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    import json

    from .dashboard import fetch_status, format_status
    from .loop import run

    secret = _read_secret_line() if args.secret_stdin else _file_secret(args)
    status, mr = run(
        fetch_status(
            args.broker,
            master=args.master,
            secret=secret,
            ssl=_ssl_context(args, server=False),
            timeout=args.timeout,
            **parse_options(args.option),
        )
    )
    if args.json:
        print(json.dumps({"broker": args.broker, "status": status, "mapreduce": mr}, indent=2))
    else:
        print(format_status(status, mr, broker=args.broker))
    return 0


def _cmd_csp_trace(args: argparse.Namespace) -> int:
    from .csp._trace import render

    render(args.path)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    from .futures import run_worker
    from .futures._worker import import_main
    from .loop import run

    secret = _read_secret_line() if args.secret_stdin else None
    if args.main:
        import_main(args.main)
    ssl = _ssl_context(args, server=False)
    status = run(
        run_worker(
            args.broker,
            slots=args.slots,
            secret=secret,
            secret_file=args.secret_file,
            ssl=ssl,
            watch_stdin=args.watch_stdin,
            name=args.name,
            **parse_options(args.option),
        )
    )
    # A plain task still running in a thread cannot be interrupted and would hold up the
    # interpreter's exit: this process is only a worker, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``["heartbeat_timeout=3", ...]`` into keyword arguments for :class:`asyncdist.Options`."""
    import dataclasses

    from .connection import Options

    fields = {f.name: f for f in dataclasses.fields(Options)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in fields:
            raise ConfigurationError(
                f"bad --option {item!r}: use NAME=VALUE with NAME one of {sorted(fields)}"
            )
        default = getattr(Options(), name)
        try:
            out[name] = type(default)(value) if not isinstance(default, str) else value
        except ValueError:
            raise ConfigurationError(f"bad value in --option {item!r}") from None
    return out


def _cmd_run(args: argparse.Namespace) -> int:
    from .futures._launch import launch

    hosts = _launch_hosts(args)
    if hosts is not None:
        return launch(args.script, args.args, cluster=_ssh_cluster(args, hosts))
    workers = args.workers if args.workers is not None else _cpu_count()
    return launch(args.script, args.args, workers=workers, slots=args.slots)


def _launch_hosts(args: argparse.Namespace) -> list[tuple[str, int | None]] | None:
    """The hosts to run workers on: --hosts and --hostfile, else a batch scheduler's, else None."""
    from .cluster import hosts_from_environment, parse_hostfile

    hosts: list[tuple[str, int | None]] = [(h, None) for h in args.hosts or []]
    if args.hostfile:
        with open(args.hostfile) as f:
            hosts += parse_hostfile(f.read())
    if not hosts and not args.local:
        hosts = hosts_from_environment(os.environ) or []
    return hosts or None


def _distribute(hosts: list[tuple[str, int | None]], total: int | None) -> dict[str, int | None]:
    """Workers per host: the hostfile's counts, or ``total`` (``-n``) spread over the hosts in
    order, filling each host up to its count first (as SCOOP does)."""
    counts: dict[str, int | None] = {}
    for name, count in hosts:
        before = counts.get(name)
        counts[name] = None if count is None and before is None else (before or 0) + (count or 0)
    if total is None:
        return counts
    given = dict.fromkeys(counts, 0)
    left = total
    for name, count in counts.items():
        take = min(left, count or 0)
        given[name] += take
        left -= take
    names = list(counts)
    for i in range(left):
        given[names[i % len(names)]] += 1
    return dict(given)


def _ssh_cluster(args: argparse.Namespace, hosts: list[tuple[str, int | None]]) -> Any:
    import contextlib

    from .cluster import SSHCluster
    from .spawn import Host

    options: dict[str, Any] = {}
    if args.ssh_config:
        options["config"] = list(args.ssh_config)
    counts = _distribute(hosts, args.workers)
    defaults: dict[str, Any] = {"connect_options": options, "prolog": args.prolog}
    if args.python:
        defaults["python"] = args.python
    targets = [Host.parse(name, **defaults) for name in counts]
    per_host = {str(t): counts[name] for t, name in zip(targets, counts, strict=True)}

    @contextlib.asynccontextmanager
    async def cluster(script: str) -> Any:
        async with SSHCluster(
            targets,
            workers_per_host={k: v for k, v in per_host.items() if v is not None},
            paradigms=("futures",),
            tunnel=args.tunnel,
            worker_main=script,
            slots=args.slots,
            connect_timeout=args.connect_timeout,
        ) as c:
            yield c.broker, c.secret.encode()

    return cluster


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", metavar="LEVEL", default=argparse.SUPPRESS, help="as asyncdist --log-level")
    p.add_argument(
        "-n",
        "--workers",
        type=int,
        help="number of workers (default: the CPU count here, or of each host)",
    )
    p.add_argument("--slots", type=int, default=1, help="threads per worker for plain functions (default 1)")
    g = p.add_argument_group("other hosts (over SSH)")
    g.add_argument(
        "--hosts",
        "--host",
        dest="hosts",
        action="append",
        metavar="HOST",
        help="run the workers on these hosts ([user@]host[:port]; --hosts h1 h2 ...)",
    )
    g.add_argument("--hostfile", help="SCOOP's hostfile: one 'host [count]' per line")
    g.add_argument("--python", help="the Python on the hosts (absolute; default: this one's path)")
    g.add_argument("--tunnel", action="store_true", help="workers reach the broker through SSH forwarding")
    g.add_argument("--prolog", help="a shell command run on each host before its workers start")
    g.add_argument("--ssh-config", action="append", help="an OpenSSH client config file (repeatable)")
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds per host (default 10)")
    g.add_argument("--local", action="store_true", help="ignore a batch scheduler's host list")
    p.add_argument("script", help="the Python script to run as the root program")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the script")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``asyncdist`` command."""
    parser = argparse.ArgumentParser(
        prog="asyncdist",
        description="asyncdist: distributed computing on one authenticated asyncio transport.",
    )
    parser.add_argument("--version", action="version", version=f"asyncdist {__version__}")
    parser.add_argument(
        "--log-level",
        metavar="LEVEL",
        help="log to stderr at this level (DEBUG, INFO, WARNING...; default: $ASYNCDIST_LOG_LEVEL or "
        "WARNING); records name their host and worker",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("certs", help="write a private CA plus server and client TLS certificates")
    p.add_argument("directory", help="where to write ca.pem, server.pem, client.pem and keys")
    p.add_argument(
        "--hostname",
        action="append",
        help="a DNS name or IP address of the server (repeatable; default localhost, 127.0.0.1, ::1)",
    )
    p.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.set_defaults(func=_cmd_certs)

    p = sub.add_parser("secret", help="print (or write to a 0600 file) a new random shared secret")
    p.add_argument("--file", help="write the secret to this new file instead of printing it")
    p.set_defaults(func=_cmd_secret)

    p = sub.add_parser("broker", help="run a futures broker (workers and clients connect to it)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=5555, help="port to listen on (default 5555; 0: any)")
    p.add_argument("--allowed-failures", type=int, default=3, help="worker deaths a task survives")
    p.add_argument("--no-workers-timeout", type=float, help="fail queued tasks after S s without workers")
    _add_option_argument(p)
    _add_security(p, server=True)
    p.set_defaults(func=_cmd_broker)

    p = sub.add_parser("worker", help="run a futures worker connected to a broker")
    p.add_argument("--broker", required=True, help="HOST:PORT of the broker")
    p.add_argument("--slots", type=int, default=1, help="threads for plain functions (default 1)")
    p.add_argument("--name", help="a name for this worker (default host:pid)")
    p.add_argument("--watch-stdin", action="store_true", help="exit when stdin reaches EOF")
    p.add_argument("--main", help="import this script first, as the launcher's workers do")
    _add_option_argument(p)
    _add_security(p, server=False)
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("ns", help="run a name server for remote objects (also: python -m asyncdist.naming)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9090, help="port to listen on (default 9090; 0: any)")
    p.add_argument("--storage", help="keep registrations in this sqlite file (survive restarts)")
    p.add_argument("--autoclean", type=float, help="remove registrations of dead daemons every S seconds")
    p.add_argument("--max-entries", type=int, default=100_000, help="registration cap (default 100000)")
    _add_option_argument(p)
    _add_security(p, server=True)
    p.set_defaults(func=_cmd_ns)

    p = sub.add_parser("csp-server", help="serve named CSP channels to other processes (csp.ChannelServer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8888, help="port to listen on (default 8888; 0: any)")
    p.add_argument("--advertise", help="host name put in channel ends sent to other processes")
    p.add_argument(
        "--secret-stdin", action="store_true", help="read the shared secret from the first line of stdin"
    )
    _add_option_argument(p)
    _add_security(p, server=True)
    p.set_defaults(func=_cmd_csp_server)

    p = sub.add_parser("rpc", help="serve an RPC service (asyncdist.rpc.Service subclass)")
    p.add_argument("--service", required=True, metavar="MODULE:CLASS", help="the service to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18861, help="port to listen on (default 18861; 0: any)")
    p.add_argument(
        "--allow-public-attrs", action="store_true", help="let clients reach every public attribute"
    )
    p.add_argument(
        "--secret-stdin", action="store_true", help="read the shared secret from the first line of stdin"
    )
    _add_option_argument(p)
    _add_security(p, server=True)
    p.set_defaults(func=_cmd_rpc)

    p = sub.add_parser("rpc-classic", help="serve RPC classic mode: clients run ANY code here (opt-in)")
    p.add_argument("--allow-classic", action="store_true", help="required: yes, let clients run any code")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=18812, help="port to listen on (default 18812; 0: any)")
    p.add_argument(
        "--secret-stdin", action="store_true", help="read the shared secret from the first line of stdin"
    )
    _add_option_argument(p)
    g = p.add_argument_group("security")
    g.add_argument("--secret-file", help="read the shared secret from this file (else ASYNCDIST_SECRET)")
    g.add_argument("--tls-ca", help="CA certificate (PEM) that signs the clients' certificates")
    g.add_argument("--tls-cert", help="this side's certificate (PEM)")
    g.add_argument("--tls-key", help="this side's private key (PEM)")
    p.set_defaults(func=_cmd_rpc_classic)

    p = sub.add_parser("master", help="run a MapReduce master (slaves and jobs connect to it)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=7878, help="port to listen on (default 7878; 0: any)")
    _add_option_argument(p)
    _add_security(p, server=True)
    p.set_defaults(func=_cmd_master)

    p = sub.add_parser("slave", help="run a MapReduce slave connected to a master")
    p.add_argument("--master", required=True, help="the master's host:port")
    p.add_argument("--data-dir", required=True, help="where map outputs and results are kept")
    p.add_argument("--workers", type=int, default=1, help="tasks run at once, each in a process (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="address this slave serves its data on")
    p.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    p.add_argument("--quiet", action="store_true", help="print no banner")
    _add_option_argument(p)
    _add_security(p, server=False)
    p.set_defaults(func=_cmd_slave)

    p = sub.add_parser("dashboard", help="serve a live web page of a broker (and a MapReduce master)")
    p.add_argument("--broker", required=True, help="HOST:PORT of the broker")
    p.add_argument("--master", help="HOST:PORT of a MapReduce master to show too (same secret)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve the page on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8787, help="port to serve the page on (default 8787; 0: any)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    _add_option_argument(p)
    _add_security(p, server=False)
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --host: the page has no authentication (trusted networks only)",
    )
    p.set_defaults(func=_cmd_dashboard)

    p = sub.add_parser("status", help="print a broker's workers, queue and counters (and MapReduce jobs)")
    p.add_argument("--broker", required=True, help="HOST:PORT of the broker")
    p.add_argument("--master", help="HOST:PORT of a MapReduce master to show too (same secret)")
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for an answer (default 5)")
    _add_option_argument(p)
    _add_security(p, server=False)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("csp-trace", help="print a CSP trace (csp.TraceInit) as a readable timeline")
    p.add_argument("path", help="the trace file (JSON lines)")
    p.set_defaults(func=_cmd_csp_trace)

    p = sub.add_parser("run", help="run a script on a local cluster (like python -m asyncdist)")
    _add_run_arguments(p)
    p.set_defaults(func=_cmd_run)
    return parser


def launcher_parser() -> argparse.ArgumentParser:
    """``python -m asyncdist [-n N] script.py args...``."""
    parser = argparse.ArgumentParser(
        prog="python -m asyncdist",
        description="Run a script on a local asyncdist cluster: a broker and N workers.",
    )
    _add_run_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    argv = _expand_hosts(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    if _is_launch(argv, parser):
        args = launcher_parser().parse_args(argv)
        args.func = _cmd_run
    else:
        args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    level = getattr(args, "log_level", None)
    try:
        configure_logging(level)
    except ValueError as exc:
        parser.error(str(exc))
    if level:
        os.environ["ASYNCDIST_LOG_LEVEL"] = level  # the workers this command starts log alike
    try:
        return int(args.func(args))
    except (AsyncDistError, OSError) as exc:
        print(f"asyncdist: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _expand_hosts(argv: list[str]) -> list[str]:
    """``--hosts h1 h2 script.py`` -> ``--hosts h1 --hosts h2 script.py``: the host names end at
    the next option or at the script (a word ending in .py or naming a file)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-") and (word.endswith(".py") or os.path.isfile(word)):
            return out + argv[i:]  # the script: what follows are its own arguments
        out.append(word)
        i += 1
        if word != "--hosts":
            continue
        taken = 0
        while i < len(argv) and not argv[i].startswith("-"):
            if taken and (argv[i].endswith(".py") or os.path.isfile(argv[i])):
                break
            if taken:
                out.append("--hosts")
            out.append(argv[i])
            taken += 1
            i += 1
    return out


def _is_launch(argv: list[str], parser: argparse.ArgumentParser) -> bool:
    """True when the arguments name a script rather than a command (``-n 4 script.py``)."""
    commands: set[str] = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            commands.update(action.choices)
    takes_value = {
        option
        for action in launcher_parser()._actions
        if action.option_strings and action.nargs != 0
        for option in action.option_strings
    }
    skip = False
    for arg in argv:
        if skip:  # the value of a launcher option (a host may be named like a command)
            skip = False
            continue
        if arg in ("-h", "--help", "--version"):
            return False
        if arg.startswith("-"):
            skip = arg in takes_value
            continue
        return arg not in commands
    return False


def worker_main(argv: Sequence[str] | None = None) -> int:
    """``asyncdist-worker ...``: the same as ``asyncdist worker ...``."""
    return main(["worker", *(sys.argv[1:] if argv is None else argv)])
