"""The ASGI handler runs each request's middleware chain and view in one sync call."""

import threading
from inspect import iscoroutinefunction

import pytest
from asgiref.sync import async_to_sync
from channels.testing import HttpCommunicator
from django.http import HttpResponse, JsonResponse
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


urlpatterns = [path("sync", sync_view), path("async", async_view)]

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
