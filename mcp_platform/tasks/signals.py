"""Publishes every committed task change and deletion, whichever code path made it."""

import logging
from collections.abc import Callable
from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from mcp_platform.tasks.models import Task
from mcp_platform.tasks.realtime import task_snapshot
from realtime.api import publish_task_deleted, publish_task_update

logger = logging.getLogger(__name__)


def _on_commit(using: str, task: Task, publish: Callable[..., None], *args: Any) -> None:
    """Run ``publish(*args)`` for ``task`` once the transaction commits: a rolled-back
    change publishes nothing."""
    task_id = task.pk  # a deleted instance forgets it

    def run() -> None:
        try:
            publish(*args)
        except Exception:
            # The change is committed and the caller's request succeeded; a channel layer
            # that is down must not turn it into an error. Clients resynchronise from the
            # state and seq that their next subscribe returns.
            logger.exception("Could not publish task %s (%s)", task_id, publish.__name__)

    transaction.on_commit(run, using=using)


@receiver(post_save, sender=Task, dispatch_uid="tasks.publish_on_commit")
def publish_on_commit(sender: type[Task], instance: Task, using: str, **kwargs: Any) -> None:
    """Publish once committed. The snapshot is taken now, so each commit publishes the
    state it saved."""
    _on_commit(using, instance, publish_task_update, task_snapshot(instance))


@receiver(post_delete, sender=Task, dispatch_uid="tasks.publish_deletion_on_commit")
def publish_deletion_on_commit(
    sender: type[Task], instance: Task, using: str, **kwargs: Any
) -> None:
    """Tell the task's watchers once the deletion commits (also of tasks deleted with their
    owner, or in bulk: Django sends this for each)."""
    _on_commit(using, instance, publish_task_deleted, instance.pk, instance.owner_id)
