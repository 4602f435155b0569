"""Django's ASGI handler, with each request's middleware and view run in one sync call.

Our middleware (Django's own, django-prometheus) and views (DRF) are synchronous. Django's
``ASGIHandler`` runs its middleware chain in async mode, so every ``MiddlewareMixin``
hops to a thread and back for each of its ``process_*`` methods: ~20 thread hops per
request, which made a 404 cost 8.7 ms against 0.7 ms under WSGI, and capped task updates
through the REST API at ~30/s (docs/performance.md). Here the chain is built in sync mode
and entered once per request, as under WSGI. The project's streaming endpoints (``/ws``,
``/events``) are Channels consumers and do not come here.
"""

from typing import Any

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler
from django.http import HttpRequest, HttpResponseBase


class SyncChainASGIHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        super().load_middleware(is_async=False)

    async def get_response_async(self, request: HttpRequest) -> HttpResponseBase:
        return await sync_to_async(self.get_response, thread_sensitive=True)(request)


def get_asgi_application() -> Any:
    """``django.core.asgi.get_asgi_application()``, with the handler above."""
    import django

    django.setup(set_prefix=False)
    return SyncChainASGIHandler()
