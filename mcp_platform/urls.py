from django.contrib import admin
from django.urls import include, path, re_path
from django_prometheus.exports import ExportToDjangoView
from rest_framework_simplejwt.views import TokenRefreshView

from mcp_platform.sign_in import TokenObtainPairView

urlpatterns = [
    path("admin/", admin.site.urls),
    # The API's paths take or leave the last slash (see tasks/urls.py).
    re_path(r"^api/token/?$", TokenObtainPairView.as_view(), name="token_obtain_pair"),
    re_path(r"^api/token/refresh/?$", TokenRefreshView.as_view(), name="token_refresh"),
    path("api/", include("mcp_platform.tasks.urls")),
    path("", include("realtime.urls")),
    # django-prometheus's view, at /metrics with or without its last slash like the API.
    re_path(r"^metrics/?$", ExportToDjangoView, name="prometheus-django-metrics"),
]

handler400 = "mcp_platform.api.bad_request"
handler403 = "mcp_platform.api.permission_denied"
handler404 = "mcp_platform.api.not_found"
handler500 = "mcp_platform.api.server_error"
