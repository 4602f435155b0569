import asyncio
import threading

import pytest
from asgiref.sync import ThreadSensitiveContext, async_to_sync, sync_to_async
from channels.db import database_sync_to_async

from realtime.batching import Batcher
from tests.conftest import run

# Most fetches here run through database_sync_to_async, as the project's database reads
# do; it checks the database connection.
pytestmark = pytest.mark.django_db(transaction=True)


def recording_batcher(**options) -> tuple[Batcher, list[list]]:
    """A batcher whose fetch returns the keys it was given, and the batches it fetched."""
    calls: list[list] = []

    def fetch_many(keys):
        calls.append(list(keys))
        return keys

    return Batcher(database_sync_to_async(fetch_many), **options), calls


def test_keys_asked_for_together_are_fetched_in_one_call_and_answered_in_order():
    calls = []

    def fetch_many(keys):
        calls.append(list(keys))
        return [key * 10 for key in keys]

    batcher = Batcher(database_sync_to_async(fetch_many))

    async def scenario():
        return await asyncio.gather(*(batcher.load(key) for key in range(5)))

    assert run(scenario) == [0, 10, 20, 30, 40]
    assert calls == [[0, 1, 2, 3, 4]]


def test_keys_asked_for_during_a_fetch_go_in_the_next_one():
    batcher, calls = recording_batcher()

    async def scenario():
        first = asyncio.ensure_future(batcher.load("a"))
        await asyncio.sleep(0)  # the first fetch is under way
        rest = [asyncio.ensure_future(batcher.load(key)) for key in "bcd"]
        return await asyncio.gather(first, *rest)

    assert run(scenario) == ["a", "b", "c", "d"]
    assert calls == [["a"], ["b", "c", "d"]]


def test_batches_are_no_larger_than_max_size():
    batcher, calls = recording_batcher(max_size=3)

    async def scenario():
        return await asyncio.gather(*(batcher.load(key) for key in range(7)))

    assert run(scenario) == list(range(7))
    assert [len(batch) for batch in calls] == [3, 3, 1]


@pytest.mark.parametrize(
    "fetch_many",
    [lambda keys: 1 / 0, lambda keys: keys[:-1]],
    ids=["raises", "too-few-values"],
)
def test_a_failed_fetch_fails_every_load_of_its_batch_and_the_next_batch_still_runs(fetch_many):
    calls = []

    def fetch(keys):
        calls.append(keys)
        return fetch_many(keys) if len(calls) == 1 else keys

    batcher = Batcher(database_sync_to_async(fetch))

    async def scenario():
        failed = await asyncio.gather(*(batcher.load(k) for k in range(3)), return_exceptions=True)
        return failed, await batcher.load("again")

    failed, again = run(scenario)
    assert all(isinstance(result, Exception) for result in failed)
    assert again == "again"


def test_a_cancelled_load_is_left_out_of_the_fetch():
    batcher, calls = recording_batcher()

    async def scenario():
        first = asyncio.ensure_future(batcher.load("first"))
        await asyncio.sleep(0)
        gone = asyncio.ensure_future(batcher.load("gone"))
        kept = asyncio.ensure_future(batcher.load("kept"))
        await asyncio.sleep(0)
        gone.cancel()
        return await asyncio.gather(first, kept)

    assert run(scenario) == ["first", "kept"]
    assert calls == [["first"], ["kept"]]


def test_each_event_loop_has_its_own_queue():
    batcher = Batcher(database_sync_to_async(lambda keys: keys))

    async def scenario():
        return await batcher.load(1)

    assert run(scenario) == 1
    assert run(scenario) == 1  # a new loop: nothing of the old one is reused


def test_fetches_do_not_run_in_the_context_of_the_load_that_started_them():
    """A sync view calling an async one (async_to_sync inside a sync_to_async thread)
    gives its loads a thread executor that quits when the view returns, while the
    batches of other connections may still be on their way: fetches must go to the
    process's sync thread instead."""
    fetch_threads = []

    def fetch_many(keys):
        fetch_threads.append(threading.get_ident())
        return keys

    batcher = Batcher(database_sync_to_async(fetch_many))

    def sync_view():
        return threading.get_ident(), async_to_sync(batcher.load)("a")

    async def scenario():
        # As Django's ASGI handler runs a request: a thread of its own for its sync code.
        async with ThreadSensitiveContext():
            return await sync_to_async(sync_view)()

    # A loop of its own, as a server runs (async_to_sync would make this thread the one
    # that thread-sensitive calls go back to).
    view_thread, value = asyncio.run(scenario())
    assert value == "a"
    assert fetch_threads and view_thread not in fetch_threads


def test_an_async_fetch_runs_on_the_loop_one_batch_at_a_time():
    calls, running = [], []

    async def fetch_many(keys):
        running.append(keys)
        assert len(running) == 1  # never two batches at once
        await asyncio.sleep(0.01)
        calls.append(list(keys))
        running.remove(keys)
        return [f"{key}!" for key in keys]

    batcher = Batcher(fetch_many)

    async def scenario():
        first = asyncio.ensure_future(batcher.load("a"))
        await asyncio.sleep(0)
        rest = [asyncio.ensure_future(batcher.load(key)) for key in "bc"]
        return await asyncio.gather(first, *rest)

    assert run(scenario) == ["a!", "b!", "c!"]
    assert calls == [["a"], ["b", "c"]]
