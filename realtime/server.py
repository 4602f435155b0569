"""Daphne's server, giving each application a ``send`` that can also send synchronously.

A fan-out delivery used to wake its connection's consumer, which then awaited ``send()``:
a future, a task step, five coroutine frames resumed and a coroutine built per message,
about 30% of the server's CPU per delivery (docs/performance.md). Nothing in Daphne's
own ``send`` ever waits: it hands the message to the connection's Twisted protocol, which
writes. ``Send.nowait()`` does the same from plain code, so a channel layer can give a
message to an idle consumer's handler directly (``realtime.consumers.InboxConsumerMixin``),
which then writes it without being woken. ``python -m mcp_platform.serve`` installs it.
"""

import asyncio
from collections.abc import Awaitable
from typing import Any

import daphne.cli
from daphne.server import Server

from realtime.layers import UNBOUNDED, ChannelQueue


class Send:
    """The ASGI ``send`` of one connection; also callable without awaiting, as ``nowait``."""

    __slots__ = ("server", "protocol", "state")

    def __init__(self, server: Server, protocol: Any) -> None:
        self.server = server
        self.protocol = protocol
        #: Daphne's record of the connection, which it drops only once it is marked
        #: disconnected: held here, it saves hashing the protocol for every message.
        self.state = server.connections[protocol]

    def __call__(self, message: dict[str, Any]) -> Awaitable[None]:
        return self.server.handle_reply(self.protocol, message)

    def nowait(self, message: dict[str, Any]) -> None:
        """Send ``message`` now, as awaiting ``self(message)`` would."""
        if self.state.get("disconnected"):
            return  # as Daphne: the connection is gone, and the application learns so
        if message["type"] == "http.response.start":
            self.server.check_headers_type(message)
        self.protocol.handle_reply(message)


class NowaitServer(Server):
    def create_application(self, protocol: Any, scope: dict[str, Any]) -> ChannelQueue | None:
        # Daphne's own method, with ``Send`` in place of a partial of ``handle_reply()``
        # and a lean input queue.
        assert "application_instance" not in self.connections[protocol]
        # Daphne's ``asyncio.Queue`` held ~3 KiB for each connection's life; the
        # application reads it from one task at a time, as ``ChannelQueue`` requires.
        input_queue = ChannelQueue(UNBOUNDED)
        scope.setdefault("asgi", {"version": "3.0"})
        send = Send(self, protocol)
        instance = self.application(scope=scope, receive=input_queue.get, send=send)
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(instance)
        return input_queue


def install() -> None:
    """Make Daphne's command line serve with ``NowaitServer``."""
    daphne.cli.CommandLineInterface.server_class = NowaitServer
