"""The real-time layer's public entry points for the rest of the project.

Every producer of task changes (signal receivers, views, admin, commands, other
processes) publishes through ``publish_task_update()``, and of deletions through
``publish_task_deleted()``; nothing else sends them.
"""

import asyncio
import functools
import logging
import threading
import uuid
from collections.abc import Coroutine
from typing import Any

from asgiref.sync import async_to_sync

from realtime.conf import realtime_settings
from realtime.connections import Recipients, get_connection_manager
from realtime.sources import TaskSnapshot

logger = logging.getLogger(__name__)


async def apublish_task_update(snapshot: TaskSnapshot) -> None:
    """Deliver a task change to every client watching the task, in every process.

    Clients get each ``seq`` of a task at most once and in increasing order; callers must
    publish only committed changes, each with the task's new ``seq``.
    """
    await get_connection_manager().send_task_update(snapshot)


def publish_task_update(snapshot: TaskSnapshot) -> None:
    """Synchronous form of ``apublish_task_update()``, which waits for the publish at most
    ``REALTIME_PUBLISH_WAIT_SECONDS`` in a server (``within_the_wait()``)."""
    async_to_sync(within_the_wait)(apublish_task_update(snapshot), f"task {snapshot.task_id}")


async def apublish_task_deleted(task_id: uuid.UUID, owner_id: int) -> None:
    """Tell every client watching a task, in every process, that it was deleted; their
    subscriptions to it end. Callers must publish only committed deletions."""
    await get_connection_manager().send_task_deleted(task_id, owner_id)


def publish_task_deleted(task_id: uuid.UUID, owner_id: int) -> None:
    """Synchronous form of ``apublish_task_deleted()``, which waits for the publish at most
    ``REALTIME_PUBLISH_WAIT_SECONDS`` in a server (``within_the_wait()``)."""
    coroutine = apublish_task_deleted(task_id, owner_id)
    async_to_sync(within_the_wait)(coroutine, f"the deletion of task {task_id}")


async def within_the_wait(publish: Coroutine[Any, Any, None], what: str) -> None:
    """Await ``publish``, in a server at most ``REALTIME_PUBLISH_WAIT_SECONDS``: past that
    it goes on without its caller, and a failure of it is logged. The caller is a request
    thread, waiting with its client and every request queued for the thread: a Redis
    that accepted connections but did not answer held each for 5 s, and the REST API with
    them. In a server, the event loop runs in the main thread and outlives the caller; any
    other loop, such as the one a management command's call runs in, ends with the call,
    and the publish is awaited to its end there."""
    if threading.current_thread() is not threading.main_thread():
        await publish
        return
    task = asyncio.ensure_future(publish)
    await asyncio.wait([task], timeout=realtime_settings.PUBLISH_WAIT_SECONDS)
    if task.done():
        task.result()
        return
    logger.warning(
        "Publishing %s takes over %s s; it goes on without the request",
        what,
        realtime_settings.PUBLISH_WAIT_SECONDS,
    )
    task.add_done_callback(functools.partial(_log_failure, what=what))


def _log_failure(task: "asyncio.Task[None]", what: str) -> None:
    if task.cancelled():
        logger.error("Could not publish %s: cancelled", what)
    elif task.exception() is not None:
        logger.error("Could not publish %s", what, exc_info=task.exception())


async def asend_broadcast(payload: dict) -> Recipients:
    """Send a broadcast to every live connection; returns how many were reached."""
    return await get_connection_manager().broadcast(payload)


def send_broadcast(payload: dict) -> Recipients:
    """Synchronous form of ``asend_broadcast()``."""
    return async_to_sync(asend_broadcast)(payload)
