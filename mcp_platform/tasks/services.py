"""Changes to tasks. Saving publishes them (see ``signals``), so callers need not."""

from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser

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
    for name, value in changes.items():
        setattr(task, name, value)
    # The transition is checked by save(), under the row lock it takes to advance seq.
    task.clean_fields(exclude=["owner"])
    task.save()
    return task
