"""Publishes every committed task change and deletion, whichever code path made it."""

import logging
import uuid
from functools import partial
from typing import Any

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from mcp_platform.tasks.models import Task
from mcp_platform.tasks.realtime import task_snapshot
from realtime.api import publish_task_deleted, publish_task_update
from realtime.sources import TaskSnapshot

logger = logging.getLogger(__name__)


def _publish(snapshot: TaskSnapshot) -> None:
    try:
        publish_task_update(snapshot)
    except Exception:
        # The change is committed and the caller's request succeeded; a channel layer
        # that is down must not turn it into an error. Clients resynchronise from the
        # state and seq that their next subscribe returns.
        logger.exception("Could not publish task %s seq %s", snapshot.task_id, snapshot.seq)


def _publish_deleted(task_id: uuid.UUID, owner_id: int) -> None:
    try:
        publish_task_deleted(task_id, owner_id)
    except Exception:
        logger.exception("Could not publish the deletion of task %s", task_id)


@receiver(post_delete, sender=Task, dispatch_uid="tasks.publish_deletion_on_commit")
def publish_deletion_on_commit(
    sender: type[Task], instance: Task, using: str, **kwargs: Any
) -> None:
    """Tell the task's watchers once the deletion commits (also of tasks deleted with their
    owner, or in bulk: Django sends this for each)."""
    transaction.on_commit(partial(_publish_deleted, instance.pk, instance.owner_id), using=using)


@receiver(post_save, sender=Task, dispatch_uid="tasks.publish_on_commit")
def publish_on_commit(sender: type[Task], instance: Task, using: str, **kwargs: Any) -> None:
    """Publish after the transaction commits: a rolled-back change publishes nothing.

    The snapshot is taken now, so each commit publishes the state it saved.
    """
    transaction.on_commit(partial(_publish, task_snapshot(instance)), using=using)
