"""Daphne's server, giving each application a ``send`` that can also send synchronously.

A fan-out delivery used to wake its connection's consumer, which then awaited ``send()``:
a future, a task step, five coroutine frames resumed and a coroutine built per message,
about 30% of the server's CPU per delivery (docs/performance.md). Nothing in Daphne's
own ``send`` ever waits: it hands the message to the connection's Twisted protocol, which
writes. ``Send.write()`` does the same from plain code, so a channel layer can give a
message to an idle consumer's handler directly (``realtime.inbox_consumer.InboxConsumerMixin``),
which then writes it without being woken; it takes the payload itself (a WebSocket text,
an event-stream chunk) rather than an ASGI message to be built and read back.
It also stops reading a WebSocket whose client sends faster than its messages are handled
(``ReadingQueue``). ``python -m mcp_platform.serve`` installs it.
"""

import asyncio
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any

import daphne.cli
from daphne.server import Server
from twisted.internet import defer
from twisted.internet.interfaces import ISSLTransport

from realtime.layers import UNBOUNDED, ChannelQueue

logger = logging.getLogger("daphne.server")  # the lines Daphne logs, under its name


class Send:
    """The ASGI ``send`` of one connection; ``write()`` also sends, without awaiting."""

    __slots__ = ("server", "protocol", "state")

    def __init__(self, server: Server, protocol: Any) -> None:
        self.server = server
        self.protocol = protocol
        #: Daphne's record of the connection, which it drops only once it is marked
        #: disconnected: held here, it saves hashing the protocol for every message.
        self.state = server.connections[protocol]

    def __call__(self, message: dict[str, Any]) -> Awaitable[None]:
        return self.server.handle_reply(self.protocol, message)

    def write(self, payload: str | bytes) -> None:
        """Send a payload of the open connection now, as awaiting ``self()`` with its
        message would: a text frame's text (``websocket.send``) or the next chunk of a
        streamed body (``http.response.body`` with ``more_body``); the protocol knows which
        (``write_payload()``)."""
        if self.state.get("disconnected"):
            return  # as Daphne: the connection is gone, and the application learns so
        self.protocol.write_payload(payload)


#: WebSocket client messages a connection holds for its application before its socket is no
#: longer read, and, once paused, the number under which reading resumes.
INCOMING_LIMIT = 16
INCOMING_RESUME = 4


class ReadingQueue(ChannelQueue):
    """What a WebSocket client sent, for its application: past ``INCOMING_LIMIT`` messages
    not yet taken, the client is held back (its protocol's ``hold_back()``: nothing more
    is read or parsed; ``held_back`` says so) until the application has taken all but
    ``INCOMING_RESUME`` (``go_on()``). A client that sends faster than its messages are
    handled then waits on TCP, as the ``websockets`` library makes it wait
    (``max_queue``), instead of filling the server's memory: one client sending
    subscribes grew a server by 87 MiB in 4 s."""

    __slots__ = ("reader",)

    def __init__(self, reader: Any) -> None:
        super().__init__(UNBOUNDED)
        self.reader = reader

    def put_nowait(self, item: Any) -> None:
        super().put_nowait(item)
        if not self.reader.held_back and len(self.items) >= INCOMING_LIMIT:
            self.reader.hold_back()

    def get(self) -> Coroutine[Any, Any, Any]:
        # A coroutine of its own only while the client is held back: one more for every
        # idle connection's wait cost ~0.5 KiB of its memory.
        if self.reader.held_back:
            return self._get_and_go_on()
        return super().get()

    async def _get_and_go_on(self) -> Any:
        item = await super().get()
        if self.reader.held_back and len(self.items) <= INCOMING_RESUME:
            self.reader.go_on()
        return item


class NowaitServer(Server):
    #: Applications still running when the shutdown's wait for them ran out: their
    #: request threads may still be at work, and are not waited for (``mcp_platform.serve``).
    outlasted = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ports: list[Any] = []

    def create_application(self, protocol: Any, scope: dict[str, Any]) -> ChannelQueue | None:
        # Daphne's own method, with ``Send`` in place of a partial of ``handle_reply()``
        # and a lean input queue.
        assert "application_instance" not in self.connections[protocol]
        # Daphne's ``asyncio.Queue`` held ~3 KiB for each connection's life; the
        # application reads it from one task at a time, as ``ChannelQueue`` requires. An
        # HTTP request's body is in memory before it is queued: only a WebSocket's messages
        # arrive while the application runs.
        if scope["type"] == "websocket":
            scope.setdefault("scheme", websocket_scheme(protocol))
            input_queue = ReadingQueue(protocol)
        else:
            input_queue = ChannelQueue(UNBOUNDED)
        scope.setdefault("asgi", {"version": "3.0"})
        send = Send(self, protocol)
        instance = self.application(scope=scope, receive=input_queue.get, send=send)
        if protocol not in self.connections:
            return None
        self.connections[protocol]["application_instance"] = asyncio.ensure_future(instance)
        return input_queue

    def listen_success(self, port: Any) -> None:
        super().listen_success(port)
        self.ports.append(port)

    def kill_all_applications(self) -> defer.Deferred:
        """End every application before the reactor stops, as Daphne's does, skipping
        connections that have none: an HTTP connection kept alive between requests.
        Daphne's raised KeyError for one, and the shutdown went on at once: every WebSocket
        and event stream was dropped without its application ending it.

        New connections are refused first. Every application is cancelled: a WebSocket or
        an event stream ends at once, while a request already in its thread is finished
        and answered (``mcp_platform.handlers``), its change published on the loop, which
        runs until then. Daphne cancelled it and the stop waited for its thread anyway:
        its client was dropped unanswered, and the change it committed later was published
        to no one. What still runs after ``--application-close-timeout`` (10 s) is
        cancelled again and dropped: the process leaves without waiting for its thread."""
        for port in self.ports:
            port.stopListening()
        running = [
            details["application_instance"]
            for details in self.connections.values()
            if "application_instance" in details and not details["application_instance"].done()
        ]
        for instance in running:
            instance.cancel()
        logger.info("Killed %i pending application instances", len(running))
        ended = defer.Deferred.fromFuture(asyncio.ensure_future(self.wait_for_ends(running)))
        ended.addErrback(lambda failure: None)
        return ended

    async def wait_for_ends(self, running: list[asyncio.Future]) -> None:
        """Wait for the cancelled ``running`` for ``--application-close-timeout`` at most,
        then cancel again what is left."""
        if not running:
            return
        _, left = await asyncio.wait(running, timeout=self.application_close_timeout)
        if left:
            self.outlasted = len(left)
            logger.warning(
                "Applications still running %s s after the stop began, dropped: %d",
                self.application_close_timeout,
                len(left),
            )
            for instance in left:
                instance.cancel()
            await asyncio.wait(left)


def websocket_scheme(protocol: Any) -> str:
    """``wss`` or ``ws``, which Daphne leaves out of a WebSocket's scope (ASGI's default is
    ``ws``), read as Daphne reads an HTTP request's scheme: ``X-Forwarded-Proto`` with
    ``--proxy-headers``, else whether the connection is TLS. A session's handshake is
    refused unless its page's origin has the same scheme (``realtime.auth.own_origin()``):
    without it, the site's own https pages were refused and its plain-http ones let in."""
    forwarded = getattr(protocol, "client_scheme", None)  # Daphne's, from the proxy's header
    if forwarded:
        return "wss" if forwarded in ("https", "wss") else "ws"
    return "ws" if ISSLTransport(protocol.transport, None) is None else "wss"


def install() -> None:
    """Make Daphne's command line serve with ``NowaitServer``."""
    daphne.cli.CommandLineInterface.server_class = NowaitServer
