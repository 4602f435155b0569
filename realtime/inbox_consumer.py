"""What the WebSocket and SSE consumers share: how a consumer reads its messages from one
``Inbox``, keeps its connection's credentials, and ends (``InboxConsumerMixin``).
"""

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable
from typing import Any

from channels.consumer import get_handler_name
from channels.exceptions import StopConsumer
from channels.layers import get_channel_layer
from django.contrib.auth.base_user import AbstractBaseUser
from redis.exceptions import RedisError

from realtime import expiry, protocol
from realtime.auth import Credentials, session_user, token_user
from realtime.conf import realtime_settings
from realtime.connections import RELEASE_HELD, TASK_HIDDEN, Connection, get_connection_manager
from realtime.failures import failure_text
from realtime.inbox import Inbox
from realtime.protocol import SseEvent

logger = logging.getLogger(__name__)

#: What goes in a connection's inbox when its token expires or its session is due a check
#: (``realtime.expiry``).
DEADLINE_PASSED = "realtime.deadline_passed"
#: Seconds before an expiry that found the inbox full tries again; a full inbox is being read.
EXPIRY_RETRY_SECONDS = 1.0
#: Seconds a connection of a server that is stopping may take to leave its groups and the
#: registry.
LEAVE_WHEN_STOPPING = 2.0


class InboxConsumerMixin:
    """Channels' ``AsyncConsumer.__call__`` and ``dispatch()``, reading one ``Inbox``.

    ``await_many_dispatch()`` costs a task and an ``asyncio.wait()`` per message
    (``realtime.inbox``, docs/performance.md). Messages are still handled one at a time, in
    arrival order. Whichever way the consumer ends (a disconnect, an error, cancellation),
    its connection is handed back to the manager before the inbox closes.

    A message that needs nothing but sending (``reply_builders``: updates, broadcasts) is
    handled by the sender's side while the consumer waits idle, when the server can send
    without waiting (``handle_nowait()``, ``realtime.server``): waking the consumer for it
    was ~30% of a delivery's CPU. What to send is said as the transport's payloads (a
    WebSocket text, an event-stream chunk), which the server then writes without an ASGI
    message built and read back for each: ~20% of a WebSocket delivery's instructions and
    ~12% of an event stream's (docs/performance.md). Awaited, each goes as its
    ``payload_message()``.
    """

    connection: Connection | None = None
    #: The token the connection holds; ``None`` for a connection opened with a session,
    #: which is checked again instead.
    credentials: Credentials | None = None
    #: When the session of a connection opened with one is next checked.
    session_check_at: float | None = None

    #: Channel-message types whose handling only sends to the client, each with the
    #: method that says what to send (payloads, see ``payload_message()``).
    reply_builders: dict[str, Callable[[Any, dict[str, Any]], list[Any]]] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scope = scope
        if await self.refused_without_channel(receive, send):
            return
        self.channel_layer = get_channel_layer(self.channel_layer_alias)
        try:
            self.channel_name = await self.channel_layer.new_channel()
        except (RedisError, OSError) as exc:  # Redis away: each was a 500, and a traceback
            logger.warning(
                "Could not open a channel for a connection; refused it: %s", failure_text(exc)
            )
            await self.refuse_unavailable(receive, send)
            return
        self.base_send = send
        self.inbox = Inbox(self.channel_layer, self.channel_name)
        if getattr(send, "write", None) is not None:
            self.inbox.handle_directly(self.handle_nowait)
        self.inbox.feed_from(receive)
        stopping = False
        try:
            while True:
                await self.dispatch(await self.inbox.get())
        except StopConsumer:
            pass
        except asyncio.CancelledError:
            # The server is stopping (Daphne cancels every application): the client is
            # told so, and reconnects, rather than finding its connection dropped.
            stopping = True
            with contextlib.suppress(Exception):
                await self.end_as_cancelled()
            raise
        finally:
            try:
                if stopping:
                    # Not for as long as a Redis that does not answer takes: what is not
                    # removed lapses with its lease.
                    await asyncio.wait_for(self.leave(), LEAVE_WHEN_STOPPING)
                else:
                    await self.leave()
            except TimeoutError:
                logger.warning(
                    "Could not hand a cancelled connection back within %s s",
                    LEAVE_WHEN_STOPPING,
                )
            finally:
                await self.inbox.close()

    async def refused_without_channel(self, receive: Any, send: Any) -> bool:
        """Answer a connection that is refused whatever it sends (bad credentials), before
        a channel is made for it, and say whether it was. A refusal then costs the channel
        layer nothing and does not depend on it: with Redis away, every refusal was a 500
        and an error logged with its traceback, an anonymous client's included."""
        return False

    async def end_as_cancelled(self) -> None:
        """End the connection, if it was answered, as one the server gives up on."""
        raise NotImplementedError("each transport says how it ends")

    async def refuse_unavailable(self, receive: Any, send: Any) -> None:
        """Answer a connection that cannot be served just now (its channel or its record
        could not be made: Redis away) as the transport says to try again later."""
        raise NotImplementedError("each transport says how it refuses")

    def payload_message(self, payload: Any) -> dict[str, Any]:
        """The ASGI message that sends one payload of ``reply_builders``. The transport's
        consumer says it (a ``websocket.send``, an ``http.response.body``): the mixin does
        not know its transport."""
        raise NotImplementedError("a consumer with reply_builders says how to send them")

    def replies(self, message: dict[str, Any]) -> list[Any] | None:
        """The payloads to send for a channel message that needs nothing else
        (``reply_builders``); ``None`` for one with a handler."""
        build = self.reply_builders.get(message["type"])
        if build is None:
            return None
        if self.connection is None:
            return []  # not connected yet, or gone
        return build(self, message)

    def handle_nowait(self, message: dict[str, Any]) -> bool:
        """Handle a channel message without waking the consumer, if it needs nothing but
        sending and the server can send without waiting (``realtime.server``). The layer
        calls it only while the consumer waits with nothing queued, so order is kept."""
        try:
            payloads = self.replies(message)
            if payloads is None:
                return False
            for payload in payloads:
                self.base_send.write(payload)
        except Exception as exc:
            # Not the sender's failure, who may be sending to thousands: the consumer
            # raises it on its next read, as if its handler had.
            self.inbox.put_nowait(exc)
        return True

    async def dispatch(self, message: dict[str, Any]) -> None:
        payloads = self.replies(message)
        if payloads is not None:
            for payload in payloads:
                await self.base_send(self.payload_message(payload))
            return
        # Channels awaits aclose_old_connections() (a hop through the single sync
        # thread) before every message. No handler here touches the database outside
        # database_sync_to_async, which closes stale connections itself, so the hop
        # is skipped: it cost more than the rest of a fan-out delivery (docs/performance.md).
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def task_deleted(self, event: dict[str, Any]) -> None:
        """A watched task was deleted: what is known of it is dropped (a subscription
        ends), and the client is told."""
        connection = self.connection
        if connection is None:
            return
        if connection.follows_all:  # it came through a feed: the task was followed
            connection.forget_deleted(event["task_id"])
        elif not connection.may_see(event["owner_id"]):
            # Given away before it was deleted: to this user it ended then, and is not
            # theirs to hear of now (the note of that may still wait in the inbox).
            await self.end_hidden(uuid.UUID(event["task_id"]))
            return
        elif not await get_connection_manager().unsubscribe_from_task(
            connection, uuid.UUID(event["task_id"])
        ):
            return  # not subscribed (any more): nothing to tell
        await self.send_notice(SseEvent.TASK_DELETED, event["text"])

    async def realtime_task_hidden(self, event: dict[str, Any]) -> None:
        """A subscribed task is no longer the user's to see (as of update ``seq``): its
        subscription ends, unless the client has subscribed again since, to the task as
        it is now (a subscribe queued before this note, the task given back meanwhile)."""
        connection = self.connection
        if connection is not None and connection.last_seq.get(event["task_id"], 0) < event["seq"]:
            await self.end_hidden(uuid.UUID(event["task_id"]))

    async def end_hidden(self, task_id: uuid.UUID) -> None:
        """End the subscription to a task the user may no longer see, and tell the client,
        unasked."""
        assert self.connection is not None
        if await get_connection_manager().unsubscribe_from_task(self.connection, task_id):
            await self.send_notice(
                SseEvent.UNSUBSCRIBED, protocol.encode(protocol.unsubscribed(task_id))
            )

    async def send_notice(self, kind: SseEvent, text: str) -> None:
        """Send a server message the client did not ask for: ``text``, of type ``kind``."""
        for payload in self.notice_payloads(kind, text):
            await self.base_send(self.payload_message(payload))

    def notice_payloads(self, kind: SseEvent, text: str) -> list[Any]:
        """The payloads of ``send_notice()``. The consumer says them, as it says
        ``payload_message()``: a WebSocket sends the text, an event stream an event."""
        raise NotImplementedError("a consumer with subscriptions says how notices are sent")

    @property
    def expires_at(self) -> float | None:
        """When the token the connection holds expires (seconds since the epoch)."""
        return None if self.credentials is None else self.credentials.expires_at

    def watch_credentials(self, credentials: Credentials | None) -> None:
        """End the connection when its credentials lapse: a token (the scope's
        ``auth_credentials``, or one the client sent since) when it expires, a session
        (``None``, for a connection opened with one) once a check finds it ended, every
        ``SESSION_RECHECK_SECONDS``. A later call replaces the deadline. Credentials are
        checked when given, and again at once when the user's access changes
        (``realtime_access_changed()``): without this, a connection would outlive them by
        hours, and a deactivated or logged-out user's streams would go on."""
        self.unwatch_expiry()
        self.credentials = credentials
        if credentials is not None:
            expiry.watch(credentials.expires_at, self)
        elif self.session_key() is not None:
            # Spread out: connections opened together (a reconnect after a restart) would
            # all read their sessions in the same second, every interval.
            interval = realtime_settings.SESSION_RECHECK_SECONDS * random.uniform(0.75, 1.25)
            self.session_check_at = time.time() + interval
            expiry.watch(self.session_check_at, self)

    def unwatch_expiry(self) -> None:
        for deadline in (self.expires_at, self.session_check_at):
            if deadline is not None:
                expiry.unwatch(deadline, self)
        self.session_check_at = None

    def session_key(self) -> str | None:
        """The key of the session that authenticated the connection, if one did (a
        connection authenticated by a token has no session in its scope)."""
        session = self.scope.get("session")
        return None if session is None else session.session_key

    def deadline_passed(self) -> None:
        """Called by ``realtime.expiry``: the consumer checks the session again, or ends
        the connection, when it takes this from its inbox (``realtime_deadline_passed()``)."""
        self.put_deadline(
            {
                "type": DEADLINE_PASSED,
                "expires_at": self.expires_at,
                "session_check_at": self.session_check_at,
            }
        )

    def put_deadline(self, message: dict[str, Any]) -> None:
        """Put in the deadline that passed, as it was then: a deadline that credentials
        given since replaced is then dropped, not taken for theirs."""
        if self.connection is None:
            return  # gone meanwhile
        if not self.inbox.put_nowait(message):  # a full inbox is being read: soon again
            asyncio.get_running_loop().call_later(EXPIRY_RETRY_SECONDS, self.put_deadline, message)

    async def realtime_deadline_passed(self, event: dict[str, Any]) -> None:
        """The token expired, or the session was due a check, unless other credentials
        replaced them while this waited in the inbox. Credentials that lapsed end the
        connection: nothing more is sent, and the transport ends it (``end_expired()``)."""
        deadlines = (event["expires_at"], event["session_check_at"])
        if self.connection is None or deadlines != (self.expires_at, self.session_check_at):
            return
        if self.session_check_at is not None and await self.credentials_hold():
            self.watch_credentials(None)  # the next check
            return
        expires_at = self.expires_at
        self.log_end("its token expired" if expires_at is not None else "its session ended")
        await self.leave()
        await self.end_expired(expires_at)

    async def realtime_access_changed(self, event: dict[str, Any]) -> None:
        """The user was deactivated, deleted, made staff or no longer staff, or changed
        password (``realtime.signals``): the credentials are checked now, not at the
        token's expiry or the session's next check, and the connection ends if they no
        longer hold."""
        if self.connection is not None and not await self.credentials_hold():
            self.log_end("its user's access changed")
            await self.leave()
            await self.end_expired(None)

    def log_end(self, why: str) -> None:
        """Say why the server ends a connection: the access log says only that it ended,
        and which address it came from."""
        connection = self.connection
        if connection is not None:
            entry = connection.entry
            logger.info(
                "Ended %s connection %s of user %s: %s",
                entry.transport,
                entry.connection_id,
                entry.user_id,
                why,
            )

    async def credentials_hold(self) -> bool:
        """Whether the connection's credentials still authenticate its user, with what the
        user may see now. A check that fails (the database or the session store
        unreachable) leaves the connection to the next one, or to its token's expiry:
        ending every connection at a database's failover would have them all reconnect
        at once."""
        connection = self.connection
        assert connection is not None
        if self.credentials is None and self.session_key() is None:
            return True  # authenticated otherwise (another middleware): nothing to check
        try:
            user = await self.current_user()
        except Exception as exc:
            # One line each: a database's failover fails the checks of thousands.
            logger.warning(
                "Could not check a connection's credentials; checking again later: %s",
                failure_text(exc),
            )
            return True
        if user is None or user.pk != connection.entry.user_id:
            return False
        return self.follow_access(user)

    def follow_access(self, user: AbstractBaseUser) -> bool:
        """Have the connection's updates follow what its ``user``, read just now, may see;
        ``False`` if they cannot: a feed of every task's (staff) or of the user's own does
        not turn into the other, and its client reconnects to the other."""
        connection = self.connection
        assert connection is not None
        if user.is_staff != connection.sees_all:
            if connection.follows_all:
                return False
            connection.sees_all = user.is_staff  # its subscriptions' updates follow
        return True

    async def current_user(self) -> AbstractBaseUser | None:
        """The user the connection's credentials authenticate now, read afresh (the token's
        checked as at connecting); ``None`` if they no longer authenticate one."""
        credentials = self.credentials
        if credentials is None:
            return await session_user(self.session_key())
        try:
            return await token_user(credentials.user_claim, credentials.password_claim)
        except ValueError:
            return None

    async def end_expired(self, expires_at: float | None) -> None:
        """End a connection whose credentials lapsed, as the transport can say so:
        ``expires_at`` is when its token expired; ``None`` if its session ended or its
        user's access was withdrawn."""
        raise NotImplementedError("a consumer that watches expiry says how it ends")

    async def leave(self) -> None:
        """Hand the connection back to the manager; a no-op once done."""
        self.unwatch_expiry()
        if self.connection is not None:
            connection, self.connection = self.connection, None
            try:
                await get_connection_manager().disconnect(connection)
            except (RedisError, OSError) as exc:
                # Raised, it ended the consumer with a traceback logged for each
                # connection: Redis away, thousands at once. Its entries lapse with
                # their leases.
                logger.warning("Could not hand a connection back: %s", failure_text(exc))

    def ready_updates(self, event: dict[str, Any]) -> list[tuple[int, str]]:
        """The updates a ``task_update`` lets through, in ``seq`` order; if it opens a gap,
        a release of what waits behind the gap is scheduled (``Connection.receive_update``).

        An update of a subscribed task that changed hands to another user goes no further,
        and the subscription is ended (``realtime_task_hidden()``)."""
        connection = self.connection
        assert connection is not None
        task_id = event["task_id"]
        if not connection.may_see(event["owner_id"]):
            if task_id in connection.last_seq:
                self.inbox.put_nowait(
                    {"type": TASK_HIDDEN, "task_id": task_id, "seq": event["seq"]}
                )
            return []
        ready = connection.receive_update(task_id, event["seq"], event["text"])
        wait = connection.starts_waiting(task_id)
        if wait is not None:
            self.inbox.put_later(
                realtime_settings.REORDER_WINDOW_SECONDS,
                {"type": RELEASE_HELD, "task_id": task_id, "wait": wait},
            )
        return ready
