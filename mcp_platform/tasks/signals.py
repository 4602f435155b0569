"""Publishes every committed task change and deletion, whichever code path made it."""

from typing import Any

from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver

from mcp_platform.tasks.models import Task
from mcp_platform.tasks.realtime import keep_saved_snapshot, task_snapshot
from realtime.api import publish_after_commit, publish_task_deleted, publish_task_update


@receiver(post_save, sender=Task, dispatch_uid="tasks.publish_on_commit")
def publish_on_commit(sender: type[Task], instance: Task, using: str, **kwargs: Any) -> None:
    """Publish once committed. The snapshot is taken now, so each commit publishes the
    state it saved. If the publish fails, clients resynchronise from the state and seq
    that their next subscribe returns.

    A copy that saved an expression (``F("progress") + 1``) still holds it, not the value
    stored: the row is read back and that is published. (The snapshot of the expression
    raised, rolling the save back, or held it, and the publish failed.) A row deleted
    before it is read back (a create is not held under a lock) has nothing to publish:
    its deletion is published by the deleter."""
    if any(
        hasattr(instance.__dict__.get(field.attname), "resolve_expression")
        for field in sender._meta.concrete_fields
    ):
        instance = sender._base_manager.using(using).filter(pk=instance.pk).first()
        if instance is None:
            return
    snapshot = task_snapshot(instance)
    keep_saved_snapshot(instance, snapshot)
    publish_after_commit(using, f"task {instance.pk}", publish_task_update, snapshot)


@receiver(post_delete, sender=Task, dispatch_uid="tasks.publish_deletion_on_commit")
def publish_deletion_on_commit(
    sender: type[Task], instance: Task, using: str, **kwargs: Any
) -> None:
    """Tell the task's watchers once the deletion commits (also of tasks deleted with their
    owner, or in bulk: Django sends this for each)."""
    publish_after_commit(
        using, f"task {instance.pk}", publish_task_deleted, instance.pk, instance.owner_id
    )
