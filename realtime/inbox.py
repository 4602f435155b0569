"""One queue from which a connection reads everything, in arrival order.

A connection has two sources: its channel in the channel layer, and something local (a
WebSocket's client frames, an SSE stream's heartbeats). Channels' consumers wait on both
with ``asyncio.wait()`` and a new task per message, which was most of the cost of one
delivery in a fan-out (docs/performance.md). An ``Inbox`` is read with a plain ``await``.

On the project's layers (``realtime.layers.InMemoryChannelLayer``,
``realtime.redis_layer.RedisPubSubChannelLayer``) the inbox *is* the channel's queue: local
items join it, so a delivery wakes one task. On other layers one long-lived task moves channel
messages into a small local queue (the in-process layer's lean ``ChannelQueue``, which
holds no memory while empty); past that queue, the layer's own bounds apply.

The project's layers can also skip the wake-up: a message that arrives while the reader
waits with nothing queued can go to a handler at once (``handle_directly()``), which is
then the same as the reader taking it next.
"""

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from realtime.layers import ChannelQueue, InMemoryChannelLayer
from realtime.redis_layer import RedisPubSubChannelLayer

#: Layers whose channel queue a connection's local items can join (``inject``).
INJECTABLE_LAYERS = (InMemoryChannelLayer, RedisPubSubChannelLayer)

#: Channel messages taken in ahead of handling them, on other layers.
LOCAL_QUEUE_SIZE = 16
#: Items of a source (``feed_from()``) taken in ahead of the reader: the rest stay with the
#: source, whose own bound then holds its sender back (``realtime.server.ReadingQueue``).
FED_AHEAD = 4


class _Fed:
    """An item from a source, counted out when the reader takes it."""

    __slots__ = ("item",)

    def __init__(self, item: Any) -> None:
        self.item = item


class Inbox:
    # Each connection has one for its life: slots, and no set until a timer needs one,
    # keep an idle connection's memory down (docs/performance.md).
    __slots__ = ("layer", "channel_name", "_queue", "_tasks", "_timers", "_fed", "_room")

    def __init__(self, layer: Any, channel_name: str) -> None:
        self.layer = layer
        self.channel_name = channel_name
        self._tasks: list[asyncio.Task] = []
        self._timers: set[asyncio.TimerHandle] | None = None
        #: Items of ``feed_from()`` put in and not yet taken, and its wait for room.
        self._fed = 0
        self._room: asyncio.Future | None = None
        if isinstance(layer, INJECTABLE_LAYERS):
            self._queue = None
        else:
            self._queue = ChannelQueue(LOCAL_QUEUE_SIZE)
            self._tasks.append(asyncio.ensure_future(self._pump(self._receive_channel)))

    async def _receive_channel(self) -> Any:
        return await self.layer.receive(self.channel_name)

    async def _pump(self, source: Any, ahead: int | None = None) -> None:
        """Move items from ``source`` in, with at most ``ahead`` of them not yet taken by
        the reader if given; a failure goes in as the last item, and is raised to the
        reader by ``get()``."""
        try:
            while True:
                if ahead is not None:
                    while self._fed >= ahead:
                        self._room = asyncio.get_running_loop().create_future()
                        await self._room
                item = await source()
                if ahead is not None:
                    self._fed += 1
                    item = _Fed(item)
                await self.put(item)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self.put(exc)

    def handle_directly(self, handler: Callable[[dict[str, Any]], bool]) -> None:
        """Have the layer give ``handler`` each channel message that arrives while this
        inbox's reader waits with nothing queued, instead of queueing it; one that
        ``handler`` declines is queued. Other layers queue every message."""
        if self._queue is None:
            self.layer.handle_directly(self.channel_name, handler)

    def feed_from(self, source: Any, ahead: int = FED_AHEAD) -> None:
        """Put in everything ``source()`` returns, until the inbox is closed, taking the next
        only while fewer than ``ahead`` of its items wait for the reader. Taken as fast as
        they came, a WebSocket client's frames piled up in memory without bound whenever
        it sent faster than they were handled (docs/protocol.md)."""
        self._tasks.append(asyncio.ensure_future(self._pump(source, ahead)))

    async def put(self, item: Any) -> None:
        """Put in a local item, waiting while the queue is full."""
        if self._queue is None:
            await self.layer.inject(self.channel_name, item)
        else:
            await self._queue.put(item)

    def put_nowait(self, item: Any) -> bool:
        """Put in a local item unless the queue is full; says whether it went in."""
        try:
            if self._queue is None:
                self.layer.inject_nowait(self.channel_name, item)
            else:
                self._queue.put_nowait(item)
        except asyncio.QueueFull:
            return False
        return True

    def put_later(self, delay: float, item: Any) -> None:
        """Put in a local item after ``delay`` seconds; while the queue is full, a further
        ``delay`` later."""

        def fire() -> None:
            timers.discard(handle)
            if not self.put_nowait(item):
                self.put_later(delay, item)

        if self._timers is None:
            self._timers = set()
        timers = self._timers
        handle = asyncio.get_running_loop().call_later(delay, fire)
        timers.add(handle)

    async def get(self) -> Any:
        """The next item; an exception from a source is raised here."""
        if self._queue is None:
            item = await self.layer.receive(self.channel_name)
        else:
            item = await self._queue.get()
        if type(item) is _Fed:
            self._fed -= 1
            if self._room is not None and not self._room.done():
                self._room.set_result(None)
            item = item.item
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        """Stop the sources and make the layer forget the channel.

        Layers have no call for the latter; the project's layers have
        ``discard_channel()``, and channels-redis's own pub/sub layer drops a channel whose
        pending receive is cancelled, which stopping the pump does.
        """
        for timer in self._timers or ():
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._queue is None:
            await self.layer.discard_channel(self.channel_name)
