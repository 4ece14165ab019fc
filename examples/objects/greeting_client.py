"""The seed's greeting client: calls the greeting object by its registered name.

Run after `asyncdist ns` and greeting_server.py: python examples/objects/greeting_client.py [NAME]
"""

import sys

import asyncdist


async def main(name: str) -> None:
    # adistname: URIs are resolved through the name server (Pyro's PYRONAME:).
    async with asyncdist.Proxy("adistname:server") as server:
        print(await server.welcomeMessage(name))


if __name__ == "__main__":
    asyncdist.run(main(sys.argv[1] if len(sys.argv) > 1 else input("What is your name? ").strip()))
