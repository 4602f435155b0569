import json

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from mcp_platform.tasks import services
from mcp_platform.tasks.models import Status, Task


class Command(BaseCommand):
    help = "Change a task; the change is published to its live subscribers."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("task_id")
        parser.add_argument("--status", choices=Status.values)
        parser.add_argument("--progress", type=int)
        parser.add_argument("--result", type=json.loads, help="JSON value")
        parser.add_argument("--error")

    def handle(self, *args, task_id: str, **options) -> None:
        changes = {
            name: options[name]
            for name in ("status", "progress", "result", "error")
            if options[name] is not None
        }
        if not changes:
            raise CommandError("Nothing to change: give --status, --progress, --result or --error.")
        try:
            task = Task.objects.get(pk=task_id)
            services.update_task(task=task, **changes)
        except (Task.DoesNotExist, ValidationError) as exc:
            message = (
                "No such task." if isinstance(exc, Task.DoesNotExist) else "; ".join(exc.messages)
            )
            raise CommandError(message) from None
        self.stdout.write(f"{task.pk} {task.status} {task.progress}% seq {task.seq}")
