"""The tasks app's side of the real-time interface: what a task looks like live."""

import uuid
from collections.abc import Sequence

from django.contrib.auth.base_user import AbstractBaseUser

from mcp_platform.tasks.models import Task
from mcp_platform.tasks.selectors import can_see
from mcp_platform.tasks.serializers import TaskSerializer
from realtime import sources

#: Every snapshot is taken by this one serializer: a new one copies and binds its fields
#: (most of the cost of serializing a task), and ``to_representation()`` keeps no state
#: between calls.
_snapshots = TaskSerializer()


def task_snapshot(task: Task) -> sources.TaskSnapshot:
    return sources.TaskSnapshot(
        task_id=task.pk,
        owner_id=task.owner_id,
        seq=task.seq,
        state=_snapshots.to_representation(task),
    )


class TaskSource(sources.TaskSource):
    def get_visible(
        self, user: AbstractBaseUser, task_id: uuid.UUID
    ) -> sources.TaskSnapshot | None:
        return self.get_visible_many([(user, task_id)])[0]

    def get_visible_many(
        self, requests: Sequence[tuple[AbstractBaseUser, uuid.UUID]]
    ) -> list[sources.TaskSnapshot | None]:
        """One query for every task asked for, and one snapshot per task: a thousand
        clients subscribing to one task cost one read and one serialization."""
        tasks = Task.objects.in_bulk({task_id for _, task_id in requests})
        snapshots = {task_id: task_snapshot(task) for task_id, task in tasks.items()}
        return [
            snapshots[task_id] if task_id in tasks and can_see(user, tasks[task_id]) else None
            for user, task_id in requests
        ]
