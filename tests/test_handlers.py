"""The ASGI handler serves each request in one sync call on a bounded pool of threads."""

import asyncio
import threading
import time
from inspect import iscoroutinefunction

import pytest
from asgiref.sync import async_to_sync
from channels.testing import HttpCommunicator
from django.core import signals
from django.db import connection, connections
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.test import override_settings
from django.urls import path

from mcp_platform.handlers import SyncChainASGIHandler

seen_threads: list[int] = []


class RecordThread:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        seen_threads.append(threading.get_ident())
        return self.get_response(request)


def sync_view(request):
    seen_threads.append(threading.get_ident())
    return HttpResponse("sync")


async def async_view(request):
    seen_threads.append(threading.get_ident())
    return JsonResponse({"view": "async"})


def slow_view(request):
    seen_threads.append(threading.get_ident())
    time.sleep(0.05)
    return HttpResponse("slow")


def stream_view(request):
    seen_threads.append(threading.get_ident())

    async def content():
        for part in (b"one", b"two"):
            seen_threads.append(threading.get_ident())
            yield part

    return StreamingHttpResponse(content())


def connection_view(request):
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return HttpResponse(str(id(connection.connection)))


urlpatterns = [
    path("sync", sync_view),
    path("async", async_view),
    path("slow", slow_view),
    path("stream", stream_view),
    path("connection", connection_view),
]

MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "tests.test_handlers.RecordThread",
    "django.middleware.common.CommonMiddleware",
]


@pytest.fixture
def app():
    seen_threads.clear()
    with override_settings(
        ROOT_URLCONF="tests.test_handlers", MIDDLEWARE=MIDDLEWARE, ALLOWED_HOSTS=["unknown"]
    ):
        yield SyncChainASGIHandler()


def get(app, url: str) -> dict:
    return async_to_sync(HttpCommunicator(app, "GET", url).get_response)(timeout=5)


def loop_thread(app, url: str) -> tuple[dict, int]:
    """The response, and the thread that ran the event loop."""

    async def request():
        return (
            await HttpCommunicator(app, "GET", url).get_response(timeout=5),
            threading.get_ident(),
        )

    return async_to_sync(request)()


def test_middleware_and_a_sync_view_run_in_one_thread_off_the_event_loop(app):
    response, loop = loop_thread(app, "/sync")
    assert (response["status"], response["body"]) == (200, b"sync")
    middleware_thread, view_thread = seen_threads
    assert middleware_thread == view_thread != loop
    # Built in sync mode: entered once, not once per middleware (Django's ASGIHandler
    # builds an async chain that hops to a thread for each MiddlewareMixin).
    assert not iscoroutinefunction(app._middleware_chain)


def test_an_async_view_still_runs_on_the_event_loop(app):
    response, loop = loop_thread(app, "/async")
    assert (response["status"], response["body"]) == (200, b'{"view": "async"}')
    middleware_thread, view_thread = seen_threads
    assert view_thread == loop != middleware_thread


def test_the_project_serves_http_with_it():
    from mcp_platform.asgi import application

    # Everything but the consumers' paths (/events) falls through to the last route.
    django_app = application.application_mapping["http"].routes[-1].callback
    assert isinstance(getattr(django_app, "application", django_app), SyncChainASGIHandler)


def record_signal_thread(**kwargs):
    seen_threads.append(threading.get_ident())


@pytest.fixture
def signal_threads():
    signals.request_started.connect(record_signal_thread)
    signals.request_finished.connect(record_signal_thread)
    yield
    signals.request_started.disconnect(record_signal_thread)
    signals.request_finished.disconnect(record_signal_thread)


def test_a_request_starts_and_finishes_in_the_thread_that_serves_it(app, signal_threads):
    response, loop = loop_thread(app, "/sync")
    assert response["status"] == 200
    # request_started, the middleware, the view, request_finished: Django closes a
    # thread's stale database connections on both signals, so they must run there.
    started, middleware, view, finished = seen_threads
    assert started == middleware == view == finished != loop


def test_a_streaming_response_finishes_its_request_after_its_content_is_sent(app, signal_threads):
    sent = []

    async def request():
        scope = {"type": "http", "method": "GET", "path": "/stream", "headers": []}
        scope |= {"query_string": b"", "server": ("unknown", 80)}
        body = asyncio.Queue()
        body.put_nowait({"type": "http.request"})

        async def send(message):
            sent.append(message)

        await app(scope, body.get, send)
        return threading.get_ident()

    loop = async_to_sync(request)()
    assert sent[0]["status"] == 200
    assert b"".join(message.get("body", b"") for message in sent[1:]) == b"onetwo"
    started, middleware, view, first_part, second_part, finished = seen_threads
    assert started == middleware == view == finished != loop
    assert first_part == second_part == loop  # sent before the request finished


def test_requests_share_a_bounded_set_of_long_lived_threads(settings):
    settings.REQUEST_THREADS = 2
    with override_settings(ROOT_URLCONF="tests.test_handlers", MIDDLEWARE=[]):
        app = SyncChainASGIHandler()

        async def many():
            return await asyncio.gather(
                *(HttpCommunicator(app, "GET", "/slow").get_response(timeout=5) for _ in range(6))
            )

        seen_threads.clear()
        responses = async_to_sync(many)()
        app.threads.shutdown()
    assert [response["status"] for response in responses] == [200] * 6
    assert len(seen_threads) == 6
    assert len(set(seen_threads)) == 2  # not a new thread per request


@pytest.mark.django_db(transaction=True)
def test_a_request_thread_keeps_its_database_connection(settings):
    settings.REQUEST_THREADS = 1
    settings.DATABASES["default"]["CONN_MAX_AGE"] = 60
    with override_settings(ROOT_URLCONF="tests.test_handlers", MIDDLEWARE=[]):
        app = SyncChainASGIHandler()
        try:
            first, second = get(app, "/connection"), get(app, "/connection")
        finally:
            app.threads.submit(connections.close_all).result()
            app.threads.shutdown()
    assert first["status"] == second["status"] == 200
    assert first["body"] == second["body"]  # the same open connection, reused
