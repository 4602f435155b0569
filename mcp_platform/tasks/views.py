from datetime import UTC
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.http import Http404
from django.utils import timezone
from rest_framework import mixins, viewsets
from rest_framework.exceptions import NotFound
from rest_framework.pagination import Cursor, CursorPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from mcp_platform.api import as_api_validation_error
from mcp_platform.tasks import services
from mcp_platform.tasks.models import Task
from mcp_platform.tasks.realtime import take_saved_state
from mcp_platform.tasks.selectors import visible_task_for_update, visible_tasks
from mcp_platform.tasks.serializers import TaskSerializer


class TaskPages(CursorPagination):
    """A listing's pages: the newest tasks first, ``page_size`` (at most 1,000) to a page,
    each page's cursor right however many tasks are added meanwhile. Unpaged, one listing
    answered every task, which for staff is every user's: for 40 tasks with large results,
    a 96 MB answer and 270 MB more of the server's memory."""

    # The id breaks ties of time, so that a page's offset among equal times is the same
    # from one query to the next (PostgreSQL returned ties in any order).
    ordering = ("-created_at", "-id")
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000

    def decode_cursor(self, request: Request) -> Cursor | None:
        """DRF's, except that a cursor whose position is no time a task could be created at
        (one made by hand) is invalid like any other, a 404: the query took it, and
        answered a 400 or, on SQLite, a 500 past the year 9999 in UTC. The cursors made
        here carry times with their offset from UTC."""
        cursor = super().decode_cursor(request)
        if cursor is not None and cursor.position is not None:
            field = Task._meta.get_field(type(self).ordering[0].lstrip("-"))
            try:
                position = field.to_python(cursor.position)
                position.astimezone(UTC)  # OverflowError past the year 9999 in UTC
            except (ValidationError, OverflowError):
                position = None
            if position is None or timezone.is_naive(position):
                raise NotFound(self.invalid_cursor_message)
        return cursor


class TaskViewSet(
    mixins.ListModelMixin,
    mixins.CreateModelMixin,
    mixins.RetrieveModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    """Tasks of the requesting user (staff: all). Another user's task is a 404."""

    serializer_class = TaskSerializer
    pagination_class = TaskPages
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[Task]:
        return visible_tasks(self.request.user)

    def get_object(self) -> Task:
        """For a PATCH, the task read under its row lock (see ``update()``)."""
        if self.request.method != "PATCH":
            return super().get_object()
        try:
            task = visible_task_for_update(
                self.request.user, self.kwargs[self.lookup_url_kwarg or self.lookup_field]
            )
        except (Task.DoesNotExist, TypeError, ValueError, ValidationError):
            raise Http404 from None  # as DRF's get_object() answers a malformed id
        self.check_object_permissions(self.request, task)
        return task

    def perform_create(self, serializer: BaseSerializer) -> None:
        try:
            serializer.instance = services.create_task(
                owner=self.request.user, **serializer.validated_data
            )
        except ValidationError as exc:
            raise as_api_validation_error(exc) from None

    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """A PATCH: the fields sent are checked, then applied to the task read under its row
        lock, so that a change committed since another request read it is not undone. One
        that sends no writable field saves nothing, so its subscribers get nothing."""
        serializer = self.get_serializer(data=request.data, partial=True)
        serializer.is_valid(raise_exception=True)
        with transaction.atomic():
            task = self.get_object()
            if serializer.validated_data:
                try:
                    task = services.update_locked_task(task, **serializer.validated_data)
                except ValidationError as exc:
                    raise as_api_validation_error(exc) from None
            serializer.instance = task
        return Response(take_saved_state(task) or serializer.data)
