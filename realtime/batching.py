"""Work asked for at nearly the same moment, done in one call.

When a thousand clients connect at once, each needs its user read, each subscription its
task, and on Redis each its registry entry written. One call apiece costs, for a database
read, a hop to the one sync thread (~0.3 ms) and an ORM query (~0.5 ms), one after
another, which capped connects at ~200/s; for a Redis write, a pooled connection and a
round trip (docs/performance.md). A ``Batcher`` takes the keys asked for while its
previous call ran and passes them together to one call. A lone request costs what it did
before.
"""

import asyncio
import contextvars
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


@dataclass
class _Queue(Generic[K, V]):
    pending: list[tuple[K, asyncio.Future]] = field(default_factory=list)
    runner: asyncio.Task | None = None


class Batcher(Generic[K, V]):
    """``await batcher.load(key)`` returns ``(await fetch_many(keys))[i]`` for the key at ``i``.

    ``fetch_many`` returns one value per key, in order; for the ORM, wrap a sync function
    in ``database_sync_to_async``. If it raises, every load of that batch raises the same
    exception. Batches run one after another, in the order their keys were asked for.
    """

    def __init__(
        self, fetch_many: Callable[[list[K]], Awaitable[Sequence[V]]], *, max_size: int = 500
    ) -> None:
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
        try:
            while queue.pending:
                batch = [item for item in queue.pending[: self.max_size] if not item[1].done()]
                del queue.pending[: self.max_size]
                if not batch:
                    continue
                try:
                    values = await self.fetch_many([key for key, _ in batch])
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
