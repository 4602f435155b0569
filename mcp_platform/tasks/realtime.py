"""The tasks app's side of the real-time interface: what a task looks like live."""

import copy
import uuid
from collections.abc import Sequence
from typing import Any

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

#: Where a task keeps the snapshot of its last save until ``take_saved_state()`` takes it.
_SAVED_SNAPSHOT = "_saved_snapshot"


def task_snapshot(task: Task) -> sources.TaskSnapshot:
    state = _snapshots.to_representation(task)
    # The representation holds the task's own ``result``, which the caller may change
    # before the snapshot is published (on commit): it keeps a copy.
    state["result"] = copy.deepcopy(state["result"])
    return sources.TaskSnapshot(task_id=task.pk, owner_id=task.owner_id, seq=task.seq, state=state)


def keep_saved_snapshot(task: Task, snapshot: sources.TaskSnapshot) -> None:
    """Keep on ``task`` the snapshot taken of the save it just made (``signals``)."""
    task.__dict__[_SAVED_SNAPSHOT] = snapshot


def take_saved_state(task: Task) -> dict[str, Any] | None:
    """The representation published for the save ``task`` last made, while the copy still
    holds that save's ``seq``; for the code that made the save, before it changes the copy
    again. Taken once: the copy no longer keeps it (nor its own copy of the result). A PATCH
    answers with it rather than serialize the task a second time (a twentieth of its CPU)."""
    snapshot = task.__dict__.pop(_SAVED_SNAPSHOT, None)
    return snapshot.state if snapshot is not None and snapshot.seq == task.seq else None


class TaskSource(sources.TaskSource):
    def get_visible(
        self, user: AbstractBaseUser, task_id: uuid.UUID
    ) -> sources.TaskSnapshot | None:
        return self.get_visible_many([(user, task_id)])[0]

    def get_visible_many(
        self, requests: Sequence[tuple[AbstractBaseUser, uuid.UUID]]
    ) -> list[sources.TaskSnapshot | None]:
        """Three queries for every task and user asked for, and one snapshot per task: a
        thousand clients subscribing to one task cost three reads and one serialization.

        The users are read again: a connection outlives the check made when it opened,
        and a user deactivated, deleted or no longer staff since then must not subscribe to
        what they may no longer see. The given users get the staff flag read, which the
        connection filters its updates by.

        Only the tasks that someone asking may see are read whole and serialized. Read
        whole first, another user's task answered ``not_found`` after a time that grew
        with its result (78 ms for 1.7 MB, against 3 ms for no task): it told that the task
        existed, and how large it was, and anyone could have the server serialize it."""
        users = get_user_model()._default_manager.in_bulk({user.pk for user, _ in requests})
        owners = dict(
            Task.objects.filter(pk__in={task_id for _, task_id in requests}).values_list(
                "pk", "owner_id"
            )
        )
        seen_as: list[AbstractBaseUser | None] = []
        for user, task_id in requests:
            now = users.get(user.pk)
            user.is_staff = now is not None and now.is_staff
            visible = (
                now is not None
                and now.is_active
                and task_id in owners
                and can_see(now, Task(pk=task_id, owner_id=owners[task_id]))
            )
            seen_as.append(now if visible else None)
        tasks = Task.objects.in_bulk(
            {task_id for (_, task_id), now in zip(requests, seen_as, strict=True) if now}
        )
        snapshots = {task_id: task_snapshot(task) for task_id, task in tasks.items()}
        return [
            # Checked again: the task may have changed hands between the two reads.
            snapshots[task_id]
            if now and task_id in tasks and can_see(now, tasks[task_id])
            else None
            for (_, task_id), now in zip(requests, seen_as, strict=True)
        ]
