from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "mcp_platform.tasks"
    label = "tasks"
    verbose_name = "Tasks"

    def ready(self) -> None:
        from mcp_platform.tasks import signals  # noqa: F401  (connects the publish hook)
        from mcp_platform.tokens import check_hmac_secrets_once

        check_hmac_secrets_once()
