"""The inbox a connection reads from, on the in-process layer and on any other."""

import asyncio

import pytest
from asgiref.sync import async_to_sync
from channels.layers import InMemoryChannelLayer as ChannelsInMemoryChannelLayer

from realtime.inbox import Inbox
from realtime.layers import InMemoryChannelLayer

LAYERS = [
    pytest.param(lambda: InMemoryChannelLayer(capacity=4), id="realtime"),
    pytest.param(lambda: ChannelsInMemoryChannelLayer(capacity=4), id="pumped"),
]


@pytest.mark.parametrize("make_layer", LAYERS)
def test_channel_and_local_items_arrive_in_order(make_layer):
    async def scenario():
        layer = make_layer()
        channel = await layer.new_channel()
        inbox = Inbox(layer, channel)
        await layer.send(channel, {"type": "from.layer", "n": 1})
        await asyncio.sleep(0.01)
        assert inbox.put_nowait({"type": "local", "n": 2})
        await inbox.put({"type": "local", "n": 3})
        received = [(await inbox.get())["n"] for _ in range(3)]
        await inbox.close()
        assert received == [1, 2, 3]

    async_to_sync(scenario)()


@pytest.mark.parametrize("make_layer", LAYERS)
def test_a_failing_source_is_raised_to_the_reader(make_layer):
    async def failing():
        raise ConnectionError("gone")

    async def scenario():
        layer = make_layer()
        inbox = Inbox(layer, await layer.new_channel())
        inbox.feed_from(failing)
        with pytest.raises(ConnectionError, match="gone"):
            await asyncio.wait_for(inbox.get(), 5)
        await inbox.close()

    async_to_sync(scenario)()


def test_put_nowait_says_when_the_queue_is_full():
    async def scenario():
        layer = InMemoryChannelLayer(capacity=2)
        inbox = Inbox(layer, await layer.new_channel())
        assert inbox.put_nowait({"type": "a"}) and inbox.put_nowait({"type": "b"})
        assert not inbox.put_nowait({"type": "c"})
        await inbox.close()

    async_to_sync(scenario)()


def test_close_makes_the_in_process_layer_forget_the_channel():
    async def scenario():
        layer = InMemoryChannelLayer()
        channel = await layer.new_channel()
        await layer.group_add("g", channel)
        inbox = Inbox(layer, channel)
        inbox.put_nowait({"type": "x"})
        await inbox.close()
        assert layer.channels == {} and layer.groups == {}

    async_to_sync(scenario)()
