"""A task's save writes what the ORM's UPDATE would, in SQL made once for its columns."""

import pytest
from django.db import connection
from django.db.models import F, Value
from django.db.models.fields.json import JSONField
from django.db.models.sql.compiler import SQLUpdateCompiler

from mcp_platform.tasks.models import Task
from tests.conftest import record_compiled_sql

pytestmark = pytest.mark.django_db


def stored_result_is_sql_null(task: Task) -> bool:
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT {connection.ops.quote_name('result')} IS NULL FROM "
            f"{connection.ops.quote_name(Task._meta.db_table)} WHERE "
            f"{connection.ops.quote_name('id')} = %s",
            [Task._meta.pk.get_db_prep_value(task.pk, connection)],
        )
        return bool(cursor.fetchone()[0])


def test_a_save_writes_every_value_as_the_orm_reads_it_back(task):
    for result in ({"k": [1, None, "é", 2.5]}, [], "text", 0, None):
        task.result, task.progress, task.error = result, 40, "it's ‘quoted’"
        task.save()
        again = Task.objects.get(pk=task.pk)
        assert (again.result, again.progress, again.error, again.seq) == (
            result,
            40,
            "it's ‘quoted’",
            task.seq,
        )
        assert stored_result_is_sql_null(again) == (result is None)


def test_json_null_and_sql_null_stay_apart(task):
    task.result = Value(None, JSONField())  # JSON null, through the ORM
    task.save(update_fields=["result"])
    assert not stored_result_is_sql_null(task)
    task.result = None
    task.save()
    assert stored_result_is_sql_null(task)


def test_a_save_of_some_fields_writes_those_and_leaves_another_writers_change(task):
    Task.objects.filter(pk=task.pk).update(name="renamed elsewhere")
    task.progress = 7
    task.save(update_fields=["progress"])
    again = Task.objects.get(pk=task.pk)
    assert (again.name, again.progress, again.seq) == ("renamed elsewhere", 7, 2)


@pytest.fixture
def orm_updates(monkeypatch) -> list[str]:
    """The UPDATEs the ORM compiles, one entry each."""
    return record_compiled_sql(monkeypatch, SQLUpdateCompiler)


def test_a_save_of_values_builds_no_update_with_the_orm(
    task, orm_updates, django_assert_num_queries
):
    for update_fields in (None, ["progress"], ["progress", "result"]):
        task.progress += 1
        task.result = None if task.result else {"n": task.progress}
        # The locked read, the other fields' read for a save of some, the UPDATE.
        with django_assert_num_queries(2 if update_fields is None else 3):
            task.save(update_fields=update_fields)
    assert orm_updates == []


def test_an_expression_is_written_by_the_orm(task, orm_updates):
    task.progress = F("progress") + 5
    task.save(update_fields=["progress"])
    assert Task.objects.get(pk=task.pk).progress == 5
    assert len(orm_updates) == 1
