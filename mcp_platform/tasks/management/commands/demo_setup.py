from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from mcp_platform.tasks import services
from mcp_platform.tasks.models import Task
from realtime.failures import reason_of

USERNAME = "demo"
PASSWORD = "demo-password"


class Command(BaseCommand):
    help = "Create the demo user (staff, so it can also use the admin) and a task, once."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--url",
            default="http://127.0.0.1:8000",
            help="where the server is, for the commands it prints (make run passes its PORT)",
        )

    def handle(self, *args: Any, url: str, **options: Any) -> None:
        if not settings.DEBUG:
            # A superuser whose password is in the README is a way into any server.
            raise CommandError(
                "demo_setup creates a superuser with a published password: it runs only with "
                "DJANGO_DEBUG on (make run sets it)."
            )
        try:
            user, task = self.demo_user_and_task()
        except DatabaseError as exc:  # a traceback of some 90 lines, where one says it
            raise CommandError(f"Could not make the demo user: {reason_of(exc)}") from None
        url = url.rstrip("/")
        if user.check_password(PASSWORD):
            password, said = PASSWORD, f"password {PASSWORD!r}"
        else:
            password, said = "<its password>", "whose password was changed since it was made"
        self.stdout.write(
            f"Demo user {USERNAME!r}, {said} (admin at {url}/admin/).\n"
            f"Demo task {task.pk}.\n"
            "Get a token:  curl -s -X POST -H 'Content-Type: application/json' "
            f'-d \'{{"username": "{USERNAME}", "password": "{password}"}}\' '
            f"{url}/api/token/"
        )

    def demo_user_and_task(self) -> tuple[AbstractBaseUser, Task]:
        user, created = get_user_model().objects.get_or_create(
            username=USERNAME, defaults={"is_staff": True, "is_superuser": True}
        )
        if created:
            user.set_password(PASSWORD)
            user.save()
        if not Task.objects.filter(owner=user).exists():
            services.create_task(owner=user, name="Demo task")
        return user, Task.objects.filter(owner=user).first()
