from django.urls import re_path

from realtime.views import BroadcastView

urlpatterns: list = [
    re_path(r"^broadcast/?$", BroadcastView.as_view(), name="broadcast"),
]
