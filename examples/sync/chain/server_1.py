"""Server 1 of the seed's Pyro4 chain (1 -> 2 -> 3 -> 1), blocking as in Pyro4. Run after ``asyncdist ns``.

Only the import differs from the seed (``import Pyro4``), with two
outright bugs fixed: the seed registered "example.chainTopology.1" while the chain objects look
up "example.chain.N", and it called ``daemon.requstLoop()``.
"""

# The seed's own style, kept: %-formatting.
# ruff: noqa: UP031

import chainTopology

from asyncdist import sync as Pyro4

# this server and the next one in the chain
this = "1"
next = "2"

# the name this server registers (the seed: "example.chainTopology." + this)
servername = "example.chain." + this

daemon = Pyro4.core.Daemon()
obj = chainTopology.Chain(this, next)
uri = daemon.register(obj)
ns = Pyro4.naming.locateNS()
ns.register(servername, uri)

# serve (the seed: daemon.requstLoop())
print("server_%s started " % this)
daemon.requestLoop()
