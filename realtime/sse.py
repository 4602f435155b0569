"""The Server-Sent Events endpoint, ``GET /events``: the channel layer as an event stream.

A thin adapter like the WebSocket consumer: it authenticates, asks the connection manager
to connect and subscribe, and turns layer messages into SSE frames (``realtime.protocol``).
Every refusal is a JSON ``{"code", "detail"}`` answer sent before any stream starts.
"""

import asyncio
import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from asgiref.sync import sync_to_async
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import close_old_connections
from django.http import HttpRequest, JsonResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from realtime import protocol
from realtime.auth import authenticate_token
from realtime.conf import realtime_settings
from realtime.connections import (
    BROADCAST,
    PERSONAL,
    RELEASE_HELD,
    TASK_UPDATE,
    Connection,
    Transport,
    get_connection_manager,
)
from realtime.inbox import Inbox
from realtime.layers import OVERFLOW
from realtime.protocol import ErrorCode, ProtocolError, SseEvent

#: What the stream's own timer puts in its inbox when it has been idle for an interval.
HEARTBEAT = "realtime.heartbeat"
HEARTBEAT_MESSAGE = {"type": HEARTBEAT}

#: Layer messages whose text every stream sends as it is, and the event name of each.
PASS_THROUGH = {BROADCAST: SseEvent.BROADCAST, PERSONAL: SseEvent.MESSAGE}

#: The HTTP status of each refusal of a ``task_id``.
PROTOCOL_ERROR_STATUS = {
    ErrorCode.INVALID_TASK_ID: 400,
    ErrorCode.SUBSCRIPTION_LIMIT: 400,
    ErrorCode.NOT_FOUND: 404,
}


class Refused(Exception):
    """A request answered with a JSON error instead of a stream."""

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def response(self) -> JsonResponse:
        response = JsonResponse({"code": self.code, "detail": self.detail}, status=self.status)
        if self.status == 401:
            response["WWW-Authenticate"] = 'Bearer realm="api"'
        return response


def bearer_token(request: HttpRequest) -> str | None:
    """The token of an ``Authorization: Bearer`` header. Other schemes are ignored, as
    the REST API ignores them."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def authenticate(request: HttpRequest) -> AbstractBaseUser:
    """The user of a bearer token (header, else ``?token=``), else of the session.

    A token that fails validation is refused even beside a valid session, as on ``/ws``.
    """
    token = bearer_token(request)
    if token is None:
        token = request.GET.get("token")
    if token is not None:
        try:
            return await authenticate_token(token)
        except ValueError as exc:
            raise Refused(401, "authentication_failed", str(exc)) from None
    user = await request.auser()
    if not user.is_authenticated:
        raise Refused(401, "not_authenticated", "Authentication credentials were not provided.")
    return user


def requested_task_ids(request: HttpRequest) -> list[uuid.UUID]:
    """The ``task_id`` parameters, in order and without repeats."""
    try:
        task_ids = [protocol.parse_task_id(value) for value in request.GET.getlist("task_id")]
    except ValueError:
        raise ProtocolError(ErrorCode.INVALID_TASK_ID, "task_id must be a UUID.") from None
    return list(dict.fromkeys(task_ids))


def keeps_alive(request: HttpRequest) -> bool:
    """Whether ``Connection: keep-alive`` is true of this response: only HTTP/1.1 has the
    header (HTTP/2 forbids it), and a client that asked to close has its connection
    closed by the server after the response."""
    tokens = {token.strip().lower() for token in request.headers.get("Connection", "").split(",")}
    return request.scope.get("http_version") == "1.1" and "close" not in tokens


def frame(connection: Connection, message: dict[str, Any], inbox: Inbox) -> bytes | None:
    """What a layer message becomes on this stream: frames, or nothing."""
    kind = message.get("type")
    if kind == TASK_UPDATE:
        task_id = message["task_id"]
        ready = connection.receive_update(task_id, message["seq"], message["text"])
        if connection.starts_waiting(task_id):
            inbox.put_later(
                realtime_settings.REORDER_WINDOW_SECONDS, {"type": RELEASE_HELD, "task_id": task_id}
            )
    elif kind == RELEASE_HELD:
        task_id = message["task_id"]
        ready = connection.release_held(task_id)
    else:
        event = PASS_THROUGH.get(kind)
        return None if event is None else protocol.sse_event(event, message["text"])
    return b"".join(protocol.sse_task_update(task_id, seq, text) for seq, text in ready) or None


async def event_stream(
    user: AbstractBaseUser, task_ids: list[uuid.UUID]
) -> AsyncGenerator[bytes, None]:
    """Connect, subscribe, then yield frames until closed or cancelled.

    The first step does every check (raising ``ProtocolError``) and yields the
    ``connected`` frame. Whichever way the stream ends, its connection leaves every group
    and the registry before the generator finishes.
    """
    manager = get_connection_manager()
    channel_name = await manager.layer.new_channel()
    inbox = Inbox(manager.layer, channel_name)
    loop = asyncio.get_running_loop()
    heartbeat = realtime_settings.SSE_HEARTBEAT_SECONDS
    last_sent = loop.time()
    timer: asyncio.TimerHandle | None = None

    def tick() -> None:
        # A heartbeat goes in only after a whole interval without a frame; a full inbox
        # has frames on the way, so none is needed then.
        nonlocal timer
        idle = loop.time() - last_sent
        if idle >= heartbeat:
            inbox.put_nowait(HEARTBEAT_MESSAGE)
            idle = 0.0
        timer = loop.call_later(heartbeat - idle, tick)

    connection: Connection | None = None
    try:
        connection = await manager.connect(
            channel_name=channel_name, user=user, transport=Transport.SSE, follow_all=not task_ids
        )
        for task_id in task_ids:
            await manager.subscribe_to_task(connection, user, task_id)
        # The stream may stay open for hours; it must not keep the database connection
        # that the checks used (a no-op for persistent connections, CONN_MAX_AGE > 0).
        await sync_to_async(close_old_connections)()
        yield protocol.sse_connected(connection.connection_id, user.pk)
        last_sent = loop.time()
        timer = loop.call_later(heartbeat, tick)
        while True:
            message = await inbox.get()
            kind = message.get("type")
            if kind == OVERFLOW:
                # Messages piled up faster than they were sent, and some are lost: the
                # stream ends, and the client reconnects (after ``retry``) to resume.
                return
            data = (
                protocol.sse_heartbeat() if kind == HEARTBEAT else frame(connection, message, inbox)
            )
            if data is not None:
                yield data
                last_sent = loop.time()
    finally:
        if timer is not None:
            timer.cancel()
        try:
            if connection is not None:
                await manager.disconnect(connection)
        finally:
            await inbox.close()


async def resume(head: bytes, stream: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """A stream whose first chunk was already taken, closed when this iterator is."""
    async with contextlib.aclosing(stream):
        yield head
        async for chunk in stream:
            yield chunk


# Nothing here changes state, so there is nothing for CSRF to protect; exempt, a POST
# gets the JSON 405 below rather than the CSRF failure page.
@csrf_exempt
async def events(request: HttpRequest) -> HttpResponseBase:
    """``GET /events``: task updates, broadcasts and personal messages as SSE.

    Cleanup: when the client goes away, Django's ASGI handler cancels the response, and
    the cancellation ends ``event_stream()``, which disconnects. The view takes the
    stream's first step itself so that a refusal is still a JSON answer, and so that a
    client gone before the response starts leaves a started generator, which asyncio
    closes (running its cleanup) when it is dropped.
    """
    if request.method != "GET":
        response = JsonResponse(
            {"code": "method_not_allowed", "detail": f'Method "{request.method}" not allowed.'},
            status=405,
        )
        response["Allow"] = "GET"
        return response
    try:
        user = await authenticate(request)
        stream = event_stream(user, requested_task_ids(request))
        head = await anext(stream)
    except Refused as exc:
        return exc.response()
    except ProtocolError as exc:
        return Refused(PROTOCOL_ERROR_STATUS[exc.code], str(exc.code), exc.message).response()
    response = StreamingHttpResponse(resume(head, stream), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    # Tells nginx not to buffer the stream.
    response["X-Accel-Buffering"] = "no"
    if keeps_alive(request):
        response["Connection"] = "keep-alive"
    return response
