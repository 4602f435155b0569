from django.contrib import admin

from mcp_platform.tasks.models import Task


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    """Saving here goes through ``Task.save()``, so it publishes like every other change."""

    list_display = ["name", "owner", "status", "progress", "seq", "updated_at"]
    list_filter = ["status", "owner"]
    search_fields = ["name", "id", "owner__username"]
    readonly_fields = ["id", "seq", "created_at", "updated_at"]
    list_select_related = ["owner"]
