from django.urls import re_path

from realtime.auth import http_auth_stack
from realtime.consumers import TaskConsumer
from realtime.sse import EventStreamConsumer

websocket_urlpatterns = [
    re_path(r"^ws/?$", TaskConsumer.as_asgi()),
]

#: HTTP endpoints served by consumers rather than Django views; everything else is Django's.
http_urlpatterns = [
    re_path(r"^events/?$", http_auth_stack(EventStreamConsumer.as_asgi())),
]
