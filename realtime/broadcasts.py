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

DEFAULT_TYPE = "announcement"
MESSAGE_MAX_LENGTH = 2000
TYPE_MAX_LENGTH = 64
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
    ``type`` of 1-64, and encode to at most ``BROADCAST_MAX_BYTES``; otherwise
    ``ValidationError`` (keyed by field where one is at fault).
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
    try:
        encoded = json.dumps(payload, ensure_ascii=False, allow_nan=False).encode()
    except ValueError:
        raise ValidationError("Numbers must be finite.", code="invalid") from None
    if len(encoded) > realtime_settings.BROADCAST_MAX_BYTES:
        raise ValidationError(
            f"A broadcast must encode to at most {realtime_settings.BROADCAST_MAX_BYTES} bytes.",
            code="payload_too_large",
        )
    return payload


def compose(*, message: str, type: str | None = None, data: Any = None) -> dict[str, Any]:
    """A payload from separate parts (admin form, command line): ``data``, a JSON object,
    adds fields besides ``message`` and ``type``. Raises ``ValidationError``."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValidationError({"data": ValidationError("Must be a JSON object.", code="invalid")})
    if clash := sorted({"message", "type"} & data.keys()):
        raise ValidationError(
            {"data": ValidationError(f"Must not set {' or '.join(clash)}.", code="invalid")}
        )
    return {**data, "message": message, **({} if type is None else {"type": type})}


def send(*, payload: Any, sent_by: AbstractBaseUser | None = None) -> Broadcast:
    """Validate ``payload``, send it to every live connection of every process, and
    record it with the number of connections it reached.

    Raises ``ValidationError`` for a bad payload and ``BroadcastUnavailable`` when the
    channel layer or registry is unreachable; in both cases nothing is sent or recorded.
    """
    payload = validate_payload(payload)
    try:
        recipients = api.send_broadcast(payload)
    except (RedisError, OSError) as exc:
        raise BroadcastUnavailable(
            f"Could not reach the channel layer or connection registry: {exc}"
        ) from exc
    return Broadcast.objects.create(
        sent_by=sent_by,
        payload=payload,
        websocket=recipients.websocket,
        sse=recipients.sse,
        recipients=recipients.total,
    )
