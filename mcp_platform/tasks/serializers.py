from rest_framework import serializers

from mcp_platform.tasks.models import Task


class TaskSerializer(serializers.ModelSerializer):
    """The REST representation of a task, also carried by every ``task_update``."""

    owner = serializers.PrimaryKeyRelatedField(read_only=True)

    class Meta:
        model = Task
        fields = [
            "id",
            "owner",
            "name",
            "status",
            "progress",
            "result",
            "error",
            "seq",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["id", "owner", "seq", "created_at", "updated_at"]
