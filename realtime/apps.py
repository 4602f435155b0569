from django.apps import AppConfig


class RealtimeConfig(AppConfig):
    name = "realtime"
    verbose_name = "Real-time"

    def ready(self) -> None:
        # Registers the system checks, and connects the receivers.
        from realtime import checks, metrics, signals  # noqa: F401

        metrics.register()
