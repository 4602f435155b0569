from django.urls import URLPattern, re_path

from realtime.views import BroadcastView

urlpatterns: list[URLPattern] = [
    re_path(r"^broadcast/?$", BroadcastView.as_view(), name="broadcast"),
]
