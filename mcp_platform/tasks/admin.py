import json
from typing import Any

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db import transaction

from mcp_platform.tasks.models import Task


class ResultField(forms.JSONField):
    """Django's, except that JSON Python will not read (an integer of over 4,300 digits,
    nesting deeper than its recursion limit) is invalid rather than a 500, and that a
    value is shown with what is not ASCII escaped: a string with a lone surrogate, which
    the model refuses, could not be shown again with its error, a 500 too."""

    def to_python(self, value: Any) -> Any:
        try:
            return super().to_python(value)
        except (ValueError, RecursionError):
            raise ValidationError(
                self.error_messages["invalid"], code="invalid", params={"value": value}
            ) from None

    def bound_data(self, data: Any, initial: Any) -> Any:
        try:
            return super().bound_data(data, initial)
        except (ValueError, RecursionError):
            return forms.fields.InvalidJSONInput(data)

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, forms.fields.InvalidJSONInput):
            return value
        return json.dumps(value, cls=self.encoder)


class TaskAdminForm(forms.ModelForm):
    """The change form, refused if the task changed since it was opened.

    The admin saves every field it shows: a form opened before a worker's progress, result
    or status change put back what the form was opened with, and published that. The
    form carries the ``seq`` it was opened at; the admin saves in the transaction in which
    this form is checked, and the row stays locked from the check to the save.
    """

    opened_at_seq = forms.IntegerField(widget=forms.HiddenInput, required=False)

    class Meta:
        model = Task
        fields = "__all__"
        field_classes = {"result": ResultField}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.instance._state.adding:
            self.fields["opened_at_seq"].initial = self.instance.seq

    def clean(self) -> dict[str, Any]:
        cleaned = super().clean()
        if self.instance._state.adding:
            return cleaned
        opened_at = cleaned.get("opened_at_seq")
        if opened_at is None:  # a page rendered without it: an error on it would be hidden
            raise ValidationError(
                "This form does not say which change of the task it was opened at. Reload the "
                "page, and make your change again.",
                code="unknown_version",
            )
        with transaction.atomic():
            stored = (
                Task.objects.select_for_update()
                .filter(pk=self.instance.pk)
                .values_list("seq", flat=True)
                .first()
            )
        if stored is None:
            raise ValidationError("This task was deleted since you opened it.", code="deleted")
        if stored != opened_at:
            raise ValidationError(
                "This task changed since you opened it (change %(opened)s then, %(stored)s "
                "now). Reload the page to see it as it is, and make your change again.",
                code="changed",
                params={"opened": opened_at, "stored": stored},
            )
        return cleaned


@admin.register(Task)
class TaskAdmin(admin.ModelAdmin):
    """Saving here goes through ``Task.save()``, so it publishes like every other change."""

    form = TaskAdminForm
    list_display = ["name", "owner", "status", "progress", "seq", "updated_at"]
    list_filter = ["status", "owner"]
    search_fields = ["name", "id", "owner__username"]
    readonly_fields = ["id", "seq", "created_at", "updated_at"]
    list_select_related = ["owner"]
