"""Broadcasts: one service that checks a payload, sends it to every live connection and
records it. The REST view, the admin and the ``broadcast`` command all call ``send()``."""

import json
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from redis.exceptions import RedisError

from realtime import api
from realtime.conf import realtime_settings
from realtime.models import Broadcast
from realtime.protocol import reject_json_constant
from realtime.validators import validate_transportable_json

DEFAULT_TYPE = "announcement"
MESSAGE_MAX_LENGTH = 2000
TYPE_MAX_LENGTH = 64
#: Deepest nesting of the payload's values; JSON as deep as Python can parse is refused.
MAX_DEPTH = 32
SEND_PERMISSION = "realtime.send_broadcast"


class BroadcastUnavailable(Exception):
    """The channel layer or the connection registry could not be reached; nothing was sent."""


def can_send(user: AbstractBaseUser) -> bool:
    """Active staff and holders of ``realtime.send_broadcast`` may send broadcasts."""
    return bool(user.is_active and (user.is_staff or user.has_perm(SEND_PERMISSION)))


def _text_error(payload: dict[str, Any], name: str, max_length: int) -> ValidationError | None:
    if name not in payload:
        return ValidationError("This field is required.", code="required")
    value = payload[name]
    if not isinstance(value, str):
        return ValidationError("Must be a string.", code="invalid")
    if not value.strip():
        return ValidationError("This field may not be blank.", code="blank")
    if len(value) > max_length:
        return ValidationError(
            f"Ensure this field has no more than {max_length} characters.", code="max_length"
        )
    return None


def validate_payload(data: Any) -> dict[str, Any]:
    """The payload clients receive: ``data`` with ``type`` defaulted to ``announcement``.

    ``data`` must be a JSON object with a ``message`` of 1-2000 characters, an optional
    ``type`` of 1-64, values that every transport and database can carry, and encode to
    at most ``BROADCAST_MAX_BYTES``; otherwise ``ValidationError`` (keyed by field where
    one is at fault).
    """
    if not isinstance(data, dict):
        raise ValidationError("A broadcast must be a JSON object.", code="invalid")
    payload = {**data, "type": data.get("type", DEFAULT_TYPE)}
    errors = {
        name: error
        for name, max_length in (("message", MESSAGE_MAX_LENGTH), ("type", TYPE_MAX_LENGTH))
        if (error := _text_error(payload, name, max_length)) is not None
    }
    if errors:
        raise ValidationError(errors)
    validate_transportable_json(payload, max_depth=MAX_DEPTH)
    # Measured as compact JSON, as a client writes it: with json.dumps()'s spaces, a
    # 14 KB body of short values measured 21 KB.
    encoded = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
    if len(encoded) > realtime_settings.BROADCAST_MAX_BYTES:
        raise ValidationError(
            f"A broadcast must encode to at most {realtime_settings.BROADCAST_MAX_BYTES} bytes.",
            code="payload_too_large",
        )
    return payload


def compose(*, message: str, type: str | None = None, data: str | None = None) -> dict[str, Any]:
    """A payload from separate parts (admin form, command line). ``data`` is the JSON text
    of an object whose fields join ``message`` and ``type``. Raises ``ValidationError``
    (keyed ``data`` for a fault of ``data``); ``validate_payload()`` checks the rest."""

    def data_error(text: str) -> ValidationError:
        return ValidationError({"data": ValidationError(text, code="invalid")})

    try:
        fields = json.loads(data or "{}", parse_constant=reject_json_constant)
    except (ValueError, RecursionError) as exc:
        raise data_error(f"Not valid JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise data_error("Must be a JSON object.")
    if clash := sorted({"message", "type"} & fields.keys()):
        raise data_error(f"Must not set {' or '.join(clash)}.")
    return {**fields, "message": message, **({} if type is None else {"type": type})}


def send(*, payload: Any, sent_by: AbstractBaseUser | None = None) -> Broadcast:
    """Validate ``payload``, send it to every live connection of every process, and
    record it with the number of connections it reached.

    The record is written first, with no recipients until the send answers, and deleted
    if the send fails: what could not be recorded is not sent. A process that dies during
    the send leaves the record with none, whether or not Redis went on to deliver it. No
    transaction is held over the send: one was, and on SQLite it held the database's one
    write lock, every task's change in every process waiting behind it for as long as
    Redis did not answer (5 s and more); it lost, in such a death, the record of a
    broadcast Redis delivered after it. Raises ``ValidationError`` for a bad payload,
    ``BroadcastUnavailable`` when the channel layer or registry is unreachable, and
    ``DatabaseError`` when the database is.
    """
    payload = validate_payload(payload)
    broadcast = Broadcast.objects.create(
        sent_by=sent_by, payload=payload, recipients=0, websocket=0, sse=0
    )
    try:
        recipients = api.send_broadcast(payload)
    except BaseException as exc:
        broadcast.delete()
        if isinstance(exc, RedisError | OSError):
            raise BroadcastUnavailable(
                f"Could not reach the channel layer or connection registry: {exc}"
            ) from exc
        raise
    broadcast.recipients = recipients.total
    broadcast.websocket = recipients.websocket
    broadcast.sse = recipients.sse
    broadcast.save(update_fields=["recipients", "websocket", "sse"])
    return broadcast
