"""Queries about tasks, with the visibility rule in one place."""

from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import QuerySet

from mcp_platform.tasks.models import Task


def visible_tasks(user: AbstractBaseUser) -> QuerySet[Task]:
    """Tasks a user may see and change: their own, or every task for staff.

    ``can_see()`` is the same rule for one task already loaded; keep the two together.
    The owner is not joined: the API shows only its id, which the task row holds.
    """
    tasks = Task.objects.all()
    if user.is_staff:
        return tasks
    return tasks.filter(owner=user)


def can_see(user: AbstractBaseUser, task: Task) -> bool:
    """Whether ``task`` is among ``visible_tasks(user)``."""
    return user.is_staff or task.owner_id == user.pk
