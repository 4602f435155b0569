"""Reads that every request makes, compiled once.

The ORM builds and compiles a queryset's SQL each time it is evaluated: for
``User.objects.get(pk=…)`` ~450 µs of CPU, against ~60 µs to run that SQL and make the
instance (docs/performance.md). A PATCH of a task read its user and its task so, a quarter
of its CPU. ``PreparedGet`` keeps what the ORM compiles for a query of one shape, per
database connection, and runs it with each call's values: the same SQL, converters and
instances as ``QuerySet.get()``, through the connection's cursor (so query logging and
``assertNumQueries`` see it).
"""

from collections.abc import Callable, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from django.core.exceptions import EmptyResultSet
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model, QuerySet
from django.db.models.query import MAX_GET_RESULTS
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
    database connection. Raises as ``get()`` does: ``DoesNotExist`` (also for an integer
    out of its column's range), ``MultipleObjectsReturned``, and the field's own error for
    a value it cannot take.

    ``queryset`` makes the query's fixed part (a manager's, ``select_for_update()``);
    it must take no value that changes between calls, since its SQL is kept. A field is
    named as ``filter()`` names it (a foreign key by its ``_id``, which takes the key). A
    value of ``None``, whose SQL differs (``IS NULL``), goes through the ORM.
    """

    def __init__(self, queryset: Callable[[], QuerySet[M]], *fields: str) -> None:
        self._queryset = queryset
        self._names = fields

    def get(self, *values: Any, using: str = DEFAULT_DB_ALIAS) -> M:
        if len(values) != len(self._names):
            raise TypeError(f"Expected {len(self._names)} values, got {len(values)}")
        if any(value is None for value in values):
            filters = dict(zip(self._names, values, strict=True))
            return self._queryset().using(using).get(**filters)
        connection = connections[using]
        # Kept on the connection: each thread has its own, the converters are bound to
        # it, and it goes with the connection. (Kept here by connection, even weakly, the
        # converters held it: a thread that ended left its database connection open.)
        compiled = vars(connection).setdefault(_ATTRIBUTE, {}).get(self)
        if compiled is None:
            compiled = self._compile(self._queryset().using(using), values, connection)
        elif compiled.locks and connection.get_autocommit():
            # As the ORM refuses it: a lock outside a transaction is released at once.
            raise TransactionManagementError(
                "select_for_update cannot be used outside of a transaction."
            )
        model = compiled.model
        params = _params(model, compiled.fields, values, connection)
        with connection.cursor() as cursor:
            cursor.execute(compiled.sql, params)
            rows = cursor.fetchmany(MAX_GET_RESULTS)
        if len(rows) > 1:
            count = len(rows) if len(rows) < MAX_GET_RESULTS else f"more than {MAX_GET_RESULTS - 1}"
            raise model.MultipleObjectsReturned(
                f"get() returned more than one {model._meta.object_name} -- it returned {count}!"
            )
        if not rows:
            raise _does_not_exist(model)
        if compiled.converters:
            rows = list(compiled.apply_converters(rows, compiled.converters))
        return model.from_db(using, compiled.attnames, rows[0][compiled.start : compiled.end])

    def _compile(
        self, query: QuerySet[M], values: Sequence[Any], connection: BaseDatabaseWrapper
    ) -> _Compiled:
        opts = query.model._meta
        fields = [opts.pk if name == "pk" else opts.get_field(name) for name in self._names]
        params = _params(query.model, fields, values, connection)
        query = query.filter(**dict(zip(self._names, values, strict=True))).order_by()
        if (
            not query.query.select_for_update
            or connection.features.supports_select_for_update_with_limit
        ):
            query.query.set_limits(high=MAX_GET_RESULTS)  # as get() asks for at most so many
        compiler = query.query.get_compiler(connection=connection)
        try:
            sql, compiled_params = compiler.as_sql()
        except EmptyResultSet:  # a value that can match nothing, as the ORM finds it
            raise _does_not_exist(query.model) from None
        if list(compiled_params) != params:
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
            locks=query.query.select_for_update
            and connection.features.has_select_for_update
            and connection.features.supports_transactions,
        )
        vars(connection)[_ATTRIBUTE][self] = compiled
        return compiled


#: The attribute of a database connection that holds its compiled reads.
_ATTRIBUTE = "_prepared_gets"


def _params(
    model: type[Model],
    fields: Sequence[Field],
    values: Sequence[Any],
    connection: BaseDatabaseWrapper,
) -> list[Any]:
    """The values as the database takes them, as a lookup of each field prepares them; an
    integer out of its column's range matches no row, as the ORM's lookup finds (unsent,
    it would fail in the driver)."""
    params = []
    for field, value in zip(fields, values, strict=True):
        param = field.get_db_prep_value(value, connection, prepared=False)
        kind = field.get_internal_type()
        if isinstance(param, int) and kind in connection.ops.integer_field_ranges:
            low, high = connection.ops.integer_field_range(kind)
            if (low is not None and param < low) or (high is not None and param > high):
                raise _does_not_exist(model)
        params.append(param)
    return params


def _does_not_exist(model: type[Model]) -> Exception:
    return model.DoesNotExist(f"{model._meta.object_name} matching query does not exist.")
