"""channels-redis's pub/sub layer, made readable by one ``realtime.inbox.Inbox`` per
connection: the layer the project uses when ``REDIS_URL`` is set.

Two costs of the stock layer, per delivery of a group message to N local members
(docs/performance.md): each member's ``receive()`` deserializes the same bytes again, and
a connection that also waits for its client's frames needed a task that moves channel
messages into a local queue, a second wake-up per delivery. Here a message is deserialized
once per process (members get shallow copies, as from the in-process layer), and a
connection's local items join its channel's queue (``inject``), so the connection reads
one queue, as on the in-process layer.
"""

from typing import Any

from channels_redis.pubsub import RedisPubSubChannelLayer as StockLayer


class _Local:
    """A connection's own item in its channel's queue, not bytes from Redis."""

    __slots__ = ("item",)

    def __init__(self, item: Any) -> None:
        self.item = item


class RedisPubSubChannelLayer(StockLayer):
    _last: tuple[bytes, dict[str, Any]] | None = None

    def deserialize(self, message: Any) -> Any:
        if type(message) is _Local:
            return message.item
        # The receiver puts one bytes object in every member's queue.
        last = self._last
        if last is not None and last[0] is message:
            return dict(last[1])
        decoded = super().deserialize(message)
        self._last = (message, decoded)
        return dict(decoded)

    def inject_nowait(self, channel: str, message: Any) -> None:
        """Queue a local item on ``channel`` behind what is there (the queue is unbounded)."""
        queue = self._get_layer().channels.get(channel)
        if queue is not None:  # else the channel is gone, and its connection with it
            queue.put_nowait(_Local(message))

    async def inject(self, channel: str, message: Any) -> None:
        self.inject_nowait(channel, message)

    async def discard_channel(self, channel: str) -> None:
        """Forget a channel and stop listening for it in Redis (the stock layer does so
        only when a pending ``receive()`` is cancelled)."""
        layer = self._get_layer()
        if layer.channels.pop(channel, None) is not None:
            await layer._get_shard(channel).unsubscribe(channel)
