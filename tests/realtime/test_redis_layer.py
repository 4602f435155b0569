"""channels-redis's pub/sub layer as the project adapts it (realtime.redis_layer)."""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from asgiref.sync import async_to_sync
from channels_redis.pubsub import RedisPubSubChannelLayer as StockLayer

from realtime.inbox import Inbox
from realtime.redis_layer import RedisPubSubChannelLayer
from tests.realtime.test_inbox import check_direct_handling

pytestmark = pytest.mark.redis


def make_layer(url: str) -> RedisPubSubChannelLayer:
    return RedisPubSubChannelLayer(hosts=[url], prefix=f"test-{uuid.uuid4().hex[:8]}:")


def test_a_group_message_is_decoded_once_and_each_member_gets_its_own_copy(
    redis_server, monkeypatch
):
    decoded = []
    stock_deserialize = StockLayer.deserialize

    def counting(self, message):
        decoded.append(message)
        return stock_deserialize(self, message)

    monkeypatch.setattr(StockLayer, "deserialize", counting)

    async def scenario():
        layer = make_layer(redis_server)
        channels = [await layer.new_channel() for _ in range(3)]
        for channel in channels:
            await layer.group_add("watchers", channel)
        await layer.group_send("watchers", {"type": "task.update", "seq": 7})
        received = [await asyncio.wait_for(layer.receive(channel), 5) for channel in channels]
        await layer.flush()
        return received

    received = async_to_sync(scenario)()
    assert received == [{"type": "task.update", "seq": 7}] * 3
    assert len({id(message) for message in received}) == 3
    assert len(decoded) == 1


def test_the_inbox_reads_the_channel_queue_with_local_items_in_order(redis_server):
    async def scenario():
        layer = make_layer(redis_server)
        channel = await layer.new_channel()
        inbox = Inbox(layer, channel)
        await layer.send(channel, {"type": "from.layer", "n": 1})
        first = await asyncio.wait_for(inbox.get(), 5)
        assert inbox.put_nowait({"type": "local", "n": 2})
        await inbox.put({"type": "local", "n": 3})
        await layer.send(channel, {"type": "from.layer", "n": 4})
        rest = [(await asyncio.wait_for(inbox.get(), 5))["n"] for _ in range(3)]
        await inbox.close()
        await layer.flush()
        return [first["n"], *rest]

    assert async_to_sync(scenario)() == [1, 2, 3, 4]


def test_messages_from_redis_go_to_the_direct_handler_only_while_the_reader_waits_idle(
    redis_server,
):
    async def scenario():
        layer = make_layer(redis_server)
        await check_direct_handling(layer)
        await layer.flush()

    async_to_sync(scenario)()


@contextlib.asynccontextmanager
async def layer_and_redis(url: str) -> AsyncIterator[tuple[RedisPubSubChannelLayer, Any]]:
    """A fresh layer, and a plain Redis client to look at what it subscribed to."""
    layer, client = make_layer(url), aioredis.Redis.from_url(url)
    try:
        yield layer, client
    finally:
        await client.aclose()
        await layer.flush()


async def subscribers(client: Any, channel: str) -> int:
    [(_, count)] = await client.pubsub_numsub(channel)
    return count


def test_closing_the_inbox_ends_the_channels_redis_subscription(redis_server):
    async def scenario():
        async with layer_and_redis(redis_server) as (layer, client):
            channel = await layer.new_channel()
            inbox = Inbox(layer, channel)
            assert await subscribers(client, channel) == 1
            await inbox.close()
            assert await subscribers(client, channel) == 0

    async_to_sync(scenario)()


def test_a_cancelled_receive_ends_the_subscription_as_in_the_stock_layer(redis_server):
    async def scenario():
        async with layer_and_redis(redis_server) as (layer, client):
            channel = await layer.new_channel()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(layer.receive(channel), 0.05)
            assert channel not in layer._get_layer().channels
            assert await subscribers(client, channel) == 0

    async_to_sync(scenario)()


def test_a_channel_not_made_here_is_subscribed_on_first_receive(redis_server):
    """Another process's channel name: the stock layer's path, which subscribes first."""

    async def scenario():
        async with layer_and_redis(redis_server) as (layer, client):
            channel = f"{layer._get_layer().prefix}specific.elsewhere"
            receiving = asyncio.ensure_future(layer.receive(channel))
            for _ in range(100):
                if await subscribers(client, channel) == 1:
                    break
                await asyncio.sleep(0.01)
            await layer.send(channel, {"type": "hello"})
            return await asyncio.wait_for(receiving, 5)

    assert async_to_sync(scenario)() == {"type": "hello"}
