"""Every way of changing a task publishes through the one path, once, after commit."""

import io
import json
import os
import subprocess
import sys

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.db import IntegrityError, OperationalError, connection, transaction
from django.db.models import F, Value
from django.db.models.fields.json import JSONField

from mcp_platform.tasks import services, signals
from mcp_platform.tasks.models import Task
from mcp_platform.tasks.realtime import take_saved_state
from mcp_platform.tasks.serializers import TaskSerializer
from realtime import api
from realtime.protocol import CloseCode
from tests.conftest import (
    ROOT,
    api_client,
    connect_user,
    free_port,
    open_websocket,
    server_database_url,
    token_for,
)

pytestmark = pytest.mark.django_db(transaction=True)


def watch_all(user, task, change, count: int) -> list[dict]:
    """Subscribe to ``task``, run the sync ``change()``, and return the ``count`` messages
    that arrive, after which nothing more may."""

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            await ws.send_json_to({"action": "subscribe", "task_id": str(task.pk)})
            assert (await ws.receive_json_from(timeout=5))["type"] == "subscribed"
            await database_sync_to_async(change)()
            received = [await ws.receive_json_from(timeout=5) for _ in range(count)]
            assert await ws.receive_nothing(timeout=0.1 if count else 0.3)
            return received

    return async_to_sync(scenario)()


def watch(user, task, change, *, expect_update: bool = True):
    """``watch_all()`` of the one update ``change()`` makes (``None`` if it makes none)."""
    if not expect_update:
        return watch_all(user, task, change, 0) or None
    [update] = watch_all(user, task, change, 1)
    return update


def test_plain_model_save_publishes(user, task):
    def change():
        task.progress = 30
        task.save()

    update = watch(user, task, change)
    assert (update["type"], update["seq"], update["progress"]) == ("task_update", 2, 30)
    assert update["task"]["progress"] == 30 and update["task"]["seq"] == 2


@pytest.mark.parametrize("update_fields", [None, ["progress", "result"]])
def test_a_save_of_expressions_publishes_the_values_stored(user, task, update_fields):
    """The copy holds the expressions, not what they made; their snapshot raised, and the
    save was rolled back."""

    def change():
        task.progress = F("progress") + 5
        task.result = Value(None, JSONField())  # JSON null, not SQL NULL
        task.save(update_fields=update_fields)

    update = watch(user, task, change)
    assert (update["seq"], update["progress"], update["task"]["result"]) == (2, 5, None)
    stored = Task.objects.get(pk=task.pk)
    assert (stored.seq, stored.progress) == (2, 5)


def test_a_create_of_expressions_deleted_at_once_publishes_nothing_and_stands(user):
    """Read back after the INSERT, a row another writer deleted meanwhile raised
    ``DoesNotExist`` from the create, whose row had been made."""
    deleted = []

    def delete_first(execute, sql, params, many, context):
        if not deleted and sql.startswith("SELECT") and Task._meta.db_table in sql:
            deleted.append(None)
            deleted[0] = Task.objects.all().delete()  # the row just made
        return execute(sql, params, many, context)

    task = Task(owner=user, name="t", result=Value(None, JSONField()))
    with connection.execute_wrapper(delete_first):
        task.save()
    assert deleted == [(1, {"tasks.Task": 1})]
    assert not Task.objects.filter(pk=task.pk).exists()


def test_a_plain_save_of_a_progress_over_100_is_refused_and_publishes_nothing(user, task):
    def change():
        task.progress = 150
        with pytest.raises(IntegrityError):
            with transaction.atomic():
                task.save()

    watch(user, task, change, expect_update=False)
    assert Task.objects.get(pk=task.pk).progress == 0


@pytest.mark.parametrize("result", [{"file": "\udcff.txt"}, ["\x00"], [float("nan")]])
@pytest.mark.parametrize("update_fields", [None, ["result"]])
@pytest.mark.parametrize("as_value", [False, True])
def test_a_plain_save_of_a_result_no_transport_can_carry_is_refused(
    user, task, result, update_fields, as_value
):
    """A lone surrogate (as ``os.fsdecode()`` makes of a file name that is not UTF-8),
    saved, made every listing of the task a 500; also written as a ``Value()``."""

    def change():
        task.result = Value(result, JSONField()) if as_value else result
        with pytest.raises(ValidationError) as refused:
            task.save(update_fields=update_fields)
        assert list(refused.value.message_dict) == ["result"]

    watch(user, task, change, expect_update=False)
    assert Task.objects.get(pk=task.pk).result is None


@pytest.mark.parametrize("body", [{}, {"seq": 999, "owner": 2, "id": "x"}])
def test_a_patch_that_changes_no_writable_field_saves_and_publishes_nothing(user, task, body):
    """Read-only fields are ignored (a task read can be sent back); with nothing else, there
    is no change to number and send."""
    answers = []

    def change():
        answers.append(api_client(user).patch(f"/api/tasks/{task.pk}/", body, format="json"))

    watch(user, task, change, expect_update=False)
    [response] = answers
    assert response.status_code == 200 and response.json()["seq"] == 1
    assert Task.objects.get(pk=task.pk).seq == 1


def test_a_patch_answers_with_the_state_it_published_serialized_once(user, task, monkeypatch):
    serialized = []
    to_representation = TaskSerializer.to_representation
    monkeypatch.setattr(
        TaskSerializer,
        "to_representation",
        lambda self, task: serialized.append(task.seq) or to_representation(self, task),
    )
    answers = []

    def change():
        answers.append(
            api_client(user).patch(
                f"/api/tasks/{task.pk}/", {"progress": 40, "result": {"a": [1]}}, format="json"
            )
        )

    update = watch(user, task, change)
    [response] = answers
    assert response.status_code == 200
    assert (
        response.json() == update["task"] == api_client(user).get(f"/api/tasks/{task.pk}/").json()
    )
    assert update["task"]["progress"] == 40 and update["task"]["result"] == {"a": [1]}
    # The subscription's state, the change's snapshot, the GET; not the PATCH's answer again.
    assert serialized == [1, 2, 2]


def test_the_state_a_save_published_is_taken_once_and_only_for_that_save(task):
    task.progress = 10
    task.save()
    assert take_saved_state(task)["progress"] == 10
    assert take_saved_state(task) is None
    task.progress = 20
    task.save()
    Task.objects.filter(pk=task.pk).update(seq=F("seq") + 1)
    task.refresh_from_db()
    assert take_saved_state(task) is None


def test_update_with_update_fields_still_advances_seq(user, task):
    def change():
        task.status = "running"
        task.save(update_fields=["status"])

    assert watch(user, task, change)["seq"] == 2
    assert Task.objects.get(pk=task.pk).seq == 2


def test_a_save_of_some_fields_of_an_old_copy_publishes_the_row_as_committed(
    user, other_user, task
):
    """A worker's copy read before the admin gave the task away and started it: its save
    of the progress writes only that, and publishes the task as stored, to its new owner."""
    old_copy = Task.objects.get(pk=task.pk)
    task.owner, task.status = other_user, "running"
    task.save()

    def change():
        old_copy.progress = 60
        old_copy.save(update_fields=["progress"])

    update = watch(other_user, task, change)
    assert (update["seq"], update["status"], update["progress"]) == (3, "running", 60)
    assert update["task"]["owner"] == other_user.pk
    stored = Task.objects.get(pk=task.pk)
    assert (stored.owner_id, stored.status, stored.progress) == (other_user.pk, "running", 60)


def test_a_save_of_some_fields_keeps_the_copys_changes_to_the_others(user, task):
    """A worker that saves its progress and then its result, each on its own: the first
    save read the stored result into the copy, and the second wrote that old result back."""
    task.result, task.progress = {"new": True}, 50
    task.save(update_fields=["progress"])
    assert task.result == {"new": True}
    task.save(update_fields=["result"])
    stored = Task.objects.get(pk=task.pk)
    assert (stored.progress, stored.result, stored.seq) == (50, {"new": True}, 3)


def test_each_change_in_one_transaction_publishes_the_result_it_saved(user, task):
    def change():
        with transaction.atomic():
            task.result = {"step": 1}
            task.save()
            task.result["step"] = 2
            task.save()

    updates = watch_all(user, task, change, 2)
    assert [update["task"]["result"] for update in updates] == [{"step": 1}, {"step": 2}]


def test_rolled_back_change_publishes_nothing(user, task):
    def change():
        with pytest.raises(RuntimeError), transaction.atomic():
            services.update_task(task=task, progress=99)
            raise RuntimeError("roll back")

    watch(user, task, change, expect_update=False)
    assert Task.objects.get(pk=task.pk).seq == 1


@pytest.mark.parametrize("how", ["delete", "queryset"])
def test_a_deletion_publishes_task_deleted_whichever_way_it_is_made(user, task, how):
    task_id = str(task.pk)  # delete() forgets it

    def change():
        if how == "delete":
            task.delete()
        else:
            Task.objects.filter(pk=task.pk).delete()

    deleted = watch(user, task, change)
    assert (deleted["type"], deleted["task_id"]) == ("task_deleted", task_id)


def test_a_deleted_owners_tasks_are_published_deleted_before_their_connection_ends(user, task):
    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            await ws.send_json_to({"action": "subscribe", "task_id": str(task.pk)})
            assert (await ws.receive_json_from(timeout=5))["type"] == "subscribed"
            # The owner's tasks go with them.
            await database_sync_to_async(type(user).objects.filter(pk=user.pk).delete)()
            deleted = await ws.receive_json_from(timeout=5)
            assert (deleted["type"], deleted["task_id"]) == ("task_deleted", str(task.pk))
            closed = await ws.receive_output(timeout=5)
            assert closed == {"type": "websocket.close", "code": CloseCode.UNAUTHORIZED}

    async_to_sync(scenario)()


def test_a_copy_read_before_the_task_changed_hands_deletes_it_for_its_new_owner(
    user, other_user, task
):
    stale = Task.objects.get(pk=task.pk)
    Task.objects.filter(pk=task.pk).update(owner=other_user)

    deleted = watch(other_user, task, stale.delete)
    assert (deleted["type"], deleted["task_id"]) == ("task_deleted", str(task.pk))
    assert stale.owner_id == other_user.pk


def test_a_copy_of_a_task_deleted_already_deletes_and_publishes_nothing(task, monkeypatch):
    stale = Task.objects.get(pk=task.pk)
    task.delete()
    published = []
    monkeypatch.setattr(signals, "publish_task_deleted", lambda *args: published.append(args))

    assert stale.delete() == (0, {})
    assert published == []


def test_rolled_back_deletion_publishes_nothing(user, task):
    def change():
        with pytest.raises(RuntimeError), transaction.atomic():
            Task.objects.filter(pk=task.pk).delete()
            raise RuntimeError("roll back")

    watch(user, task, change, expect_update=False)
    assert Task.objects.filter(pk=task.pk).exists()


@pytest.mark.parametrize("change", ["update", "delete"])
def test_a_publish_that_fails_is_logged_and_the_change_stands(task, change, monkeypatch, caplog):
    def unreachable(*args):
        raise ConnectionError("layer is down")

    task_id = task.pk
    name = f"publish_task_{'update' if change == 'update' else 'deleted'}"
    unreachable.__name__ = name
    monkeypatch.setattr(signals, name, unreachable)
    if change == "update":
        services.update_task(task=task, progress=7)
        assert Task.objects.get(pk=task_id).seq == 2
    else:
        task.delete()
        assert not Task.objects.filter(pk=task_id).exists()
    # One line, without a traceback: while Redis is away every change fails.
    [logged] = [record for record in caplog.records if record.name == "realtime.api"]
    assert logged.getMessage() == (
        f"Could not publish task {task_id} ({name}): ConnectionError: layer is down"
    )
    assert logged.exc_info is None


def test_changes_in_one_transaction_publish_each_seq_in_order(user, task):
    def change():
        with transaction.atomic():
            services.update_task(task=task, progress=10)
            services.update_task(task=task, progress=20)

    updates = watch_all(user, task, change, 2)
    assert [(update["seq"], update["progress"]) for update in updates] == [(2, 10), (3, 20)]


def admin_form(task: Task, **changes) -> dict:
    """The admin's change form of ``task`` as it is now, submitted with ``changes``."""
    fields = {"owner": task.owner_id, "name": task.name, "status": task.status}
    fields |= {"progress": task.progress, "error": task.error, "opened_at_seq": task.seq}
    if task.result is not None:
        fields["result"] = json.dumps(task.result)
    return {**fields, **changes}


def test_admin_change_publishes(admin_client, user, task):
    def change():
        response = admin_client.post(
            f"/admin/tasks/task/{task.pk}/change/",
            admin_form(task, name="renamed", status="running", progress=55),
        )
        assert response.status_code == 302, response.content[:2000]

    update = watch(user, task, change)
    assert (update["status"], update["progress"], update["task"]["name"]) == (
        "running",
        55,
        "renamed",
    )


def test_admin_rejects_leaving_a_finished_state(admin_client, user):
    done = services.create_task(owner=user, name="done", status="completed")
    response = admin_client.post(
        f"/admin/tasks/task/{done.pk}/change/", admin_form(done, status="running")
    )
    assert response.status_code == 200 and b"cannot become running" in response.content
    assert Task.objects.get(pk=done.pk).status == "completed"


@pytest.mark.parametrize(
    "result",
    ['"\\ud800"', "1" * 5001, "[" * 3000 + "]" * 3000],
    ids=["lone surrogate", "5001 digits", "3000 deep"],
)
def test_a_result_the_admin_cannot_store_is_shown_as_an_error_not_a_500(
    admin_client, user, task, result
):
    response = admin_client.post(
        f"/admin/tasks/task/{task.pk}/change/", admin_form(task, result=result)
    )
    assert response.status_code == 200
    assert b"errornote" in response.content
    assert Task.objects.get(pk=task.pk).result is None


def test_an_admin_form_opened_before_another_change_is_refused_not_saved_over_it(
    admin_client, user, task
):
    """Saved, it put back the progress, status and result it was opened with."""
    page = admin_client.get(f"/admin/tasks/task/{task.pk}/change/")
    assert b'name="opened_at_seq" value="1"' in page.content
    opened = admin_form(task, name="renamed")
    services.update_task(task=task, status="running", progress=90, result={"rows": 5})

    def change():
        response = admin_client.post(f"/admin/tasks/task/{task.pk}/change/", opened)
        assert response.status_code == 200 and b"changed since you opened it" in response.content

    watch(user, task, change, expect_update=False)
    stored = Task.objects.get(pk=task.pk)
    assert (stored.name, stored.progress, stored.result, stored.seq) == (
        "watched",
        90,
        {"rows": 5},
        2,
    )
    # Opened again, the change goes through.
    update = watch(
        user,
        task,
        lambda: admin_client.post(
            f"/admin/tasks/task/{task.pk}/change/", admin_form(stored, name="renamed")
        ),
    )
    assert (update["task"]["name"], update["progress"], update["seq"]) == ("renamed", 90, 3)


def test_an_admin_form_that_does_not_say_when_it_was_opened_is_refused_visibly(admin_client, task):
    form = admin_form(task, name="renamed")
    del form["opened_at_seq"]
    response = admin_client.post(f"/admin/tasks/task/{task.pk}/change/", form)
    assert response.status_code == 200
    assert b'<ul class="errorlist nonfield">' in response.content
    assert b"Reload the page" in response.content
    assert Task.objects.get(pk=task.pk).name == "watched"


def test_management_command_publishes(user, task):
    out = io.StringIO()
    update = watch(
        user,
        task,
        lambda: call_command(
            "update_task", str(task.pk), "--status", "failed", "--error", "boom", stdout=out
        ),
    )
    assert (update["status"], update["task"]["error"], update["seq"]) == ("failed", "boom", 2)
    assert "failed" in out.getvalue()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "Nothing to change"),
        (["--progress", "500"], "100"),
    ],
)
def test_management_command_bad_input(task, args, message):
    with pytest.raises(CommandError, match=message):
        call_command("update_task", str(task.pk), *args)


def test_management_command_clears_a_result_with_null(user, task):
    services.update_task(task=task, result={"rows": 1})
    update = watch(
        user, task, lambda: call_command("update_task", str(task.pk), "--result", "null")
    )
    assert update["task"]["result"] is None and Task.objects.get(pk=task.pk).result is None


@pytest.mark.parametrize(
    ("value", "message"), [("{", "not JSON"), ("[" * 5000 + "]" * 5000, "nested too deeply")]
)
def test_management_command_refuses_a_result_that_is_not_json(task, value, message):
    with pytest.raises(CommandError, match=message):
        call_command("update_task", str(task.pk), "--result", value)


def test_management_command_reports_a_database_failure_on_one_line(task, monkeypatch):
    def fails(**changes):
        raise OperationalError("connection refused\n\tIs the server running?")

    monkeypatch.setattr(services, "update_task", fails)
    with pytest.raises(CommandError, match="^Could not change the task: connection refused Is"):
        call_command("update_task", str(task.pk), "--progress", "1")


def test_management_command_whose_publish_fails_says_the_change_is_saved_and_exits_1(
    task, monkeypatch, capsys, caplog
):
    def unreachable(*args):
        raise ConnectionError("layer is down\n\tfor now")

    monkeypatch.setattr(signals, "publish_task_update", unreachable)
    with pytest.raises(CommandError) as raised:
        call_command("update_task", str(task.pk), "--progress", "5")
    assert str(raised.value) == (
        f"The change is saved, but its subscribers were not told (task {task.pk}: ConnectionError:"
        " layer is down for now): they see it with the task's next change, or when they"
        " subscribe again."
    )
    assert capsys.readouterr().out == f"{task.pk} pending 5% seq 2\n"
    assert Task.objects.get(pk=task.pk).seq == 2
    assert "Could not publish" not in caplog.text  # the command says it, once


def test_publish_failures_outside_the_block_are_logged_as_before(task, monkeypatch, caplog):
    def unreachable(*args):
        raise ConnectionError("layer is down")

    monkeypatch.setattr(signals, "publish_task_update", unreachable)
    with api.publish_failures() as failures:
        pass
    services.update_task(task=task, progress=6)
    assert failures == []
    assert f"Could not publish task {task.pk} (unreachable)" in caplog.text


# The command is another process: it must be able to write to the database.
def test_management_command_with_redis_unreachable_exits_1_on_one_line(task):
    closed = f"redis://127.0.0.1:{free_port()}/0"
    result = subprocess.run(
        [sys.executable, "manage.py", "update_task", str(task.pk), "--progress", "9"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": server_database_url(), "REDIS_URL": closed},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith(
        f"CommandError: The change is saved, but its subscribers were not told (task {task.pk}:"
    ), result.stderr
    assert result.stdout == f"{task.pk} pending 9% seq 2\n"
    assert Task.objects.get(pk=task.pk).progress == 9


def test_management_command_without_redis_says_it_reaches_no_server(task, settings, capsys):
    settings.REALTIME = {**settings.REALTIME, "REDIS_URL": ""}
    call_command("update_task", str(task.pk), "--progress", "3")
    captured = capsys.readouterr()
    assert captured.out == f"{task.pk} pending 3% seq 2\n"
    assert captured.err == (
        "REDIS_URL is not set: the change reaches the clients of no server process.\n"
    )


def test_management_command_unknown_task():
    with pytest.raises(CommandError, match="No such task"):
        call_command("update_task", "00000000-0000-0000-0000-000000000000", "--progress", "1")


def test_admin_lists_filters_and_searches_tasks(admin_client, user, other_user):
    services.create_task(owner=user, name="alpha job")
    services.create_task(owner=other_user, name="beta job", status="running")
    listing = admin_client.get("/admin/tasks/task/")
    assert listing.status_code == 200 and b"alpha job" in listing.content
    filtered = admin_client.get("/admin/tasks/task/", {"status__exact": "running"})
    assert b"beta job" in filtered.content and b"alpha job" not in filtered.content
    by_owner = admin_client.get("/admin/tasks/task/", {"owner__id__exact": user.pk})
    assert b"alpha job" in by_owner.content and b"beta job" not in by_owner.content
    searched = admin_client.get("/admin/tasks/task/", {"q": "beta"})
    assert b"beta job" in searched.content and b"alpha job" not in searched.content
