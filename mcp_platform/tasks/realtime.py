"""The tasks app's side of the real-time interface: what a task looks like live."""

import uuid

from django.contrib.auth.base_user import AbstractBaseUser

from mcp_platform.tasks.models import Task
from mcp_platform.tasks.selectors import visible_tasks
from mcp_platform.tasks.serializers import TaskSerializer
from realtime import sources


def task_snapshot(task: Task) -> sources.TaskSnapshot:
    return sources.TaskSnapshot(
        task_id=task.pk, owner_id=task.owner_id, seq=task.seq, state=dict(TaskSerializer(task).data)
    )


class TaskSource(sources.TaskSource):
    def get_visible(
        self, user: AbstractBaseUser, task_id: uuid.UUID
    ) -> sources.TaskSnapshot | None:
        task = visible_tasks(user).filter(pk=task_id).first()
        return None if task is None else task_snapshot(task)
