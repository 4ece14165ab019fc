"""Publish-subscribe over RPC: the server pushes every event to every subscriber, one way.

Run:  python examples/rpc/pubsub.py [--subscribers 3] [--events 5]

Everything runs in this process, over real connections on 127.0.0.1: the
server (on a free port), three subscriber clients and one publisher client.

* A subscriber calls ``subscribe(name, inbox.receive)``: its function
  travels by reference, and the server keeps the netref.
* ``publish(event)`` sends the event to every subscriber with
  ``callback.oneway(event)``: one message each, no answer awaited (a slow
  subscriber does not hold the publisher up), in order on each connection.
* When a subscriber's connection closes, the server's ``on_disconnect``
  hook unsubscribes it; the next events go to the others only.

It prints (the same on every run):

    server: sub-1 subscribed (subscribers: 1)
    server: sub-2 subscribed (subscribers: 2)
    server: sub-3 subscribed (subscribers: 3)
    publisher: 'event 1' sent to 3 subscribers
    ...
    publisher: 'event 5' sent to 3 subscribers
    sub-1 received ['event 1', 'event 2', 'event 3', 'event 4', 'event 5']
    sub-2 received ['event 1', 'event 2', 'event 3', 'event 4', 'event 5']
    sub-3 received ['event 1', 'event 2', 'event 3', 'event 4', 'event 5']
    sub-1 disconnects
    server: sub-1 unsubscribed on disconnect (subscribers: 2)
    publisher: 'event 6' sent to 2 subscribers
    sub-2 received ['event 1', 'event 2', 'event 3', 'event 4', 'event 5', 'event 6']
    sub-3 received ['event 1', 'event 2', 'event 3', 'event 4', 'event 5', 'event 6']
    server: sub-2 unsubscribed on disconnect (subscribers: 1)
    server: sub-3 unsubscribed on disconnect (subscribers: 0)
"""

from __future__ import annotations

import argparse
import asyncio
import functools
from typing import Any

import asyncdist
from asyncdist import rpc

#: The bound of every wait of this example (seconds): it fails rather than hangs.
PATIENCE = 10.0


class Broker:
    """The server's state, shared by the connections: each subscriber's name and callback."""

    def __init__(self) -> None:
        self.subscribers: dict[PubSubService, tuple[str, rpc.Netref]] = {}
        self._changed = asyncio.Event()

    def subscribe(self, service: PubSubService, name: str, callback: rpc.Netref) -> None:
        self.subscribers[service] = (name, callback)
        self._changed.set()

    def unsubscribe(self, service: PubSubService) -> str | None:
        name, _ = self.subscribers.pop(service, (None, None))
        self._changed.set()
        return name

    def publish(self, event: Any) -> int:
        """Send ``event`` one way to every subscriber; return how many it was sent to."""
        sent = 0
        for service, (_, callback) in list(self.subscribers.items()):
            try:
                callback.oneway(event)  # returns at once; the subscriber's function runs there
            except asyncdist.ConnectionClosed:  # just gone: its on_disconnect is on the way
                self.unsubscribe(service)
            else:
                sent += 1
        return sent

    async def wait_for_subscribers(self, count: int) -> None:
        """Until exactly ``count`` clients are subscribed (checked after each change)."""
        while len(self.subscribers) != count:
            self._changed.clear()
            await self._changed.wait()


class PubSubService(rpc.Service):
    """The server's service, one instance per connection, all sharing one :class:`Broker`."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def exposed_subscribe(self, name: str, callback: rpc.Netref) -> None:
        """Call ``callback(event)`` (one way) for every event published from now on."""
        self.broker.subscribe(self, name, callback)
        print(f"server: {name} subscribed (subscribers: {len(self.broker.subscribers)})")

    def exposed_publish(self, event: Any) -> int:
        """Push ``event`` to every subscriber; the number of subscribers it was sent to."""
        return self.broker.publish(event)

    def on_disconnect(self, conn: rpc.Connection) -> None:
        # The connection is closed: the callback's netref is dead, drop the subscription.
        name = self.broker.unsubscribe(self)
        if name is not None:
            print(f"server: {name} unsubscribed on disconnect (subscribers: {len(self.broker.subscribers)})")


class Inbox:
    """A subscriber's side: what arrived, in order. ``receive`` is the callback it subscribes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.events: list[Any] = []
        self._arrived = asyncio.Event()

    def receive(self, event: Any) -> None:
        """Called by the server (one way): runs here, on this process's event loop."""
        self.events.append(event)
        self._arrived.set()

    async def wait_for(self, count: int) -> None:
        """Until ``count`` events have arrived."""
        while len(self.events) < count:
            self._arrived.clear()
            await self._arrived.wait()


async def publish(publisher: rpc.Connection, event: str) -> None:
    sent = await publisher.root.publish(event)
    print(f"publisher: {event!r} sent to {sent} subscribers")


async def main(subscribers: int, events: int) -> None:
    broker = Broker()
    # A factory (not a class): the server calls it for each connection's service instance.
    async with rpc.serve(functools.partial(PubSubService, broker), "127.0.0.1", 0) as server:
        inboxes: list[Inbox] = []
        conns: list[rpc.Connection] = []
        try:
            for i in range(1, subscribers + 1):
                inbox = Inbox(f"sub-{i}")
                conn = await rpc.connect("127.0.0.1", server.port)
                conns.append(conn)
                await conn.root.subscribe(inbox.name, inbox.receive)  # the function goes by reference
                inboxes.append(inbox)

            async with rpc.connect("127.0.0.1", server.port) as publisher:
                for n in range(1, events + 1):
                    await publish(publisher, f"event {n}")
                async with asyncio.timeout(PATIENCE):
                    for inbox in inboxes:
                        await inbox.wait_for(events)
                for inbox in inboxes:
                    print(f"{inbox.name} received {inbox.events}")

                # The first subscriber leaves; the server notices and unsubscribes it.
                print(f"{inboxes[0].name} disconnects")
                await conns[0].close()
                async with asyncio.timeout(PATIENCE):
                    await broker.wait_for_subscribers(subscribers - 1)
                await publish(publisher, f"event {events + 1}")
                async with asyncio.timeout(PATIENCE):
                    for inbox in inboxes[1:]:
                        await inbox.wait_for(events + 1)
                for inbox in inboxes[1:]:
                    print(f"{inbox.name} received {inbox.events}")
                assert inboxes[0].events == [f"event {n}" for n in range(1, events + 1)]

            # The others leave too, one after the other.
            remaining = subscribers - 1
            for conn in conns[1:]:
                await conn.close()
                remaining -= 1
                async with asyncio.timeout(PATIENCE):
                    await broker.wait_for_subscribers(remaining)
        finally:
            for conn in conns:
                await conn.close()  # idempotent: only the ones still open, on an error


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=3, help="subscriber clients (default 3)")
    parser.add_argument("--events", type=int, default=5, help="events published to all of them (default 5)")
    args = parser.parse_args()
    if args.subscribers < 1 or args.events < 0:
        parser.error("at least 1 subscriber, and no negative number of events")
    return args


if __name__ == "__main__":
    args = parse_args()
    asyncdist.run(main(args.subscribers, args.events))
