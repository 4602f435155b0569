"""The wire protocol, shared by the WebSocket and SSE transports.

Everything a client can send or receive is parsed or built here; nothing here does I/O.
Server messages are JSON objects with a ``type``; client messages are JSON objects with an
``action``. An ``id`` on a client message is echoed on its reply.
"""

import enum
import functools
import json
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

RequestId = str | int | None


class CloseCode(enum.IntEnum):
    """WebSocket close codes the server uses (application codes, 4000-4999)."""

    #: Credentials missing, invalid or expired: sent right after accepting, or when the
    #: connection's credentials lapse (its token expires, its session ends, its user's
    #: access changes).
    UNAUTHORIZED = 4401
    #: A client frame exceeded ``MAX_MESSAGE_BYTES``, or Daphne's own limit (1 MiB).
    #: Daphne drops application close codes below 3000, so this stands in for 1009.
    MESSAGE_TOO_BIG = 4009
    #: The client read too slowly and its queue of unsent messages overflowed.
    SLOW_CLIENT = 4008
    #: The user already held ``MAX_CONNECTIONS_PER_USER`` connections: sent right after
    #: accepting, as 4401 is.
    TOO_MANY_CONNECTIONS = 4429
    #: The connection cannot be served just now: its credentials could not be checked (the
    #: database unreachable), its channel or record could not be made (Redis unreachable),
    #: or the server is stopping. Try again later; Daphne drops 1013 (try again later) as
    #: it drops every code below 3000.
    UNAVAILABLE = 4503


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` message; the connection stays open."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNKNOWN_ACTION = "unknown_action"
    INVALID_TASK_ID = "invalid_task_id"
    NOT_FOUND = "not_found"
    SUBSCRIPTION_LIMIT = "subscription_limit"
    AUTHENTICATION_FAILED = "authentication_failed"
    #: The task could not be read just then (the database unreachable): try again.
    UNAVAILABLE = "unavailable"


class HttpErrorCode(enum.StrEnum):
    """The ``code`` of an HTTP refusal that no WebSocket error shares: of ``/events`` (its
    JSON answer before any stream; the others are ``ErrorCode``'s) and of a body too large."""

    NOT_AUTHENTICATED = "not_authenticated"
    BAD_REQUEST = "bad_request"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    TOO_MANY_CONNECTIONS = "too_many_connections"


class ProtocolError(Exception):
    """A client message that cannot be served; becomes an ``error`` message."""

    def __init__(self, code: ErrorCode, message: str, request_id: RequestId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


class Action(enum.StrEnum):
    SUBSCRIBE = "subscribe"
    UNSUBSCRIBE = "unsubscribe"
    PING = "ping"
    AUTHENTICATE = "authenticate"


TASK_ACTIONS = frozenset({Action.SUBSCRIBE, Action.UNSUBSCRIBE})


@dataclass(frozen=True, slots=True)
class ClientMessage:
    action: Action
    request_id: RequestId = None
    task_id: uuid.UUID | None = None
    token: str | None = None


def parse_task_id(value: Any) -> uuid.UUID:
    """A task id as sent by a client: a UUID in a string. Raises ``ValueError``."""
    if not isinstance(value, str):
        raise ValueError("task_id must be a UUID string")
    return uuid.UUID(value)


def reject_json_constant(name: str) -> None:
    """For ``json.loads()``'s ``parse_constant``: ``NaN``, ``Infinity`` and ``-Infinity``,
    which Python's parser accepts, are not JSON."""
    raise ValueError(f"{name} is not JSON")


class NumberTooLong(ValueError):
    """A JSON integer longer than Python converts (``sys.get_int_max_str_digits()``)."""


def parse_json_int(text: str) -> int:
    """For ``json.loads()``'s ``parse_int``: Python's digit limit raised a plain
    ``ValueError``, and a frame of valid JSON was answered as not JSON."""
    try:
        return int(text)
    except ValueError:
        raise NumberTooLong() from None


def parse_client_message(text: str) -> ClientMessage:
    """Parse one client frame, raising ``ProtocolError`` with the code the client gets."""
    try:
        data = json.loads(text, parse_constant=reject_json_constant, parse_int=parse_json_int)
    except NumberTooLong:
        limit = sys.get_int_max_str_digits()
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"Numbers may have at most {limit} digits."
        ) from None
    except (ValueError, RecursionError):  # the latter: nested deeper than Python's parser goes
        raise ProtocolError(ErrorCode.INVALID_JSON, "Message is not valid JSON.") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "Message must be a JSON object.")
    request_id = data.get("id")
    if request_id is not None and (
        isinstance(request_id, bool) or not isinstance(request_id, str | int)
    ):
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, "id must be a string or an integer.")
    action = data.get("action")
    if not isinstance(action, str):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "Message must have a string 'action'.", request_id
        )
    try:
        action = Action(action)
    except ValueError:
        raise ProtocolError(
            ErrorCode.UNKNOWN_ACTION, f"Unknown action {action[:64]!r}.", request_id
        ) from None
    if action is Action.AUTHENTICATE:
        token = data.get("token")
        if not isinstance(token, str):
            raise ProtocolError(ErrorCode.INVALID_MESSAGE, "token must be a string.", request_id)
        return ClientMessage(action, request_id, token=token)
    if action not in TASK_ACTIONS:
        return ClientMessage(action, request_id)
    try:
        task_id = parse_task_id(data.get("task_id"))
    except ValueError:
        raise ProtocolError(
            ErrorCode.INVALID_TASK_ID, "task_id must be a UUID string.", request_id
        ) from None
    return ClientMessage(action, request_id, task_id)


def body_too_large(limit: int) -> str:
    """What every endpoint says of a request body over ``limit`` bytes (413
    ``payload_too_large``), whether the server or the application refuses it."""
    return f"The body must be at most {limit} bytes."


def error_body(code: str, detail: str) -> bytes:
    """The JSON body of an HTTP refusal that no DRF view answers (``/events``, a body the
    server refuses as it arrives), in the REST API's shape."""
    return encode({"code": code, "detail": detail}).encode()


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def encode(message: dict[str, Any]) -> str:
    """One server message as compact JSON text, the form both transports send.

    Non-ASCII characters are escaped, so text that cannot be UTF-8 (a lone surrogate in a
    client's echoed ``id``, say) still makes a valid frame. A float that is not finite
    raises ``ValueError``: Python writes it as ``NaN`` or ``Infinity``, which no JSON parser
    reads, and a browser's ``JSON.parse()`` threw on every such frame.
    """
    return json.dumps(message, separators=(",", ":"), allow_nan=False)


def _reply(message: dict[str, Any], request_id: RequestId) -> dict[str, Any]:
    if request_id is not None:
        message["id"] = request_id
    return message


@functools.lru_cache(maxsize=1024)
def expiry_iso(expires_at: float | None) -> str | None:
    """When credentials expire (seconds since the epoch), as messages say it. Cached: a
    token's ``exp`` is in whole seconds, and the clients that log in within one second,
    or connect again with one token, share it."""
    if expires_at is None:
        return None
    return datetime.fromtimestamp(expires_at, UTC).isoformat()


def connected(connection_id: uuid.UUID, user_id: int, expires_at: float | None) -> dict[str, Any]:
    return {
        "type": "connected",
        "connection_id": str(connection_id),
        "user_id": user_id,
        "expires_at": expiry_iso(expires_at),
    }


def authenticated(expires_at: float, request_id: RequestId = None) -> dict[str, Any]:
    return _reply({"type": "authenticated", "expires_at": expiry_iso(expires_at)}, request_id)


def subscribed(
    task_id: uuid.UUID, seq: int, task: dict[str, Any], request_id: RequestId = None
) -> dict[str, Any]:
    message = {"type": "subscribed", "task_id": str(task_id), "seq": seq, "task": task}
    return _reply(message, request_id)


def unsubscribed(task_id: uuid.UUID, request_id: RequestId = None) -> dict[str, Any]:
    return _reply({"type": "unsubscribed", "task_id": str(task_id)}, request_id)


def pong(request_id: RequestId = None) -> dict[str, Any]:
    return _reply({"type": "pong", "timestamp": now_iso()}, request_id)


def error(code: ErrorCode, message: str, request_id: RequestId = None) -> dict[str, Any]:
    return _reply({"type": "error", "code": str(code), "message": message}, request_id)


def task_update(task_id: uuid.UUID, seq: int, task: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "task_update",
        "task_id": str(task_id),
        "status": task["status"],
        "progress": task["progress"],
        "seq": seq,
        "timestamp": now_iso(),
        "task": task,
    }


def task_deleted(task_id: uuid.UUID) -> dict[str, Any]:
    return {"type": "task_deleted", "task_id": str(task_id), "timestamp": now_iso()}


def broadcast(payload: dict[str, Any]) -> dict[str, Any]:
    return {"type": "broadcast", "payload": payload, "timestamp": now_iso()}


def personal_message(payload: dict[str, Any]) -> dict[str, Any]:
    return {"type": "message", "payload": payload, "timestamp": now_iso()}


def token_expired(expires_at: float | None) -> dict[str, Any]:
    """The data of an event stream's last event (a WebSocket is closed with 4401): when
    its token expired, or ``None`` for a stream whose session ended or whose user's access
    was withdrawn."""
    return {"expires_at": expiry_iso(expires_at)}


# Server-Sent Events framing (WHATWG HTML, "event stream interpretation").


#: Framings of recent messages kept, by each cache of one (an SSE event, an HTTP chunk, a
#: WebSocket frame): a fan-out frames one message for every connection in turn, and
#: needs only the latest. Kept by the hundred, the framings of updates of a task with a
#: 1.5 MB result held hundreds of MiB after their fan-outs were done.
FRAMINGS_KEPT = 8


def _sse_field(value: str) -> str:
    # A field value ends at CR or LF, and NUL is not allowed by the grammar.
    return value.replace("\r", "").replace("\n", "").replace("\0", "")


@functools.lru_cache(maxsize=FRAMINGS_KEPT)
def sse_event(event: str, data: str, event_id: str | None = None) -> bytes:
    """One event block. ``data`` is sent on as many ``data:`` lines as it has lines.

    A lone surrogate (JSON may carry one) becomes ``?``: the stream is UTF-8, and one bad
    string must not end it. Cached: a fan-out frames one message for every stream, and
    its text is one object, whose hash Python computes once.
    """
    lines = [f"event: {_sse_field(event)}"]
    if event_id is not None:
        lines.append(f"id: {_sse_field(event_id)}")
    lines.extend(
        f"data: {line}" for line in data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    )
    return ("\n".join(lines) + "\n\n").encode("utf-8", "replace")


def sse_retry(milliseconds: int) -> bytes:
    return f"retry: {milliseconds}\n\n".encode()


#: Milliseconds an ``EventSource`` waits before reconnecting; the first field of a stream.
SSE_RETRY_MILLISECONDS = 3000


class SseEvent(enum.StrEnum):
    """The ``event:`` names of the SSE stream."""

    CONNECTED = "connected"
    TASK_UPDATE = "task_update"
    UNSUBSCRIBED = "unsubscribed"
    TASK_DELETED = "task_deleted"
    BROADCAST = "broadcast"
    MESSAGE = "message"
    HEARTBEAT = "heartbeat"
    TOKEN_EXPIRED = "token_expired"


def sse_connected(connection_id: uuid.UUID, user_id: int, expires_at: float | None) -> bytes:
    """The first bytes of every stream: the reconnection delay, then ``connected``."""
    message = connected(connection_id, user_id, expires_at)
    del message["type"]
    return sse_retry(SSE_RETRY_MILLISECONDS) + sse_event(SseEvent.CONNECTED, encode(message))


@functools.lru_cache(maxsize=FRAMINGS_KEPT)
def sse_task_update(task_id: str, seq: int, text: str) -> bytes:
    """A task update, with the WebSocket's JSON text as data and ``<task_id>:<seq>`` as id.

    Cached as ``sse_event()`` is, and ahead of it: one lookup per stream instead of an id
    built and hashed for each."""
    return sse_event(SseEvent.TASK_UPDATE, text, f"{task_id}:{seq}")


def sse_heartbeat() -> bytes:
    return sse_event(SseEvent.HEARTBEAT, encode({"timestamp": now_iso()}))
