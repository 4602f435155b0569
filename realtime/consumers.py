"""The WebSocket endpoint, ``/ws``: a thin adapter from frames to the connection manager.

``InboxConsumerMixin`` (``realtime.inbox_consumer``) is the part it shares with the SSE
endpoint (``realtime.sse``): how a consumer reads its messages, and how its connection ends.
"""

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from channels.exceptions import StopConsumer
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import DatabaseError
from redis.exceptions import RedisError

from realtime import protocol
from realtime.auth import authenticate_token
from realtime.conf import realtime_settings
from realtime.connections import (
    BROADCAST,
    PERSONAL,
    RELEASE_HELD,
    TASK_UPDATE,
    TooManyConnections,
    Transport,
    get_connection_manager,
)
from realtime.failures import failure_text
from realtime.inbox_consumer import InboxConsumerMixin
from realtime.protocol import Action, ClientMessage, CloseCode, ErrorCode, ProtocolError, SseEvent

logger = logging.getLogger(__name__)


def utf8_length_exceeds(text: str, limit: int) -> bool:
    """Whether ``text`` encodes to more than ``limit`` bytes, encoding only when it must."""
    if len(text) > limit:
        return True
    if len(text) * 4 <= limit:
        return False
    return len(text.encode("utf-8", "surrogatepass")) > limit


async def close_handshake(receive: Any, send: Any, code: CloseCode) -> None:
    """Complete the handshake and close with ``code`` at once: a close before it would be
    an HTTP 403, which says nothing of why."""
    if (await receive())["type"] == "websocket.connect":
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": code.value})


class TaskConsumer(InboxConsumerMixin, AsyncWebsocketConsumer):
    """One client connection: authenticate, then serve subscribe/unsubscribe/ping."""

    async def refused_without_channel(self, receive: Any, send: Any) -> bool:
        """Without credentials that hold, the handshake completes and the connection is
        closed at once: 4401, or 4503 if they could not be checked (docs/protocol.md)."""
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            return False
        unavailable = self.scope.get("auth_unavailable", False)
        if not unavailable:  # that one is logged where it failed
            logger.info(
                "Refused a WebSocket 4401: %s",
                self.scope.get("auth_failure") or "no credentials given",
            )
        await close_handshake(
            receive, send, CloseCode.UNAVAILABLE if unavailable else CloseCode.UNAUTHORIZED
        )
        return True

    async def refuse_unavailable(self, receive: Any, send: Any) -> None:
        await close_handshake(receive, send, CloseCode.UNAVAILABLE)

    async def end_as_cancelled(self) -> None:
        if self.connection is not None:  # accepted
            await self.close(CloseCode.UNAVAILABLE.value)

    async def connect(self) -> None:
        user = self.user = self.scope["user"]  # authenticated: refused_without_channel()
        try:
            self.connection = await get_connection_manager().connect(
                channel_name=self.channel_name, user=user, transport=Transport.WEBSOCKET
            )
        except (RedisError, OSError) as exc:  # Redis away: it was a 500, and a traceback
            logger.warning("Could not record a connection; closed it 4503: %s", failure_text(exc))
            await self.accept()
            await self.close(CloseCode.UNAVAILABLE.value)
            return
        except TooManyConnections as exc:
            logger.info("Refused a WebSocket 4429 of user %s: %s", user.pk, exc)
            await self.accept()
            await self.close(CloseCode.TOO_MANY_CONNECTIONS.value)
            return
        # Accepted only now, so that the handshake's answer and ``connected`` leave in one
        # write: accepted first, they took a socket send each whenever recording the
        # connection waited (on Redis; docs/performance.md). Messages that arrive
        # meanwhile wait in the inbox.
        await self.accept()
        self.watch_credentials(self.scope.get("auth_credentials"))
        await self.send_message(
            protocol.connected(self.connection.connection_id, user.pk, self.expires_at)
        )

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        # Channels' handler also awaits aclose_old_connections(), a hop through the one
        # sync thread that queued 4,000 clients leaving at once (12% of a profile); this
        # consumer touches the database only through database_sync_to_async.
        await self.disconnect(message["code"])
        raise StopConsumer()

    async def disconnect(self, code: int) -> None:
        await self.leave()

    async def send_message(self, message: dict[str, Any]) -> None:
        await self.send(text_data=protocol.encode(message))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.connection is None:
            return
        if text_data is None:
            reply = protocol.error(ErrorCode.INVALID_MESSAGE, "Binary frames are not accepted.")
        elif utf8_length_exceeds(text_data, realtime_settings.MAX_MESSAGE_BYTES):
            self.log_end(f"a frame over {realtime_settings.MAX_MESSAGE_BYTES} bytes (4009)")
            await self.close(code=CloseCode.MESSAGE_TOO_BIG.value)
            return
        else:
            try:
                message = protocol.parse_client_message(text_data)
                reply = await self.handlers[message.action](self, message)
            except ProtocolError as exc:
                reply = protocol.error(exc.code, exc.message, exc.request_id)
        await self.send_message(reply)

    async def subscribe(self, message: ClientMessage) -> dict[str, Any]:
        try:
            snapshot = await get_connection_manager().subscribe_to_task(
                self.connection, self.user, message.task_id
            )
        except ProtocolError as exc:
            exc.request_id = message.request_id
            raise
        return protocol.subscribed(
            snapshot.task_id, snapshot.seq, snapshot.state, message.request_id
        )

    async def unsubscribe(self, message: ClientMessage) -> dict[str, Any]:
        await get_connection_manager().unsubscribe_from_task(self.connection, message.task_id)
        return protocol.unsubscribed(message.task_id, message.request_id)

    async def ping(self, message: ClientMessage) -> dict[str, Any]:
        return protocol.pong(message.request_id)

    async def authenticate(self, message: ClientMessage) -> dict[str, Any]:
        """A new token for the connection's user, checked in full: the connection then
        ends when it expires instead. A refused one changes nothing."""
        try:
            credentials = await authenticate_token(message.token)
        except ValueError as exc:
            raise ProtocolError(
                ErrorCode.AUTHENTICATION_FAILED, str(exc), message.request_id
            ) from None
        except DatabaseError:
            # User reads are batched: raised, it ended every connection authenticating then.
            raise ProtocolError(
                ErrorCode.UNAVAILABLE,
                "The token could not be checked just now; try again.",
                message.request_id,
            ) from None
        if credentials.user.pk != self.user.pk:
            raise ProtocolError(
                ErrorCode.AUTHENTICATION_FAILED,
                "The token is another user's.",
                message.request_id,
            )
        self.watch_credentials(credentials)
        # A check of the user, as at connecting: a change that reached no connection
        # (``QuerySet.update()``) went on past the old token's expiry. /ws follows no feed.
        self.follow_access(credentials.user)
        return protocol.authenticated(credentials.expires_at, message.request_id)

    handlers: dict[Action, Callable[["TaskConsumer", ClientMessage], Awaitable[dict[str, Any]]]] = {
        Action.SUBSCRIBE: subscribe,
        Action.UNSUBSCRIBE: unsubscribe,
        Action.PING: ping,
        Action.AUTHENTICATE: authenticate,
    }

    # Channel-layer messages: the text was encoded once by the sender.

    def payload_message(self, text: str) -> dict[str, Any]:
        return {"type": "websocket.send", "text": text}

    def task_update_replies(self, event: dict[str, Any]) -> list[str]:
        ready = self.ready_updates(event)
        if len(ready) == 1:  # nearly always; a comprehension costs a function and a frame
            return [ready[0][1]]
        return [text for _, text in ready]

    def release_held_replies(self, event: dict[str, Any]) -> list[str]:
        released = self.connection.release_held(event["task_id"], event["wait"])
        return [text for _, text in released]

    def notice_payloads(self, kind: SseEvent, text: str) -> list[str]:
        return [text]

    def text_replies(self, event: dict[str, Any]) -> list[str]:
        return [event["text"]]

    reply_builders = {
        TASK_UPDATE: task_update_replies,
        RELEASE_HELD: release_held_replies,
        BROADCAST: text_replies,
        PERSONAL: text_replies,
    }

    async def realtime_overflow(self, event: dict[str, Any]) -> None:
        """Messages for this client piled up faster than it read them (see realtime.layers)."""
        self.log_end("its messages piled up unsent, a slow client (4008)")
        await self.close(code=CloseCode.SLOW_CLIENT.value)

    async def end_expired(self, expires_at: float | None) -> None:
        await self.close(code=CloseCode.UNAUTHORIZED.value)
