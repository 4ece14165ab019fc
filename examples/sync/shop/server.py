"""The seed's Pyro4 shop server, blocking as in Pyro4. Run after ``asyncdist ns``.

Only the import differs from the seed (``import Pyro4``; ``Pyro4.naming.locateNS`` and
``Pyro4.core.Daemon`` are written ``Pyro4.locateNS`` and ``Pyro4.Daemon``).
"""

import shop

from asyncdist import sync as Pyro4

# locate the name server
ns = Pyro4.locateNS()
# a daemon: the communication channel of this server
daemon = Pyro4.Daemon()
uri = daemon.register(shop.Shop())
ns.register("example.shop.Shop", uri)
print(list(ns.list(prefix="example.shop.").keys()))
daemon.requestLoop()
