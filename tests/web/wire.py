"""Raw HTTP/1.1 bytes through a NodeSite's channel, for what a client library hides."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import IResource

from imgproxy.web.site import NodeSite


def exchange(root: IResource, data: bytes, **site_options: Any) -> bytes:
    """Feed ``data`` to a fresh connection of a site over ``root``; the raw response."""
    site = NodeSite(root, Clock(), **site_options)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    channel.connectionLost(None)
    return transport.value()
