"""channels-redis's pub/sub layer as the project adapts it (realtime.redis_layer)."""

import asyncio
import contextlib
import logging
import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from asgiref.sync import async_to_sync
from channels_redis.pubsub import RedisPubSubChannelLayer as StockLayer

from realtime import redis_layer
from realtime.inbox import Inbox
from realtime.redis_layer import OfferingQueue, RedisPubSubChannelLayer
from tests.conftest import free_port, service_unavailable
from tests.realtime.test_inbox import check_direct_handling

pytestmark = pytest.mark.redis


def make_layer(url: str) -> RedisPubSubChannelLayer:
    return RedisPubSubChannelLayer(hosts=[url], prefix=f"test-{uuid.uuid4().hex[:8]}:")


def record_calls(monkeypatch, method: str) -> list:
    """The messages each later call of the stock layer's ``method`` is given."""
    calls = []
    stock = getattr(StockLayer, method)

    def recording(self, message):
        calls.append(message)
        return stock(self, message)

    monkeypatch.setattr(StockLayer, method, recording)
    return calls


def test_a_group_message_is_decoded_once_and_each_member_gets_its_own_copy(
    redis_server, monkeypatch
):
    decoded = record_calls(monkeypatch, "deserialize")

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


def test_a_layers_channels_share_one_pattern_subscription_that_other_processes_reach(
    redis_server,
):
    async def scenario():
        async with layer_and_redis(redis_server) as (layer, client):
            before = await client.pubsub_numpat()
            channels = [await layer.new_channel() for _ in range(3)]
            assert await client.pubsub_numpat() == before + 1
            assert [await subscribers(client, channel) for channel in channels] == [0, 0, 0]
            # Another process, with the same prefix.
            other = RedisPubSubChannelLayer(hosts=[redis_server], prefix=layer.prefix)
            await other.send(channels[1], {"type": "hello"})
            assert await asyncio.wait_for(layer.receive(channels[1]), 5) == {"type": "hello"}
            await other.flush()
            # A flush drops every subscription; the next channel subscribes the pattern again.
            await layer.flush()
            fresh = await layer.new_channel()
            await layer.send(fresh, {"type": "again"})
            assert await asyncio.wait_for(layer.receive(fresh), 5) == {"type": "again"}

    async_to_sync(scenario)()


def test_layers_on_two_databases_of_one_redis_do_not_reach_each_others_groups(redis_server):
    """Pub/sub channels belong to no database: deployments told apart only by theirs got
    each other's broadcasts and task updates."""
    base = redis_server.rsplit("/", 1)[0]

    async def scenario():
        prefix = f"test-{uuid.uuid4().hex[:8]}:"
        layers = [
            RedisPubSubChannelLayer(hosts=[f"{base}/{database}"], prefix=prefix)
            for database in (1, 2, 2)
        ]
        try:
            channels = [await layer.new_channel() for layer in layers]
            for layer, channel in zip(layers, channels, strict=True):
                await layer.group_add("broadcast", channel)
            await layers[0].group_send("broadcast", {"type": "from-one"})
            await layers[1].group_send("broadcast", {"type": "from-two"})
            received = []
            for layer, channel in zip(layers, channels, strict=True):
                inbox = []
                with contextlib.suppress(TimeoutError):
                    while True:
                        inbox.append((await asyncio.wait_for(layer.receive(channel), 0.5))["type"])
                received.append(inbox)
            return received
        finally:
            for layer in layers:
                await layer.flush()

    assert async_to_sync(scenario)() == [["from-one"], ["from-two"], ["from-two"]]


def test_a_database_is_read_from_a_layers_host_as_redis_py_reads_it():
    assert [
        redis_layer.database_of(host)
        for host in (
            {"address": "redis://127.0.0.1:6379/7"},
            {"address": "redis://127.0.0.1:6379/%38"},
            {"address": "redis://127.0.0.1:6379", "db": 3},
            {"address": "unix:///run/redis.sock?db=4"},
            {"host": "127.0.0.1", "port": 6379, "db": 5},
            {"host": "127.0.0.1", "port": 6379},
        )
    ] == [7, 8, 3, 4, 5, 0]


def test_a_pattern_names_a_prefix_as_it_is_written(redis_server):
    """Glob characters in a prefix match only themselves."""

    async def scenario():
        url = redis_server
        layer = RedisPubSubChannelLayer(hosts=[url], prefix=f"test-{uuid.uuid4().hex[:8]}*[?]:")
        lookalike = RedisPubSubChannelLayer(hosts=[url], prefix=layer.prefix)
        try:
            channel = await layer.new_channel()
            start, _, _ = channel.rpartition("!")
            await lookalike.send(channel, {"type": "hello"})
            assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "hello"}
            # A name the pattern would match if its "*", "[?]" were taken as globs.
            stranger = f"{start.replace('*[?]', 'x?', 1)}!{uuid.uuid4().hex}"
            layer._get_layer().channels[stranger] = asyncio.Queue()
            await lookalike.send(stranger, {"type": "stray"})
            await asyncio.sleep(0.1)
            assert layer._get_layer().channels[stranger].empty()
        finally:
            await lookalike.flush()
            await layer.flush()

    async_to_sync(scenario)()


def test_closing_the_inbox_forgets_the_channel(redis_server):
    async def scenario():
        async with layer_and_redis(redis_server) as (layer, client):
            channel = await layer.new_channel()
            await Inbox(layer, channel).close()
            assert channel not in layer._get_layer().channels
            await layer.send(channel, {"type": "late"})  # reaches no queue, raises nothing
            fresh = await layer.new_channel()
            await layer.send(fresh, {"type": "next"})
            assert await asyncio.wait_for(layer.receive(fresh), 5) == {"type": "next"}
            assert channel not in layer._get_layer().channels

    async_to_sync(scenario)()


def test_a_cancelled_receive_forgets_the_channel_as_the_stock_layer_does(redis_server):
    async def scenario():
        async with layer_and_redis(redis_server) as (layer, client):
            channel = await layer.new_channel()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(layer.receive(channel), 0.05)
            assert channel not in layer._get_layer().channels

    async_to_sync(scenario)()


async def receive_elsewhere(layer: RedisPubSubChannelLayer, client: Any) -> tuple[str, Any]:
    """A channel not made by ``layer`` (another process's name), and a pending receive on
    it, once the stock layer's path has subscribed to it."""
    channel = f"{layer._get_layer().prefix}specific.elsewhere"
    receiving = asyncio.ensure_future(layer.receive(channel))
    for _ in range(100):
        if await subscribers(client, channel) == 1:
            break
        await asyncio.sleep(0.01)
    return channel, receiving


def test_a_channel_not_made_here_is_subscribed_on_first_receive(redis_server):
    """Another process's channel name: the stock layer's path, which subscribes first."""

    async def scenario():
        async with layer_and_redis(redis_server) as (layer, client):
            channel, receiving = await receive_elsewhere(layer, client)
            await layer.send(channel, {"type": "hello"})
            return await asyncio.wait_for(receiving, 5)

    assert async_to_sync(scenario)() == {"type": "hello"}


def test_a_group_member_the_stock_layer_made_gets_this_processs_group_message_once(
    redis_server,
):
    async def scenario():
        async with layer_and_redis(redis_server) as (layer, client):
            channel, receiving = await receive_elsewhere(layer, client)
            await layer.group_add("watchers", channel)
            await layer.group_send("watchers", {"type": "hello"})
            first = await asyncio.wait_for(receiving, 5)
            await asyncio.sleep(0.2)  # Redis's copy, if it were not dropped
            return first, layer._get_layer().channels[channel].qsize()

    assert async_to_sync(scenario)() == ({"type": "hello"}, 0)


def test_a_message_for_several_groups_is_serialized_once_and_reaches_each(
    redis_server, monkeypatch
):
    serialized = record_calls(monkeypatch, "serialize")

    async def scenario():
        async with layer_and_redis(redis_server) as (layer, client):
            channels = [await layer.new_channel() for _ in range(3)]
            for group, channel in zip(["a", "b", "c"], channels, strict=True):
                await layer.group_add(group, channel)
            await layer.group_add("c", channels[0])  # a member of two of them
            await layer.group_send_many(["a", "b", "c", "nobody"], {"type": "hello"})
            first = [await asyncio.wait_for(layer.receive(c), 5) for c in channels]
            again = await asyncio.wait_for(layer.receive(channels[0]), 5)
            return first, again

    first, again = async_to_sync(scenario)()
    assert first == [{"type": "hello"}] * 3 and again == {"type": "hello"}
    assert len(serialized) == 1


def test_this_process_gets_its_own_group_message_at_once_and_drops_the_copy_from_redis(
    redis_server, monkeypatch
):
    copies: list[bytes] = []  # what the shard receiver got back from Redis
    receive = redis_layer._receive_unless_published_here

    def recording(shard, origin, message):
        if message is not None:
            copies.append(message["data"])
        return receive(shard, origin, message)

    monkeypatch.setattr(redis_layer, "_receive_unless_published_here", recording)

    async def scenario():
        async with layer_and_redis(redis_server) as (layer, _):
            channel = await layer.new_channel()
            await layer.group_add("watchers", channel)
            queue = layer._get_layer().channels[channel]
            await layer.group_send("watchers", {"type": "hello"})
            queued_at_once = len(queue.items)
            received = await asyncio.wait_for(layer.receive(channel), 5)
            for _ in range(500):  # until Redis's copy is back
                if copies:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.05)
            return queued_at_once, received, len(queue.items)

    assert async_to_sync(scenario)() == (1, {"type": "hello"}, 0)
    assert len(copies) == 1


def test_the_publisher_delivers_to_its_own_members_once_redis_has_the_message(
    redis_server, monkeypatch
):
    """Delivering first held the other processes' share of a fan-out back by the length of
    this process's share."""

    seen_by_other_processes: list[bool] = []
    offer = OfferingQueue.offer

    def delivered_checking(self, message):
        # The publisher's delivery to its own member starts with the offer. This blocks
        # the loop: a publish still to be sent could not be sent meanwhile.
        published = other_process.get_message(ignore_subscribe_messages=True, timeout=2)
        seen_by_other_processes.append(
            published is not None and self.layer.decode(published["data"]) == message
        )
        return offer(self, message)

    monkeypatch.setattr(OfferingQueue, "offer", delivered_checking)
    other_process = redis.Redis.from_url(redis_server).pubsub()

    async def scenario():
        async with layer_and_redis(redis_server) as (layer, _):
            channel = await layer.new_channel()
            await layer.group_add("watchers", channel)
            other_process.subscribe(layer._get_layer()._get_group_channel_name("watchers"))
            other_process.get_message(timeout=2)  # the confirmation
            await layer.group_send("watchers", {"type": "hello"})
            return await asyncio.wait_for(layer.receive(channel), 5)

    try:
        assert async_to_sync(scenario)() == {"type": "hello"}
    finally:
        other_process.close()
    assert seen_by_other_processes == [True]


def test_a_waiting_member_of_the_publishers_process_is_handed_the_message_undecoded(
    redis_server, monkeypatch
):
    decoded = record_calls(monkeypatch, "deserialize")
    handled = []

    async def scenario():
        async with layer_and_redis(redis_server) as (layer, _):
            channels = [await layer.new_channel() for _ in range(3)]
            for channel in channels:
                layer.handle_directly(channel, lambda message: handled.append(message) or True)
                await layer.group_add("watchers", channel)
            readers = [asyncio.ensure_future(layer.receive(channel)) for channel in channels]
            await asyncio.sleep(0)
            message = {"type": "task.update", "seq": 7}
            await layer.group_send("watchers", message)
            await asyncio.sleep(0.05)  # Redis's copy comes back, and is dropped
            assert not any(reader.done() for reader in readers)
            for reader in readers:
                reader.cancel()
            return message

    message = async_to_sync(scenario)()
    assert handled == [message] * 3
    assert decoded == []


def test_a_failed_publish_raises_and_reaches_no_member_of_this_process(redis_server, monkeypatch):
    """A sender told that a message was not sent (a broadcast's 503) must be right."""

    async def unreachable(self, *args, **kwargs):
        raise redis.ConnectionError("Redis went away")

    async def scenario():
        async with layer_and_redis(redis_server) as (layer, _):
            channel = await layer.new_channel()
            await layer.group_add("watchers", channel)
            monkeypatch.setattr(aioredis.client.Redis, "execute_command", unreachable)
            with pytest.raises(redis.ConnectionError):
                await layer.group_send("watchers", {"type": "hello"})
            monkeypatch.undo()
            await layer.group_send("watchers", {"type": "next"})
            return await asyncio.wait_for(layer.receive(channel), 5)

    assert async_to_sync(scenario)() == {"type": "next"}


def test_another_process_gets_a_group_message_through_redis_once(redis_server):
    async def scenario():
        async with layer_and_redis(redis_server) as (here, _):
            # Another process, with the same prefix.
            there = RedisPubSubChannelLayer(hosts=[redis_server], prefix=here.prefix)
            try:
                mine, theirs = await here.new_channel(), await there.new_channel()
                await here.group_add("watchers", mine)
                await there.group_add("watchers", theirs)
                await here.group_send("watchers", {"type": "from here"})
                await there.group_send("watchers", {"type": "from there"})
                received = {
                    name: [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(2)]
                    for name, layer, channel in [("here", here, mine), ("there", there, theirs)]
                }
                await asyncio.sleep(0.2)  # nothing more comes
                left = [
                    len(layer._get_layer().channels[channel].items)
                    for layer, channel in [(here, mine), (there, theirs)]
                ]
                return received, left
            finally:
                await there.flush()

    received, left = async_to_sync(scenario)()
    for name in ("here", "there"):
        assert sorted(m["type"] for m in received[name]) == ["from here", "from there"], name
    assert left == [0, 0]


def test_a_groups_members_are_delivered_to_in_the_order_they_joined(redis_server):
    """By the publisher, and by the receiver of another process: the in-process layer's
    order, which follows the connections' order in memory (``redis_layer.Members``)."""

    async def joined(layer: RedisPubSubChannelLayer, count: int, offered: list) -> list[str]:
        channels = [await layer.new_channel() for _ in range(count)]
        for channel in channels:
            layer.handle_directly(channel, lambda message, c=channel: offered.append(c) or True)
        order = channels[::2] + channels[1::2]
        for channel in order:
            await layer.group_add("watchers", channel)
        await layer.group_discard("watchers", order[0])
        await layer.group_add("watchers", order[0])  # it joins again, last
        return order[1:] + order[:1]

    async def scenario():
        async with layer_and_redis(redis_server) as (here, _):
            there = RedisPubSubChannelLayer(hosts=[redis_server], prefix=here.prefix)
            offered_here, offered_there = [], []
            try:
                order_here = await joined(here, 30, offered_here)
                order_there = await joined(there, 30, offered_there)
                readers = [
                    asyncio.ensure_future(layer.receive(channel))
                    for layer, order in [(here, order_here), (there, order_there)]
                    for channel in order
                ]
                await asyncio.sleep(0)
                await here.group_send("watchers", {"type": "task.update"})
                for _ in range(50):
                    if len(offered_there) == len(order_there):
                        break
                    await asyncio.sleep(0.05)
                for reader in readers:
                    reader.cancel()
                return (offered_here, order_here), (offered_there, order_there)
            finally:
                await there.flush()

    (offered_here, order_here), (offered_there, order_there) = async_to_sync(scenario)()
    assert offered_here == order_here
    assert offered_there == order_there


def test_a_refused_group_add_leaves_no_group_behind(redis_server):
    async def scenario():
        async with layer_and_redis(redis_server) as (layer, _):
            with pytest.raises(RuntimeError):
                await layer.group_add("watchers", "specific.made-elsewhere!1")
            return dict(layer._get_layer().groups)

    assert async_to_sync(scenario)() == {}


def test_a_group_is_dropped_with_its_subscription_when_its_last_member_leaves(redis_server):
    async def scenario():
        async with layer_and_redis(redis_server) as (layer, _):
            loop_layer = layer._get_layer()
            name = loop_layer._get_group_channel_name("watchers")
            shard = loop_layer._get_shard(name)
            first, second = await layer.new_channel(), await layer.new_channel()
            await layer.group_add("watchers", first)
            await layer.group_add("watchers", second)
            subscribed = name in shard._subscribed_to
            await layer.group_discard("watchers", first)
            left = list(loop_layer.groups[name])
            await layer.group_discard("watchers", second)
            gone = name not in loop_layer.groups and name not in shard._subscribed_to
            return subscribed, left == [second], gone

    subscribed, second_left, gone = async_to_sync(scenario)()
    assert subscribed
    assert second_left
    assert gone


def test_a_publish_on_a_connection_redis_closed_is_sent_again_on_a_new_one(redis_server):
    """As after a restart of Redis: the first update was lost, and the first broadcast
    answered 503, with Redis up."""

    async def scenario():
        async with layer_and_redis(redis_server) as (layer, client):
            channel = await layer.new_channel()
            await layer.group_add("watchers", channel)
            await layer.group_send("watchers", {"type": "first"})
            assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "first"}
            [shard] = layer._get_layer()._shards
            await client.client_kill_filter(_id=await shard._redis.client_id())
            await layer.group_send("watchers", {"type": "after"})
            assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "after"}

    async_to_sync(scenario)()


@contextlib.asynccontextmanager
async def silent_redis() -> AsyncIterator[str]:
    """The URL of a server that accepts connections and reads commands but never answers,
    as a Redis that has stalled does."""
    writers = []

    async def take(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        await reader.read()

    server = await asyncio.start_server(take, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in writers:
            writer.close()
        server.close()


def test_commands_queued_behind_two_that_redis_did_not_answer_fail_with_them():
    """Each used to wait out its own timeout in turn: the sixth of six publishes failed
    after six timeouts, and with Redis silent for long, publishes piled up."""
    timeout = 0.5

    async def publish(layer: RedisPubSubChannelLayer, group: str) -> float:
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            await layer.group_send(group, {"type": "hello"})
        return time.monotonic() - started

    async def scenario() -> tuple[list[float], float]:
        async with silent_redis() as url:
            layer = RedisPubSubChannelLayer(hosts=[{"address": url, "socket_timeout": timeout}])
            queued = await asyncio.gather(*(publish(layer, f"group{i}") for i in range(6)))
            # Queued after those timeouts, a command tries Redis again.
            return queued, await publish(layer, "later")

    queued, later = async_to_sync(scenario)()
    assert all(timeout * 0.9 < waited < timeout * 2.8 for waited in queued), queued
    assert later > timeout * 0.9


@contextlib.asynccontextmanager
async def stalling_proxy(url: str) -> AsyncIterator[tuple[str, dict]]:
    """The URL of a proxy to the Redis at ``url`` whose answers wait while its state says
    ``stalled``, as a Redis that stalls for a moment, and whose commands wait while it says
    ``commands_stalled``, as on a slow way to Redis."""
    target = redis.connection.parse_url(url)
    state = {"stalled": False, "commands_stalled": False}

    async def pipe(reader, writer, stalled: str) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                while state[stalled]:
                    await asyncio.sleep(0.01)
                writer.write(data)
                await writer.drain()
        writer.close()

    async def take(client_reader, client_writer) -> None:
        reader, writer = await asyncio.open_connection(target["host"], target.get("port", 6379))
        await asyncio.gather(
            pipe(client_reader, writer, "commands_stalled"),
            pipe(reader, client_writer, "stalled"),
        )

    server = await asyncio.start_server(take, "127.0.0.1", 0)
    try:
        yield f"redis://127.0.0.1:{server.sockets[0].getsockname()[1]}/{target.get('db', 0)}", state
    finally:
        server.close()


@contextlib.asynccontextmanager
async def here_and_there(
    url: str, redis_server: str
) -> AsyncIterator[tuple[RedisPubSubChannelLayer, RedisPubSubChannelLayer]]:
    """This process's layer, reaching Redis at ``url``, and another process's, reaching it
    directly, sharing a prefix; flushed at the end."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    here = RedisPubSubChannelLayer(hosts=[url], prefix=prefix)
    there = RedisPubSubChannelLayer(hosts=[redis_server], prefix=prefix)
    try:
        yield here, there
    finally:
        await there.flush()
        await here.flush()


def test_commands_queued_behind_one_timeout_go_to_a_redis_that_came_back(redis_server):
    """Failing all of them at the first timeout lost those that Redis, back a moment
    later, would have taken."""

    async def scenario() -> list[str]:
        async with stalling_proxy(redis_server) as (url, state):
            layer = RedisPubSubChannelLayer(
                hosts=[{"address": url, "socket_timeout": 0.5}],
                prefix=f"test-{uuid.uuid4().hex[:8]}:",
            )
            await layer.group_send("warm", {"type": "hello"})
            state["stalled"] = True
            asyncio.get_running_loop().call_later(0.7, state.update, {"stalled": False})

            async def publish() -> str:
                try:
                    await layer.group_send("watchers", {"type": "hello"})
                except redis.TimeoutError:
                    return "timed out"
                return "sent"

            first = asyncio.ensure_future(publish())
            await asyncio.sleep(0.05)
            queued = asyncio.gather(publish(), publish())  # behind the first, stalled
            return [await first, *await queued]

    assert async_to_sync(scenario)() == ["timed out", "sent", "sent"]


def test_a_channel_is_forgotten_without_waiting_for_a_command_redis_does_not_answer(
    redis_server,
):
    """Each consumer forgets its channel as it ends, which sends Redis nothing; it waited
    for the shard's lock behind a stalled publish, and then failed with it."""

    async def scenario() -> float:
        async with stalling_proxy(redis_server) as (url, state):
            layer = RedisPubSubChannelLayer(
                hosts=[{"address": url, "socket_timeout": 0.5}],
                prefix=f"test-{uuid.uuid4().hex[:8]}:",
            )
            channel = await layer.new_channel()
            await layer.group_send("warm", {"type": "hello"})
            state["stalled"] = True
            publish = asyncio.ensure_future(layer.group_send("watchers", {"type": "hello"}))
            await asyncio.sleep(0.05)
            started = time.monotonic()
            await layer.discard_channel(channel)
            took = time.monotonic() - started
            with pytest.raises(redis.TimeoutError):
                await publish
            return took

    assert async_to_sync(scenario)() < 0.2


def test_a_member_gets_what_another_process_publishes_once_it_has_joined(redis_server):
    """Joined once its SUBSCRIBE was sent, a member that reached Redis late missed what was
    published meanwhile: a subscriber read the task's state, and lost the next change."""

    async def scenario() -> dict:
        async with (
            stalling_proxy(redis_server) as (url, state),
            here_and_there(url, redis_server) as (here, there),
        ):
            mine = await here.new_channel()
            state["commands_stalled"] = True
            asyncio.get_running_loop().call_later(0.3, state.update, {"commands_stalled": False})
            await here.group_add("watchers", mine)
            await there.group_send("watchers", {"type": "published after the join"})
            return await asyncio.wait_for(here.receive(mine), 2)

    assert async_to_sync(scenario)() == {"type": "published after the join"}


class OwnRedis:
    """A Redis server of a test's own, to stop and start again on its port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"]
        self.process = subprocess.Popen(
            [*command, "--dir", str(self.directory)], stdout=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def redis_of_our_own(tmp_path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        service_unavailable("redis-server is not installed")
    server = OwnRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_joins_that_failed_leave_nothing_waiting_for_a_confirmation(redis_of_our_own):
    """One was kept for each group named: a client subscribing to new tasks while Redis
    was away grew the server for good."""

    async def scenario() -> dict:
        prefix = f"test-{uuid.uuid4().hex[:8]}:"
        layer = RedisPubSubChannelLayer(
            hosts=[{"address": redis_of_our_own.url, "socket_timeout": 0.5}], prefix=prefix
        )
        channel = await layer.new_channel()
        redis_of_our_own.stop()
        for number in range(3):  # the first may be sent, and time out unconfirmed
            with pytest.raises(redis.RedisError):
                await layer.group_add(f"group-{number}", channel)
        return layer._get_layer()._shards[0]._confirmations

    assert async_to_sync(scenario)() == {}


def test_a_receiver_that_lost_redis_says_so_once_and_hears_again_soon_after_it_returns(
    redis_of_our_own, caplog
):
    """It logged a traceback every second of an outage, and tried again only a second
    after each failure: messages published meanwhile, once Redis was back, were lost."""
    layer = make_layer(redis_of_our_own.url)

    async def scenario() -> float:
        channel = await layer.new_channel()
        await layer.group_add("watchers", channel)
        redis_of_our_own.stop()
        await asyncio.sleep(1)  # tried again, and failed, every tenth of a second
        redis_of_our_own.start()
        back = time.monotonic()
        other = RedisPubSubChannelLayer(hosts=[redis_of_our_own.url], prefix=layer.prefix)

        async def publish_often() -> None:
            while True:
                await other.group_send("watchers", {"type": "hello"})
                await asyncio.sleep(0.02)

        publishing = asyncio.ensure_future(publish_often())
        try:  # what is published reaches the group once it listens again
            assert await asyncio.wait_for(layer.receive(channel), 5) == {"type": "hello"}
            return time.monotonic() - back
        finally:
            publishing.cancel()

    with caplog.at_level(logging.WARNING, logger="realtime.redis_layer"):
        heard_after = async_to_sync(scenario)()
    messages = [record.getMessage() for record in caplog.records]
    assert messages[0].startswith("Could not receive from Redis; trying again every 0.1 s: ")
    assert messages[1:] == ["Receiving from Redis again"]
    # One line: each restart of Redis logged a traceback of ~25 lines in every process.
    assert caplog.records[0].exc_info is None
    assert heard_after < 0.5


def test_a_group_left_while_redis_was_away_is_not_listened_to_once_it_returns(
    redis_of_our_own,
):
    """The stock layer forgets a group before its UNSUBSCRIBE, and redis-py, which keeps
    a channel until Redis confirms its UNSUBSCRIBE, subscribed again when it reconnected:
    each task whose last watcher here left during an outage went on being sent here, to
    be dropped, for as long as the process lived."""
    layer = make_layer(redis_of_our_own.url)

    async def scenario() -> list[bytes]:
        stays, leaves = await layer.new_channel(), await layer.new_channel()
        await layer.group_add("staying", stays)
        await layer.group_add("leaving", leaves)
        redis_of_our_own.stop()
        # Raised, or sent to a connection that Redis had closed: never done either way.
        with contextlib.suppress(redis.RedisError):
            await layer.group_discard("leaving", leaves)
        redis_of_our_own.start()
        client = redis.asyncio.Redis.from_url(redis_of_our_own.url)
        try:
            # Once the process listens again, the group it left is no longer among
            # what it listens to.
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                channels = sorted(await client.pubsub_channels())
                if channels and not any(b"leaving" in channel for channel in channels):
                    return channels
                await asyncio.sleep(0.05)
            return channels
        finally:
            await client.aclose()

    channels = async_to_sync(scenario)()
    assert [channel.rsplit(b"__group__", 1)[1] for channel in channels] == [b"staying"]


def test_a_group_left_just_as_redis_is_reached_again_is_left_and_can_be_joined_again(
    redis_server,
):
    """An UNSUBSCRIBE that is the first command after Redis closed the connection reconnects,
    and the reconnection forgets the group being left: the stock layer's own bookkeeping of
    it then raised KeyError, and the connection leaving ended with a traceback."""
    layer = make_layer(redis_server)
    other = RedisPubSubChannelLayer(hosts=[redis_server], prefix=layer.prefix)

    async def scenario() -> dict:
        channel = await layer.new_channel()
        await layer.group_add("staying", channel)
        await layer.group_add("leaving", channel)
        pubsub = layer._get_layer()._shards[0]._pubsub
        unsubscribe = pubsub.unsubscribe

        async def reconnecting_first(*channels):
            # What redis-py's command does on a connection Redis closed (the receiver,
            # reading the same connection, is left out of it here).
            await pubsub.on_connect(pubsub.connection)
            return await unsubscribe(*channels)

        pubsub.unsubscribe = reconnecting_first
        await layer.group_discard("leaving", channel)
        del pubsub.unsubscribe
        # Left for good, and joined again as any group is: its messages arrive.
        await layer.group_add("leaving", channel)
        await other.group_send("leaving", {"type": "back"})
        return await asyncio.wait_for(layer.receive(channel), 2)

    assert async_to_sync(scenario)() == {"type": "back"}


def test_members_joining_while_redis_confirms_the_first_wait_for_it(redis_server):
    async def scenario() -> tuple[list[bool], dict]:
        async with (
            stalling_proxy(redis_server) as (url, state),
            here_and_there(url, redis_server) as (here, there),
        ):
            first, second = await here.new_channel(), await here.new_channel()
            state["stalled"] = True
            joins = [
                asyncio.ensure_future(here.group_add("watchers", channel))
                for channel in (first, second)
            ]
            await asyncio.sleep(0.2)
            waiting = [not join.done() for join in joins]
            state["stalled"] = False
            await asyncio.gather(*joins)
            await there.group_send("watchers", {"type": "hello"})
            received = {
                channel: await asyncio.wait_for(here.receive(channel), 2)
                for channel in (first, second)
            }
            return waiting, received

    waiting, received = async_to_sync(scenario)()
    assert waiting == [True, True]
    assert list(received.values()) == [{"type": "hello"}, {"type": "hello"}]


def test_a_member_joining_as_the_last_one_leaves_stays_subscribed(redis_server):
    """The join found the group still subscribed and went on; the leave's UNSUBSCRIBE,
    queued behind a publish, went after it, and the member heard nothing from Redis."""

    async def scenario() -> dict:
        async with (
            stalling_proxy(redis_server) as (url, state),
            here_and_there(url, redis_server) as (here, there),
        ):
            leaving, joining = await here.new_channel(), await here.new_channel()
            await here.group_add("watchers", leaving)
            state["stalled"] = True
            publish = asyncio.ensure_future(here.group_send("others", {"type": "x"}))
            await asyncio.sleep(0.05)  # the publish holds the shard's lock
            leave = asyncio.ensure_future(here.group_discard("watchers", leaving))
            await asyncio.sleep(0.05)
            join = asyncio.ensure_future(here.group_add("watchers", joining))
            await asyncio.sleep(0.05)
            state["stalled"] = False
            await asyncio.gather(publish, leave, join)
            await there.group_send("watchers", {"type": "hello"})
            return await asyncio.wait_for(here.receive(joining), 2)

    assert async_to_sync(scenario)() == {"type": "hello"}


def test_a_member_waits_for_the_confirmation_of_its_own_subscribe(redis_server):
    """A join, its leave and another join before Redis answers: the first SUBSCRIBE's
    confirmation is not the second's."""

    async def scenario() -> tuple[bool, bool]:
        async with stalling_proxy(redis_server) as (url, state):
            here = RedisPubSubChannelLayer(hosts=[url], prefix=f"test-{uuid.uuid4().hex[:8]}:")
            try:
                first, second = await here.new_channel(), await here.new_channel()
                state["stalled"] = True
                cancelled = asyncio.ensure_future(here.group_add("watchers", first))
                await asyncio.sleep(0.1)  # its SUBSCRIBE reached Redis; the answer waits
                cancelled.cancel()
                state["commands_stalled"] = True
                await here.group_discard("watchers", first)
                join = asyncio.ensure_future(here.group_add("watchers", second))
                await asyncio.sleep(0.1)
                state["stalled"] = False  # the first SUBSCRIBE's confirmation comes
                await asyncio.sleep(0.3)
                joined_early = join.done()
                state["commands_stalled"] = False
                await join
                return joined_early, join.done()
            finally:
                await here.flush()

    assert async_to_sync(scenario)() == (False, True)


def test_a_flush_fails_the_members_waiting_for_a_confirmation_at_once(redis_server):
    async def scenario() -> float:
        async with stalling_proxy(redis_server) as (url, state):
            here = RedisPubSubChannelLayer(hosts=[url], prefix=f"test-{uuid.uuid4().hex[:8]}:")
            channel = await here.new_channel()
            state["stalled"] = True
            join = asyncio.ensure_future(here.group_add("watchers", channel))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            await here.flush()
            with pytest.raises(redis.ConnectionError):
                await join
            return time.monotonic() - started

    assert async_to_sync(scenario)() < 1
