"""The seed's Pyro4 chain client: starts the chain at server 1. Run after the three servers.

Only the import differs from the seed (``import Pyro4``), with one outright bug fixed: the
seed called "example.chain.A", a name no server registers; server 1 is "example.chain.1".
"""

# The seed's own style, kept: %-formatting.
# ruff: noqa: UP031

from asyncdist import sync as Pyro4

# start the chain at its first element (server_1)
obj = Pyro4.core.Proxy("PYRONAME:example.chain.1")  # the seed: "PYRONAME:example.chain.A"
print("Result=%s" % obj.process(["hello"]))
