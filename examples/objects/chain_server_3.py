"""Server 3 of the seed's chain: 1 -> 2 -> 3 -> 1. Run after `asyncdist ns`."""

from chain_topology import serve

import asyncdist

this = "3"
next = "1"

if __name__ == "__main__":
    asyncdist.run(serve(this, next))
