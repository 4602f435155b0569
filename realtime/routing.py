from django.urls import re_path

from realtime.consumers import TaskConsumer

websocket_urlpatterns = [
    re_path(r"^ws/?$", TaskConsumer.as_asgi()),
]
