"""The service layer of the real-time app: who is connected, to what, and sending to them.

The WebSocket and SSE consumers call ``ConnectionManager``; so does the one publish path
(``realtime.api``). The manager sits on the channel layer and the registry. It keeps no
consumer objects: a ``Connection`` is plain state that its consumer owns and passes in.
"""

import contextlib
import enum
import itertools
import logging
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import DatabaseError

from realtime import groups, protocol
from realtime.batching import Batcher
from realtime.conf import realtime_settings
from realtime.failures import failure_text
from realtime.protocol import ErrorCode, ProtocolError
from realtime.registry import ConnectionRegistry, Entry, LocalRegistry, Overview
from realtime.sources import TaskSnapshot, get_task_source

logger = logging.getLogger(__name__)

#: Channel-layer message types. These only send, so each transport says what in its
#: consumer's ``reply_builders`` (``InboxConsumerMixin.replies()``):
TASK_UPDATE = "task.update"
#: A transport's own reminder to stop waiting for a missing update (``release_held()``).
RELEASE_HELD = "realtime.release_held"
BROADCAST = "realtime.broadcast"
PERSONAL = "realtime.message"
#: ...and these call the consumer's handler of the name given.
TASK_DELETED = "task.deleted"  # task_deleted()
#: A transport's own note that a subscribed task changed hands (``ready_updates()``).
TASK_HIDDEN = "realtime.task_hidden"  # realtime_task_hidden()
ACCESS_CHANGED = "realtime.access_changed"  # realtime_access_changed()


@contextlib.contextmanager
def logged_failure(message: str, *args: Any) -> Iterator[None]:
    """Log a failure of the block (the channel layer's or the registry's, Redis away) as a
    warning, for a step whose failure should end neither the request nor the connection."""
    try:
        yield
    except Exception as exc:
        logger.warning(f"{message}: %s", *args, failure_text(exc))


class TooManyConnections(Exception):
    """The user already holds ``REALTIME_MAX_CONNECTIONS_PER_USER`` connections."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"A user may hold at most {limit} connections at once.")
        self.limit = limit


class SourceFailed(Exception):
    """The task source raised something other than ``DatabaseError``: a bug of its own."""


def _visible_snapshots(
    requests: list[tuple[AbstractBaseUser, uuid.UUID]],
) -> list[TaskSnapshot | None]:
    """The source's answers to a batch of subscriptions. A failure is logged here, once for
    the batch, and each subscription of it is answered ``unavailable``: raised as it was,
    it ended every connection subscribing just then, a source's bug closing them 1011."""
    try:
        answers = list(get_task_source().get_visible_many(requests))
        if len(answers) != len(requests):
            raise ValueError(f"get_visible_many() gave {len(answers)} answers for {len(requests)}")
        return answers
    except DatabaseError as exc:
        logger.warning(
            "Could not read tasks for %d subscriptions: %s", len(requests), failure_text(exc)
        )
        raise
    except Exception as exc:
        logger.exception("The task source failed to read tasks for %d subscriptions", len(requests))
        raise SourceFailed() from exc


_snapshots: Batcher[tuple[AbstractBaseUser, uuid.UUID], TaskSnapshot | None] = Batcher(
    database_sync_to_async(_visible_snapshots)
)


def _watchers(task_id: uuid.UUID, owner_id: int) -> list[str]:
    """The groups that watch a task: its subscribers, its owner's feed, the staff feed."""
    return [groups.task_group(task_id), groups.feed_group(owner_id), groups.STAFF_FEED_GROUP]


class Transport(enum.StrEnum):
    WEBSOCKET = "websocket"
    SSE = "sse"


#: The last seq of a followed task that was deleted: above any update of it.
DELETED = sys.maxsize

#: Numbers of waits for missing updates, unique in the process (``Connection.waiting``).
_waits = itertools.count(1)
#: Tasks whose last seq a connection that follows every task keeps, the most recently
#: updated: an update arrives out of order only within moments of another of its task, and
#: a stream open for months must not keep one entry per task it ever saw.
FOLLOWED_TASKS_KEPT = 10_000


@dataclass(eq=False, slots=True)
class Connection:
    """One live client connection, as its consumer and the manager see it."""

    channel_name: str
    entry: Entry
    #: Channel-layer groups joined, so that all are left on disconnect.
    groups: set[str] = field(default_factory=set)
    #: Subscribed task ids (as strings), each with the newest seq the client has seen;
    #: with ``follows_all``, the followed tasks seen last (``FOLLOWED_TASKS_KEPT``).
    last_seq: dict[str, int] = field(default_factory=dict)
    #: Whether every task the user may see is followed, not just subscribed ones.
    follows_all: bool = False
    #: Whether the user may see every task (staff), not just their own.
    sees_all: bool = False
    #: Updates that arrived ahead of a missing one, by task id, then seq.
    held: dict[str, dict[int, str]] = field(default_factory=dict)
    #: Tasks whose held updates wait for a release, each with its wait's number.
    waiting: dict[str, int] = field(default_factory=dict)

    @property
    def connection_id(self) -> uuid.UUID:
        return self.entry.connection_id

    def may_see(self, owner_id: int) -> bool:
        """Whether the user may see a task of this owner: ``visible_tasks()``'s rule, for a
        task whose owner an update names, without a query."""
        return self.sees_all or owner_id == self.entry.user_id

    def receive_update(self, task_id: str, seq: int, text: str) -> list[tuple[int, str]]:
        """The updates to deliver now, ``(seq, text)`` in ``seq`` order, after this one arrived.

        Drops updates of tasks not (or no longer) subscribed, and updates the client has
        already seen, whether delivered before or included in its ``subscribed`` state.
        An update that arrives ahead of a missing one (changes committed at nearly the same
        moment may be published out of order) is held until the missing one arrives, or
        until ``release_held()`` gives up on it; ``seq`` has no gaps, so one is only ever
        missing for a moment, unless its publication failed.
        """
        last = self.last_seq.get(task_id)
        if last is None:
            if not self.follows_all:
                return []
            last = seq - 1  # a followed task seen for the first time starts here
            if len(self.last_seq) >= FOLLOWED_TASKS_KEPT:
                self._forget_least_recent()
        if seq <= last:
            return []
        if self.follows_all:
            self.last_seq.pop(task_id, None)  # set again below, as the most recent
        if seq == last + 1 and task_id not in self.held:  # the usual case: the next one
            self.last_seq[task_id] = seq
            return [(seq, text)]
        held = self.held.setdefault(task_id, {})
        held[seq] = text
        ready = []
        while last + 1 in held:
            last += 1
            ready.append((last, held.pop(last)))
        if not held:
            self._stop_holding(task_id)  # the gap closed: its release is stale
        elif ready:
            # The gap closed with another behind it, which gets a wait of its own.
            self.waiting.pop(task_id, None)
        self.last_seq[task_id] = last
        return ready

    def starts_waiting(self, task_id: str) -> int | None:
        """A new wait's number, once updates of a task begin to be held: time to arm the
        release that calls ``release_held()`` with it; ``None`` otherwise."""
        if task_id not in self.held or task_id in self.waiting:
            return None
        wait = self.waiting[task_id] = next(_waits)
        return wait

    def release_held(self, task_id: str, wait: int) -> list[tuple[int, str]]:
        """Stop waiting for a task's missing updates: the held ones, in ``seq`` order.

        A release armed for an earlier wait, whose gap has since closed, releases nothing:
        a gap that opened after it has a release of its own, a whole window later. Ended
        early by the stale one, that gap's wait dropped its missing update when it came,
        for every subscriber alike."""
        if self.waiting.get(task_id) != wait:
            return []
        held = self._stop_holding(task_id)
        if not held or task_id not in self.last_seq:
            return []
        ready = sorted(held.items())
        self.last_seq[task_id] = ready[-1][0]
        return ready

    def saw(self, task_id: str, seq: int) -> None:
        """The client has seen the task up to ``seq`` (the state ``subscribed`` returned):
        no update up to it is delivered, whether held or still to come."""
        last = self.last_seq[task_id] = max(seq, self.last_seq.get(task_id, 0))
        held = self.held.get(task_id)
        if held:
            for seen in [seen for seen in held if seen <= last]:
                del held[seen]
            if not held:
                self._stop_holding(task_id)

    def _forget_least_recent(self) -> None:
        """Forget the followed task updated longest ago that has no update held."""
        for task_id in self.last_seq:
            if task_id not in self.held:
                del self.last_seq[task_id]
                return

    def forget(self, task_id: str) -> None:
        """Drop what is known of a task's updates (on unsubscribe)."""
        self.last_seq.pop(task_id, None)
        self._stop_holding(task_id)

    def forget_deleted(self, task_id: str) -> None:
        """A followed task was deleted: none of its updates is delivered any more, not
        even one published before the deletion that arrives after it."""
        self.forget(task_id)
        if len(self.last_seq) >= FOLLOWED_TASKS_KEPT:
            self._forget_least_recent()  # as for updates: a deletion of every task adds up
        self.last_seq[task_id] = DELETED

    def _stop_holding(self, task_id: str) -> dict[int, str] | None:
        """End a task's wait, if any, with its held updates, which it returns: a release
        armed for the wait is stale from then on."""
        self.waiting.pop(task_id, None)
        return self.held.pop(task_id, None)


@dataclass(frozen=True, slots=True)
class Recipients:
    websocket: int
    sse: int

    @property
    def total(self) -> int:
        return self.websocket + self.sse


class ConnectionManager:
    """Connects, subscribes and reaches clients, across every server process."""

    def __init__(self, registry: ConnectionRegistry) -> None:
        self.registry = registry

    @property
    def layer(self) -> Any:
        return get_channel_layer()

    async def _group_send_all(self, names: list[str], message: dict[str, Any]) -> None:
        """Send to several groups, in one go on a layer that can (the Redis one)."""
        send_many = getattr(self.layer, "group_send_many", None)
        if send_many is not None:
            await send_many(names, message)
            return
        for name in names:
            await self.layer.group_send(name, message)

    async def _join(self, connection: Connection, group: str) -> None:
        # Recorded first: a join that fails may have made the channel a member anyway
        # (channels-redis's adds it, then subscribes), and only recorded groups are left.
        connection.groups.add(group)
        await self.layer.group_add(group, connection.channel_name)

    async def _leave(self, connection: Connection, group: str) -> None:
        connection.groups.discard(group)
        await self.layer.group_discard(group, connection.channel_name)

    async def _leave_all(self, connection: Connection) -> None:
        """Leave every group of the connection. One that fails to be left (Redis away)
        does not keep the connection in the others; the first failure is raised after."""
        failure: BaseException | None = None
        for group in list(connection.groups):
            try:
                await self._leave(connection, group)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def connect(
        self,
        *,
        channel_name: str,
        user: AbstractBaseUser,
        transport: Transport,
        follow_all: bool = False,
    ) -> Connection:
        """Join the user's and the broadcast groups and record the connection.

        Once this returns the connection counts as a recipient of broadcasts. With
        ``follow_all`` it also follows every task the user may see (staff: all tasks).
        Raises ``TooManyConnections`` if the user already holds
        ``REALTIME_MAX_CONNECTIONS_PER_USER`` connections in every process.
        """
        entry = Entry(connection_id=uuid.uuid4(), user_id=user.pk, transport=str(transport))
        connection = Connection(
            channel_name=channel_name, entry=entry, follows_all=follow_all, sees_all=user.is_staff
        )
        joined = [groups.user_group(user.pk), groups.BROADCAST_GROUP]
        if follow_all:
            joined.append(groups.STAFF_FEED_GROUP if user.is_staff else groups.feed_group(user.pk))
        try:
            for group in joined:
                await self._join(connection, group)
            limit = realtime_settings.MAX_CONNECTIONS_PER_USER
            if not await self.registry.add(entry, limit):
                raise TooManyConnections(limit)
        except BaseException:
            # The caller gets no connection to disconnect, and a layer keeps a channel in
            # its groups until told: a failed connect leaves nothing behind.
            with contextlib.suppress(Exception):
                await self._leave_all(connection)
            raise
        return connection

    async def disconnect(self, connection: Connection) -> None:
        """Leave every group and drop every registry entry of the connection, the latter
        even if leaving a group failed: a process renews its entries for as long as it
        holds them, so one left behind would be counted for good."""
        subscribed = frozenset(
            () if connection.follows_all else map(uuid.UUID, connection.last_seq)
        )  # a connection that follows every task subscribes to none
        connection.last_seq.clear()
        connection.held.clear()
        try:
            await self._leave_all(connection)
        finally:
            await self.registry.remove(connection.entry, subscribed)

    async def subscribe_to_task(
        self, connection: Connection, user: AbstractBaseUser, task_id: uuid.UUID
    ) -> TaskSnapshot:
        """Subscribe to a task the user may see, returning its current state.

        The group is joined before the state is read, so an update made in between is
        either in the returned state or delivered afterwards, never lost; updates already
        in the state are not delivered again. Raises ``ProtocolError`` (``not_found``,
        ``subscription_limit``, ``unavailable``).
        """
        key = str(task_id)
        is_new = key not in connection.last_seq
        if is_new and len(connection.last_seq) >= realtime_settings.SUBSCRIPTION_LIMIT:
            raise ProtocolError(
                ErrorCode.SUBSCRIPTION_LIMIT,
                f"At most {realtime_settings.SUBSCRIPTION_LIMIT} subscriptions per connection.",
            )
        group = groups.task_group(task_id)
        try:
            await self._join(connection, group)
        except Exception as exc:
            # The channel layer failed (Redis away, or not confirming the subscription):
            # raised, it ended the connection. Logged in one line, not with a traceback:
            # during an outage one client can ask thousands of times a second.
            logger.warning("Could not join the group of task %s: %s", task_id, failure_text(exc))
            if is_new:
                with contextlib.suppress(Exception):
                    await self._leave(connection, group)
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                "The task's updates could not be followed just now; try again.",
            ) from None
        try:
            snapshot = await _snapshots.load((user, task_id))
        except (DatabaseError, SourceFailed):
            if is_new:
                await self._leave_task(connection, task_id)
            raise ProtocolError(
                ErrorCode.UNAVAILABLE, "The task could not be read just now; try again."
            ) from None
        connection.sees_all = user.is_staff  # as the source read it just now
        if snapshot is None:
            if is_new:
                await self._leave_task(connection, task_id)
            else:  # held, but gone or no longer the user's to see: it ends here
                await self.unsubscribe_from_task(connection, task_id)
            raise ProtocolError(ErrorCode.NOT_FOUND, "No such task.")
        connection.saw(key, snapshot.seq)
        if is_new:
            # The registry only counts: failing to write it (Redis away) spoils no
            # delivery, and its next renewal writes what this process holds.
            with logged_failure("Could not count the subscription to task %s", task_id):
                await self.registry.add_subscription(connection.entry, task_id)
        return snapshot

    async def _leave_task(self, connection: Connection, task_id: uuid.UUID) -> None:
        """Leave a task's group, logging a failure (Redis away): an unsubscribe, or a
        subscribe refused after its join, is answered all the same. Raised, it ended the
        connection."""
        with logged_failure("Could not leave the group of task %s", task_id):
            await self._leave(connection, groups.task_group(task_id))

    async def unsubscribe_from_task(self, connection: Connection, task_id: uuid.UUID) -> bool:
        """Stop a subscription, saying whether there was one: doing so twice, or for a task
        never subscribed, is harmless."""
        if str(task_id) not in connection.last_seq:
            return False
        connection.forget(str(task_id))
        # Once forgotten, the task's updates are dropped here whatever the layer still
        # sends, and its registry entry lapses with its lease: a failure of either step
        # (Redis away) ends the subscription all the same, and not the connection.
        await self._leave_task(connection, task_id)
        with logged_failure("Could not uncount the subscription to task %s", task_id):
            await self.registry.remove_subscription(connection.entry, task_id)
        return True

    async def send_personal_message(self, user_id: int, payload: dict[str, Any]) -> None:
        """Send ``{"type": "message", "payload": …}`` to every connection of one user."""
        text = protocol.encode(protocol.personal_message(payload))
        await self.layer.group_send(groups.user_group(user_id), {"type": PERSONAL, "text": text})

    async def send_access_changed(self, user_id: int) -> None:
        """Have every connection of the user check its credentials again, in every process."""
        await self.layer.group_send(groups.user_group(user_id), {"type": ACCESS_CHANGED})

    async def broadcast(self, payload: dict[str, Any]) -> Recipients:
        """Send a broadcast to every live connection of every process, and say how many."""
        recipients = Recipients(
            websocket=await self.registry.count_transport(Transport.WEBSOCKET),
            sse=await self.registry.count_transport(Transport.SSE),
        )
        text = protocol.encode(protocol.broadcast(payload))
        await self.layer.group_send(groups.BROADCAST_GROUP, {"type": BROADCAST, "text": text})
        return recipients

    async def send_task_update(self, snapshot: TaskSnapshot) -> None:
        """Deliver one task change to its subscribers and to the feeds that follow it.

        The message is encoded once here; consumers send the text as it is.
        """
        message = {
            "type": TASK_UPDATE,
            "task_id": str(snapshot.task_id),
            "owner_id": snapshot.owner_id,
            "seq": snapshot.seq,
            "text": protocol.encode(
                protocol.task_update(snapshot.task_id, snapshot.seq, snapshot.state)
            ),
        }
        await self._group_send_all(_watchers(snapshot.task_id, snapshot.owner_id), message)

    async def send_task_deleted(self, task_id: uuid.UUID, owner_id: int) -> None:
        """Tell a deleted task's subscribers and the feeds that followed it; each
        subscription to it ends."""
        message = {
            "type": TASK_DELETED,
            "task_id": str(task_id),
            "owner_id": owner_id,
            "text": protocol.encode(protocol.task_deleted(task_id)),
        }
        await self._group_send_all(_watchers(task_id, owner_id), message)

    async def count_connections(self, transport: Transport | None = None) -> int:
        """Live connections of every process, of one transport or of all."""
        transports = list(Transport) if transport is None else [transport]
        return sum([await self.registry.count_transport(t) for t in transports])

    async def count_user_connections(self, user_id: int) -> int:
        return await self.registry.count_user(user_id)

    async def count_task_subscribers(self, task_id: uuid.UUID) -> int:
        return await self.registry.count_task(task_id)

    async def overview(self) -> Overview:
        return await self.registry.overview([str(transport) for transport in Transport])


_manager: ConnectionManager | None = None
_manager_lock = threading.Lock()


def make_registry() -> ConnectionRegistry:
    url = realtime_settings.REDIS_URL
    if url:
        from realtime.redis_registry import RedisRegistry

        return RedisRegistry(
            url,
            lease_seconds=realtime_settings.CONNECTION_LEASE_SECONDS,
            prefix=realtime_settings.REDIS_PREFIX,
        )
    return LocalRegistry()


def get_connection_manager() -> ConnectionManager:
    """The process's manager, made on first use from the settings. Made under a lock: the
    first use may come from a request thread (a scrape of ``/metrics``) while the event loop
    makes it too, and a connection recorded in a manager then replaced was counted nowhere."""
    global _manager
    manager = _manager
    if manager is None:
        with _manager_lock:
            if _manager is None:
                _manager = ConnectionManager(make_registry())
            manager = _manager
    return manager


def reset_connection_manager() -> None:
    """Forget the process's manager (tests, after changing settings)."""
    global _manager
    _manager = None
