import argparse
import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from mcp_platform.tasks import services
from mcp_platform.tasks.models import Status, Task
from realtime.api import publish_failures
from realtime.conf import realtime_settings
from realtime.failures import reason_of

#: The fields the command changes: every one the service updates but the name.
CHANGES = tuple(field for field in services.UPDATABLE if field != "name")


def json_value(text: str) -> Any:
    """``--result``'s JSON; ``null`` too, which clears the result."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise argparse.ArgumentTypeError(f"not JSON: {reason}") from None


class Command(BaseCommand):
    help = (
        "Change a task; the change is published to its live subscribers (through Redis). "
        "Exits 1 if it is saved but its publish fails."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task_id")
        # Left out of the options unless given: a value of None (``--result null``) is a
        # change.
        parser.add_argument("--status", choices=Status.values, default=argparse.SUPPRESS)
        parser.add_argument("--progress", type=int, default=argparse.SUPPRESS)
        parser.add_argument(
            "--result", type=json_value, default=argparse.SUPPRESS, help="JSON value"
        )
        parser.add_argument("--error", default=argparse.SUPPRESS)

    def handle(self, *args: Any, task_id: str, **options: Any) -> None:
        changes = {name: options[name] for name in CHANGES if name in options}
        if not changes:
            raise CommandError("Nothing to change: give --status, --progress, --result or --error.")
        try:
            task = Task.objects.get(pk=task_id)
            with publish_failures() as failures:
                services.update_task(task=task, **changes)
        except (Task.DoesNotExist, ValidationError) as exc:
            message = (
                "No such task." if isinstance(exc, Task.DoesNotExist) else "; ".join(exc.messages)
            )
            raise CommandError(message) from None
        except DatabaseError as exc:
            raise CommandError(f"Could not change the task: {reason_of(exc)}") from None
        self.stdout.write(f"{task.pk} {task.status} {task.progress}% seq {task.seq}")
        if failures:
            raise CommandError(
                f"The change is saved, but its subscribers were not told ({'; '.join(failures)}):"
                " they see it with the task's next change, or when they subscribe again."
            )
        if not realtime_settings.REDIS_URL:
            self.stderr.write(
                "REDIS_URL is not set: the change reaches the clients of no server process."
            )
