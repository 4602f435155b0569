"""A channel layer whose receive fails after a moment, as one whose server went away."""

import asyncio

from channels.layers import InMemoryChannelLayer


class BrokenLayer(InMemoryChannelLayer):
    async def receive(self, channel):
        await asyncio.sleep(0.5)
        raise ConnectionError("layer is down")


class UnreachableLayer(InMemoryChannelLayer):
    """A layer that cannot make a channel, as the Redis one while Redis is away."""

    async def new_channel(self, prefix="specific."):
        raise ConnectionError("layer is down")
