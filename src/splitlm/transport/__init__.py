"""Steps 3, 5, 7, 9: moving messages between client and server."""

from splitlm.transport.base import ByteMeter, Handler, Transport
from splitlm.transport.inprocess import InProcessTransport
from splitlm.transport.messages import Message

__all__ = ["ByteMeter", "Handler", "InProcessTransport", "Message", "Transport"]
