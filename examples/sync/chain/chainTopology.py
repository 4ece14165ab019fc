"""The seed's Pyro4 chain object: each server forwards the message to the next one, by name.

Only the import differs from the seed (``import Pyro4``), plus ``@Pyro4.expose``
(Pyro4 4.46 and later require it too). ``process`` is a plain method: the
daemon runs it in a thread of its pool, where the blocking call to the next
server is allowed.
"""

# The seed's own style, kept: class Chain(object), %-formatting.
# ruff: noqa: UP004, UP031

from asyncdist import sync as Pyro4


@Pyro4.expose
class Chain(object):
    """Supports the communication between the servers."""

    def __init__(self, name, next):
        self.name = name
        self.nextName = next
        self.next = None

    def process(self, message):
        if self.next is None:
            # the proxy to the next server
            self.next = Pyro4.core.Proxy("PYRONAME:example.chain." + self.nextName)
        if self.name in message:
            # the chain is closed (the last call, from 3 back to 1)
            print("Back at %s; the chain is closed!" % self.name)
            return ["complete at " + self.name]
        else:
            # there is a next element in the chain
            print("%s forwarding the message to the object %s" % (self.name, self.nextName))
            message.append(self.name)
            result = self.next.process(message)
            result.insert(0, "passed on from " + self.name)
            return result
