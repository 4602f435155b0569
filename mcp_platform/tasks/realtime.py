"""The tasks app's side of the real-time interface: what a task looks like live."""

import copy
import uuid
from collections.abc import Sequence

from django.contrib.auth import get_user_model
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
    state = _snapshots.to_representation(task)
    # The representation holds the task's own ``result``, which the caller may change
    # before the snapshot is published (on commit): it keeps a copy.
    state["result"] = copy.deepcopy(state["result"])
    return sources.TaskSnapshot(task_id=task.pk, owner_id=task.owner_id, seq=task.seq, state=state)


class TaskSource(sources.TaskSource):
    def get_visible(
        self, user: AbstractBaseUser, task_id: uuid.UUID
    ) -> sources.TaskSnapshot | None:
        return self.get_visible_many([(user, task_id)])[0]

    def get_visible_many(
        self, requests: Sequence[tuple[AbstractBaseUser, uuid.UUID]]
    ) -> list[sources.TaskSnapshot | None]:
        """One query for every task asked for, one for their users, and one snapshot per
        task: a thousand clients subscribing to one task cost two reads and one
        serialization.

        The users are read again: a connection outlives the check made when it opened,
        and a user deactivated, deleted or no longer staff since then must not subscribe to
        what they may no longer see. The given users get the staff flag read, which the
        connection filters its updates by."""
        tasks = Task.objects.in_bulk({task_id for _, task_id in requests})
        users = get_user_model()._default_manager.in_bulk({user.pk for user, _ in requests})
        snapshots = {task_id: task_snapshot(task) for task_id, task in tasks.items()}
        answers = []
        for user, task_id in requests:
            now = users.get(user.pk)
            user.is_staff = now is not None and now.is_staff
            visible = now is not None and now.is_active and task_id in tasks
            answers.append(snapshots[task_id] if visible and can_see(now, tasks[task_id]) else None)
        return answers
