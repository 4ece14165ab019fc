"""The seed's greeting server, ported from Pyro4: one object, registered in the name server.

Run (three terminals):
    asyncdist ns
    python examples/objects/greeting_server.py
    python examples/objects/greeting_client.py LiLei
"""

import asyncdist


@asyncdist.expose
class Server:
    def welcomeMessage(self, name):
        return "Hi welcome " + str(name)


async def start_server() -> None:
    server = Server()
    # A daemon serves the objects of this process; the name server must be running.
    async with asyncdist.Daemon() as daemon, asyncdist.locate_ns() as ns:
        uri = daemon.register(server)
        await ns.register("server", uri)
        print("Ready. Object uri =", uri, flush=True)
        await daemon.serve_forever()


if __name__ == "__main__":
    asyncdist.run(start_server())
