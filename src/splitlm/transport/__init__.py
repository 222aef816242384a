"""Steps 3, 5, 7, 9: moving messages between client and server, and the mods that wrap them."""

from splitlm.transport.base import Answer, ByteMeter, Handler, Transport
from splitlm.transport.inprocess import InProcessTransport
from splitlm.transport.messages import Message
from splitlm.transport.mods import Channel, Exchange, MeterMod, Mod, Pending, server_chain

__all__ = [
    "Answer",
    "ByteMeter",
    "Channel",
    "Exchange",
    "Handler",
    "InProcessTransport",
    "Message",
    "MeterMod",
    "Mod",
    "Pending",
    "Transport",
    "server_chain",
]
