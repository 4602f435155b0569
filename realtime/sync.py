"""Running the real-time layer's async calls from synchronous code: a request's thread,
a management command, a script.

In a server the calls run on the loop that serves the process (``set_server_loop()``),
where its connections live; elsewhere on a loop of their own (``async_to_sync``).
"""

import asyncio
import concurrent.futures
import inspect
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from asgiref.sync import async_to_sync

T = TypeVar("T")

#: The event loop that serves this process's requests, if it is a server's (``set_server_loop()``).
_server_loop: asyncio.AbstractEventLoop | None = None

#: Seconds between a waiting request thread's checks that the server's loop still runs.
LOOP_CHECK_SECONDS = 0.2


def set_server_loop(loop: asyncio.AbstractEventLoop | None) -> None:
    """Say which event loop serves this process's requests, for as long as the process
    lives (``python -m mcp_platform.serve`` does): a publish made for a request then waits
    at most ``REALTIME_PUBLISH_WAIT_SECONDS`` (``realtime.api``)."""
    global _server_loop
    _server_loop = loop


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
