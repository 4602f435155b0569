"""The real-time layer's public entry points for the rest of the project.

Every producer of task changes (signal receivers, views, admin, commands, other
processes) publishes through ``publish_task_update()``, and of deletions through
``publish_task_deleted()``; nothing else sends them.
"""

import uuid

from asgiref.sync import async_to_sync

from realtime.connections import Recipients, get_connection_manager
from realtime.sources import TaskSnapshot


async def apublish_task_update(snapshot: TaskSnapshot) -> None:
    """Deliver a task change to every client watching the task, in every process.

    Clients get each ``seq`` of a task at most once and in increasing order; callers must
    publish only committed changes, each with the task's new ``seq``.
    """
    await get_connection_manager().send_task_update(snapshot)


def publish_task_update(snapshot: TaskSnapshot) -> None:
    """Synchronous form of ``apublish_task_update()``."""
    async_to_sync(apublish_task_update)(snapshot)


async def apublish_task_deleted(task_id: uuid.UUID, owner_id: int) -> None:
    """Tell every client watching a task, in every process, that it was deleted; their
    subscriptions to it end. Callers must publish only committed deletions."""
    await get_connection_manager().send_task_deleted(task_id, owner_id)


def publish_task_deleted(task_id: uuid.UUID, owner_id: int) -> None:
    """Synchronous form of ``apublish_task_deleted()``."""
    async_to_sync(apublish_task_deleted)(task_id, owner_id)


async def asend_broadcast(payload: dict) -> Recipients:
    """Send a broadcast to every live connection; returns how many were reached."""
    return await get_connection_manager().broadcast(payload)


def send_broadcast(payload: dict) -> Recipients:
    """Synchronous form of ``asend_broadcast()``."""
    return async_to_sync(asend_broadcast)(payload)
