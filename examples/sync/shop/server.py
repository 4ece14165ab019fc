"""The seed's Pyro4 shop server, blocking as in Pyro4. Run after ``asyncdist ns``.

Only the import differs from the seed (``import Pyro4``).
"""

import shop

from asyncdist import sync as Pyro4

# locate the name server
ns = Pyro4.naming.locateNS()
# a daemon: the communication channel of this server
daemon = Pyro4.core.Daemon()
uri = daemon.register(shop.Shop())
ns.register("example.shop.Shop", uri)
print(list(ns.list(prefix="example.shop.").keys()))
daemon.requestLoop()
