"""The one interface through which the real-time layer reaches the project's tasks.

A project names its subclass of ``TaskSource`` in ``REALTIME["TASK_SOURCE"]`` and calls
``realtime.api.publish_task_update()`` whenever a task changes.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from django.contrib.auth.base_user import AbstractBaseUser
from django.utils.module_loading import import_string

from realtime.conf import realtime_settings


@dataclass(frozen=True, slots=True)
class TaskSnapshot:
    """A task's state as of one change; ``seq`` grows by one with every change."""

    task_id: uuid.UUID
    owner_id: int
    seq: int
    #: The task's REST representation, made of JSON values only.
    state: dict[str, Any]


class TaskSource:
    """Answers the real-time layer's questions about tasks. Methods run in a sync thread."""

    def get_visible(self, user: AbstractBaseUser, task_id: uuid.UUID) -> TaskSnapshot | None:
        """The task's current snapshot if ``user`` may view it; ``None`` if it does not
        exist or is not the user's to see (callers must not tell the two apart)."""
        raise NotImplementedError("subclasses of TaskSource must provide get_visible()")

    def get_visible_many(
        self, requests: Sequence[tuple[AbstractBaseUser, uuid.UUID]]
    ) -> list[TaskSnapshot | None]:
        """``get_visible()`` of each ``(user, task_id)``, in order.

        Subscriptions made at nearly the same moment arrive here together
        (``realtime.batching``); override it to answer them with one query. A source that
        reads the users again sets each given user's ``is_staff`` to what it read: the
        connection's updates are then filtered by it (``Connection.may_see()``).
        """
        return [self.get_visible(user, task_id) for user, task_id in requests]


@cache
def _load(path: str) -> TaskSource:
    return import_string(path)()


def get_task_source() -> TaskSource:
    return _load(realtime_settings.TASK_SOURCE)
