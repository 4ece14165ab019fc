"""Mobile channel ends: a reader or writer end sent to another process arrives as an end there.

An end travels as the address of the channel server that serves its
channel, the channel's name there, its kind and buffer, and a one-time
token. An end of a channel of this loop makes this loop serve it first
(:func:`~._net.host_here`). The end in transit stays joined, so its side
does not retire while it travels: the server counts it once, whether the
sender's ``csp.transfer`` or the receiver's ``csp.adopt`` reaches it first.
Ends travel over networked channels, to ``@csp.multiprocess`` children, and
over any asyncdist connection (e.g. as an argument of a remote call).
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from ..codec import register_type
from ..errors import ProtocolError
from ._channel import Channel, ChannelEnd, ReaderEnd, WriterEnd
from ._net import NeedsHost, effect, link_for, local_server, servers_of

__all__: list[str] = []


def _encode_end(end: ChannelEnd) -> list[Any]:
    if not end._active:
        raise ValueError(f"cannot send {end!r}: it retired or disconnected")
    token = secrets.token_hex(12)
    name, kind = end.channel.name, end.kind
    link = end._link
    if link is not None:
        effect(lambda: link.send("csp.transfer", name, kind, token))
        host, port = link.address
        return [host, port, name, kind, end.channel.buffer, token]
    home = end._home
    servers = servers_of(home.loop)
    if not servers:
        raise NeedsHost(f"{end!r} is sent elsewhere: this loop must serve its channel first")
    server = servers[0]
    served = server.host(home)
    effect(lambda: server.sent(home, kind, token))
    host, port = server.advertised
    return [host, port, served, kind, home.capacity, token]


def _decode_end(fields: Any) -> ChannelEnd:
    if not (
        type(fields) is list
        and len(fields) == 6
        and type(fields[0]) is str
        and type(fields[1]) is int
        and type(fields[2]) is str
        and fields[3] in ("read", "write")
        and type(fields[4]) is int
        and type(fields[5]) is str
    ):
        raise ProtocolError("bad channel-end payload")
    host, port, name, kind, buffer, token = fields
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise ProtocolError("a channel end can only be received inside an event loop") from None
    server = local_server(loop, (host, port))
    if server is not None:  # it came home: an end of one of this loop's channels
        home = server.homes.get(name)
        if home is None:
            raise ProtocolError(f"a channel end of {name!r}, which this loop does not serve")
        server.handover(home, kind, token, sent=False)
        channel = Channel._attached(name, buffer, home=home, link=None)
    else:
        link = link_for((host, port))
        link.send("csp.adopt", name, kind, token)
        channel = Channel._attached(name, buffer, home=None, link=link)
    end: ChannelEnd = ReaderEnd(channel, joined=True) if kind == "read" else WriterEnd(channel, joined=True)
    channel._made.add(end)
    return end


register_type(ReaderEnd, "asyncdist.csp.reader", _encode_end, _decode_end)
register_type(WriterEnd, "asyncdist.csp.writer", _encode_end, _decode_end)
