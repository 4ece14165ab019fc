"""The seed's RPyC classic example, ported: run code on a classic server and see its output here.

Start the server first (classic mode runs any code its clients send, so it
must be asked for twice: the command and the flag):

    python -m asyncdist rpc-classic --allow-classic          (listens on 127.0.0.1:18812)

then, in another terminal:

    python examples/rpc/classic_client.py [HOST [PORT]]      (default 127.0.0.1 18812)

It prints "hi python cookbook" here, in the client's terminal: the server
runs the print, and ``redirected_stdio()`` (the seed's
``c.modules.sys.stdout = sys.stdout``) sends what it prints back. The seed's
typo ``prit('hi here')`` raises NameError on the server, and the same
NameError here. Against a server that is not a classic one (``asyncdist
rpc --service ...``) the client exits 1 with the PermissionError it gets.

The seed, for comparison (RPyC, blocking)::

    c = rpyc.classic.connect("localhost")
    c.execute("print('hi python cookbook')")
    c.modules.sys.stdout = sys.stdout
    c.execute("prit('hi here')")
"""

import sys

import asyncdist
from asyncdist import rpc


async def main(host: str, port: int) -> None:
    # rpyc.classic.connect(host, port): a ClassicConnection (PermissionError if the server is not classic).
    async with rpc.classic.connect(host, port) as conn:
        # Inside the block, what code run for this connection prints on the server comes here.
        async with conn.redirected_stdio():
            await conn.execute("print('hi python cookbook')")
        # conn.modules: the server's modules, imported there on first use.
        version = await conn.modules.sys.version
        print(f"the server runs Python {version.split()[0]}")
        print(f"eval on the server: 6 * 7 = {await conn.eval('6 * 7')}")
        # The seed's last line has a typo: the server's NameError is raised here.
        try:
            await conn.execute("prit('hi here')")
        except NameError as exc:
            print(f"remote NameError: {exc}")


if __name__ == "__main__":
    host = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1"
    port = int(sys.argv[2]) if len(sys.argv) > 2 else rpc.classic.DEFAULT_PORT
    try:
        asyncdist.run(main(host, port))
    except PermissionError as exc:  # a server that is not a classic one refuses to run code
        sys.exit(f"classic_client: PermissionError: {exc}")
    except asyncdist.ConnectError as exc:  # no server there (yet)
        sys.exit(
            f"classic_client: {exc}\nstart the server with: python -m asyncdist rpc-classic --allow-classic"
        )
