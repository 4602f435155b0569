"""Django's ASGI handler, with each request served in one call on a bounded pool of threads.

Our middleware (Django's own, django-prometheus) and views (DRF) are synchronous. Django's
``ASGIHandler`` runs its middleware chain in async mode, so every ``MiddlewareMixin``
hops to a thread and back for each of its ``process_*`` methods: ~20 thread hops per
request, which made a 404 cost 8.7 ms against 0.7 ms under WSGI. It also gives every
request a thread of its own (one ``ThreadSensitiveContext`` each), so every request starts
a thread and opens a database connection, and ``CONN_MAX_AGE`` cannot keep one.

Here the chain is built in sync mode, and a request's start signal, middleware, view and
end signal run in one call on one of ``REQUEST_THREADS`` long-lived threads, as under a
threaded WSGI server. Each thread keeps its own database connection, and Django's
per-request housekeeping (``close_old_connections()`` on ``request_started`` and
``request_finished``) runs in that thread, so ``CONN_MAX_AGE`` and ``CONN_HEALTH_CHECKS``
work as Django documents them. docs/performance.md has the measurements. The project's
streaming endpoints (``/ws``, ``/events``) are Channels consumers and do not come here.
"""

import asyncio
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any, TypeVar

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core import signals
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.http import FileResponse, HttpResponseBase
from django.urls import set_script_prefix

T = TypeVar("T")


class SyncChainASGIHandler(ASGIHandler):
    def __init__(self) -> None:
        super().__init__()
        self.threads = ThreadPoolExecutor(
            max_workers=settings.REQUEST_THREADS, thread_name_prefix="request"
        )

    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            scope = with_content_length(scope, body_file)
            response = await through_one_cancel(self.in_pool(self.respond)(scope, body_file))
            try:
                await self.send_response(response, send)
            finally:
                if response.streaming:
                    # Its content was read just now, so the request ends only now.
                    await self.in_pool(response.close)()
        finally:
            body_file.close()

    def in_pool(self, function: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        return sync_to_async(function, thread_sensitive=False, executor=self.threads)

    def respond(self, scope: dict[str, Any], body_file: Any) -> HttpResponseBase:
        """The whole synchronous life of a request, in one of the pool's threads."""
        set_script_prefix(get_script_prefix(scope))
        signals.request_started.send(sender=self.__class__, scope=scope)
        request, response = self.create_request(scope, body_file)
        if request is not None:
            response = self.get_response(request)
            response._handler_class = self.__class__
            if isinstance(response, FileResponse):
                response.block_size = self.chunk_size  # the server chunks it
        if not response.streaming:
            # Its content is all in memory: the request is over once it is read.
            response.close()
        return response


async def through_one_cancel(awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, awaited through a first cancellation, not a second.

    A server that stops cancels every application once, and again only when its wait
    for them runs out (``realtime.server.NowaitServer.kill_all_applications()``). A
    request's thread goes on regardless of the first: its answer is still sent, rather
    than its client dropped with the change it makes unknown."""
    future = asyncio.ensure_future(awaitable)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        return await future


def with_content_length(scope: dict[str, Any], body_file: IO[bytes]) -> dict[str, Any]:
    """``scope``, saying how long the body read is if its request did not (a chunked one,
    ``Transfer-Encoding: chunked``). Django REST framework reads a body without a
    ``Content-Length`` as empty: a chunked login was "username required"."""
    size = body_file.seek(0, os.SEEK_END)
    body_file.seek(0)
    if not size or any(name.lower() == b"content-length" for name, _ in scope["headers"]):
        return scope
    return {**scope, "headers": [*scope["headers"], (b"content-length", str(size).encode())]}


def get_asgi_application() -> Any:
    """``django.core.asgi.get_asgi_application()``, with the handler above."""
    import django

    django.setup(set_prefix=False)
    return SyncChainASGIHandler()
