"""A prepared read answers as ``QuerySet.get()`` does, with SQL compiled once per connection."""

import gc
import threading
import uuid
import weakref

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import connection, connections, transaction
from django.db.transaction import TransactionManagementError
from django.utils import timezone

from mcp_platform.prepared import PreparedGet
from mcp_platform.tasks import services
from mcp_platform.tasks.models import Task
from tests.conftest import record_compiled_sql

pytestmark = pytest.mark.django_db


def stored(instance) -> dict:
    return {f.attname: getattr(instance, f.attname) for f in type(instance)._meta.concrete_fields}


@pytest.fixture
def compilations(monkeypatch) -> list[str]:
    return record_compiled_sql(monkeypatch)


def test_rows_come_back_as_the_orm_reads_them_and_the_sql_is_compiled_once(
    user, other_user, compilations, django_assert_num_queries
):
    user.last_login = timezone.now()
    user.save()
    tasks = [
        services.create_task(owner=owner, name=name, result={"n": [1, None, "é"]})
        for owner, name in ((user, "first"), (other_user, "second"))
    ]
    users = PreparedGet(lambda: get_user_model().objects.all(), "pk")
    owned = PreparedGet(lambda: Task.objects.all(), "owner_id", "pk")
    assert stored(users.get(user.pk)) == stored(get_user_model().objects.get(pk=user.pk))
    assert stored(owned.get(user.pk, tasks[0].pk)) == stored(Task.objects.get(pk=tasks[0].pk))
    compilations.clear()
    with django_assert_num_queries(3):
        assert stored(users.get(other_user.pk)) == stored(other_user)
        found = owned.get(other_user.pk, str(tasks[1].pk))  # the id as a URL gives it
        assert stored(found) == stored(Task.objects.get(pk=tasks[1].pk))
    assert len(compilations) == 1  # the ORM's own read, to compare with
    assert found._state.db == "default" and not found._state.adding
    assert isinstance(found.pk, uuid.UUID) and found.result == {"n": [1, None, "é"]}


@pytest.mark.django_db(transaction=True)
def test_the_sql_is_the_one_get_runs(user, task, compilations):
    prepared = {
        "users": (PreparedGet(lambda: get_user_model().objects.all(), "pk"), (user.pk,)),
        "locked": (
            PreparedGet(lambda: Task.objects.select_for_update(), "owner_id", "pk"),
            (user.pk, task.pk),
        ),
    }
    by_orm = {
        "users": lambda: get_user_model().objects.get(pk=user.pk),
        "locked": lambda: Task.objects.select_for_update().get(owner_id=user.pk, pk=task.pk),
    }
    for name, (read, values) in prepared.items():
        with transaction.atomic():
            compilations.clear()
            read.get(*values)
            by_orm[name]()
        assert compilations[0] == compilations[1], name  # a LIMIT, the row lock where there is one


def test_a_missing_row_or_a_value_its_field_cannot_take_is_refused_as_by_get(user, task):
    owned = PreparedGet(lambda: Task.objects.all(), "owner_id", "pk")
    owned.get(user.pk, task.pk)  # compiled
    with pytest.raises(Task.DoesNotExist):
        owned.get(user.pk + 1, task.pk)
    with pytest.raises(Task.DoesNotExist):
        owned.get(user.pk, uuid.uuid4())
    with pytest.raises(ValidationError):
        owned.get(user.pk, "not-a-uuid")
    with pytest.raises(TypeError):
        owned.get(task.pk)


def test_more_than_one_row_is_refused_and_none_is_looked_up_by_the_orm(user, other_user):
    by_login = PreparedGet(lambda: get_user_model().objects.all(), "last_login")
    with pytest.raises(get_user_model().MultipleObjectsReturned):
        by_login.get(None)  # IS NULL: no parameter to put it in
    services.create_task(owner=user, name="same")
    services.create_task(owner=other_user, name="same")
    by_name = PreparedGet(lambda: Task.objects.all(), "name")
    for _ in range(2):  # compiling, then compiled
        with pytest.raises(Task.MultipleObjectsReturned) as prepared:
            by_name.get("same")
        with pytest.raises(Task.MultipleObjectsReturned) as orm:
            Task.objects.get(name="same")
        assert str(prepared.value) == str(orm.value)


@pytest.mark.parametrize("key", [2**31, 2**63, 10**30, -(2**63) - 1])
def test_an_integer_out_of_its_columns_range_matches_no_row(user, key):
    """As the ORM finds; unsent, it failed in the driver (a 500 for such a token's claim)."""
    users = PreparedGet(lambda: get_user_model().objects.all(), "pk")
    for _ in range(2):  # compiling, then compiled
        with pytest.raises(get_user_model().DoesNotExist):
            users.get(key)
        users.get(user.pk)


def test_a_fixed_part_that_takes_a_value_is_refused(user, task):
    with pytest.raises(ValueError, match="Cannot prepare"):
        PreparedGet(lambda: Task.objects.filter(name="t"), "pk").get(task.pk)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("compiled_first", [False, True])
def test_a_lock_outside_a_transaction_is_refused_as_the_orm_refuses_it(task, compiled_first):
    """PostgreSQL refuses it; SQLite, which has no row locks, takes it, with the ORM too."""
    locked = PreparedGet(lambda: Task.objects.select_for_update(), "pk")
    if compiled_first:
        with transaction.atomic():
            locked.get(task.pk)

    def refusal(read):
        try:
            read()
        except TransactionManagementError as exc:
            return str(exc)
        return None

    by_orm = refusal(lambda: Task.objects.select_for_update().get(pk=task.pk))
    assert refusal(lambda: locked.get(task.pk)) == by_orm


@pytest.mark.django_db(transaction=True)
def test_each_threads_connection_has_its_own_compiled_read(user, task, compilations):
    owned = PreparedGet(lambda: Task.objects.select_for_update(), "owner_id", "pk")
    with transaction.atomic():
        here = owned.get(user.pk, task.pk)
    there = []

    def read() -> None:
        try:
            with transaction.atomic():
                there.append(owned.get(user.pk, task.pk))
        finally:
            connection.close()

    compilations.clear()
    thread = threading.Thread(target=read)
    thread.start()
    thread.join(10)
    assert [stored(found) for found in there] == [stored(here)]
    assert len(compilations) == 1  # its converters are bound to its own connection


@pytest.mark.django_db(transaction=True)
def test_a_thread_that_ends_leaves_its_connection_to_be_closed_and_collected(user):
    """Held by the compiled read's converters, a thread's connection outlived the thread:
    one more open database connection for every thread that had read."""
    users = PreparedGet(lambda: get_user_model().objects.all(), "pk")
    held = []

    def read() -> None:
        held.append(weakref.ref(connections["default"]))
        assert users.get(user.pk).pk == user.pk

    for _ in range(3):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join(10)
    gc.collect()
    assert [ref() for ref in held] == [None, None, None]
