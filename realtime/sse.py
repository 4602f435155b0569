"""The Server-Sent Events endpoint, ``GET /events``: the channel layer as an event stream.

A Channels consumer beside the WebSocket one, reading the same kind of ``Inbox``: each
event is one chunk of the response body, sent as the WebSocket consumer sends a frame
(``InboxConsumerMixin``). It was a Django view, which put every event
through three async generators and Django's ``send_response()`` and gave each stream a
thread of its own; as a consumer a stream holds no thread, and an event costs about what a
WebSocket frame does (docs/performance.md). Every refusal is a JSON ``{"code", "detail"}``
answer sent before any stream starts.
"""

import asyncio
import contextlib
import io
import logging
import time
import uuid
from typing import Any

from channels.exceptions import StopConsumer
from channels.generic.http import AsyncHttpConsumer
from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import DisallowedHost, TooManyFieldsSent
from django.core.handlers.asgi import ASGIRequest
from django.http import HttpRequest
from redis.exceptions import RedisError

from realtime import protocol
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
from realtime.protocol import ErrorCode, HttpErrorCode, ProtocolError, SseEvent

logger = logging.getLogger(__name__)

#: What the stream's own timer puts in its inbox when it has been idle for an interval.
HEARTBEAT = "realtime.heartbeat"
HEARTBEAT_MESSAGE = {"type": HEARTBEAT}

#: The HTTP status of each refusal of a ``task_id``.
PROTOCOL_ERROR_STATUS = {
    ErrorCode.INVALID_TASK_ID: 400,
    ErrorCode.SUBSCRIPTION_LIMIT: 400,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.UNAVAILABLE: 503,
}

STREAM_HEADERS = [
    (b"Content-Type", b"text/event-stream"),
    (b"Cache-Control", b"no-store"),
    # Tells nginx not to buffer the stream.
    (b"X-Accel-Buffering", b"no"),
    (b"X-Content-Type-Options", b"nosniff"),
]


class Refused(Exception):
    """A request answered with a JSON error instead of a stream."""

    def __init__(self, status: int, code: ErrorCode | HttpErrorCode, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    @classmethod
    def from_protocol_error(cls, exc: ProtocolError) -> "Refused":
        return cls(PROTOCOL_ERROR_STATUS[exc.code], exc.code, exc.message)

    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = [
            (b"Content-Type", b"application/json"),
            (b"X-Content-Type-Options", b"nosniff"),
        ]
        if self.status == 401:
            headers.append((b"WWW-Authenticate", b'Bearer realm="api"'))
        elif self.status == 405:
            headers.append((b"Allow", b"GET"))
        return headers

    def body(self) -> bytes:
        return protocol.error_body(self.code, self.detail)

    def messages(self) -> list[dict[str, Any]]:
        """The whole response, as the ASGI messages that send it."""
        return [
            {"type": "http.response.start", "status": self.status, "headers": self.headers()},
            {"type": "http.response.body", "body": self.body()},
        ]


#: The answer to a stream that cannot be served just now: its channel or its record could
#: not be made (Redis away).
UNAVAILABLE = Refused(503, ErrorCode.UNAVAILABLE, "Updates cannot be followed just now; try again.")


def authenticated_user(scope: dict[str, Any]) -> AbstractBaseUser:
    """The user ``realtime.auth.http_auth_stack`` found: of a bearer token (header, else
    ``?token=``), else of the session. A token that fails is refused even beside a valid
    session, as on ``/ws``."""
    if scope.get("auth_unavailable"):
        raise Refused(
            503,
            ErrorCode.UNAVAILABLE,
            "The credentials could not be checked just now; try again.",
        )
    failure = scope.get("auth_failure")
    if failure is not None:
        raise Refused(401, ErrorCode.AUTHENTICATION_FAILED, failure)
    user = scope.get("user")
    if user is None or not user.is_authenticated:
        raise Refused(
            401, HttpErrorCode.NOT_AUTHENTICATED, "Authentication credentials were not provided."
        )
    return user


def requested_task_ids(request: HttpRequest) -> list[uuid.UUID]:
    """The ``task_id`` parameters, in order and without repeats."""
    try:
        values = request.GET.getlist("task_id")
    except TooManyFieldsSent:
        limit = settings.DATA_UPLOAD_MAX_NUMBER_FIELDS
        raise Refused(
            400, HttpErrorCode.BAD_REQUEST, f"More than {limit} query parameters."
        ) from None
    try:
        task_ids = [protocol.parse_task_id(value) for value in values]
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_TASK_ID, "task_id must be a UUID.") from None
    return list(dict.fromkeys(task_ids))


def keeps_alive(request: HttpRequest) -> bool:
    """Whether ``Connection: keep-alive`` is true of this response: only HTTP/1.1 has the
    header (HTTP/2 forbids it), and a client that asked to close has its connection
    closed by the server after the response."""
    tokens = {token.strip().lower() for token in request.headers.get("Connection", "").split(",")}
    return request.scope.get("http_version") == "1.1" and "close" not in tokens


class EventStreamConsumer(InboxConsumerMixin, AsyncHttpConsumer):
    """``GET /events``: task updates, broadcasts and personal messages as SSE.

    The request is checked, connected and subscribed when it arrives; then each channel
    message becomes frames. The stream ends when the client goes away (``http.disconnect``)
    or its messages overflow; either way the connection leaves every group and the registry
    (``InboxConsumerMixin``).
    """

    heartbeat_timer: asyncio.TimerHandle | None = None
    last_sent = 0.0
    #: Whether the stream's headers went out: from then on, the response is the stream.
    streaming = False
    #: The request's user, task ids and whether its connection is kept alive, once checked.
    checked: tuple[AbstractBaseUser, list[uuid.UUID], bool]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """A stream that fails ends its response, and its client reconnects after
        ``retry``. Raised, the failure would leave the response open and the client
        waiting, and Daphne, unable to answer it with a 500, would stop checking on its
        applications."""
        try:
            await super().__call__(scope, receive, send)
        except Exception:
            if not self.streaming:
                raise
            logger.exception("Event stream failed; it was ended")
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def refused_without_channel(self, receive: Any, send: Any) -> bool:
        """Every refusal that the request alone decides (method, host, credentials, task
        ids) is answered at once."""
        try:
            self.checked = self.check_request()
        except ProtocolError as exc:
            refusal = Refused.from_protocol_error(exc)
        except Refused as exc:
            refusal = exc
        else:
            return False
        for message in refusal.messages():
            await send(message)
        return True

    async def end_as_cancelled(self) -> None:
        if self.streaming:  # a stream cut short, without its last chunk, looked broken
            await self.send_body(b"")

    async def refuse_unavailable(self, receive: Any, send: Any) -> None:
        for message in UNAVAILABLE.messages():
            await send(message)

    def check_request(self) -> tuple[AbstractBaseUser, list[uuid.UUID], bool]:
        """The request's user, task ids and whether its connection is kept alive; raises
        ``Refused`` or ``ProtocolError`` for a request refused."""
        if self.scope["method"] != "GET":
            method = self.scope["method"]
            raise Refused(405, HttpErrorCode.METHOD_NOT_ALLOWED, f'Method "{method}" not allowed.')
        request = ASGIRequest(self.scope, io.BytesIO())
        try:
            request.get_host()
        except DisallowedHost:
            raise Refused(400, HttpErrorCode.BAD_REQUEST, "Invalid Host header.") from None
        user = authenticated_user(self.scope)
        task_ids = requested_task_ids(request)
        limit = realtime_settings.SUBSCRIPTION_LIMIT
        if len(task_ids) > limit:
            raise ProtocolError(ErrorCode.SUBSCRIPTION_LIMIT, f"At most {limit} task_ids.")
        return user, task_ids, keeps_alive(request)

    async def http_request(self, message: dict[str, Any]) -> None:
        if message.get("more_body"):
            return  # a GET's body means nothing here; answer once it has all arrived
        try:
            await self.start()
        except ProtocolError as exc:
            await self.refuse(Refused.from_protocol_error(exc))

    async def start(self) -> None:
        """Connect and subscribe the checked request, and send the stream's first bytes.

        The stream counts as a live connection from before ``connected`` is sent."""
        user, task_ids, keep_alive = self.checked
        manager = get_connection_manager()
        try:
            self.connection = await manager.connect(
                channel_name=self.channel_name,
                user=user,
                transport=Transport.SSE,
                follow_all=not task_ids,
            )
        except (RedisError, OSError) as exc:  # Redis away: it was a 500 page, and a traceback
            logger.warning(
                "Could not record an event stream; refused it 503: %s", failure_text(exc)
            )
            await self.refuse(UNAVAILABLE)
        except TooManyConnections as exc:
            logger.info("Refused an event stream 429 of user %s: %s", user.pk, exc)
            await self.refuse(Refused(429, HttpErrorCode.TOO_MANY_CONNECTIONS, str(exc)))
        for task_id in task_ids:
            await manager.subscribe_to_task(self.connection, user, task_id)
        headers = list(STREAM_HEADERS)
        if keep_alive:
            headers.append((b"Connection", b"keep-alive"))
        await self.send_headers(headers=headers)
        self.streaming = True
        self.watch_credentials(self.scope.get("auth_credentials"))
        connected = protocol.sse_connected(self.connection.connection_id, user.pk, self.expires_at)
        await self.send_chunk(connected)
        self.tick()

    async def refuse(self, refusal: Refused) -> None:
        """Answer with the JSON error, leaving nothing connected, and end."""
        await self.leave()
        for message in refusal.messages():
            await self.send(message)
        raise StopConsumer()

    async def send_chunk(self, data: bytes) -> None:
        for body in self.chunk(data):
            await self.send(self.payload_message(body))

    def payload_message(self, body: bytes) -> dict[str, Any]:
        return {"type": "http.response.body", "body": body, "more_body": True}

    def chunk(self, *data: bytes) -> list[bytes]:
        """``data`` as the next chunks of the stream, one each."""
        self.last_sent = time.monotonic()
        return list(data)

    def tick(self) -> None:
        """A heartbeat goes in only after a whole interval without a frame; a full inbox
        has frames on the way, so none is needed then. (One timer per interval, rather
        than one re-armed per frame, keeps the cost off the delivery path.)"""
        loop = asyncio.get_running_loop()
        interval = realtime_settings.SSE_HEARTBEAT_SECONDS
        idle = time.monotonic() - self.last_sent
        if idle >= interval:
            self.inbox.put_nowait(HEARTBEAT_MESSAGE)
            idle = 0.0
        self.heartbeat_timer = loop.call_later(interval - idle, self.tick)

    async def http_disconnect(self, message: dict[str, Any]) -> None:
        # Channels' handler also awaits aclose_old_connections(); nothing here holds one.
        raise StopConsumer()

    async def leave(self) -> None:
        if self.heartbeat_timer is not None:
            self.heartbeat_timer.cancel()
        await super().leave()

    # Channel-layer and local messages: the text was encoded once by the sender.

    def task_update_replies(self, event: dict[str, Any]) -> list[bytes]:
        return self.update_replies(event["task_id"], self.ready_updates(event))

    def release_held_replies(self, event: dict[str, Any]) -> list[bytes]:
        task_id = event["task_id"]
        return self.update_replies(task_id, self.connection.release_held(task_id, event["wait"]))

    def update_replies(self, task_id: str, ready: list[tuple[int, str]]) -> list[bytes]:
        """A chunk per update: each is one block for every stream (``sse_task_update()``
        and ``as_chunk()`` are cached)."""
        if not ready:
            return []
        if len(ready) == 1:  # nearly always; a generator costs a function and a frame
            seq, text = ready[0]
            return self.chunk(protocol.sse_task_update(task_id, seq, text))
        return self.chunk(*(protocol.sse_task_update(task_id, seq, text) for seq, text in ready))

    def notice_payloads(self, kind: SseEvent, text: str) -> list[bytes]:
        return self.chunk(protocol.sse_event(kind, text))

    def broadcast_replies(self, event: dict[str, Any]) -> list[bytes]:
        return self.chunk(protocol.sse_event(SseEvent.BROADCAST, event["text"]))

    def message_replies(self, event: dict[str, Any]) -> list[bytes]:
        return self.chunk(protocol.sse_event(SseEvent.MESSAGE, event["text"]))

    def heartbeat_replies(self, event: dict[str, Any]) -> list[bytes]:
        return self.chunk(protocol.sse_heartbeat())

    reply_builders = {
        TASK_UPDATE: task_update_replies,
        RELEASE_HELD: release_held_replies,
        BROADCAST: broadcast_replies,
        PERSONAL: message_replies,
        HEARTBEAT: heartbeat_replies,
    }

    async def end_expired(self, expires_at: float | None) -> None:
        """A ``token_expired`` event, then the end of the stream. An ``EventSource`` would
        reconnect with the same expired token and be refused (401): the client needs a new
        token, and a new stream."""
        data = protocol.encode(protocol.token_expired(expires_at))
        await self.send_chunk(protocol.sse_event(SseEvent.TOKEN_EXPIRED, data))
        await self.send_body(b"")
        raise StopConsumer()

    async def realtime_overflow(self, event: dict[str, Any]) -> None:
        """Messages piled up faster than they were sent, and some are lost: the stream
        ends, and the client reconnects (after ``retry``) to resume."""
        self.log_end("its messages piled up unsent, a slow client")
        await self.send_body(b"")
        raise StopConsumer()
