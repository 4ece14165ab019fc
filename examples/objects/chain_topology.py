"""The chain object of the seed's chain example: each server forwards to the next one by name."""

import asyncdist


@asyncdist.expose
class Chain:
    """Supports the communication between the servers of the chain."""

    def __init__(self, name, next):
        self.name = name
        self.nextName = next
        self.next = None

    async def process(self, message):
        if self.next is None:
            self.next = asyncdist.Proxy("adistname:example.chain." + self.nextName)
        if self.name in message:
            # the chain is closed (the last call, from 3 back to 1)
            print("Back at %s; the chain is closed!" % self.name, flush=True)
            return ["complete at " + self.name]
        else:
            # forward the message to the next element of the chain
            print("%s forwarding the message to the object %s" % (self.name, self.nextName), flush=True)
            message.append(self.name)
            result = await self.next.process(message)
            result.insert(0, "passed on from " + self.name)
            return result


async def serve(this, next):
    """Register this server's Chain object as example.chain.THIS and serve it."""
    servername = "example.chain." + this
    async with asyncdist.Daemon() as daemon, asyncdist.locate_ns() as ns:
        obj = Chain(this, next)
        uri = daemon.register(obj)
        await ns.register(servername, uri)
        print("server_%s started " % this, flush=True)
        try:
            await daemon.serve_forever()
        finally:
            if obj.next is not None:
                await obj.next._release()
