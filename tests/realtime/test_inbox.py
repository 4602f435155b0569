"""The inbox a connection reads from, on the in-process layer and on any other."""

import asyncio
import threading

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


@pytest.mark.parametrize("make_layer", LAYERS)
def test_a_source_is_taken_from_only_while_few_of_its_items_wait_for_the_reader(make_layer):
    taken = []

    async def source():
        taken.append(len(taken))
        return {"type": "local", "n": taken[-1]}

    async def scenario():
        layer = make_layer()
        inbox = Inbox(layer, await layer.new_channel())
        inbox.feed_from(source, ahead=3)
        await asyncio.sleep(0.05)
        assert len(taken) == 3
        assert [(await inbox.get())["n"] for _ in range(5)] == [0, 1, 2, 3, 4]
        await asyncio.sleep(0.05)
        assert len(taken) == 5 + 3
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


async def check_direct_handling(layer) -> None:
    """A channel message reaches the inbox's handler at once only while its reader waits
    with nothing queued; otherwise, or when the handler declines it, it is queued in
    order. Local items are always queued."""
    channel = await layer.new_channel()
    inbox = Inbox(layer, channel)
    handled = []

    def handler(message):
        handled.append(message["n"])
        return message.get("accept", True)

    async def settle():
        for _ in range(50):  # a message from Redis takes a few loop turns to arrive
            await asyncio.sleep(0.002)

    inbox.handle_directly(handler)
    await layer.group_add("watchers", channel)

    # No one is reading: queued, in order, and not handled.
    await layer.group_send("watchers", {"type": "t", "n": 1})
    await settle()
    assert handled == []
    assert (await asyncio.wait_for(inbox.get(), 5))["n"] == 1

    # The reader waits with nothing queued: handled, and the reader is not woken.
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    await layer.group_send("watchers", {"type": "t", "n": 2})
    await layer.send(channel, {"type": "t", "n": 3})
    await settle()
    assert handled == [2, 3] and not reader.done()

    # Declined: queued for the reader, which wakes with it.
    await layer.group_send("watchers", {"type": "t", "n": 4, "accept": False})
    assert (await asyncio.wait_for(reader, 5))["n"] == 4
    assert handled == [2, 3, 4]

    # Local items are the reader's alone; a message behind one waits its turn.
    reader = asyncio.ensure_future(inbox.get())
    await asyncio.sleep(0)
    assert inbox.put_nowait({"type": "local", "n": 5})
    await layer.group_send("watchers", {"type": "t", "n": 6})
    await settle()
    assert (await asyncio.wait_for(reader, 5))["n"] == 5
    assert (await asyncio.wait_for(inbox.get(), 5))["n"] == 6
    assert handled == [2, 3, 4]
    await inbox.close()


def test_messages_go_to_the_direct_handler_only_while_the_reader_waits_idle():
    async_to_sync(check_direct_handling)(InMemoryChannelLayer(capacity=4))


def test_other_layers_queue_every_message_for_the_reader():
    async def scenario():
        layer = ChannelsInMemoryChannelLayer()
        channel = await layer.new_channel()
        inbox = Inbox(layer, channel)
        inbox.handle_directly(lambda message: pytest.fail("handled directly"))
        reader = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0.01)
        await layer.send(channel, {"type": "t", "n": 1})
        assert (await asyncio.wait_for(reader, 5))["n"] == 1
        await inbox.close()

    async_to_sync(scenario)()


def test_a_sender_on_another_event_loop_queues_instead_of_handling():
    async def scenario():
        layer = InMemoryChannelLayer(capacity=4)
        channel = await layer.new_channel()
        inbox = Inbox(layer, channel)
        inbox.handle_directly(lambda message: pytest.fail("handled on the sender's loop"))
        reader = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        elsewhere = threading.Thread(
            target=asyncio.run, args=(layer.send(channel, {"type": "t", "n": 1}),)
        )
        elsewhere.start()
        elsewhere.join(5)
        assert (await asyncio.wait_for(reader, 5))["n"] == 1
        await inbox.close()

    async_to_sync(scenario)()
