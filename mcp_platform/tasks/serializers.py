from collections.abc import Mapping
from typing import Any, ClassVar

from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail

from mcp_platform.tasks.models import Task


class TaskSerializer(serializers.ModelSerializer):
    """The REST representation of a task, also carried by every ``task_update``."""

    owner = serializers.PrimaryKeyRelatedField(read_only=True)

    #: The fields and the validators as ``ModelSerializer`` derives them from the model,
    #: by class.
    _derived: ClassVar[dict[type, dict[str, serializers.Field]]] = {}
    _derived_validators: ClassVar[dict[type, list[Any]]] = {}

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        """Refuse a field the task does not have (``unknown_field``): a client's misspelt
        ``progres`` was ignored, and answered 200. Read-only fields are ignored, as DRF
        ignores them, so that a task read can be sent back changed."""
        if isinstance(data, Mapping):
            unknown = sorted(str(name) for name in data if name not in self.fields)
            if unknown:
                error = ErrorDetail("Unknown field.", code="unknown_field")
                raise serializers.ValidationError({name: [error] for name in unknown})
        return super().to_internal_value(data)

    def get_fields(self) -> dict[str, serializers.Field]:
        # Deriving them cost more than the rest of a PATCH's serializing. Each serializer
        # binds copies of its own; shallow ones, since nothing changes a field once made
        # (DRF's deep copies took a twentieth of a PATCH's CPU), and made directly:
        # ``copy.copy()`` took 75 µs for the ten, this 19.
        derived = self._derived.get(type(self))
        if derived is None:
            derived = self._derived[type(self)] = super().get_fields()
        return {name: _shallow_copy(field) for name, field in derived.items()}

    def get_validators(self) -> list[Any]:
        # ``ModelSerializer`` looks through the model's constraints and fields for them on
        # every request's serializer: 100 µs of each PATCH, for validators that depend
        # on the class alone and keep no state of their own.
        derived = self._derived_validators.get(type(self))
        if derived is None:
            derived = self._derived_validators[type(self)] = super().get_validators()
        return list(derived)

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


def _shallow_copy(field: serializers.Field) -> serializers.Field:
    """What ``copy.copy()`` makes of a field, without its generic protocol. (``Field``'s
    ``__new__`` records its arguments, which the copied attributes then replace.)"""
    copied = object.__new__(type(field))
    copied.__dict__.update(field.__dict__)
    return copied
