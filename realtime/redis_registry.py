"""The connection registry shared by every server process through Redis.

Each process records its connections in sorted sets whose scores are lease expiry
times, and renews the leases of its live connections every third of a lease. Counts
ignore lapsed members, so a process that dies without cleaning up stops being counted
within one lease (``REALTIME_CONNECTION_LEASE_SECONDS``, 60 s by default); lapsed
members are pruned as the sets are touched.
"""

import asyncio
import logging
import time
import uuid
import weakref
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from realtime.batching import Batcher
from realtime.failures import failure_text
from realtime.redis_layer import names_starting_with, retry_once
from realtime.registry import ConnectionRegistry, Entry, Overview

logger = logging.getLogger(__name__)

#: Redis connections one process's registry uses at most, per event loop.
POOL_SIZE = 16
#: Seconds to wait for a connection, a reply or a free pooled connection.
REDIS_TIMEOUT_SECONDS = 5.0

#: Seconds between checks that Redis still holds this process's marker (``renew()``).
#: Without it, after Redis lost what it held (a restart that kept nothing on disk, a
#: flush), this process's connections were counted as gone until the next renewal: a
#: broadcast that reached them all answered ``recipients: 0`` for up to 20 s.
LOSS_CHECK_SECONDS = 1.0

#: A registry write: a connection (its id) added to or removed from a set (its key).
Write = tuple[Literal["add", "remove"], str, str]


@dataclass(frozen=True, slots=True)
class Arrival:
    """A connection (``member``) to record in its user's set and its transport's, unless
    the user's set already holds ``limit`` live members (0: no limit)."""

    user_key: str
    transport_key: str
    member: str
    limit: int


#: Connections one script call writes or renews at most. A ZADD then has at most twice as
#: many arguments, well within Lua's stack, and a renewal holds the event loop a few
#: milliseconds per call, however many connections the process has.
CHUNK = 500

#: Registry writes in one command: as a pipeline of one ZADD and one EXPIRE per set and
#: connection, redis-py's packing and reply parsing cost ~7% of a connect's CPU, and a
#: renewal of 4,000 connections held the event loop for 0.3-0.5 s (docs/performance.md).
#:
#: In order: removals, which make room; arrivals, each recorded unless its user holds its
#: limit, counted after those before it (so that no two arrivals in any process pass the
#: limit together, and none is written only to be taken out again), or if its member is
#: already recorded (the command sent again after a lost answer); then additions. A batch
#: writes each member of a set once (``_write_many()``), so the order changes no set's
#: final members. Sets written to are pruned of lapsed members first, and live at least
#: ``ttl``.
#:
#: KEYS: the sets removed from, two per arrival (its user's, its transport's), the sets
#: added to. ARGV: the leases' expiry, the time up to which a lease has lapsed, the sets'
#: time to live, then how many sets removed from, arrivals and sets added to; then per set
#: removed from its member count and members, per arrival its member and limit, per set
#: added to its member count and members. Returns 1 for each arrival recorded, 0 for each
#: refused.
WRITE_SCRIPT = """
local expiry, now, ttl = ARGV[1], ARGV[2], ARGV[3]
local removed, arrivals, added = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local at, k = 7, 0
local pruned = {}
local function next_key()
    k = k + 1
    local key = KEYS[k]
    if not pruned[key] then
        redis.call("ZREMRANGEBYSCORE", key, "-inf", now)
        pruned[key] = true
    end
    return key
end
local function next_members()
    local count = tonumber(ARGV[at])
    local first = at + 1
    at = first + count
    return first, at - 1
end
local function lease(key, first, last)
    local leases = {}
    for j = first, last do
        leases[#leases + 1] = expiry
        leases[#leases + 1] = ARGV[j]
    end
    redis.call("ZADD", key, unpack(leases))
    redis.call("EXPIRE", key, ttl)
end
for _ = 1, removed do
    local key = next_key()
    redis.call("ZREM", key, unpack(ARGV, next_members()))
end
local recorded = {}
for i = 1, arrivals do
    local user, transport = next_key(), next_key()
    local member, limit = ARGV[at], tonumber(ARGV[at + 1])
    if limit == 0 or redis.call("ZSCORE", user, member) or redis.call("ZCARD", user) < limit then
        lease(user, at, at)
        lease(transport, at, at)
        recorded[i] = 1
    else
        recorded[i] = 0
    end
    at = at + 2
end
for _ = 1, added do
    lease(next_key(), next_members())
end
return recorded
"""


class RedisRegistry(ConnectionRegistry):
    def __init__(self, url: str, *, lease_seconds: float, prefix: str) -> None:
        self.url = url
        self.lease_seconds = lease_seconds
        #: Keys start with this, so deployments (and test runs) can share one Redis.
        self.prefix = f"{prefix}:registry:"
        # A client is bound to the event loop it was made on.
        self._clients: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # This process's live connections and their subscriptions, for lease renewal.
        self._local: dict[uuid.UUID, Entry] = {}
        self._local_tasks: defaultdict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
        self._renewer: asyncio.Task | None = None
        #: Written by each renewal after the leases: Redis holds it only while it holds
        #: them (``_renew_forever()``).
        self._marker = f"{self.prefix}process:{uuid.uuid4()}"
        #: Sets outlive their members' leases: a live one never lapses between renewals.
        self._key_ttl = int(lease_seconds * 2) + 1
        # Connections arriving (or leaving) together share one command.
        self._writes: Batcher[Arrival | list[Write], bool | None] = Batcher(
            self._write_many, max_size=CHUNK
        )
        self._write_script: AsyncScript | None = None

    @property
    def client(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None:
            # A bounded pool: thousands of connections subscribing at once wait for one of
            # a few Redis connections rather than each opening its own (and running the
            # process out of file descriptors). Timeouts turn a silent Redis into errors.
            pool = aioredis.BlockingConnectionPool.from_url(
                self.url,
                max_connections=POOL_SIZE,
                timeout=REDIS_TIMEOUT_SECONDS,
                socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                socket_timeout=REDIS_TIMEOUT_SECONDS,
                retry=retry_once(),
            )
            client = self._clients[loop] = aioredis.Redis.from_pool(pool)
        return client

    def _transport_key(self, transport: str) -> str:
        return f"{self.prefix}transport:{transport}"

    def _user_key(self, user_id: int) -> str:
        return f"{self.prefix}user:{user_id}"

    def _task_key(self, task_id: uuid.UUID) -> str:
        return f"{self.prefix}task:{task_id}"

    def _entry_keys(self, entry: Entry) -> tuple[str, str]:
        return self._transport_key(entry.transport), self._user_key(entry.user_id)

    def _ensure_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_forever())

    async def _renew_forever(self) -> None:
        """Renew every third of a lease, and at once when Redis no longer holds this
        process's marker: it lost the leases too. A renewal that failed is tried again
        at the next check, not a third of a lease later."""
        loop = asyncio.get_running_loop()
        interval = self.lease_seconds / 3
        due = loop.time() + interval
        failing = False
        while self._local:
            await asyncio.sleep(min(LOSS_CHECK_SECONDS, interval))
            try:
                if loop.time() >= due or not await self.client.exists(self._marker):
                    await self.renew()
                    due = loop.time() + interval
            except aioredis.RedisError as exc:
                if not failing:  # once, not at every check
                    logger.warning(
                        "Could not renew connection leases; retrying: %s", failure_text(exc)
                    )
                failing = True
            else:
                if failing:
                    logger.info("Connection leases renewed again")
                failing = False

    async def renew(self) -> None:
        """Lease every connection of this process and its subscriptions again, and prune
        lapsed members, ``CHUNK`` connections per command, so other work runs between the
        commands. What Redis lost of them (a restart, a flush, leases that lapsed while
        it was out of reach) is written again: this process knows they are live. Then
        this process's marker, whose loss the renewer looks for between renewals."""
        connection_ids = list(self._local)
        for start in range(0, len(connection_ids), CHUNK):
            chunk = connection_ids[start : start + CHUNK]
            leases = self._leases(chunk)
            await self._run_script(leases, {})
            # What ended while the command was on its way may have been removed before
            # the command wrote it back: remove that again.
            live = self._leases(chunk)
            ended = {
                key: stale
                for key, members in leases.items()
                if (stale := sorted(set(members).difference(live.get(key, ()))))
            }
            if ended:
                await self._run_script({}, ended)
        await self._run_script({self._marker: ["live"]}, {})

    def _leases(self, connection_ids: list[uuid.UUID]) -> dict[str, list[str]]:
        """The members each set has for those of ``connection_ids`` still live here."""
        leases: defaultdict[str, list[str]] = defaultdict(list)
        for connection_id in connection_ids:
            entry = self._local.get(connection_id)
            if entry is None:
                continue
            member = str(connection_id)
            for key in self._entry_keys(entry):
                leases[key].append(member)
            for task_id in self._local_tasks.get(connection_id, ()):
                leases[self._task_key(task_id)].append(member)
        return leases

    async def _write(self, writes: Arrival | list[Write]) -> bool | None:
        """Make ``writes`` with those of connections arriving (or leaving) together; for an
        ``Arrival``, whether it was recorded."""
        return await self._writes.load(writes)

    async def _write_many(self, batches: list[Arrival | list[Write]]) -> list[bool | None]:
        """One script call for a whole batch."""
        arrivals = [batch for batch in batches if isinstance(batch, Arrival)]
        # A member written to a set more than once (an unsubscribe, then a subscribe to
        # the same task) ends as its last write leaves it.
        last: dict[tuple[str, str], str] = {}
        for batch in batches:
            if not isinstance(batch, Arrival):
                for kind, key, member in batch:
                    last[key, member] = kind
        added: defaultdict[str, list[str]] = defaultdict(list)
        removed: defaultdict[str, list[str]] = defaultdict(list)
        for (key, member), kind in last.items():
            (added if kind == "add" else removed)[key].append(member)
        recorded = iter(await self._run_script(added, removed, arrivals))
        return [next(recorded) if isinstance(batch, Arrival) else None for batch in batches]

    async def _run_script(
        self,
        added: dict[str, list[str]],
        removed: dict[str, list[str]],
        arrivals: list[Arrival] | None = None,
    ) -> list[bool]:
        """Drop the members of ``removed`` from their sets, record ``arrivals`` within
        their limits and lease the members of ``added`` to their sets (``WRITE_SCRIPT``);
        whether each arrival was recorded."""
        arrivals = arrivals or []
        now = time.time()
        keys: list[str] = [*removed]
        args: list[str | float | int] = [now + self.lease_seconds, now, self._key_ttl]
        args += [len(removed), len(arrivals), len(added)]
        for members in removed.values():
            args += [len(members), *members]
        for arrival in arrivals:
            keys += [arrival.user_key, arrival.transport_key]
            args += [arrival.member, arrival.limit]
        keys += [*added]
        for members in added.values():
            args += [len(members), *members]
        client = self.client
        if self._write_script is None:  # any loop's client can run it
            self._write_script = client.register_script(WRITE_SCRIPT)
        recorded = await self._write_script(keys=keys, args=args, client=client)
        return [bool(answer) for answer in recorded]

    def served_here(self) -> tuple[list[Entry], int]:
        # list() copies in one step, which the event loop's thread cannot interleave.
        return list(self._local.values()), sum(map(len, list(self._local_tasks.values())))

    async def add(self, entry: Entry, limit: int = 0) -> bool:
        transport_key, user_key = self._entry_keys(entry)
        arrival = Arrival(user_key, transport_key, str(entry.connection_id), limit)
        if not await self._write(arrival):
            return False
        self._local[entry.connection_id] = entry
        self._ensure_renewer()
        return True

    async def remove(self, entry: Entry, task_ids: frozenset[uuid.UUID]) -> None:
        self._local.pop(entry.connection_id, None)
        self._local_tasks.pop(entry.connection_id, None)
        member = str(entry.connection_id)
        keys = [*self._entry_keys(entry), *(self._task_key(task_id) for task_id in task_ids)]
        await self._write([("remove", key, member) for key in keys])

    async def add_subscription(self, entry: Entry, task_id: uuid.UUID) -> None:
        # Held first: should the write fail, the next renewal makes it.
        self._local_tasks[entry.connection_id].add(task_id)
        await self._write([("add", self._task_key(task_id), str(entry.connection_id))])

    async def remove_subscription(self, entry: Entry, task_id: uuid.UUID) -> None:
        tasks = self._local_tasks.get(entry.connection_id)
        if tasks is not None:
            tasks.discard(task_id)
        await self._write([("remove", self._task_key(task_id), str(entry.connection_id))])

    async def _count(self, key: str) -> int:
        return await self.client.zcount(key, time.time(), "+inf")

    async def _keys(self, start: str) -> list[bytes]:
        """Every key of this registry that begins with ``prefix + start``."""
        pattern = names_starting_with(f"{self.prefix}{start}")
        return [key async for key in self.client.scan_iter(match=pattern, count=500)]

    async def _counts(self, kind: str) -> dict[str, int]:
        """Live member counts of every set of a kind (``user:``, ``task:``), by the rest of
        its key."""
        keys = await self._keys(kind)
        now = time.time()
        async with self.client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zcount(key, now, "+inf")
            counts = await pipe.execute()
        start = len(self.prefix) + len(kind)
        return {
            key.decode()[start:]: count for key, count in zip(keys, counts, strict=True) if count
        }

    async def count_transport(self, transport: str) -> int:
        return await self._count(self._transport_key(transport))

    async def count_user(self, user_id: int) -> int:
        return await self._count(self._user_key(user_id))

    async def count_task(self, task_id: uuid.UUID) -> int:
        return await self._count(self._task_key(task_id))

    async def overview(self, transports: list[str]) -> Overview:
        by_user = await self._counts("user:")
        by_task = await self._counts("task:")
        return Overview(
            by_transport={
                transport: await self.count_transport(transport) for transport in transports
            },
            by_user={int(user_id): count for user_id, count in by_user.items()},
            by_task={uuid.UUID(task_id): count for task_id, count in by_task.items()},
        )

    async def flush(self) -> None:
        """Forget every entry of every process (tests)."""
        keys = await self._keys("")
        if keys:
            await self.client.delete(*keys)
        self._local.clear()
        self._local_tasks.clear()

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()
