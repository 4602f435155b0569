"""The real-time layer's public entry points for the rest of the project.

Every producer of task changes (signal receivers, views, admin, commands, other
processes) publishes through ``publish_task_update()``, of deletions through
``publish_task_deleted()``, and of a message to one user's connections through
``send_personal_message()``; nothing else sends them.
"""

import asyncio
import concurrent.futures
import contextlib
import functools
import inspect
import logging
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextvars import ContextVar
from typing import Any, TypeVar

from asgiref.sync import async_to_sync
from django.db import transaction
from redis.exceptions import RedisError

from realtime.conf import realtime_settings
from realtime.connections import Recipients, get_connection_manager
from realtime.failures import failure_text
from realtime.sources import TaskSnapshot

logger = logging.getLogger(__name__)

#: The event loop that serves this process's requests, if it is a server's (``set_server_loop()``).
_server_loop: asyncio.AbstractEventLoop | None = None

#: Seconds between a waiting request thread's checks that the server's loop still runs.
LOOP_CHECK_SECONDS = 0.2

T = TypeVar("T")

#: Where ``publish_after_commit()`` lists its failures for ``publish_failures()``, if asked.
_failures: ContextVar[list[str] | None] = ContextVar("publish_failures", default=None)


def set_server_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """Say which event loop serves this process's requests, for as long as the process
    lives (``python -m mcp_platform.serve`` does): a publish made for a request then waits
    at most ``REALTIME_PUBLISH_WAIT_SECONDS`` (``_publish_sync()``)."""
    global _server_loop
    _server_loop = loop


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


class Outlasted(Exception):
    """A call ``run_sync()`` made on the server's loop outlasted its wait; it goes on."""

    def __init__(self, future: "concurrent.futures.Future[Any]") -> None:
        super().__init__("the call outlasted its wait")
        self.future = future


class ServerStopping(ConnectionError):
    """The server's loop stopped before a call ``run_sync()`` made on it had ended."""


def run_sync(coroutine: Coroutine[Any, Any, T], *, wait: float | None = None) -> T:
    """Run ``coroutine`` from synchronous code and return its result.

    In a server (``set_server_loop()``) the caller is a request thread: the coroutine runs
    on the server's loop, and the thread waits for it at most ``wait`` seconds if given
    (``Outlasted`` past that, the coroutine going on), and never for a loop that has
    stopped (``ServerStopping``). Once SIGTERM had stopped the loop, a request's call on
    it (the publish of a change that committed meanwhile, a broadcast) waited for ever,
    its thread with it, and the process for its thread. Elsewhere (a management command,
    a script's ``asyncio.run()``) it runs with ``async_to_sync``, to its end, since the
    loop it runs on may end with the call."""
    if _running_loop() is not None:
        coroutine.close()
        raise RuntimeError("run_sync() waits for its call: it cannot run on an event loop.")
    loop = _server_loop
    if loop is None:
        return async_to_sync(_awaited)(coroutine)
    try:
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    except RuntimeError:  # the loop is closed
        coroutine.close()
        raise ServerStopping("The server has stopped.") from None
    deadline = None if wait is None else time.monotonic() + wait
    while True:
        left = LOOP_CHECK_SECONDS if deadline is None else deadline - time.monotonic()
        try:
            return future.result(timeout=max(0.0, min(left, LOOP_CHECK_SECONDS)))
        except concurrent.futures.TimeoutError:
            if future.done():  # it ended meanwhile, or raised a TimeoutError of its own
                return future.result()
        if not loop.is_running():
            future.cancel()
            if inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
                coroutine.close()  # never to run; one that started is left as it stopped
            raise ServerStopping("The server is stopping.")
        if deadline is not None and time.monotonic() >= deadline:
            raise Outlasted(future)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _awaited(coroutine: Coroutine[Any, Any, T]) -> T:
    return await coroutine


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
    if not isinstance(payload, dict):
        raise TypeError(f"A broadcast's payload is a dict, not {type(payload).__name__}.")
    return await get_connection_manager().broadcast(payload)


def send_broadcast(payload: dict[str, Any]) -> Recipients:
    """Synchronous form of ``asend_broadcast()`` (``run_sync()``)."""
    return run_sync(asend_broadcast(payload))


async def asend_personal_message(user_id: int, payload: dict[str, Any]) -> None:
    """Send ``payload`` to every live connection of one user, in every process: a
    WebSocket gets ``{"type": "message", "payload": …}``, an event stream a ``message``
    event. A user with none gets nothing; nothing is kept for later."""
    if not isinstance(payload, dict):
        raise TypeError(f"A personal message's payload is a dict, not {type(payload).__name__}.")
    await get_connection_manager().send_personal_message(user_id, payload)


def send_personal_message(user_id: int, payload: dict[str, Any]) -> None:
    """Synchronous form of ``asend_personal_message()`` (``run_sync()``)."""
    run_sync(asend_personal_message(user_id, payload))
