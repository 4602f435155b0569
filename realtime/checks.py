"""System checks for settings that would break the real-time layer quietly."""

from typing import Any

from django.conf import settings
from django.core.checks import Error, Warning, register

from realtime.conf import DEFAULTS, realtime_settings


@register()
def check_settings(app_configs: Any = None, **kwargs: Any) -> list:
    messages = []
    unknown = sorted(set(getattr(settings, "REALTIME", {})) - set(DEFAULTS))
    if unknown:
        messages.append(
            Error(
                f"Unknown realtime settings: {', '.join(unknown)}.",
                hint=f"Known settings: {', '.join(sorted(DEFAULTS))}.",
                id="realtime.E001",
            )
        )
    if realtime_settings.SSE_HEARTBEAT_SECONDS <= 0:
        messages.append(
            Error(
                "SSE_HEARTBEAT_SECONDS must be greater than 0.",
                hint="At 0 or below, idle SSE streams would send heartbeats without pause.",
                id="realtime.E002",
            )
        )
    if not realtime_settings.TASK_SOURCE:
        messages.append(
            Error(
                "REALTIME['TASK_SOURCE'] is not set.",
                hint="Name the project's subclass of realtime.sources.TaskSource.",
                id="realtime.E003",
            )
        )
    backend = settings.CHANNEL_LAYERS.get("default", {}).get("BACKEND", "")
    if not settings.DEBUG and backend.endswith("InMemoryChannelLayer"):
        messages.append(
            Warning(
                "The in-memory channel layer reaches only clients of this one process.",
                hint="Set REDIS_URL to run more than one server process.",
                id="realtime.W001",
            )
        )
    return messages
