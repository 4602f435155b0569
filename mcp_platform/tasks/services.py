"""Changes to tasks. Saving publishes them (see ``signals``), so callers need not."""

from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction

from mcp_platform.tasks.models import Task

UPDATABLE = ("name", "status", "progress", "result", "error")


def create_task(*, owner: AbstractBaseUser, name: str, **fields: Any) -> Task:
    task = Task(owner=owner, name=name, **fields)
    task.full_clean()
    task.save()
    return task


def update_task(*, task: Task, **changes: Any) -> Task:
    """Apply ``changes``; raises ``django.core.exceptions.ValidationError`` for an illegal
    transition or value, and saves nothing then."""
    unknown = set(changes) - set(UPDATABLE)
    if unknown:
        raise TypeError(f"Cannot update {', '.join(sorted(unknown))}")
    with transaction.atomic():
        # In a transaction, clean() reads the stored status under a row lock, so the
        # transition check sees the status that this save replaces.
        for name, value in changes.items():
            setattr(task, name, value)
        task.full_clean(exclude=["owner"], validate_unique=False)  # only the pk is unique
        task.save()
    return task
