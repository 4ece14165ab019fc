"""The seed's chain client: starts the chain call at server 1.

Run after `asyncdist ns` and chain_server_1.py, chain_server_2.py, chain_server_3.py.
"""

import asyncdist


async def main() -> None:
    async with asyncdist.Proxy("adistname:example.chain.1") as obj:
        print("Result=%s" % await obj.process(["hello"]))


if __name__ == "__main__":
    asyncdist.run(main())
