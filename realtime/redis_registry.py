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

#: Connections one script call writes or renews at most. A ZADD then has at most twice as
#: many arguments, well within Lua's stack, and a renewal holds the event loop a few
#: milliseconds per call, however many connections the process has.
CHUNK = 500

#: Registry writes in one command: as a pipeline of one ZADD and one EXPIRE per set and
#: connection, redis-py's packing and reply parsing cost ~7% of a connect's CPU, and a
#: renewal of 4,000 connections held the event loop for 0.3-0.5 s (docs/performance.md).
#: KEYS: the sets to add to, then those to remove from. ARGV: the leases' expiry, the time
#: up to which a lease has lapsed, the sets' time to live, how many sets are added to,
#: then per set its member count and members. Sets added to are pruned of lapsed members.
#: Returns, for each set added to, its live members before the call: with the order of
#: the members added, every connection's count as it was recorded (``_write_many()``).
WRITE_SCRIPT = """
local expiry, now, ttl, added = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local at = 5
local before = {}
for i, key in ipairs(KEYS) do
    local count = tonumber(ARGV[at])
    if i <= added then
        redis.call("ZREMRANGEBYSCORE", key, "-inf", now)
        before[i] = redis.call("ZCARD", key)
        local leases = {}
        for j = at + 1, at + count do
            leases[#leases + 1] = expiry
            leases[#leases + 1] = ARGV[j]
        end
        redis.call("ZADD", key, unpack(leases))
        redis.call("EXPIRE", key, ttl)
    else
        redis.call("ZREM", key, unpack(ARGV, at + 1, at + count))
    end
    at = at + count + 1
end
return before
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
        self._writes: Batcher[list[Write], dict[str, int]] = Batcher(
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

    async def _write(self, writes: list[Write]) -> dict[str, int]:
        """Make ``writes`` with those of connections arriving (or leaving) together; return
        the live members of each set added to, counted up to this member."""
        return await self._writes.load(writes)

    async def _write_many(self, batches: list[list[Write]]) -> list[dict[str, int]]:
        """One script call for a whole batch. A set's members are counted in the order
        they were added: of two connections of a user arriving together, the first is
        counted without the second, as if each had been written alone."""
        added: defaultdict[str, list[str]] = defaultdict(list)
        removed: defaultdict[str, list[str]] = defaultdict(list)
        for writes in batches:
            for kind, key, member in writes:
                (added if kind == "add" else removed)[key].append(member)
        counts = await self._run_script(added, removed)
        results = []
        for writes in batches:
            result = {}
            for kind, key, _ in writes:
                if kind == "add":
                    counts[key] += 1
                    result[key] = counts[key]
            results.append(result)
        return results

    async def _run_script(
        self, added: dict[str, list[str]], removed: dict[str, list[str]]
    ) -> dict[str, int]:
        """Lease the members of ``added`` to their sets, drop those of ``removed`` from
        theirs (``WRITE_SCRIPT``); return the live members each set of ``added`` had
        before."""
        now = time.time()
        args: list[str | float | int] = [now + self.lease_seconds, now, self._key_ttl, len(added)]
        for members in (*added.values(), *removed.values()):
            args.append(len(members))
            args.extend(members)
        client = self.client
        if self._write_script is None:  # any loop's client can run it
            self._write_script = client.register_script(WRITE_SCRIPT)
        before = await self._write_script(keys=[*added, *removed], args=args, client=client)
        return dict(zip(added, before, strict=True))

    def served_here(self) -> tuple[list[Entry], int]:
        # list() copies in one step, which the event loop's thread cannot interleave.
        return list(self._local.values()), sum(map(len, list(self._local_tasks.values())))

    async def add(self, entry: Entry) -> int:
        member = str(entry.connection_id)
        counts = await self._write([("add", key, member) for key in self._entry_keys(entry)])
        self._local[entry.connection_id] = entry
        self._ensure_renewer()
        return counts[self._user_key(entry.user_id)]

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
