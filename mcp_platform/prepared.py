"""Reads that every request makes, compiled once.

The ORM builds and compiles a queryset's SQL each time it is evaluated: for
``User.objects.get(pk=…)`` ~450 µs of CPU, against ~60 µs to run that SQL and make the
instance (docs/performance.md). A PATCH of a task read its user and its task so, a quarter
of its CPU. ``PreparedGet`` keeps what the ORM compiles for a query of one shape, per
database connection, and runs it with each call's values: the same SQL, converters and
instances as ``QuerySet.get()``, through the connection's cursor (so query logging and
``assertNumQueries`` see it).
"""

import weakref
from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model, QuerySet
from django.db.transaction import TransactionManagementError

M = TypeVar("M", bound=Model)


class _Compiled(NamedTuple):
    model: type[Model]
    #: The fields the values are for.
    fields: list[Field]
    sql: str
    #: ``(converters, expression)`` by column, as the compiler applies them.
    converters: dict[int, Any]
    apply_converters: Callable[[Any, Any], Any]
    #: The model's columns: where they are in a row, and their attribute names.
    start: int
    end: int
    attnames: list[str]
    locks: bool


class PreparedGet(Generic[M]):
    """``queryset().get(field=value, …)`` for the ``fields`` given, compiled once per
    database connection. Raises as ``get()`` does: ``DoesNotExist``,
    ``MultipleObjectsReturned``, and the field's own error for a value it cannot take.

    ``queryset`` makes the query's fixed part (a manager's, ``select_for_update()``);
    it must take no value that changes between calls, since its SQL is kept. A field is
    named as ``filter()`` names it (a foreign key by its ``_id``, which takes the key). A
    value of ``None``, whose SQL differs (``IS NULL``), goes through the ORM.
    """

    def __init__(self, queryset: Callable[[], QuerySet[M]], *fields: str) -> None:
        self._queryset = queryset
        self._names = fields
        # Per connection: each thread has its own, and the converters are bound to it.
        self._compiled: weakref.WeakKeyDictionary[BaseDatabaseWrapper, _Compiled] = (
            weakref.WeakKeyDictionary()
        )

    def get(self, *values: Any, using: str = DEFAULT_DB_ALIAS) -> M:
        if len(values) != len(self._names):
            raise TypeError(f"Expected {len(self._names)} values, got {len(values)}")
        connection = connections[using]
        compiled = self._compiled.get(connection)
        if compiled is None or any(value is None for value in values):
            query = self._queryset().using(using)
            if any(value is None for value in values):
                return query.get(**dict(zip(self._names, values, strict=True)))
            compiled = self._compile(query, values, connection)
        elif compiled.locks and connection.get_autocommit():
            # As the ORM refuses it: a lock outside a transaction is released at once.
            raise TransactionManagementError(
                "select_for_update cannot be used outside of a transaction."
            )
        model = compiled.model
        with connection.cursor() as cursor:
            cursor.execute(compiled.sql, _params(compiled.fields, values, connection))
            rows = cursor.fetchmany(2)
        if not rows:
            raise model.DoesNotExist(f"{model._meta.object_name} matching query does not exist.")
        if len(rows) > 1:
            raise model.MultipleObjectsReturned(
                f"get() returned more than one {model._meta.object_name}."
            )
        if compiled.converters:
            rows = list(compiled.apply_converters(rows, compiled.converters))
        return model.from_db(using, compiled.attnames, rows[0][compiled.start : compiled.end])

    def _compile(
        self, query: QuerySet[M], values: Sequence[Any], connection: BaseDatabaseWrapper
    ) -> _Compiled:
        opts = query.model._meta
        fields = [opts.pk if name == "pk" else opts.get_field(name) for name in self._names]
        query = query.filter(**dict(zip(self._names, values, strict=True))).order_by()
        compiler = query.query.get_compiler(connection=connection)
        sql, params = compiler.as_sql()
        if list(params) != _params(fields, values, connection):
            # The fixed part took values of its own, or a field prepares a value otherwise
            # than its lookup does: the kept SQL would not match another call's values.
            raise ValueError(f"Cannot prepare {query.query}: its parameters are not the values")
        columns = compiler.select[: compiler.col_count]
        start = compiler.klass_info["select_fields"][0]
        end = compiler.klass_info["select_fields"][-1] + 1
        compiled = _Compiled(
            model=query.model,
            fields=fields,
            sql=sql,
            converters=compiler.get_converters([column[0] for column in columns]),
            apply_converters=compiler.apply_converters,
            start=start,
            end=end,
            attnames=[column[0].target.attname for column in columns[start:end]],
            locks=query.query.select_for_update and connection.features.has_select_for_update,
        )
        self._compiled[connection] = compiled
        return compiled


def _params(
    fields: Sequence[Field], values: Sequence[Any], connection: BaseDatabaseWrapper
) -> list[Any]:
    """The values as the database takes them, as a lookup of each field prepares them."""
    return [
        field.get_db_prep_value(value, connection, prepared=False)
        for field, value in zip(fields, values, strict=True)
    ]
