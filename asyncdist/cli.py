"""The ``asyncdist`` command line (an edge module: it may import every layer).

::

    asyncdist --version
    asyncdist certs DIR [--hostname NAME ...] [--days N] [--force]
    asyncdist secret [--file PATH]

``python -m asyncdist`` runs the same command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ._version import __version__
from .errors import AsyncDistError

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``asyncdist`` command."""
    parser = argparse.ArgumentParser(
        prog="asyncdist",
        description="asyncdist: distributed computing on one authenticated asyncio transport.",
    )
    parser.add_argument("--version", action="version", version=f"asyncdist {__version__}")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except (AsyncDistError, OSError) as exc:
        print(f"asyncdist: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def worker_main(argv: Sequence[str] | None = None) -> int:
    """``asyncdist-worker ...``: the same as ``asyncdist worker ...``."""
    return main(["worker", *(sys.argv[1:] if argv is None else argv)])
