from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from realtime import broadcasts
from realtime.failures import reason_of


class Command(BaseCommand):
    help = "Send a broadcast to every live connection and print how many it reached."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("message")
        parser.add_argument("--type", help=f"default: {broadcasts.DEFAULT_TYPE}")
        parser.add_argument("--data", help="JSON object of further fields for the payload")

    def handle(
        self, *args: Any, message: str, type: str | None, data: str | None, **options: Any
    ) -> None:
        try:
            payload = broadcasts.compose(message=message, type=type, data=data)
            broadcast = broadcasts.send(payload=payload)
        except ValidationError as exc:
            raise CommandError(describe(exc)) from None
        except broadcasts.BroadcastUnavailable as exc:
            raise CommandError(f"Nothing was sent. {exc}") from None
        except DatabaseError as exc:
            raise CommandError(f"Could not record the broadcast: {reason_of(exc)}") from None
        self.stdout.write(f"Broadcast sent to {broadcast.describe_reach()}.")


def describe(exc: ValidationError) -> str:
    """A validation error on one line, naming the fields at fault."""
    if not hasattr(exc, "error_dict"):
        return " ".join(exc.messages)
    fields = {"data": "--data", "type": "--type"}
    return " ".join(
        f"{fields.get(name, name)}: {' '.join(messages)}"
        for name, messages in exc.message_dict.items()
    )
