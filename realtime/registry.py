"""Where live connections are recorded, so counts can be answered for every process.

``LocalRegistry`` serves one process; ``RedisRegistry`` (chosen when ``REDIS_URL`` is set)
serves several, with entries that lapse unless their process renews them.
"""

import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    connection_id: uuid.UUID
    user_id: int
    transport: str


@dataclass(frozen=True, slots=True)
class Overview:
    """Counts for the admin's live connections page."""

    by_transport: dict[str, int]
    by_user: dict[int, int]
    by_task: dict[uuid.UUID, int]

    @property
    def total(self) -> int:
        return sum(self.by_transport.values())


class ConnectionRegistry:
    """Records connections and their task subscriptions; answers counts."""

    async def add(self, entry: Entry, limit: int = 0) -> bool:
        """Record a connection, unless its user already holds ``limit`` in every process
        (0: no limit); whether it was recorded. Counting and recording are one step, so
        that connections arriving together cannot all pass the limit."""
        raise NotImplementedError("subclasses of ConnectionRegistry must provide add()")

    async def remove(self, entry: Entry, task_ids: frozenset[uuid.UUID]) -> None:
        """Forget a connection and the subscriptions it still held."""
        raise NotImplementedError("subclasses of ConnectionRegistry must provide remove()")

    async def add_subscription(self, entry: Entry, task_id: uuid.UUID) -> None:
        raise NotImplementedError(
            "subclasses of ConnectionRegistry must provide add_subscription()"
        )

    async def remove_subscription(self, entry: Entry, task_id: uuid.UUID) -> None:
        raise NotImplementedError(
            "subclasses of ConnectionRegistry must provide remove_subscription()"
        )

    async def count_transport(self, transport: str) -> int:
        raise NotImplementedError("subclasses of ConnectionRegistry must provide count_transport()")

    async def count_user(self, user_id: int) -> int:
        raise NotImplementedError("subclasses of ConnectionRegistry must provide count_user()")

    async def count_task(self, task_id: uuid.UUID) -> int:
        raise NotImplementedError("subclasses of ConnectionRegistry must provide count_task()")

    async def overview(self, transports: list[str]) -> Overview:
        raise NotImplementedError("subclasses of ConnectionRegistry must provide overview()")

    async def close(self) -> None:
        """Release whatever the registry holds open."""

    def served_here(self) -> tuple[list[Entry], int]:
        """This process's live connections, and their task subscriptions in all, read
        without I/O from any thread (for ``realtime.metrics``)."""
        raise NotImplementedError("subclasses of ConnectionRegistry must provide served_here()")


class LocalRegistry(ConnectionRegistry):
    """The registry of one process, in dicts; exact and free of I/O."""

    def __init__(self) -> None:
        self.entries: dict[uuid.UUID, Entry] = {}
        self.per_user: Counter[int] = Counter()
        self.subscribers: defaultdict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)

    def served_here(self) -> tuple[list[Entry], int]:
        # list() copies in one step, which the event loop's thread cannot interleave.
        return list(self.entries.values()), sum(map(len, list(self.subscribers.values())))

    async def add(self, entry: Entry, limit: int = 0) -> bool:
        if entry.connection_id in self.entries:
            return True
        if limit and self.per_user[entry.user_id] >= limit:
            return False
        self.entries[entry.connection_id] = entry
        self.per_user[entry.user_id] += 1
        return True

    async def remove(self, entry: Entry, task_ids: frozenset[uuid.UUID]) -> None:
        if self.entries.pop(entry.connection_id, None) is not None:
            self.per_user[entry.user_id] -= 1
            if not self.per_user[entry.user_id]:
                del self.per_user[entry.user_id]
        for task_id in task_ids:
            await self.remove_subscription(entry, task_id)

    async def add_subscription(self, entry: Entry, task_id: uuid.UUID) -> None:
        self.subscribers[task_id].add(entry.connection_id)

    async def remove_subscription(self, entry: Entry, task_id: uuid.UUID) -> None:
        subscribers = self.subscribers.get(task_id)
        if subscribers is not None:
            subscribers.discard(entry.connection_id)
            if not subscribers:
                del self.subscribers[task_id]

    async def count_transport(self, transport: str) -> int:
        return sum(1 for entry in self.entries.values() if entry.transport == transport)

    async def count_user(self, user_id: int) -> int:
        return self.per_user[user_id]

    async def count_task(self, task_id: uuid.UUID) -> int:
        return len(self.subscribers.get(task_id, ()))

    async def overview(self, transports: list[str]) -> Overview:
        return Overview(
            by_transport={
                transport: await self.count_transport(transport) for transport in transports
            },
            by_user=dict(self.per_user),
            by_task={task_id: len(ids) for task_id, ids in self.subscribers.items()},
        )
