"""Queries about tasks, with the visibility rule in one place."""

from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import QuerySet

from mcp_platform.prepared import PreparedGet
from mcp_platform.tasks.models import Task

_locked = PreparedGet(lambda: Task.objects.select_for_update(), "pk")
_locked_own = PreparedGet(lambda: Task.objects.select_for_update(), "owner_id", "pk")


def visible_tasks(user: AbstractBaseUser) -> QuerySet[Task]:
    """Tasks a user may see and change: their own, or every task for staff.

    ``can_see()`` is the same rule for one task already loaded, and
    ``visible_task_for_update()`` for one read to be changed; keep the three together.
    The owner is not joined: the API shows only its id, which the task row holds.
    """
    tasks = Task.objects.all()
    if user.is_staff:
        return tasks
    return tasks.filter(owner=user)


def can_see(user: AbstractBaseUser, task: Task) -> bool:
    """Whether ``task`` is among ``visible_tasks(user)``."""
    return user.is_staff or task.owner_id == user.pk


def visible_task_for_update(user: AbstractBaseUser, pk: Any) -> Task:
    """``visible_tasks(user).select_for_update().get(pk=pk)``, each PATCH's read, in SQL
    compiled once (``mcp_platform.prepared``). Must be called in a transaction."""
    if user.is_staff:
        return _locked.get(pk)
    return _locked_own.get(user.pk, pk)
