"""The seed's Pyro4 greeting server, blocking as in Pyro4. Run after ``asyncdist ns``.

Only the import differs from the seed (``import Pyro4``), plus ``@Pyro4.expose``
(Pyro4 4.46 and later require it too) and one outright bug fixed: the seed
defined ``startServer()`` inside the class (without ``self``), so the
``startServer()`` call at the end was a NameError; it is a module function here.
"""

# The seed's own style, kept: class Server(object).
# ruff: noqa: UP004

from asyncdist import sync as Pyro4


# the class of the remotely accessible object
@Pyro4.expose
class Server(object):
    # a method of the Server instances
    def welcomeMessage(self, name):
        return "Hi welcome " + str(name)


# (the seed indented this function inside the class)
def startServer():
    # make the instance
    server = Server()
    # a Pyro daemon dispatches the incoming calls to the objects; each server has one
    daemon = Pyro4.Daemon()
    # a name server must be running before this script: locate it
    ns = Pyro4.locateNS()
    # register the object with the daemon: its URI
    uri = daemon.register(server)
    # register that URI under a name in the name server
    ns.register("server", uri)
    print("Ready. Object uri = ", uri)
    # serve: the daemon's event loop waits for calls
    daemon.requestLoop()


if __name__ == "__main__":
    startServer()
