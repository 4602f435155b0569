import uuid
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import connections, models, router, transaction
from django.db.backends.base.base import BaseDatabaseWrapper

from realtime.validators import validate_transportable_json


class Status(models.TextChoices):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED})


def transition_allowed(old: str, new: str) -> bool:
    """A finished task keeps its status; any other change of status is allowed."""
    return old not in FINISHED or new == old


def validate_transition(old: str, new: str) -> None:
    if not transition_allowed(old, new):
        raise ValidationError(f"A {old} task cannot become {new}.", code="invalid_transition")


#: The UPDATE statements of saves, by database vendor, table and the columns written
#: (``None`` is written as ``NULL``): a few, one per set of fields saved.
_UPDATES: dict[tuple[str, str, tuple[tuple[str, bool], ...]], str] = {}


def _row_sql(opts: Any, connection: BaseDatabaseWrapper) -> tuple[str, str]:
    """A model's table, quoted, and the condition that picks one of its rows by key."""
    quote = connection.ops.quote_name
    return quote(opts.db_table), f"{quote(opts.pk.column)} = %s"


def _needs_the_orm(field: models.Field, value: Any) -> bool:
    """Whether the ORM must compile a value's SQL (an expression, a model instance, a
    field with a placeholder of its own): ``Task._do_update()`` writes plain values."""
    return (
        hasattr(value, "resolve_expression")
        or hasattr(value, "prepare_database_save")
        or hasattr(field, "get_placeholder")
    )


class Task(models.Model):
    """A long-running unit of work whose changes clients watch live."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="tasks"
    )
    name = models.CharField(max_length=200)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    progress = models.PositiveSmallIntegerField(
        default=0, validators=[MinValueValidator(0), MaxValueValidator(100)]
    )
    result = models.JSONField(null=True, blank=True, validators=[validate_transportable_json])
    error = models.TextField(blank=True, default="")
    #: Number of saved changes; the first save is 1. Clients order updates by it.
    seq = models.PositiveIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["owner", "-created_at"]), models.Index(fields=["status"])]
        constraints = [
            # The field's validators hold for forms, the API and commands; this, for any
            # save (a worker's plain save() is published like the rest).
            models.CheckConstraint(
                condition=models.Q(progress__lte=100), name="task_progress_at_most_100"
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"

    def clean(self) -> None:
        """Reject leaving a finished status, for forms; ``save()`` checks it again under
        the row lock, against the status the save replaces."""
        if not self._state.adding:
            stored = type(self).objects.filter(pk=self.pk).values_list("status", flat=True)
            self.check_transition(stored.first())

    def check_transition(self, stored_status: str | None) -> None:
        if stored_status is not None:
            try:
                validate_transition(stored_status, self.status)
            except ValidationError as exc:
                raise ValidationError({"status": exc}) from None

    def check_result(self) -> None:
        """Refuse a ``result`` that no transport can carry, as the field's validator does
        for forms and the API: saved by a worker's plain ``save()``, a lone surrogate made
        every listing of the task a 500 (SQLite stores it; PostgreSQL refuses it). A
        ``Value()`` (JSON ``null`` is written so) is checked for what it holds."""
        result = self.result.value if isinstance(self.result, models.Value) else self.result
        try:
            validate_transportable_json(result)
        except ValidationError as exc:
            raise ValidationError({"result": exc.error_list}) from None

    def _locked_state(self, connection: BaseDatabaseWrapper) -> tuple[str, int] | None:
        """The stored ``(status, seq)``, read under a row lock (where the database has row
        locks). In SQL of its own: built by the ORM, this one query cost ~10% of the CPU
        of a PATCH (docs/performance.md)."""
        quote, opts = connection.ops.quote_name, self._meta
        status, seq = (quote(opts.get_field(name).column) for name in ("status", "seq"))
        table, where_pk = _row_sql(opts, connection)
        sql = f"SELECT {status}, {seq} FROM {table} WHERE {where_pk}"
        if connection.features.has_select_for_update:
            sql += " FOR UPDATE"
        with connection.cursor() as cursor:
            cursor.execute(sql, [opts.pk.get_db_prep_value(self.pk, connection)])
            return cursor.fetchone()

    def _do_update(
        self,
        base_qs: models.QuerySet,
        using: str,
        pk_val: Any,
        values: list[tuple[models.Field, Any, Any]],
        update_fields: Any,
        forced_update: bool,
    ) -> bool:
        """The UPDATE of a save, in SQL of its own, made once for each set of columns
        written: built by the ORM for every save, it was a sixteenth of the CPU of a PATCH
        (docs/performance.md). Values that need the ORM (expressions) go through it, as
        does a model that checks for its row first (``select_on_save``)."""
        connection, opts = connections[using], base_qs.model._meta
        if (
            not values
            or opts.select_on_save
            or any(_needs_the_orm(field, value) for field, _, value in values)
        ):
            return super()._do_update(base_qs, using, pk_val, values, update_fields, forced_update)
        params = [field.get_db_prep_save(value, connection) for field, _, value in values]
        if any(hasattr(param, "as_sql") for param in params):  # as the ORM's compiler checks
            return super()._do_update(base_qs, using, pk_val, values, update_fields, forced_update)
        columns = tuple(
            (field.column, param is None)
            for (field, _, _), param in zip(values, params, strict=True)
        )
        key = (connection.vendor, opts.db_table, columns)
        sql = _UPDATES.get(key)
        if sql is None:
            quote = connection.ops.quote_name
            assignments = ", ".join(
                f"{quote(column)} = {'NULL' if null else '%s'}" for column, null in columns
            )
            table, where_pk = _row_sql(opts, connection)
            sql = _UPDATES[key] = f"UPDATE {table} SET {assignments} WHERE {where_pk}"
        params = [param for param in params if param is not None]
        params.append(opts.pk.get_db_prep_value(pk_val, connection))
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.rowcount > 0

    def _fields_other_than(self, names: set[str]) -> list[str]:
        return [
            field.attname
            for field in self._meta.concrete_fields
            if field.name not in names and field.attname not in names and not field.primary_key
        ]

    def delete(
        self, using: str | None = None, keep_parents: bool = False
    ) -> tuple[int, dict[str, int]]:
        """Delete the task, for the watchers of its owner as stored (read under the row's
        lock): a copy read before the task changed hands told its previous owner's, and
        its new owner's subscribers heard that it was no longer theirs, not that it was
        deleted. A task deleted already is left as it is, and nothing is published."""
        using = using or router.db_for_write(type(self), instance=self)
        with transaction.atomic(using=using, savepoint=False):
            stored = type(self)._base_manager.using(using).select_for_update()
            try:
                self.owner_id = stored.values_list("owner_id", flat=True).get(pk=self.pk)
            except self.DoesNotExist:
                return 0, {}
            return super().delete(using=using, keep_parents=keep_parents)

    def save(self, *args: Any, **kwargs: Any) -> None:
        """Save and advance ``seq``. The stored status and ``seq`` are read under a row
        lock, so that concurrent writers in other processes never reuse a number and no
        save leaves a finished status (``ValidationError``), whoever calls it; nor does
        one store a ``result`` that no transport can carry. A task deleted since it was
        read is not brought back (``Task.DoesNotExist``)."""
        update_fields = kwargs.get("update_fields")
        if update_fields is not None:
            update_fields = kwargs["update_fields"] = {*update_fields, "seq", "updated_at"}
        if update_fields is None or "result" in update_fields:
            self.check_result()
        if self._state.adding:
            self.seq = 1
            super().save(*args, **kwargs)
            return
        using = kwargs.get("using") or router.db_for_write(type(self), instance=self)
        # Within a caller's transaction, no savepoint: a failure here fails it anyway.
        with transaction.atomic(using=using, savepoint=False):
            stored = self._locked_state(connections[using])
            kept: dict[str, Any] = {}
            if stored is not None and update_fields is not None:
                # The fields not written are read as stored: the change is published as
                # the row will be, not as this copy was read (its owner may be another's).
                # The copy gets its own values of them back once saved, as any save of
                # some fields leaves them: a change the caller has yet to save is kept.
                unwritten = self._fields_other_than(update_fields)
                kept = {name: self.__dict__[name] for name in unwritten if name in self.__dict__}
                self.refresh_from_db(using=using, fields=unwritten)
            allowed = stored is not None and transition_allowed(stored[0], self.status)
            try:
                if allowed:
                    self.seq = stored[1] + 1
                    super().save(*args, **kwargs)
            finally:
                for name, value in kept.items():
                    setattr(self, name, value)
        # Refusals are raised once the block is left: nothing was written, and a caller's
        # transaction stays usable.
        if stored is None:
            # Deleted since it was read. Saved, it would come back as new, with seq 1: its
            # numbers would start again, and its subscribers would drop them.
            raise self.DoesNotExist(f"Task {self.pk} was deleted.")
        if not allowed:
            self.check_transition(stored[0])
