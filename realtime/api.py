"""The real-time layer's public entry points for the rest of the project.

Every producer of task changes (signal receivers, views, admin, commands, other
processes) publishes through ``publish_task_update()``, of deletions through
``publish_task_deleted()``, and of a message to one user's connections through
``send_personal_message()``; nothing else sends them.
"""

import concurrent.futures
import contextlib
import functools
import logging
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from typing import Any

from django.db import transaction
from redis.exceptions import RedisError

from realtime.conf import realtime_settings
from realtime.connections import Recipients, get_connection_manager
from realtime.failures import failure_text
from realtime.sources import TaskSnapshot
from realtime.sync import Outlasted, run_sync

logger = logging.getLogger(__name__)

#: Where ``publish_after_commit()`` lists its failures for ``publish_failures()``, if asked.
_failures: ContextVar[list[str] | None] = ContextVar("publish_failures", default=None)


async def apublish_task_update(snapshot: TaskSnapshot) -> None:
    """Deliver a task change to every client watching the task, in every process.

    Clients get each ``seq`` of a task at most once and in increasing order; callers must
    publish only committed changes, each with the task's new ``seq``.
    """
    await get_connection_manager().send_task_update(snapshot)


def publish_task_update(snapshot: TaskSnapshot) -> None:
    """Synchronous form of ``apublish_task_update()`` (``_publish_sync()``)."""
    _publish_sync(apublish_task_update(snapshot), f"task {snapshot.task_id}")


async def apublish_task_deleted(task_id: uuid.UUID, owner_id: int) -> None:
    """Tell every client watching a task, in every process, that it was deleted; their
    subscriptions to it end. Callers must publish only committed deletions."""
    await get_connection_manager().send_task_deleted(task_id, owner_id)


def publish_task_deleted(task_id: uuid.UUID, owner_id: int) -> None:
    """Synchronous form of ``apublish_task_deleted()`` (``_publish_sync()``)."""
    _publish_sync(apublish_task_deleted(task_id, owner_id), f"the deletion of task {task_id}")


async def apublish_access_change(user_id: int) -> None:
    """Have every live connection of a user, in every process, check its credentials again
    at once: the user was deactivated, deleted, made staff or no longer staff, or changed
    password (``realtime.signals`` publishes these)."""
    await get_connection_manager().send_access_changed(user_id)


def publish_access_change(user_id: int) -> None:
    """Synchronous form of ``apublish_access_change()`` (``_publish_sync()``)."""
    _publish_sync(apublish_access_change(user_id), f"an access change of user {user_id}")


def _publish_sync(publish: Coroutine[Any, Any, None], what: str) -> None:
    """Run an asynchronous publish from synchronous code (``run_sync()``); ``what`` names
    the change in the log if it fails or outlasts the wait.

    In a server, a request thread waits for it at most ``REALTIME_PUBLISH_WAIT_SECONDS``;
    past that it goes on without the request, and a failure of it is logged: a Redis that
    accepted connections but did not answer held each request for 5 s, the REST API with
    them."""
    try:
        run_sync(publish, wait=realtime_settings.PUBLISH_WAIT_SECONDS)
    except Outlasted as exc:
        logger.warning(
            "Publishing %s takes over %s s; it goes on without the request",
            what,
            realtime_settings.PUBLISH_WAIT_SECONDS,
        )
        exc.future.add_done_callback(functools.partial(_log_failure, what=what))


def publish_after_commit(using: str, what: str, publish: Callable[..., None], *args: Any) -> None:
    """Run ``publish(*args)`` once the transaction on ``using`` commits: a rolled-back change
    publishes nothing. A failure is logged, naming ``what`` changed (or listed for
    ``publish_failures()``), and not raised: the change is committed and its caller
    succeeded, which a channel layer that is down must not turn into an error."""

    def run() -> None:
        try:
            publish(*args)
        except Exception as exc:
            failures = _failures.get()
            if failures is None:
                _log_publish_failure(f"{what} ({publish.__name__})", exc)
            else:
                failures.append(f"{what}: {failure_text(exc)}")

    transaction.on_commit(run, using=using)


@contextlib.contextmanager
def publish_failures() -> Iterator[list[str]]:
    """Within the block, each publish after a commit that fails is listed (what changed,
    and why, on one line) instead of logged: the caller, such as a management command,
    tells its user that the change was saved but reached no subscriber."""
    failures: list[str] = []
    token = _failures.set(failures)
    try:
        yield failures
    finally:
        _failures.reset(token)


def _log_failure(future: "concurrent.futures.Future[None]", what: str) -> None:
    if future.cancelled():
        logger.error("Could not publish %s: cancelled", what)
    elif (exc := future.exception()) is not None:
        _log_publish_failure(what, exc)


def _log_publish_failure(what: str, exc: BaseException) -> None:
    """One line for Redis away (every change fails then), a traceback for anything else."""
    if isinstance(exc, RedisError | OSError):
        logger.error("Could not publish %s: %s", what, failure_text(exc))
    else:
        logger.error("Could not publish %s", what, exc_info=exc)


async def asend_broadcast(payload: dict[str, Any]) -> Recipients:
    """Deliver a broadcast's payload, as it is, to every live connection; returns how many
    were reached. This is the delivery step of ``realtime.broadcasts.send()``, the entry
    point that validates and records a broadcast: use that."""
    return await get_connection_manager().broadcast(_object(payload, "A broadcast"))


def send_broadcast(payload: dict[str, Any]) -> Recipients:
    """Synchronous form of ``asend_broadcast()`` (``run_sync()``)."""
    return run_sync(asend_broadcast(payload))


async def asend_personal_message(user_id: int, payload: dict[str, Any]) -> None:
    """Send ``payload`` to every live connection of one user, in every process: a
    WebSocket gets ``{"type": "message", "payload": …}``, an event stream a ``message``
    event. A user with none gets nothing; nothing is kept for later."""
    payload = _object(payload, "A personal message")
    await get_connection_manager().send_personal_message(user_id, payload)


def send_personal_message(user_id: int, payload: dict[str, Any]) -> None:
    """Synchronous form of ``asend_personal_message()``, waiting for it as a publish is
    waited for (``_publish_sync()``): a request is not held for as long as Redis stalls."""
    _publish_sync(asend_personal_message(user_id, payload), f"a message to user {user_id}")


def _object(payload: Any, what: str) -> dict[str, Any]:
    """``payload``, which clients receive as a JSON object; ``TypeError`` if it is none."""
    if not isinstance(payload, dict):
        raise TypeError(f"{what}'s payload is a dict, not {type(payload).__name__}.")
    return payload
