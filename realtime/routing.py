from channels.security.websocket import WebsocketDenier
from django.urls import re_path

from realtime.auth import http_auth_stack, websocket_auth_stack
from realtime.consumers import TaskConsumer
from realtime.sse import EventStreamConsumer

websocket_urlpatterns = [
    re_path(r"^ws/?$", websocket_auth_stack(TaskConsumer.as_asgi())),
    # A handshake on any other path is refused (403, as Daphne refuses), before any
    # authentication: Channels' router raised instead, a 500 with a logged traceback.
    re_path(r"", WebsocketDenier.as_asgi()),
]

#: HTTP endpoints served by consumers rather than Django views; everything else is Django's.
http_urlpatterns = [
    re_path(r"^events/?$", http_auth_stack(EventStreamConsumer.as_asgi())),
]
