"""The app's settings: ``settings.REALTIME`` merged over ``DEFAULTS``, read lazily.

Values may arrive as strings from the environment (``REALTIME_<NAME>``); each is
coerced to the type of its default, so ``REALTIME_SUBSCRIPTION_LIMIT=50`` is an int.
"""

from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.signals import setting_changed

DEFAULTS: dict[str, Any] = {
    # Dotted path of the project's realtime.sources.TaskSource subclass (required).
    "TASK_SOURCE": "",
    # Redis server for the shared connection registry; empty: each process keeps its own.
    "REDIS_URL": "",
    # Start of every Redis key the registry writes.
    "REDIS_PREFIX": "mcp",
    # Task subscriptions one WebSocket connection may hold.
    "SUBSCRIPTION_LIMIT": 100,
    # Connections (WebSockets and event streams, in every process) one user may hold at
    # once; past it a connection is refused (4429, or 429 on /events). 0: no limit.
    "MAX_CONNECTIONS_PER_USER": 0,
    # Largest client frame, in bytes of UTF-8; a larger one closes the connection with 4009.
    "MAX_MESSAGE_BYTES": 65536,
    # Seconds between heartbeat events on an idle SSE stream.
    "SSE_HEARTBEAT_SECONDS": 15.0,
    # Seconds a connection entry in the shared registry lives unless its process renews it.
    "CONNECTION_LEASE_SECONDS": 60.0,
    # Largest POST /broadcast body, in bytes.
    "BROADCAST_MAX_BYTES": 16384,
    # Seconds an update that arrived ahead of a missing one waits for it before it is sent.
    "REORDER_WINDOW_SECONDS": 0.5,
    # Messages a connection may have queued and unsent before it is closed as too slow.
    "SLOW_CLIENT_QUEUE_LIMIT": 1000,
    # Bytes a client that stopped reading may have sent to it, beyond Twisted's 64 KiB
    # buffer, before it is dropped as too slow (with python -m mcp_platform.serve).
    "SLOW_CLIENT_BUFFER_BYTES": 1_048_576,
    # Seconds between checks of the session of a connection opened with one: once the
    # session has ended (logout, expiry) or its user is inactive, the connection ends.
    "SESSION_RECHECK_SECONDS": 60.0,
    # Seconds a request that changed a task waits for the change's publish, in a server;
    # past that the publish goes on without it (realtime.api).
    "PUBLISH_WAIT_SECONDS": 1.0,
}


def _coerce(name: str, value: Any) -> Any:
    default = DEFAULTS[name]
    if not isinstance(value, str) or isinstance(default, str):
        return value
    try:
        return type(default)(value)
    except ValueError:
        kind = {int: "an integer", float: "a number"}[type(default)]
        raise ImproperlyConfigured(f"REALTIME_{name} must be {kind}, not {value!r}.") from None


class RealtimeSettings:
    """Attribute access to the merged settings, cached until Django's settings change."""

    def __init__(self) -> None:
        self._cache: dict[str, Any] = {}

    @property
    def user_settings(self) -> dict[str, Any]:
        return getattr(settings, "REALTIME", {})

    def __getattr__(self, name: str) -> Any:
        if name not in DEFAULTS:
            raise AttributeError(f"Invalid realtime setting: {name!r}")
        if name not in self._cache:
            self._cache[name] = _coerce(name, self.user_settings.get(name, DEFAULTS[name]))
        return self._cache[name]

    def reload(self) -> None:
        self._cache.clear()


realtime_settings = RealtimeSettings()


def _reload(*, setting: str, **kwargs: Any) -> None:
    if setting == "REALTIME":
        realtime_settings.reload()


setting_changed.connect(_reload)
