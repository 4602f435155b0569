"""The admin: send broadcasts and read their history, and see who is connected."""

from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from redis.exceptions import RedisError

from realtime import broadcasts, sync
from realtime.conf import realtime_settings
from realtime.connections import get_connection_manager
from realtime.failures import failure_text
from realtime.models import Broadcast, LiveConnections
from realtime.registry import Overview


class BroadcastForm(forms.Form):
    message = forms.CharField(widget=forms.Textarea(attrs={"rows": 4, "cols": 60}), strip=False)
    type = forms.CharField(initial=broadcasts.DEFAULT_TYPE)
    data = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 4, "cols": 60}),
        required=False,
        help_text="Optional: a JSON object of further fields for the payload.",
    )

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if not self.errors:
            try:
                cleaned["payload"] = broadcasts.validate_payload(
                    broadcasts.compose(
                        message=cleaned["message"], type=cleaned["type"], data=cleaned["data"]
                    )
                )
            except ValidationError as exc:
                self.add_error(None, exc)
        return cleaned


@admin.register(Broadcast)
class BroadcastAdmin(admin.ModelAdmin):
    """History is read-only; "add" is the send form, and sending is what creates a record."""

    list_display = [
        "created_at",
        "message",
        "payload_type",
        "recipients",
        "websocket",
        "sse",
        "sent_by",
    ]
    list_select_related = ["sent_by"]
    date_hierarchy = "created_at"

    @admin.display(description="message")
    def message(self, obj: Broadcast) -> str:
        return str(obj)

    @admin.display(description="type")
    def payload_type(self, obj: Broadcast) -> str:
        return obj.payload.get("type", "")

    def has_module_permission(self, request: HttpRequest) -> bool:
        return broadcasts.can_send(request.user) or super().has_module_permission(request)

    def has_view_permission(self, request: HttpRequest, obj: Broadcast | None = None) -> bool:
        return broadcasts.can_send(request.user) or super().has_view_permission(request, obj)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return broadcasts.can_send(request.user)

    def has_change_permission(self, request: HttpRequest, obj: Broadcast | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Broadcast | None = None) -> bool:
        return False

    def add_view(
        self, request: HttpRequest, form_url: str = "", extra_context: dict[str, Any] | None = None
    ) -> HttpResponse:
        """The "send a broadcast" form; the confirmation says how many connections it reached."""
        if not self.has_add_permission(request):
            raise PermissionDenied
        form = BroadcastForm(request.POST if request.method == "POST" else None)
        if form.is_valid():
            try:
                broadcast = broadcasts.send(
                    payload=form.cleaned_data["payload"], sent_by=request.user
                )
            except broadcasts.BroadcastUnavailable as exc:
                self.message_user(request, f"Nothing was sent. {exc}", messages.ERROR)
            else:
                self.log_addition(request, broadcast, [{"added": {}}])
                self.message_user(
                    request, f"Broadcast sent to {broadcast.describe_reach()}.", messages.SUCCESS
                )
                return HttpResponseRedirect(reverse("admin:realtime_broadcast_changelist"))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Send a broadcast",
            "form": form,
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/realtime/broadcast/send.html", context)


@admin.register(LiveConnections)
class LiveConnectionsAdmin(admin.ModelAdmin):
    """A read-only page for staff: connections by transport, per user, and per task."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_staff

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_staff

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view(self.changelist_view)
        return [path("", view, name="realtime_liveconnections_changelist")]

    def changelist_view(
        self, request: HttpRequest, extra_context: dict[str, Any] | None = None
    ) -> TemplateResponse:
        if not self.has_view_permission(request):
            raise PermissionDenied
        try:
            overview = sync.run_sync(get_connection_manager().overview())
        except (RedisError, OSError) as exc:  # it was a 500, with a traceback logged
            self.message_user(
                request,
                f"The connections could not be counted just now: {failure_text(exc)}",
                messages.ERROR,
            )
            overview = Overview(by_transport={}, by_user={}, by_task={})
        users = get_user_model()._default_manager.in_bulk(list(overview.by_user))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Live connections",
            "shared": bool(realtime_settings.REDIS_URL),
            "total": overview.total,
            "by_transport": sorted(overview.by_transport.items()),
            "by_user": sorted(
                (
                    (users.get(user_id), user_id, count)
                    for user_id, count in overview.by_user.items()
                ),
                key=lambda row: (-row[2], row[1]),
            ),
            "by_task": sorted(overview.by_task.items(), key=lambda row: (-row[1], str(row[0]))),
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/realtime/live_connections.html", context)
