"""Database reads asked for at nearly the same moment, answered by one query.

When a thousand clients connect at once, each needs its user read and each subscription its
task. One ``database_sync_to_async`` call apiece costs a hop to the one sync thread
(~0.3 ms), a new database connection with the default ``CONN_MAX_AGE=0`` (~1.2 ms) and an
ORM query (~0.5 ms), one after another, which capped connects at ~200/s
(docs/performance.md). A ``Batcher`` takes the keys asked for while its previous fetch ran
and fetches them together in one call. A lone request costs what it did before.
"""

import asyncio
import contextvars
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from channels.db import database_sync_to_async

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class _Queue(Generic[K, V]):
    pending: list[tuple[K, asyncio.Future]] = field(default_factory=list)
    runner: asyncio.Task | None = None


class Batcher(Generic[K, V]):
    """``await batcher.load(key)`` returns ``fetch_many(keys)[i]`` for the key at ``i``.

    ``fetch_many`` runs in the sync thread (it may use the ORM) and returns one value per
    key, in order. If it raises, every load of that batch raises the same exception.
    """

    def __init__(self, fetch_many: Callable[[list[K]], Sequence[V]], *, max_size: int = 500):
        self.fetch_many = fetch_many
        self.max_size = max_size
        # One queue per event loop: tests and management commands run several.
        self._queues: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue[K, V]] = (
            weakref.WeakKeyDictionary()
        )

    async def load(self, key: K) -> V:
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        future = loop.create_future()
        queue.pending.append((key, future))
        if queue.runner is None:
            # A fresh context: the runner serves every caller, so it must not inherit
            # this one's thread executor (one that a sync view calling an async one gets,
            # and that quits when that view returns).
            queue.runner = loop.create_task(self._run(queue), context=contextvars.Context())
        return await future

    async def _run(self, queue: _Queue[K, V]) -> None:
        fetch = database_sync_to_async(self.fetch_many)
        try:
            while queue.pending:
                batch = [item for item in queue.pending[: self.max_size] if not item[1].done()]
                del queue.pending[: self.max_size]
                if not batch:
                    continue
                try:
                    values = await fetch([key for key, _ in batch])
                    if len(values) != len(batch):
                        raise ValueError(f"fetch_many gave {len(values)} values for {len(batch)}")
                except Exception as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                for (_, future), value in zip(batch, values, strict=True):
                    if not future.done():
                        future.set_result(value)
        finally:
            queue.runner = None
