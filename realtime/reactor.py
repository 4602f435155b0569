"""A Twisted reactor for Daphne that writes without an event-loop registration per write.

Twisted's asyncio reactor answers every buffered write with ``add_writer()`` on the event
loop and, once the data is flushed, ``remove_writer()``: two ``epoll_ctl`` calls and
asyncio's selector bookkeeping per frame. Profiling one task update fanned out to 2,000
WebSocket subscribers put 35% of the server's time there (docs/performance.md).

``CoalescingWriteReactor`` queues such connections instead and flushes all of them in one
loop callback, as asyncio's own transports write at once. Only a connection whose socket
buffer is full is registered with the loop, to be written when it drains, as before.

The reactor runs on uvloop's event loop where uvloop is installed (it is not on Windows):
the loop's own work (ready callbacks, timers, socket readiness) is then done in C, which
saves 3-5% of a WebSocket connect's instructions in-process and 6-7% on Redis
(docs/performance.md).

``write_now()`` goes further for the frames of a fan-out: with nothing buffered before it,
a frame goes straight to the socket, as an asyncio transport writes, and Twisted's buffer
and flush are not involved at all.
"""

import asyncio
from typing import Any

from twisted.internet import tcp
from twisted.internet.asyncioreactor import AsyncioSelectorReactor
from twisted.internet.interfaces import IWriteDescriptor


def write_now(transport: Any, data: bytes) -> None:
    """``transport.write(data)``, but sent at once if nothing is buffered before it.

    Twisted buffers every write and sends it from the loop: in a fan-out to 1,000 event
    streams its flush took 25 ms of CPU for ~15 ms of ``send()`` calls, the rest being
    buffer bookkeeping, writer registrations and ``doWrite()`` (docs/performance.md).
    What the socket does not take, an error included, goes to Twisted's buffer, to be
    sent (or to end the connection) as any write is."""
    if (
        isinstance(transport, tcp.Connection)
        and not transport.TLS
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataLen
    ):
        try:
            sent = transport.socket.send(data)
        except OSError:
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


class CoalescingWriteReactor(AsyncioSelectorReactor):
    def __init__(self, eventloop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(eventloop)
        self._pending_writers: dict = {}  # an ordered set
        self._flush_scheduled = False
        self._flushing = None
        self._flushing_stopped = False

    def addWriter(self, writer: IWriteDescriptor) -> None:  # noqa: N802 (Twisted's name)
        if writer in self._pending_writers or writer in self._writers:
            return
        if writer in self._continuousPolling._writers:
            return
        self._pending_writers[writer] = None
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._asyncioEventloop.call_soon(self._flush_writers)

    def removeWriter(self, writer: IWriteDescriptor) -> None:  # noqa: N802
        if writer is self._flushing:
            self._flushing_stopped = True
        if self._pending_writers.pop(writer, False) is None:
            return
        super().removeWriter(writer)

    def getWriters(self) -> list:  # noqa: N802
        return list(self._pending_writers) + super().getWriters()

    def _flush_writers(self) -> None:
        self._flush_scheduled = False
        pending, self._pending_writers = self._pending_writers, {}
        for writer in pending:
            self._flushing, self._flushing_stopped = writer, False
            # The same call the loop would make when the socket is writable: it handles
            # errors and disconnects.
            try:
                self._readOrWrite(writer, False)
            except Exception:
                # A protocol's connectionLost() raised; the loop's own call is wrapped
                # to log it, and so is this one. Raised, it ended the flush: every later
                # writer's data stayed unsent, and their clients hung.
                self._log.failure("Writing to {writer} failed", writer=writer)
                continue
            if not self._flushing_stopped and not getattr(writer, "disconnected", False):
                # Data is left over (a full socket buffer): wait until it drains.
                super().addWriter(writer)
        self._flushing = None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop, or asyncio's where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def install(loop: asyncio.AbstractEventLoop | None = None) -> CoalescingWriteReactor:
    """Install the reactor on ``loop``, or a new event loop; must run before
    ``daphne.server`` is imported."""
    from twisted.internet.main import installReactor

    reactor = CoalescingWriteReactor(loop or new_event_loop())
    installReactor(reactor)
    return reactor
