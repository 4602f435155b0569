"""System checks for settings that would break the real-time layer quietly."""

import math
from typing import Any
from urllib.parse import unquote, urlsplit

from django.conf import settings
from django.core.checks import Error, Warning, register
from django.utils.module_loading import import_string
from redis.connection import ConnectionPool, parse_url

from realtime.conf import DEFAULTS, realtime_settings
from realtime.sources import TaskSource

#: Settings that must be above 0 (and finite), each with what would go wrong otherwise.
MUST_BE_POSITIVE = {
    "SSE_HEARTBEAT_SECONDS": "idle SSE streams would send heartbeats without pause",
    "CONNECTION_LEASE_SECONDS": "registry entries would lapse at once, renewed without pause",
    "SUBSCRIPTION_LIMIT": "no task could be subscribed to",
    "MAX_MESSAGE_BYTES": "every client frame would close its connection",
    "BROADCAST_MAX_BYTES": "every broadcast would be refused",
    "SLOW_CLIENT_QUEUE_LIMIT": "a connection's first message would wait for room forever",
    "SLOW_CLIENT_BUFFER_BYTES": "a client would be dropped at the first write it did not take",
    "REORDER_WINDOW_SECONDS": "an update ahead of a missing one would go at once, and the "
    "missing one be dropped when it came",
    "SESSION_RECHECK_SECONDS": "sessions would be checked without pause",
    "PUBLISH_WAIT_SECONDS": "a request would not wait for its change to be published, even "
    "when it takes a moment",
}


#: Tag of every check here: ``manage.py check --tag realtime`` runs them alone.
TAG = "realtime"


@register(TAG)
def check_known_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """A misspelt name in ``REALTIME`` would leave its setting at the default, quietly."""
    unknown = sorted(set(getattr(settings, "REALTIME", {})) - set(DEFAULTS))
    if not unknown:
        return []
    return [
        Error(
            f"Unknown realtime settings: {', '.join(unknown)}.",
            hint=f"Known settings: {', '.join(sorted(DEFAULTS))}.",
            id="realtime.E001",
        )
    ]


@register(TAG)
def check_positive_settings(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    return [
        Error(
            f"{name} must be a finite number greater than 0.",
            hint=f"At 0 or below, {harm}; infinite or NaN, timers fail.",
            id="realtime.E002",
        )
        for name, harm in MUST_BE_POSITIVE.items()
        if not 0 < getattr(realtime_settings, name) < math.inf  # NaN is refused too
    ]


@register(TAG)
def check_connection_limit(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    limit = realtime_settings.MAX_CONNECTIONS_PER_USER
    if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0:
        return []
    return [
        Error(
            f"MAX_CONNECTIONS_PER_USER must be a whole number of 0 or more, not {limit!r}.",
            hint="0 sets no limit.",
            id="realtime.E007",
        )
    ]


@register(TAG)
def check_task_source(app_configs: Any = None, **kwargs: Any) -> list[Error]:
    """A ``TASK_SOURCE`` that names no ``TaskSource`` failed every subscribe, not start-up."""
    path = realtime_settings.TASK_SOURCE
    if not path:
        return [
            Error(
                "REALTIME['TASK_SOURCE'] is not set.",
                hint="Name the project's subclass of realtime.sources.TaskSource.",
                id="realtime.E003",
            )
        ]
    try:
        source = import_string(path)
    except ImportError as exc:
        reason = f"cannot be imported: {exc}"
    else:
        if not isinstance(source, type) or not issubclass(source, TaskSource):
            reason = "is not a subclass of realtime.sources.TaskSource"
        elif (source.get_visible, source.get_visible_many) == (
            TaskSource.get_visible,
            TaskSource.get_visible_many,
        ):
            # TaskSource itself, or a subclass that answers nothing: every subscribe failed.
            reason = "provides neither get_visible() nor get_visible_many()"
        else:
            return []
    return [
        Error(
            f"REALTIME['TASK_SOURCE'] {path!r} {reason}.",
            hint="Name the project's subclass of realtime.sources.TaskSource.",
            id="realtime.E005",
        )
    ]


@register(TAG)
def check_redis_settings(app_configs: Any = None, **kwargs: Any) -> list[Error | Warning]:
    """The channel layer and the registry must agree on Redis, and its URL must be one
    redis-py reads; without Redis, a production server reaches its own clients only."""
    messages: list[Error | Warning] = []
    if realtime_settings.REDIS_URL:
        problem = redis_url_problem(realtime_settings.REDIS_URL)
        if problem:
            messages.append(
                Error(
                    f"The Redis URL is not one redis-py reads: {problem}",
                    hint="For example redis://127.0.0.1:6379/0 (REDIS_URL).",
                    id="realtime.E006",
                )
            )
    backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
    if bool(realtime_settings.REDIS_URL) != ("redis" in backend.lower()):
        messages.append(
            Error(
                "The channel layer and the connection registry must both use Redis, or neither.",
                hint="Give REALTIME['REDIS_URL'] the Redis of CHANNEL_LAYERS (REDIS_URL sets"
                " both). Apart, broadcasts would count the clients of every process and reach"
                " those of one, or the other way round.",
                id="realtime.E004",
            )
        )
    if not settings.DEBUG and backend.endswith("InMemoryChannelLayer"):
        messages.append(
            Warning(
                "The in-memory channel layer reaches only clients of this one process.",
                hint="Set REDIS_URL to run more than one server process.",
                id="realtime.W001",
            )
        )
    return messages


def redis_url_problem(url: str) -> str:
    """What is wrong with a Redis URL; empty if nothing. redis-py ignores a database path
    it cannot read as a number: ``/nine`` or ``/9x`` used database 0, which others may
    share. It passes a query's unknown option (``?socket_timout=5``) on to each connection,
    which then fails to be made, every one: the server served, and answered none."""
    try:
        parse_url(url)
    except ValueError as exc:
        return str(exc)
    parts = urlsplit(url)
    database = unquote(parts.path).replace("/", "")  # as redis-py reads it
    if parts.scheme != "unix" and database and not database.isdigit():
        return f"its database {database!r} is not a number."
    try:
        ConnectionPool.from_url(url).make_connection()  # made, not connected
    except (TypeError, ValueError) as exc:
        return f"redis-py cannot make a connection of it: {exc}"
    return ""
