"""Changes to tasks. Saving publishes them (see ``signals``), so callers need not."""

from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import router, transaction

from mcp_platform.tasks.models import Task

UPDATABLE = ("name", "status", "progress", "result", "error")


def create_task(*, owner: AbstractBaseUser, name: str, **fields: Any) -> Task:
    task = Task(owner=owner, name=name, **fields)
    task.full_clean()
    task.save()
    return task


def update_task(*, task: Task, **changes: Any) -> Task:
    """Apply ``changes`` to the task as it is stored now, and return it as saved.

    The row is read again under its lock: ``task`` may have been read before another
    writer's change, which saving it would undo (a change of the progress would put back
    the status it was read with). ``task`` gets the saved state too. Raises
    ``Task.DoesNotExist`` if the task was deleted meanwhile; otherwise as
    ``update_locked_task()``.
    """
    using = router.db_for_write(Task, instance=task)
    with transaction.atomic(using=using):
        current = Task.objects.using(using).select_for_update().get(pk=task.pk)
        update_locked_task(current, **changes)
    for field in Task._meta.concrete_fields:
        setattr(task, field.attname, getattr(current, field.attname))
    return task


def update_locked_task(task: Task, **changes: Any) -> Task:
    """Apply ``changes`` to ``task``, read under its row lock in the caller's transaction
    (``select_for_update()``), and save it. Raises ``django.core.exceptions.ValidationError``
    for an illegal transition or value; nothing is saved then."""
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise TypeError(f"Cannot update {', '.join(sorted(unknown))}")
    for name, value in changes.items():
        setattr(task, name, value)
    task.clean_fields(exclude=["owner"])
    task.save()  # it checks the transition, under the same lock
    return task
