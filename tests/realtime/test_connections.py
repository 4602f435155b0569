"""Per-connection delivery rules: each seq once, in order, a late one waited for briefly."""

import asyncio
import functools
import gc
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import asynccontextmanager
from types import SimpleNamespace

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from hypothesis import given
from hypothesis import strategies as st

from mcp_platform.tasks import services
from realtime import api, connections, groups, sync
from realtime.connections import Connection, ConnectionManager, Transport
from realtime.layers import InMemoryChannelLayer
from realtime.registry import Entry, LocalRegistry
from realtime.sources import TaskSnapshot
from tests.conftest import connect_user, open_websocket, token_for


def connection(
    *, follows_all: bool = False, subscribed: dict[str, int] | None = None
) -> Connection:
    entry = Entry(connection_id=uuid.uuid4(), user_id=1, transport="websocket")
    return Connection("specific.x", entry, last_seq=dict(subscribed or {}), follows_all=follows_all)


def test_in_order_updates_go_straight_through_and_duplicates_are_dropped():
    c = connection(subscribed={"t": 1})
    assert c.receive_update("t", 2, "two") == [(2, "two")]
    assert c.receive_update("t", 2, "two again") == []
    assert c.receive_update("t", 1, "old") == []
    assert c.starts_waiting("t") is None


def test_an_early_update_waits_for_the_missing_one():
    c = connection(subscribed={"t": 1})
    assert c.receive_update("t", 3, "three") == []
    wait = c.starts_waiting("t")
    assert wait is not None and c.starts_waiting("t") is None
    assert c.receive_update("t", 2, "two") == [(2, "two"), (3, "three")]
    assert c.release_held("t", wait) == []


def test_release_gives_up_on_a_missing_update():
    c = connection(subscribed={"t": 1})
    c.receive_update("t", 4, "four")
    wait = c.starts_waiting("t")
    c.receive_update("t", 3, "three")
    assert c.release_held("t", wait) == [(3, "three"), (4, "four")]
    assert c.receive_update("t", 2, "two, too late") == []
    assert c.receive_update("t", 5, "five") == [(5, "five")]


def test_each_gap_is_waited_for_the_whole_window_however_soon_it_follows_another():
    """A release armed for a gap that has since closed must not end a later gap's wait
    early: the update missing from the later gap would be dropped when it came."""
    c = connection(subscribed={"t": 1})
    c.receive_update("t", 3, "three")
    first = c.starts_waiting("t")
    assert c.receive_update("t", 2, "two") == [(2, "two"), (3, "three")]
    c.receive_update("t", 5, "five")
    second = c.starts_waiting("t")
    assert second is not None and second != first  # a release is armed for this gap too
    assert c.release_held("t", first) == []  # the first gap's release, now stale
    assert c.receive_update("t", 4, "four") == [(4, "four"), (5, "five")]
    assert c.release_held("t", second) == []


def test_a_gap_left_when_the_one_waited_for_closes_is_waited_for_the_whole_window():
    c = connection(subscribed={"t": 3})
    c.receive_update("t", 5, "five")
    first = c.starts_waiting("t")
    c.receive_update("t", 7, "seven")  # behind a second gap, at 6
    assert c.starts_waiting("t") is None  # one wait at a time
    assert c.receive_update("t", 4, "four") == [(4, "four"), (5, "five")]
    second = c.starts_waiting("t")
    assert second is not None and second != first
    assert c.release_held("t", first) == []  # stale: 7 has not waited its window yet
    assert c.receive_update("t", 6, "six") == [(6, "six"), (7, "seven")]


def test_unsubscribing_ends_a_wait():
    c = connection(subscribed={"t": 1})
    c.receive_update("t", 3, "three")
    first = c.starts_waiting("t")
    c.forget("t")
    c.last_seq["t"] = 5  # subscribed again
    c.receive_update("t", 7, "seven")
    second = c.starts_waiting("t")
    assert second is not None and c.release_held("t", first) == []
    assert c.release_held("t", second) == [(7, "seven")]


def test_a_subscribe_whose_state_is_older_than_what_was_delivered_moves_nothing_back():
    """Its read raced an update delivered meanwhile: moved back, the next update was held
    as if one were missing, and reached the client a reorder window late."""
    c = connection(subscribed={"t": 6})
    c.saw("t", 5)
    assert c.last_seq == {"t": 6}
    assert c.receive_update("t", 7, "seven") == [(7, "seven")]
    assert c.starts_waiting("t") is None


def test_a_subscribe_that_covers_the_held_updates_ends_their_wait():
    c = connection(subscribed={"t": 1})
    c.receive_update("t", 3, "three")
    first = c.starts_waiting("t")
    c.saw("t", 3)  # subscribed again: its state includes seq 3
    assert c.held == {} and c.receive_update("t", 3, "three") == []
    c.receive_update("t", 5, "five")
    second = c.starts_waiting("t")
    assert second is not None and c.release_held("t", first) == []
    assert c.receive_update("t", 4, "four") == [(4, "four"), (5, "five")]


def test_unsubscribed_tasks_get_nothing_and_followed_ones_start_where_first_seen():
    assert connection().receive_update("t", 2, "x") == []
    feed = connection(follows_all=True)
    assert feed.receive_update("t", 7, "seven") == [(7, "seven")]
    assert feed.receive_update("t", 6, "six") == []


@given(st.permutations(range(2, 12)))
def test_any_arrival_order_within_the_window_delivers_every_seq_once_in_order(order):
    c = connection(subscribed={"t": 1})
    delivered = [seq for seq_ in order for seq, _ in c.receive_update("t", seq_, str(seq_))]
    assert delivered == list(range(2, 12))


@asynccontextmanager
async def subscribed_websocket(user, task):
    """A WebSocket client of ``user``, subscribed to ``task``, through the full application."""
    async with open_websocket(f"/ws?token={token_for(user)}") as ws:
        await connect_user(ws)
        await ws.send_json_to({"action": "subscribe", "task_id": str(task.pk)})
        await ws.receive_json_from(timeout=5)
        yield ws


async def publish(task, seq: int) -> None:
    state = {"id": str(task.pk), "status": "running", "progress": seq}
    await api.apublish_task_update(
        TaskSnapshot(task_id=task.pk, owner_id=task.owner_id, seq=seq, state=state)
    )


async def seqs_received(ws, count: int) -> list[int]:
    return [(await ws.receive_json_from(timeout=5))["seq"] for _ in range(count)]


@pytest.mark.django_db(transaction=True)
def test_websocket_client_gets_out_of_order_publications_in_order(user, settings):
    settings.REALTIME = {**settings.REALTIME, "REORDER_WINDOW_SECONDS": 0.2}
    task = services.create_task(owner=user, name="t")

    async def scenario():
        async with subscribed_websocket(user, task) as ws:
            for seq in (3, 2, 5):  # 4 never comes
                await publish(task, seq)
            assert await seqs_received(ws, 3) == [2, 3, 5]
            assert await ws.receive_nothing(timeout=0.3)

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_a_gap_soon_after_another_is_waited_for_and_nothing_is_lost(user, settings):
    """The first gap's release comes while the second gap waits; the second's missing
    update, published after it, still reaches the client, in order."""
    window = 1.0
    settings.REALTIME = {**settings.REALTIME, "REORDER_WINDOW_SECONDS": window}
    task = services.create_task(owner=user, name="t")

    async def scenario():
        async with subscribed_websocket(user, task) as ws:
            for seq in (3, 2):  # a first gap, closed at once; its release is armed
                await publish(task, seq)
            got = await seqs_received(ws, 2)
            await asyncio.sleep(window / 2)
            await publish(task, 5)  # a second gap
            await asyncio.sleep(window * 0.7)  # past the first release, within the second
            await publish(task, 4)
            got += await seqs_received(ws, 2)
            assert got == [2, 3, 4, 5]

    async_to_sync(scenario)()


class FlakyLayer(InMemoryChannelLayer):
    """The in-process layer, failing to leave (or join) the groups named, as Redis away.
    A join fails as channels-redis's does: the member is added, then the subscription to
    Redis fails."""

    def __init__(self, fail_leaving=(), fail_joining=()):
        super().__init__()
        self.fail_leaving, self.fail_joining = set(fail_leaving), set(fail_joining)

    async def group_add(self, group, channel):
        await super().group_add(group, channel)
        if group in self.fail_joining:
            raise ConnectionError("layer is down")

    async def group_discard(self, group, channel):
        if group in self.fail_leaving:
            raise ConnectionError("layer is down")
        await super().group_discard(group, channel)


class ManagerOn(ConnectionManager):
    def __init__(self, registry, layer):
        super().__init__(registry)
        self._layer = layer

    @property
    def layer(self):
        return self._layer


class FailingRegistry(LocalRegistry):
    async def add(self, entry, limit=0):
        raise ConnectionError("registry is down")


def members(layer):
    return {group: set(channels) for group, channels in layer.groups.items()}


def test_a_connection_that_fails_to_leave_a_group_still_leaves_the_others_and_the_registry():
    layer = FlakyLayer(fail_leaving={groups.user_group(7)})
    manager = ManagerOn(LocalRegistry(), layer)
    user = SimpleNamespace(pk=7, is_staff=False)

    async def scenario():
        connection = await manager.connect(
            channel_name="specific.a", user=user, transport=Transport.SSE, follow_all=True
        )
        with pytest.raises(ConnectionError):
            await manager.disconnect(connection)
        assert await manager.count_connections() == 0
        assert members(layer) == {groups.user_group(7): {"specific.a"}}

    async_to_sync(scenario)()


@pytest.mark.parametrize("failing", ["group", "registry"])
def test_a_connect_that_fails_leaves_no_group_behind(failing):
    if failing == "group":
        layer, registry = FlakyLayer(fail_joining={groups.BROADCAST_GROUP}), LocalRegistry()
    else:
        layer, registry = FlakyLayer(), FailingRegistry()
    manager = ManagerOn(registry, layer)
    user = SimpleNamespace(pk=7, is_staff=False)

    async def scenario():
        with pytest.raises(ConnectionError):
            await manager.connect(
                channel_name="specific.a", user=user, transport=Transport.WEBSOCKET
            )
        assert members(layer) == {}
        assert await manager.count_connections() == 0

    async_to_sync(scenario)()


def test_a_connection_past_the_users_limit_is_refused_and_leaves_nothing_behind(settings):
    settings.REALTIME = {**settings.REALTIME, "MAX_CONNECTIONS_PER_USER": 2}
    layer, registry = FlakyLayer(), LocalRegistry()
    manager = ManagerOn(registry, layer)
    user, other = SimpleNamespace(pk=7, is_staff=False), SimpleNamespace(pk=8, is_staff=False)

    async def connect(user, channel_name, transport=Transport.WEBSOCKET):
        return await manager.connect(channel_name=channel_name, user=user, transport=transport)

    async def scenario():
        first = await connect(user, "specific.a")
        await connect(user, "specific.b", Transport.SSE)
        held = members(layer)
        with pytest.raises(connections.TooManyConnections, match="at most 2 connections"):
            await connect(user, "specific.c")
        assert members(layer) == held
        assert await registry.count_user(7) == 2
        await connect(other, "specific.d")  # another user's limit is their own
        await manager.disconnect(first)
        await connect(user, "specific.e")
        assert await registry.count_user(7) == 2

    async_to_sync(scenario)()


def test_an_update_of_a_followed_task_that_arrives_after_its_deletion_is_dropped():
    c = connection(follows_all=True)
    assert c.receive_update("t", 2, "two") == [(2, "two")]
    c.forget_deleted("t")
    assert c.receive_update("t", 3, "published before the deletion, arrived after") == []


def test_a_connection_that_follows_every_task_keeps_the_last_seqs_of_the_latest_only(
    monkeypatch,
):
    monkeypatch.setattr(connections, "FOLLOWED_TASKS_KEPT", 3)
    c = connection(follows_all=True)
    for task_id in ("a", "b", "c"):
        c.receive_update(task_id, 1, "one")
    assert c.receive_update("a", 2, "two") == [(2, "two")]  # "a" is now the latest
    c.receive_update("d", 1, "one")  # "b", updated longest ago, makes room
    assert set(c.last_seq) == {"a", "c", "d"}
    assert c.receive_update("a", 2, "again") == []  # still known: a repeat is dropped


def test_deletions_seen_by_a_connection_that_follows_every_task_are_kept_within_the_bound(
    monkeypatch,
):
    """A deletion of every task (a user's, with thousands) added an entry for each."""
    monkeypatch.setattr(connections, "FOLLOWED_TASKS_KEPT", 3)
    c = connection(follows_all=True)
    for task_id in ("a", "b", "c", "d", "e"):
        c.forget_deleted(task_id)
    assert set(c.last_seq) == {"c", "d", "e"}
    assert c.receive_update("e", 9, "published before the deletion, arrived after") == []


def test_a_connection_that_follows_every_task_leaves_no_subscription_to_remove():
    removed = []

    class Recording(LocalRegistry):
        async def remove(self, entry, task_ids):
            removed.append(task_ids)
            await super().remove(entry, task_ids)

    manager = ManagerOn(Recording(), InMemoryChannelLayer())
    user = SimpleNamespace(pk=7, is_staff=True)

    async def scenario():
        connection = await manager.connect(
            channel_name="specific.a", user=user, transport=Transport.SSE, follow_all=True
        )
        for task_id in (uuid.uuid4(), uuid.uuid4()):
            connection.receive_update(str(task_id), 1, "one")
        await manager.disconnect(connection)

    async_to_sync(scenario)()
    assert removed == [frozenset()]


@pytest.fixture
def stalled_publish(settings, monkeypatch) -> Iterator[TaskSnapshot]:
    """A publish that fails after 0.5 s, as on a Redis that accepts and does not answer,
    with a wait of 0.1 s for it."""
    settings.REALTIME = {**settings.REALTIME, "PUBLISH_WAIT_SECONDS": 0.1}

    async def stalled(self, snapshot):
        await asyncio.sleep(0.5)
        raise ConnectionError("Redis did not answer")

    monkeypatch.setattr(ConnectionManager, "send_task_update", stalled)
    yield TaskSnapshot(task_id=uuid.uuid4(), owner_id=1, seq=2, state={})
    sync.set_server_loop(None)


def test_a_request_waits_for_its_publish_at_most_the_wait_in_a_server(stalled_publish, caplog):
    """A silent Redis held every request that changed a task for 5 s, and those queued
    for its thread with it."""

    async def server():  # the request in a thread of its own, as the server runs it
        sync.set_server_loop(asyncio.get_running_loop())
        started = time.monotonic()
        await sync_to_async(api.publish_task_update, thread_sensitive=False)(stalled_publish)
        waited = time.monotonic() - started
        await asyncio.sleep(0.6)  # the publish goes on meanwhile, and fails
        return waited

    assert 0.1 <= asyncio.run(server()) < 0.4
    assert f"Could not publish task {stalled_publish.task_id}" in caplog.text


def test_a_request_never_waits_for_a_server_loop_that_has_stopped(stalled_publish):
    """Once SIGTERM had stopped it, a request thread's call on it waited for ever."""
    stopped = asyncio.new_event_loop()  # never runs, as once a server has stopped
    sync.set_server_loop(stopped)

    async def never_runs():
        raise AssertionError("ran")

    try:
        started = time.monotonic()
        with pytest.raises(sync.ServerStopping):
            sync.run_sync(never_runs())
        with pytest.raises(sync.ServerStopping):
            api.publish_task_update(stalled_publish)
        assert time.monotonic() - started < 2 * sync.LOOP_CHECK_SECONDS + 0.5
    finally:
        stopped.close()
    with pytest.raises(sync.ServerStopping, match="has stopped"):
        sync.run_sync(never_runs())


def test_a_call_under_way_when_the_server_loop_stops_is_server_stopping():
    """It was a RuntimeError from the coroutine closed in the wrong thread: a broadcast's
    500 instead of a 503."""
    loop = asyncio.new_event_loop()
    running = threading.Thread(target=loop.run_forever)
    running.start()
    sync.set_server_loop(loop)

    async def with_cleanup():  # as redis-py's commands, which disconnect on the loop
        try:
            await asyncio.sleep(10)
        finally:
            await asyncio.sleep(0)

    try:
        loop.call_soon_threadsafe(loop.call_later, 0.3, loop.stop)
        started = time.monotonic()
        with pytest.raises(sync.ServerStopping):
            sync.run_sync(with_cleanup())
        assert time.monotonic() - started < 2
    finally:
        sync.set_server_loop(None)
        running.join(5)
        loop.run_until_complete(asyncio.sleep(0.1))  # the call, cancelled, ends
        loop.close()


def test_a_call_made_on_an_event_loop_is_refused_and_leaves_nothing_unawaited():
    snapshot = TaskSnapshot(task_id=uuid.uuid4(), owner_id=1, seq=2, state={})

    async def on_the_loop():
        with pytest.raises(RuntimeError, match="cannot run on an event loop"):
            api.publish_task_update(snapshot)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... never awaited"
        asyncio.run(on_the_loop())
        gc.collect()


def test_a_calls_own_timeout_is_raised_as_it_is_not_as_outlasting_the_wait(stalled_publish):
    async def times_out():
        raise TimeoutError("Redis did not answer in time")

    async def server():
        sync.set_server_loop(asyncio.get_running_loop())
        call = functools.partial(sync.run_sync, times_out(), wait=5)
        with pytest.raises(TimeoutError, match="Redis did not answer"):
            await sync_to_async(call, thread_sensitive=False)()

    asyncio.run(server())


def test_a_publish_outside_a_server_is_waited_for_to_its_end(stalled_publish):
    """As a management command's, or a script's in ``asyncio.run()``: its loop may end
    with the call, and the publish with it."""
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        api.publish_task_update(stalled_publish)

    async def script():
        with pytest.raises(ConnectionError):
            await sync_to_async(api.publish_task_update, thread_sensitive=False)(stalled_publish)

    asyncio.run(script())
    assert time.monotonic() - started >= 1.0


def test_threads_that_first_ask_for_the_manager_together_get_the_same_one(monkeypatch):
    """A scrape of /metrics in a request thread may ask first, while the event loop does."""
    make = connections.make_registry

    def slow_make():
        time.sleep(0.05)  # both threads find no manager before either has made one
        return make()

    connections.reset_connection_manager()
    monkeypatch.setattr(connections, "make_registry", slow_make)
    managers = []
    threads = [
        threading.Thread(target=lambda: managers.append(connections.get_connection_manager()))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert managers[0] is managers[1]
    connections.reset_connection_manager()
