"""A lean in-process channel layer: the default when ``REDIS_URL`` is unset.

It replaces Channels' ``InMemoryChannelLayer``, which measured ~220 deliveries/s for one
update to 4,000 subscribers (docs/performance.md) because its ``group_send`` starts a task
and deep-copies the message for every member, and its ``receive`` sweeps every queue and
group for expired messages, so one broadcast costs O(connections²). It also skips a full
channel silently, losing messages while the sender is told nothing.

Here ``group_send`` puts one shallow copy per member without tasks, expiry is checked as a
message is received, and a member whose queue is full is not skipped: its next receive
returns ``{"type": "realtime.overflow"}`` so its consumer can close the connection (the
slow-client policy, close code 4008) instead of silently missing messages. So does a
receive that finds a message past its expiry, which Channels' layer drops. Memory is
bounded by ``capacity`` messages per channel. A channel whose pending receive is cancelled
(its consumer ended) is dropped with its group memberships. A channel's reader may take a
message at once, without a wake-up, while it waits with nothing queued
(``handle_directly()``).
"""

import asyncio
import sys
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import BaseChannelLayer

from realtime.conf import realtime_settings

#: The message a consumer receives in place of what overflowed its queue.
OVERFLOW = "realtime.overflow"

#: A ``ChannelQueue`` size for queues that must take every item at once.
UNBOUNDED = sys.maxsize


class ChannelQueue:
    """A channel's bounded queue, for one receiver at a time.

    Lighter than ``asyncio.Queue``, which allocates four deques and an event per channel
    (~3 KiB for each connection) and wakes getters through a deque of futures.
    """

    __slots__ = ("items", "maxsize", "handler", "_getter", "_putters")

    def __init__(self, maxsize: int) -> None:
        # Most channels are idle and empty: an empty deque still costs ~600 bytes, so
        # an empty queue holds a shared empty tuple instead.
        self.items: deque | tuple = ()
        self.maxsize = maxsize
        #: Given a message while the reader waits with nothing queued (``offer()``).
        self.handler: Callable[[dict[str, Any]], bool] | None = None
        self._getter: asyncio.Future | None = None
        self._putters: deque | None = None

    def empty(self) -> bool:
        return not self.items

    def offer(self, message: dict[str, Any]) -> bool:
        """Give ``message`` to the handler if the reader waits with nothing queued, so
        that it is handled now, in order, without waking the reader; whether it was.

        Only a sender on the reader's own event loop hands it over: the handler writes to
        the reader's connection."""
        getter = self._getter
        return (
            getter is not None
            and self.handler is not None
            and not getter.done()
            and getter.get_loop() is asyncio.get_running_loop()
            and self.handler(message)
        )

    def put_nowait(self, item: Any) -> None:
        if len(self.items) >= self.maxsize:
            raise asyncio.QueueFull
        if not self.items:
            self.items = deque()
        self.items.append(item)
        getter = self._getter
        if getter is not None and not getter.done():
            getter.set_result(None)

    async def put(self, item: Any) -> None:
        """Put ``item`` in, waiting while the queue is full."""
        while len(self.items) >= self.maxsize:
            if self._putters is None:
                self._putters = deque()
            putter = asyncio.get_running_loop().create_future()
            self._putters.append(putter)
            await putter
        self.put_nowait(item)

    async def get(self) -> Any:
        if self._getter is not None:
            raise RuntimeError("A ChannelQueue has one reader at a time.")
        while not self.items:
            self._getter = asyncio.get_running_loop().create_future()
            try:
                await self._getter
            finally:
                self._getter = None
        item = self.items.popleft()
        if not self.items:
            self.items = ()
        while self._putters:
            putter = self._putters.popleft()
            if not putter.done():  # skip putters that were cancelled meanwhile
                putter.set_result(None)
                break
        return item


class InMemoryChannelLayer(BaseChannelLayer):
    extensions = ["groups", "flush"]

    def __init__(self, expiry: int = 60, capacity: int | None = None, **kwargs: Any) -> None:
        if capacity is None:
            capacity = realtime_settings.SLOW_CLIENT_QUEUE_LIMIT
        super().__init__(expiry=expiry, capacity=capacity, **kwargs)
        self.channels: dict[str, ChannelQueue] = {}
        #: Each group's members, each with its queue: a fan-out reaches the queues without
        #: looking each channel up again.
        self.groups: dict[str, dict[str, ChannelQueue]] = {}
        self._memberships: defaultdict[str, set[str]] = defaultdict(set)
        self._overflowed: set[str] = set()

    def _queue(self, channel: str) -> ChannelQueue:
        queue = self.channels.get(channel)
        if queue is None:
            queue = self.channels[channel] = ChannelQueue(self.get_capacity(channel))
        return queue

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        queue = self._queue(channel)
        if queue.offer(message):
            return
        try:
            queue.put_nowait((time.monotonic() + self.expiry, dict(message)))
        except asyncio.QueueFull:
            raise ChannelFull(channel) from None

    async def receive(self, channel: str) -> dict[str, Any]:
        queue = self.channels.get(channel)
        if queue is None:  # checked once, not on every receive (4% of a fan-out)
            self.require_valid_channel_name(channel)
            queue = self._queue(channel)
        try:
            if channel in self._overflowed:
                self._overflowed.discard(channel)
                return {"type": OVERFLOW}
            expires, message = await queue.get()
            if expires >= time.monotonic():
                return message
            # A message that waited past the expiry is lost to this reader, which is told
            # so, as of an overflow: dropped silently, it was never missed.
            return {"type": OVERFLOW}
        except asyncio.CancelledError:
            self._forget(channel)
            raise

    async def inject(self, channel: str, message: Any) -> None:
        """Queue ``message`` on ``channel`` behind what is there, waiting while it is full.

        A connection's local items (client frames, heartbeats) go in here, so that one
        queue, and one wake-up per message, serves every source (``realtime.inbox``).
        """
        await self._queue(channel).put((float("inf"), message))

    def inject_nowait(self, channel: str, message: Any) -> None:
        """``inject()`` that raises ``asyncio.QueueFull`` instead of waiting."""
        self._queue(channel).put_nowait((float("inf"), message))

    async def new_channel(self, prefix: str = "specific.") -> str:
        return f"{prefix}inmemory!{uuid.uuid4().hex}"

    def handle_directly(self, channel: str, handler: Callable[[dict[str, Any]], bool]) -> None:
        """Give ``handler`` each message for ``channel`` that arrives while its reader
        waits with nothing queued; one it declines (returns false for) is queued. It gets
        the sender's message, shared by every member of a group, to read only."""
        self._queue(channel).handler = handler

    async def discard_channel(self, channel: str) -> None:
        """Forget a channel: its queue and its group memberships."""
        self._forget(channel)

    def _forget(self, channel: str) -> None:
        self.channels.pop(channel, None)
        self._overflowed.discard(channel)
        for group in self._memberships.pop(channel, ()):
            self._leave(group, channel)

    def _leave(self, group: str, channel: str) -> None:
        members = self.groups.get(group)
        if members is not None:
            members.pop(channel, None)
            if not members:
                del self.groups[group]

    async def group_add(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        self.groups.setdefault(group, {})[channel] = self._queue(channel)
        self._memberships[channel].add(group)

    async def group_discard(self, group: str, channel: str) -> None:
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        self._leave(group, channel)
        groups = self._memberships.get(channel)
        if groups is not None:
            groups.discard(group)
            if not groups:
                del self._memberships[channel]

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_group_name(group)
        members = self.groups.get(group)
        if not members:
            return
        expires = time.monotonic() + self.expiry
        for channel, queue in members.items():
            if queue.offer(message):
                continue
            try:
                queue.put_nowait((expires, dict(message)))
            except asyncio.QueueFull:
                self._overflowed.add(channel)

    async def flush(self) -> None:
        self.channels.clear()
        self.groups.clear()
        self._memberships.clear()
        self._overflowed.clear()

    async def close(self) -> None:
        """Nothing to release."""
