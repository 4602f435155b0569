"""Both registry backends answer the same counts; Redis entries lapse without renewal."""

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from asgiref.sync import async_to_sync

from realtime import redis_registry
from realtime.conf import realtime_settings
from realtime.redis_registry import RedisRegistry
from realtime.registry import ConnectionRegistry, Entry, LocalRegistry, Overview

TRANSPORTS = ["websocket", "sse"]
TASK_1, TASK_2 = uuid.uuid4(), uuid.uuid4()


def entry(user_id: int, transport: str) -> Entry:
    return Entry(connection_id=uuid.uuid4(), user_id=user_id, transport=transport)


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def registry(request) -> ConnectionRegistry:
    """A registry of each backend."""
    if request.param == "local":
        return LocalRegistry()
    return redis_registry_factory(request.getfixturevalue("redis_server"))()


def redis_registry_factory(url: str) -> Callable[..., RedisRegistry]:
    """Registries of this test run (its own key prefix), as its server processes use."""
    return lambda lease_seconds=60.0: RedisRegistry(
        url, lease_seconds=lease_seconds, prefix=realtime_settings.REDIS_PREFIX
    )


def run(scenario: Callable[[], Awaitable[None]], *registries: ConnectionRegistry) -> None:
    """Run a scenario on a clean registry, closing every registry afterwards."""

    async def wrapped() -> None:
        if isinstance(registries[0], RedisRegistry):
            await registries[0].flush()
        try:
            await scenario()
        finally:
            for registry in registries:
                if isinstance(registry, RedisRegistry):
                    await registry.flush()
                await registry.close()

    async_to_sync(wrapped)()


async def populate(registry: ConnectionRegistry) -> tuple[Entry, Entry, Entry]:
    """User 1 on both transports, user 2 on a WebSocket; two watch task 1, one task 2."""
    first, second, third = entry(1, "websocket"), entry(1, "sse"), entry(2, "websocket")
    for connection in (first, second, third):
        await registry.add(connection)
    await registry.add_subscription(first, TASK_1)
    await registry.add_subscription(second, TASK_1)
    await registry.add_subscription(third, TASK_2)
    return first, second, third


async def assert_empty(registry: ConnectionRegistry) -> None:
    assert await registry.overview(TRANSPORTS) == Overview(
        by_transport={"websocket": 0, "sse": 0}, by_user={}, by_task={}
    )


def test_counts_by_transport_user_and_task(registry):
    async def scenario():
        await populate(registry)
        assert await registry.count_transport("websocket") == 2
        assert await registry.count_transport("sse") == 1
        assert [await registry.count_user(user_id) for user_id in (1, 2, 3)] == [2, 1, 0]
        assert await registry.count_task(TASK_1) == 2
        assert await registry.count_task(TASK_2) == 1
        assert await registry.count_task(uuid.uuid4()) == 0
        overview = await registry.overview(TRANSPORTS)
        assert overview == Overview(
            by_transport={"websocket": 2, "sse": 1},
            by_user={1: 2, 2: 1},
            by_task={TASK_1: 2, TASK_2: 1},
        )
        assert overview.total == 3

    run(scenario, registry)


def test_what_this_process_serves_is_read_without_io(registry):
    async def scenario():
        first, second, third = await populate(registry)
        entries, subscriptions = registry.served_here()
        assert (set(entries), subscriptions) == ({first, second, third}, 3)
        await registry.remove_subscription(first, TASK_1)
        await registry.remove(third, frozenset({TASK_2}))
        assert (set(registry.served_here()[0]), registry.served_here()[1]) == ({first, second}, 1)

    run(scenario, registry)


def test_unsubscribe_and_disconnect_remove_everything(registry):
    async def scenario():
        first, second, third = await populate(registry)
        await registry.remove_subscription(first, TASK_1)
        await registry.remove_subscription(first, TASK_1)  # twice is harmless
        assert await registry.count_task(TASK_1) == 1
        await registry.remove(first, frozenset())
        assert await registry.count_user(1) == 1
        await registry.remove(second, frozenset({TASK_1}))
        await registry.remove(third, frozenset({TASK_2}))
        await registry.remove(third, frozenset({TASK_2}))  # twice is harmless
        await assert_empty(registry)

    run(scenario, registry)


def test_a_connection_past_its_users_limit_is_not_recorded(registry):
    async def scenario():
        first, second = entry(1, "websocket"), entry(1, "sse")
        assert [await registry.add(e, limit=2) for e in (first, second)] == [True, True]
        assert await registry.add(entry(1, "websocket"), limit=2) is False
        assert await registry.add(first, limit=2) is True  # recorded already: counted once
        assert await registry.add(entry(2, "websocket"), limit=2) is True  # their own limit
        assert await registry.add(entry(1, "websocket"), limit=0) is True  # no limit
        assert await registry.count_user(1) == 3
        assert await registry.count_transport("websocket") == 3  # the refused one is not
        await registry.remove(second, frozenset())
        await registry.remove(second, frozenset())  # twice counts once
        assert await registry.add(entry(1, "sse"), limit=3) is True
        assert await registry.add(entry(1, "sse"), limit=3) is False
        # Arriving together, each is counted after those before it.
        together = await asyncio.gather(*(registry.add(entry(5, "sse"), limit=4) for _ in range(7)))
        assert sorted(together) == [False] * 3 + [True] * 4
        assert await registry.count_user(5) == 4
        assert len(registry.served_here()[0]) == 8

    run(scenario, registry)


@pytest.mark.redis
def test_connections_arriving_together_in_several_processes_pass_the_limit_no_more(
    redis_server,
):
    make = redis_registry_factory(redis_server)
    one, other = make(), make()
    arriving = [entry(1, "websocket") for _ in range(10)]

    async def scenario():
        # A lapsed member, of a process that died, is not counted.
        await one.client.zadd(one._user_key(1), {"dead": time.time() - 1})
        recorded = await asyncio.gather(
            *(
                registry.add(e, limit=3)
                for registry, e in zip((one, other) * 5, arriving, strict=True)
            )
        )
        assert sorted(recorded) == [False] * 7 + [True] * 3
        members = {
            str(e.connection_id).encode() for e, ok in zip(arriving, recorded, strict=True) if ok
        }
        for key in (one._user_key(1), one._transport_key("websocket")):
            assert set(await one.client.zrange(key, 0, -1)) == members  # refused: nowhere

    run(scenario, one, other)


@pytest.mark.redis
def test_a_connection_leaving_in_the_same_command_makes_room_for_one_arriving(redis_server):
    registry = redis_registry_factory(redis_server)()
    leaving, arriving = entry(7, "websocket"), entry(7, "websocket")

    async def scenario():
        await registry.add(leaving, limit=1)
        _, recorded = await asyncio.gather(
            registry.remove(leaving, frozenset()), registry.add(arriving, limit=1)
        )
        assert recorded is True
        assert await registry.count_user(7) == 1

    run(scenario, registry)


@pytest.mark.redis
def test_an_arrival_sent_again_is_recorded_and_counted_once(redis_server):
    """redis-py sends a command again on a new connection when Redis closed the first one,
    which Redis may have run already."""
    registry = redis_registry_factory(redis_server)()
    member = str(uuid.uuid4())
    arrival = redis_registry.Arrival(
        registry._user_key(7), registry._transport_key("websocket"), member, limit=1
    )

    async def scenario():
        assert await registry._run_script({}, {}, [arrival]) == [True]
        assert await registry._run_script({}, {}, [arrival]) == [True]
        assert await registry.count_user(7) == 1

    run(scenario, registry)


@pytest.mark.redis
def test_counts_are_shared_by_every_process(redis_server):
    make = redis_registry_factory(redis_server)
    one, other = make(), make()

    async def scenario():
        await populate(one)
        await other.add(entry(3, "sse"))
        for registry in (one, other):
            assert await registry.count_transport("sse") == 2
            assert (await registry.overview(TRANSPORTS)).total == 4

    run(scenario, one, other)


@pytest.mark.redis
def test_glob_characters_in_a_prefix_match_only_themselves(redis_server):
    base = realtime_settings.REDIS_PREFIX
    registry = RedisRegistry(redis_server, lease_seconds=60.0, prefix=f"{base}[x]")
    # Its keys would match the other's SCAN patterns if "[x]" were taken as a glob.
    lookalike = RedisRegistry(redis_server, lease_seconds=60.0, prefix=f"{base}x")

    async def scenario():
        await populate(lookalike)
        await registry.add(entry(3, "sse"))
        assert await registry.overview(TRANSPORTS) == Overview(
            by_transport={"websocket": 0, "sse": 1}, by_user={3: 1}, by_task={}
        )
        await registry.flush()
        assert (await lookalike.overview(TRANSPORTS)).total == 3
        await assert_empty(registry)

    run(scenario, lookalike, registry)


@pytest.mark.redis
def test_a_command_on_a_connection_redis_closed_is_sent_again_on_a_new_one(redis_server):
    """As after a restart of Redis, whose first command failed."""
    registry = redis_registry_factory(redis_server)()

    async def scenario():
        await registry.add(entry(1, "sse"))
        killer = aioredis.Redis.from_url(redis_server)
        try:
            await killer.client_kill_filter(_id=await registry.client.client_id())
        finally:
            await killer.aclose()
        assert await registry.count_transport("sse") == 1

    run(scenario, registry)


async def wait_until_empty(registry: ConnectionRegistry, within: float) -> float:
    """Seconds until the registry counts nothing, polling; fails after ``within``."""
    start = time.monotonic()
    while (await registry.overview(TRANSPORTS)).total or await registry.count_task(TASK_1):
        assert time.monotonic() - start < within, await registry.overview(TRANSPORTS)
        await asyncio.sleep(0.05)
    return time.monotonic() - start


@pytest.mark.redis
def test_entries_of_a_dead_process_lapse_after_one_lease(redis_server):
    lease = 0.5
    make = redis_registry_factory(redis_server)
    dead, survivor = make(lease_seconds=lease), make()

    async def scenario():
        await populate(dead)
        added = time.monotonic()
        assert (await survivor.overview(TRANSPORTS)).total == 3
        # The process dies without removing anything: its renewals stop.
        await dead.close()
        await wait_until_empty(survivor, within=lease + 1)
        assert time.monotonic() - added >= lease * 0.9
        await assert_empty(survivor)
        # Counted as gone by their leases, not because their sets expired meanwhile.
        assert time.monotonic() - added < dead._key_ttl

    run(scenario, dead, survivor)


@pytest.mark.redis
def test_a_live_process_renews_its_leases(redis_server):
    lease = 0.5
    make = redis_registry_factory(redis_server)
    live, observer = make(lease_seconds=lease), make()

    async def scenario():
        first, second, third = await populate(live)
        # Time itself is what is tested: three leases pass while the renewer runs, and
        # no lease lapses between its renewals.
        end = time.monotonic() + lease * 3
        while time.monotonic() < end:
            assert (await observer.overview(TRANSPORTS)).total == 3
            await asyncio.sleep(0.05)
        assert await observer.count_task(TASK_1) == 2
        for connection, tasks in ((first, {TASK_1}), (second, {TASK_1}), (third, {TASK_2})):
            await live.remove(connection, frozenset(tasks))
        await assert_empty(observer)

    run(scenario, live, observer)


@pytest.mark.redis
def test_a_renewal_extends_every_lease_a_bounded_number_of_connections_at_a_time(
    redis_server, monkeypatch
):
    """One command per ``CHUNK`` connections: renewing 4,000 connections one ZADD per set
    and connection held the event loop for 0.3-0.5 s."""
    monkeypatch.setattr(redis_registry, "CHUNK", 4)
    registry = redis_registry_factory(redis_server)(lease_seconds=30)
    entries = [entry(user_id % 3, "websocket") for user_id in range(10)]
    commands: list[int] = []
    run_script = registry._run_script

    async def recording(added, removed, arrivals=None):
        commands.append(len(set().union(*added.values())))
        return await run_script(added, removed, arrivals)

    async def scenario():
        for connection in entries:
            await registry.add(connection)
            await registry.add_subscription(connection, TASK_1)
        keys = [registry._transport_key("websocket"), registry._task_key(TASK_1)]
        keys += [registry._user_key(user_id) for user_id in range(3)]
        before = {
            key: dict(await registry.client.zrange(key, 0, -1, withscores=True)) for key in keys
        }
        await asyncio.sleep(0.05)
        registry._run_script = recording
        await registry.renew()
        assert commands == [4, 4, 2, 1]  # then the process's marker
        for key in keys:
            after = dict(await registry.client.zrange(key, 0, -1, withscores=True))
            assert after.keys() == before[key].keys()
            assert all(after[member] > before[key][member] for member in after)
        assert await registry.count_task(TASK_1) == 10

    run(scenario, registry)


@pytest.mark.redis
def test_a_renewal_does_not_bring_back_a_connection_that_left_while_it_ran(redis_server):
    """The renewal's command, sent before the connection left, reaches Redis after the
    connection's removal."""
    registry = redis_registry_factory(redis_server)()
    staying, leaving = entry(1, "websocket"), entry(1, "websocket")
    run_script = registry._run_script

    async def leaving_first(added, removed, arrivals=None):
        if added and registry._local.get(leaving.connection_id) is not None:
            await registry.remove(leaving, frozenset({TASK_1}))
        return await run_script(added, removed, arrivals)

    async def scenario():
        for connection in (staying, leaving):
            await registry.add(connection)
            await registry.add_subscription(connection, TASK_1)
        registry._run_script = leaving_first
        await registry.renew()
        assert await registry.count_transport("websocket") == 1
        assert await registry.count_user(1) == 1
        assert await registry.count_task(TASK_1) == 1

    run(scenario, registry)


@pytest.mark.redis
def test_a_renewal_writes_back_the_live_connections_redis_lost(redis_server):
    """After a restart of a Redis that keeps nothing on disk (or a flush), this process's
    connections are counted again from its next renewal, not only once they reconnect."""
    registry = redis_registry_factory(redis_server)()

    async def scenario():
        first, second, third = await populate(registry)
        await registry.remove_subscription(first, TASK_1)
        keys = [key async for key in registry.client.scan_iter(match=f"{registry.prefix}*")]
        await registry.client.delete(*keys)
        await assert_empty(registry)
        await registry.renew()
        assert await registry.overview(TRANSPORTS) == Overview(
            by_transport={"websocket": 2, "sse": 1},
            by_user={1: 2, 2: 1},
            by_task={TASK_1: 1, TASK_2: 1},
        )

    run(scenario, registry)


@pytest.mark.redis
def test_what_redis_lost_is_written_back_within_seconds_not_at_the_next_renewal(redis_server):
    """The renewal came a third of a lease (20 s) later: meanwhile a broadcast that reached
    every connection answered ``recipients: 0``, and the admin counted none."""
    registry = redis_registry_factory(redis_server)(lease_seconds=60.0)
    expected = Overview(
        by_transport={"websocket": 2, "sse": 1},
        by_user={1: 2, 2: 1},
        by_task={TASK_1: 2, TASK_2: 1},
    )

    async def counted_again_within(seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if await registry.overview(TRANSPORTS) == expected:
                return True
            await asyncio.sleep(0.05)
        return False

    async def scenario():
        await populate(registry)
        for _ in range(2):  # a loss before the first renewal, then one after it
            keys = [key async for key in registry.client.scan_iter(match=f"{registry.prefix}*")]
            await registry.client.delete(*keys)  # as a restart of Redis that kept nothing
            await assert_empty(registry)
            assert await counted_again_within(3 * redis_registry.LOSS_CHECK_SECONDS)

    run(scenario, registry)


@pytest.mark.redis
def test_a_subscription_whose_write_failed_is_written_by_the_next_renewal(redis_server):
    registry = redis_registry_factory(redis_server)()

    async def scenario():
        first = entry(1, "websocket")
        await registry.add(first)
        write = registry._write

        async def away(writes):
            raise ConnectionError("Redis is away")

        registry._write = away
        with pytest.raises(ConnectionError):
            await registry.add_subscription(first, TASK_1)
        registry._write = write
        assert await registry.count_task(TASK_1) == 0
        await registry.renew()
        assert await registry.count_task(TASK_1) == 1

    run(scenario, registry)


@pytest.mark.redis
def test_a_set_written_to_is_pruned_of_lapsed_members(redis_server):
    registry = redis_registry_factory(redis_server)()

    async def scenario():
        key = registry._transport_key("sse")
        await registry.client.zadd(key, {"of-a-dead-process": time.time() - 1})
        await registry.add(entry(1, "sse"))
        assert await registry.client.zcard(key) == 1
        assert await registry.count_transport("sse") == 1

    run(scenario, registry)


@pytest.mark.redis
def test_writes_of_connections_arriving_together_share_one_command(redis_server):
    registry = redis_registry_factory(redis_server)()
    commands: list[int] = []
    write_many = registry._writes.fetch_many

    async def recording(batches):
        commands.append(len(batches))
        return await write_many(batches)

    registry._writes.fetch_many = recording
    entries = [entry(user_id, "websocket") for user_id in range(50)]

    async def scenario():
        await asyncio.gather(*(registry.add(connection) for connection in entries))
        assert await registry.count_transport("websocket") == 50
        await asyncio.gather(*(registry.add_subscription(e, TASK_1) for e in entries))
        assert await registry.count_task(TASK_1) == 50
        await asyncio.gather(*(registry.remove(e, frozenset({TASK_1})) for e in entries))
        await assert_empty(registry)

    run(scenario, registry)
    # Each wave was asked for before its first command ran: one command each.
    assert commands == [50, 50, 50]


@pytest.mark.redis
def test_one_command_may_add_to_and_remove_from_the_same_sets(redis_server):
    registry = redis_registry_factory(redis_server)()
    leaving, arriving = entry(7, "websocket"), entry(7, "websocket")

    async def scenario():
        await registry.add(leaving)
        await registry.add_subscription(leaving, TASK_1)
        await asyncio.gather(
            registry.remove(leaving, frozenset({TASK_1})),
            registry.add(arriving),
            registry.add_subscription(entry(8, "sse"), TASK_1),
        )
        assert await registry.count_transport("websocket") == 1
        assert await registry.count_user(7) == 1
        assert await registry.count_task(TASK_1) == 1
        client = registry.client
        assert await client.zrange(registry._user_key(7), 0, -1) == [
            str(arriving.connection_id).encode()
        ]

    run(scenario, registry)


@pytest.mark.redis
def test_a_set_written_twice_in_one_command_keeps_the_last_write(redis_server):
    registry = redis_registry_factory(redis_server)()
    staying, leaving = entry(7, "websocket"), entry(8, "websocket")

    async def scenario():
        for connection in (staying, leaving):
            await registry.add(connection)
            await registry.add_subscription(connection, TASK_1)
        await asyncio.gather(  # one unsubscribes and subscribes again, the other the reverse
            registry.remove_subscription(staying, TASK_1),
            registry.add_subscription(staying, TASK_1),
            registry.add_subscription(leaving, TASK_2),
            registry.remove_subscription(leaving, TASK_2),
        )
        assert [await registry.count_task(task) for task in (TASK_1, TASK_2)] == [2, 0]

    run(scenario, registry)


@pytest.mark.redis
def test_writes_go_on_after_redis_forgets_the_script(redis_server):
    registry = redis_registry_factory(redis_server)()

    async def scenario():
        await registry.add(entry(1, "websocket"))
        await registry.client.script_flush()  # as after a restart of Redis
        await registry.add(entry(2, "websocket"))
        assert await registry.count_transport("websocket") == 2

    run(scenario, registry)


@pytest.mark.redis
def test_every_set_written_to_outlives_its_members_leases(redis_server):
    registry = redis_registry_factory(redis_server)(lease_seconds=30)
    connection = entry(7, "sse")

    async def scenario():
        await registry.add(connection)
        await registry.add_subscription(connection, TASK_1)
        keys = [registry._transport_key("sse"), registry._user_key(7), registry._task_key(TASK_1)]
        for key in keys:
            assert 30 < await registry.client.ttl(key) <= 61

    run(scenario, registry)
