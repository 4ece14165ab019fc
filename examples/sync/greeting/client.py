"""The seed's Pyro4 greeting client, blocking as in Pyro4. Run after the name server and server.py.

It asks for the object's URI (and, as the seed, does not use it: it looks the
object up by its name ``server``), then for your name. Only the import differs
from the seed (``import Pyro4``).
"""

from asyncdist import sync as Pyro4

uri = input("What is the Pyro uri of the greeting object?")
name = input("What is your name? ").strip()
# the client calls through a proxy object, which forwards the calls to the remote
# object and hands back their results
server = Pyro4.Proxy("PYRONAME:server")
print(server.welcomeMessage(name))
