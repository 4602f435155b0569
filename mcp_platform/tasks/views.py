from django.core.exceptions import ValidationError
from rest_framework import mixins, viewsets
from rest_framework.serializers import BaseSerializer

from mcp_platform.api import as_api_validation_error
from mcp_platform.tasks import services
from mcp_platform.tasks.selectors import visible_tasks
from mcp_platform.tasks.serializers import TaskSerializer


class TaskViewSet(
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    """Tasks of the requesting user (staff: all). Another user's task is a 404."""

    serializer_class = TaskSerializer
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self):
        return visible_tasks(self.request.user)

    def perform_create(self, serializer: BaseSerializer) -> None:
        try:
            serializer.instance = services.create_task(
                owner=self.request.user, **serializer.validated_data
            )
        except ValidationError as exc:
            raise as_api_validation_error(exc) from None

    def perform_update(self, serializer: BaseSerializer) -> None:
        try:
            services.update_task(task=serializer.instance, **serializer.validated_data)
        except ValidationError as exc:
            raise as_api_validation_error(exc) from None
