"""The REST API: tokens, tasks, visibility, transitions and the one error shape."""

import base64
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from rest_framework import serializers
from rest_framework.test import APIClient

from mcp_platform.tasks import services
from mcp_platform.tasks.models import Task
from mcp_platform.tasks.serializers import TaskSerializer
from mcp_platform.tasks.views import TaskPages
from tests.conftest import PASSWORD, api_client

pytestmark = pytest.mark.django_db


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code and isinstance(body["detail"], str) and body["detail"]
    return body


def test_token_pair_and_refresh(user):
    client = api_client()
    pair = client.post(
        "/api/token/", {"username": user.username, "password": PASSWORD}, format="json"
    )
    assert pair.status_code == 200
    refreshed = client.post(
        "/api/token/refresh/", {"refresh": pair.json()["refresh"]}, format="json"
    )
    assert refreshed.status_code == 200 and refreshed.json()["access"]


def test_sign_ins_are_throttled_by_client_address(user, settings):
    """Each costs a password hash on one of two request threads: unthrottled, a burst of
    wrong guesses kept every other request waiting, and guessing had no bound."""
    settings.SIGN_INS_PER_MINUTE = 3
    client = api_client()

    def sign_in(password: str, **extra: str) -> Any:
        credentials = {"username": user.username, "password": password}
        return client.post("/api/token/", credentials, format="json", **extra)

    for _ in range(3):
        assert_error(sign_in("a-wrong-guess"), 401, "no_active_account")
    refused = sign_in(PASSWORD)
    assert_error(refused, 429, "throttled")
    assert 0 < int(refused["Retry-After"]) <= 60
    # A header any client may send does not make it another client.
    assert_error(sign_in(PASSWORD, HTTP_X_FORWARDED_FOR="203.0.113.9"), 429, "throttled")
    assert sign_in(PASSWORD, REMOTE_ADDR="203.0.113.9").status_code == 200
    # Refreshing a token costs no hash, and is not counted.
    pair = sign_in(PASSWORD, REMOTE_ADDR="203.0.113.10").json()
    response = client.post("/api/token/refresh/", {"refresh": pair["refresh"]}, format="json")
    assert response.status_code == 200


@pytest.mark.parametrize("gone", ["deleted", "inactive"])
def test_refreshing_the_token_of_a_user_gone_since_is_401_json(user, gone):
    client = api_client()
    pair = client.post(
        "/api/token/", {"username": user.username, "password": PASSWORD}, format="json"
    ).json()
    if gone == "deleted":
        user.delete()
    else:
        user.is_active = False
        user.save()
    response = client.post("/api/token/refresh/", {"refresh": pair["refresh"]}, format="json")
    assert_error(response, 401, "no_active_account")


def test_a_new_password_revokes_the_tokens_issued_before_it(user):
    """Access and refresh tokens alike: after a reset for a stolen password, a stolen
    refresh token minted working access tokens for the rest of its day."""
    client = api_client()
    pair = client.post(
        "/api/token/", {"username": user.username, "password": PASSWORD}, format="json"
    ).json()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {pair['access']}")
    assert client.get("/api/tasks/").status_code == 200
    user.set_password("another-secret-9")
    user.save()
    assert_error(client.get("/api/tasks/"), 401, "password_changed")
    client.credentials()
    response = client.post("/api/token/refresh/", {"refresh": pair["refresh"]}, format="json")
    assert_error(response, 401, "password_changed")
    pair = client.post(
        "/api/token/", {"username": user.username, "password": "another-secret-9"}, format="json"
    ).json()
    response = client.post("/api/token/refresh/", {"refresh": pair["refresh"]}, format="json")
    assert response.status_code == 200


def test_wrong_password_is_401_json(user):
    response = api_client().post(
        "/api/token/", {"username": user.username, "password": "nope"}, format="json"
    )
    assert_error(response, 401, "no_active_account")


def test_unauthenticated_is_401_json():
    assert_error(api_client().get("/api/tasks/"), 401, "not_authenticated")


def test_bad_bearer_token_is_401_json():
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer not-a-token")
    assert_error(client.get("/api/tasks/"), 401, "token_not_valid")


def test_create_answers_201_with_seq_1(user):
    response = api_client(user).post("/api/tasks/", {"name": "build"}, format="json")
    assert response.status_code == 201
    task = response.json()
    assert task["owner"] == user.pk and task["status"] == "pending" and task["seq"] == 1
    assert task["progress"] == 0 and task["result"] is None and task["error"] == ""
    uuid.UUID(task["id"])


def test_create_needs_a_name(user):
    body = assert_error(api_client(user).post("/api/tasks/", {}, format="json"), 400, "required")
    assert "name" in body["errors"]


def test_users_see_their_own_tasks_and_staff_see_all(user, other_user, staff_user):
    mine = services.create_task(owner=user, name="mine")
    theirs = services.create_task(owner=other_user, name="theirs")
    listed = api_client(user).get("/api/tasks/").json()["results"]
    assert [t["id"] for t in listed] == [str(mine.pk)]
    assert {t["id"] for t in api_client(staff_user).get("/api/tasks/").json()["results"]} == {
        str(mine.pk),
        str(theirs.pk),
    }
    assert_error(api_client(user).get(f"/api/tasks/{theirs.pk}/"), 404, "not_found")
    assert_error(
        api_client(user).patch(f"/api/tasks/{theirs.pk}/", {"progress": 5}, format="json"),
        404,
        "not_found",
    )
    assert (
        api_client(staff_user)
        .patch(f"/api/tasks/{theirs.pk}/", {"progress": 5}, format="json")
        .status_code
        == 200
    )


def test_a_listing_comes_in_pages_of_the_newest_first(user, monkeypatch):
    """It answered every task at once, however many there were."""
    created = [services.create_task(owner=user, name=f"t{n}") for n in range(101)]
    client = api_client(user)
    first = client.get("/api/tasks/").json()
    assert len(first["results"]) == 100 and first["previous"] is None
    assert [t["id"] for t in first["results"]] == [str(t.pk) for t in reversed(created)][:100]
    assert [t["id"] for t in client.get(first["next"]).json()["results"]] == [str(created[0].pk)]
    seen, page = [], "/api/tasks/?page_size=7"
    while page:
        body = client.get(page).json()
        seen += [t["id"] for t in body["results"]]
        page = body["next"]
    assert seen == [str(t.pk) for t in reversed(created)]
    monkeypatch.setattr(TaskPages, "max_page_size", 3)
    assert len(client.get("/api/tasks/?page_size=500").json()["results"]) == 3


def test_tasks_created_at_the_same_time_are_each_listed_once(user, other_user, staff_user):
    """Ordered by time alone, PostgreSQL returned ties in any order from one page's query
    to the next, and a staff listing repeated some tasks and lost others."""
    for owner in (user, other_user) * 15:
        services.create_task(owner=owner, name="tied")
    tasks = list(Task.objects.order_by("pk"))
    for group in range(3):
        moment = tasks[0].created_at.replace(microsecond=group)
        Task.objects.filter(pk__in=[t.pk for t in tasks[group::3]]).update(created_at=moment)
    client, seen, page = api_client(staff_user), [], "/api/tasks/?page_size=7"
    while page:
        body = client.get(page).json()
        seen += [t["id"] for t in body["results"]]
        page = body["next"]
    expected = Task.objects.order_by("-created_at", "-id").values_list("pk", flat=True)
    assert seen == [str(pk) for pk in expected]


@pytest.mark.parametrize(
    "position",
    [
        None,  # no cursor at all
        "2026",
        "2026-13-45 00:00:00",
        "9999-12-31 23:59:59.999999-14:00",  # past the year 9999 in UTC
        "2026-01-01 00:00:00",  # no offset from UTC
    ],
)
def test_a_cursor_that_is_none_of_ours_is_a_json_404(user, position):
    """A position no task could have went to the query: a 400, or a 500 past 9999."""
    services.create_task(owner=user, name="listed")
    cursor = "forged" if position is None else base64.b64encode(f"p={position}".encode())
    response = api_client(user).get("/api/tasks/", {"cursor": cursor})
    assert_error(response, 404, "not_found")


def test_tasks_name_their_owner_by_id_without_reading_the_owners(user, staff_user):
    task = services.create_task(owner=user, name="theirs")
    user_table = type(user)._meta.db_table
    client = api_client(staff_user)
    for method, path, body in [
        ("get", "/api/tasks/", None),
        ("get", f"/api/tasks/{task.pk}/", None),
        ("patch", f"/api/tasks/{task.pk}/", {"progress": 5}),
    ]:
        with CaptureQueriesContext(connection) as queries:
            response = getattr(client, method)(path, body, format="json")
        assert response.status_code == 200, response.content
        shown = response.json()
        assert shown.get("results", [shown])[0]["owner"] == user.pk
        # The one read of a user is the requester's, by the token's authentication.
        reads_of_users = [q["sql"] for q in queries if user_table in q["sql"]]
        assert len(reads_of_users) == 1, reads_of_users


def test_unknown_task_and_unknown_path_are_404_json(user):
    assert_error(api_client(user).get(f"/api/tasks/{uuid.uuid4()}/"), 404, "not_found")
    assert_error(api_client(user).get("/api/no-such-thing/"), 404, "not_found")


@pytest.mark.parametrize("task_id", [uuid.uuid4(), "not-a-uuid", "1"])
def test_a_patch_of_no_task_is_404_json_for_users_and_staff(user, staff_user, task, task_id):
    for client in (api_client(user), api_client(staff_user)):
        for _ in range(2):  # the second time, with its SQL compiled already
            response = client.patch(f"/api/tasks/{task_id}/", {"progress": 5}, format="json")
            assert_error(response, 404, "not_found")
    task.refresh_from_db()
    assert task.progress == 0


def test_the_api_takes_its_paths_with_or_without_the_last_slash(user):
    """Django would answer a 301 to add it, which clients follow with a body-less GET."""
    client = api_client()
    credentials = {"username": user.username, "password": PASSWORD}
    pair = client.post("/api/token", credentials, format="json")
    assert pair.status_code == 200
    refreshed = client.post(
        "/api/token/refresh", {"refresh": pair.json()["refresh"]}, format="json"
    )
    assert refreshed.status_code == 200
    client = api_client(user)
    created = client.post("/api/tasks", {"name": "t"}, format="json")
    assert created.status_code == 201
    patched = client.patch(f"/api/tasks/{created.json()['id']}", {"progress": 5}, format="json")
    assert (patched.status_code, patched.json()["progress"]) == (200, 5)
    assert client.get("/api/tasks").status_code == 200


def test_patch_changes_and_advances_seq(user):
    task = services.create_task(owner=user, name="t")
    response = api_client(user).patch(
        f"/api/tasks/{task.pk}/",
        {"status": "completed", "progress": 100, "result": {"rows": 3}},
        format="json",
    )
    assert response.status_code == 200
    body = response.json()
    assert (body["status"], body["progress"], body["result"], body["seq"]) == (
        "completed",
        100,
        {"rows": 3},
        2,
    )


@pytest.mark.parametrize("finished", ["completed", "failed", "cancelled"])
def test_leaving_a_finished_state_is_400(user, finished):
    task = services.create_task(owner=user, name="t", status=finished)
    body = assert_error(
        api_client(user).patch(f"/api/tasks/{task.pk}/", {"status": "running"}, format="json"),
        400,
        "invalid_transition",
    )
    assert "status" in body["errors"]
    task.refresh_from_db()
    assert (task.status, task.seq) == (finished, 1)


@pytest.mark.parametrize(
    ("progress", "code"), [(-1, "min_value"), (101, "max_value"), ("lots", "invalid")]
)
def test_progress_outside_0_to_100_is_400(user, progress, code):
    task = services.create_task(owner=user, name="t")
    response = api_client(user).patch(
        f"/api/tasks/{task.pk}/", {"progress": progress}, format="json"
    )
    assert_error(response, 400, code)


@pytest.mark.parametrize("method", ["post", "patch"])
def test_a_field_the_task_does_not_have_is_400(user, method):
    task = services.create_task(owner=user, name="t")
    client = api_client(user)
    if method == "post":
        response = client.post("/api/tasks/", {"name": "n", "progres": 50}, format="json")
    else:
        response = client.patch(f"/api/tasks/{task.pk}/", {"progres": 50}, format="json")
    body = assert_error(response, 400, "unknown_field")
    assert body["errors"] == {"progres": ["Unknown field."]}
    assert Task.objects.get() == task and Task.objects.get().seq == 1


def test_unknown_status_is_400(user):
    task = services.create_task(owner=user, name="t")
    assert_error(
        api_client(user).patch(f"/api/tasks/{task.pk}/", {"status": "exploded"}, format="json"),
        400,
        "invalid_choice",
    )


def test_put_and_delete_are_not_allowed(user):
    task = services.create_task(owner=user, name="t")
    assert_error(api_client(user).delete(f"/api/tasks/{task.pk}/"), 405, "method_not_allowed")
    assert_error(
        api_client(user).put(f"/api/tasks/{task.pk}/", {"name": "x"}, format="json"),
        405,
        "method_not_allowed",
    )


def test_non_json_body_is_415_json(user):
    response = api_client(user).post(
        "/api/tasks/", "name=x", content_type="application/x-www-form-urlencoded"
    )
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize("method", ["post", "patch"])
def test_a_body_over_djangos_memory_limit_is_413_json(user, settings, method):
    """Django answered 400 ``bad_request``, and logged an error."""
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    task = services.create_task(owner=user, name="t")
    path = "/api/tasks/" if method == "post" else f"/api/tasks/{task.pk}/"
    body = {"name": "n", "result": "x" * 2000}
    assert_error(
        getattr(api_client(user), method)(path, body, format="json"), 413, "payload_too_large"
    )
    assert Task.objects.get().seq == 1


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_chunked_body_is_read_over_daphne(daphne_server, user):
    """Without ``Content-Length`` (``Transfer-Encoding: chunked``), Django REST framework
    read the body as empty: a login was answered "This field is required."."""
    import aiohttp
    from asgiref.sync import async_to_sync

    async def chunks():
        yield json.dumps({"username": user.username}).encode()[:-1]
        yield json.dumps({"password": PASSWORD}).encode().replace(b"{", b", ", 1)

    async def scenario():
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{daphne_server.http_url}/api/token/",
                data=chunks(),
                headers={"Content-Type": "application/json"},
            ) as response:
                assert response.request_info.headers.get("Content-Length") is None
                return response.status, await response.json()

    status, answer = async_to_sync(scenario)()
    assert status == 200 and answer.keys() == {"access", "refresh"}


def test_malformed_json_is_400_json(user):
    response = api_client(user).post("/api/tasks/", "{nope", content_type="application/json")
    assert_error(response, 400, "parse_error")


def test_django_level_errors_are_json_too(user):
    # More query parameters than DATA_UPLOAD_MAX_NUMBER_FIELDS is refused by Django itself.
    query = "&".join(f"f{i}=1" for i in range(1100))
    response = APIClient(raise_request_exception=False).get(f"/api/tasks/?{query}")
    assert_error(response, 400, "bad_request")


@pytest.mark.parametrize(
    "result",
    [
        {"text": "nul\u0000inside"},
        {"text": "lone \ud800"},
        [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]],
    ],
)
def test_result_that_cannot_be_stored_or_sent_is_400(user, result):
    task = services.create_task(owner=user, name="t")
    body = json.dumps({"result": result})  # escapes the surrogate, as a client's JSON would
    response = api_client(user).patch(
        f"/api/tasks/{task.pk}/", body, content_type="application/json"
    )
    assert_error(response, 400, "invalid")


def test_json_nested_too_deeply_to_parse_is_400(user):
    body = "[" * 100_000 + "]" * 100_000
    response = api_client(user).post("/api/tasks/", body, content_type="application/json")
    assert_error(response, 400, "parse_error")


def test_serializers_do_not_share_fields_or_validators():
    first, second = TaskSerializer(), TaskSerializer()
    assert first.fields["status"] is not second.fields["status"]
    assert (first.fields["status"].parent, second.fields["status"].parent) == (first, second)
    assert first.validators is not second.validators


def test_serializers_have_the_fields_and_validators_drf_derives():
    """Derived once per class, copied for each serializer: the same as DRF's own."""
    ours = TaskSerializer()
    drfs = serializers.ModelSerializer.get_fields(ours)
    assert {name: repr(field) for name, field in ours.fields.items()} == {
        name: repr(field) for name, field in drfs.items()
    }
    assert {name: vars(field).keys() for name, field in TaskSerializer().get_fields().items()} == {
        name: vars(field).keys() for name, field in drfs.items()
    }
    assert ours.validators == serializers.ModelSerializer.get_validators(ours)


@contextmanager
def another_writer_holding(task: Task, **changes: Any) -> Iterator[None]:
    """Another writer, in a thread: it locks the task's row, holds it for 0.5 s, then saves
    ``changes``. The block runs while the lock is held; leaving it waits for the commit."""
    locked = threading.Event()

    def change_slowly() -> None:
        try:
            with transaction.atomic():
                row = Task.objects.select_for_update().get(pk=task.pk)
                locked.set()
                time.sleep(0.5)
                for name, value in changes.items():
                    setattr(row, name, value)
                row.save()
        finally:
            connection.close()

    writer = threading.Thread(target=change_slowly)
    writer.start()
    try:
        assert locked.wait(5)
        yield
    finally:
        writer.join()


@pytest.mark.django_db(transaction=True)
def test_a_transition_is_checked_against_the_status_a_concurrent_writer_commits(user):
    """The status read for the check waits for the row lock of a writer in progress."""
    task = services.create_task(owner=user, name="t", status="running")
    stale = Task.objects.get(pk=task.pk)
    with (
        another_writer_holding(task, status="completed"),
        pytest.raises(ValidationError, match="cannot become"),
    ):
        services.update_task(task=stale, status="pending")
    task.refresh_from_db()
    assert (task.status, task.seq) == ("completed", 2)


def test_an_update_does_not_undo_a_change_committed_since_its_task_was_read(user):
    task = services.create_task(owner=user, name="t")
    stale = Task.objects.get(pk=task.pk)  # a PATCH's read, before another writer's change
    services.update_task(task=task, status="running", result={"rows": 1})
    saved = services.update_task(task=stale, progress=50)
    stored = Task.objects.values("status", "result", "progress", "seq").get(pk=task.pk)
    assert stored == {"status": "running", "result": {"rows": 1}, "progress": 50, "seq": 3}
    assert (saved.status, saved.result, saved.progress, saved.seq) == (
        "running",
        {"rows": 1},
        50,
        3,
    )


def test_a_task_deleted_since_it_was_read_is_not_brought_back(user):
    task = services.create_task(owner=user, name="t")
    services.update_task(task=task, progress=10)
    stale = Task.objects.get(pk=task.pk)
    Task.objects.filter(pk=task.pk).delete()
    with pytest.raises(Task.DoesNotExist):
        services.update_task(task=stale, progress=20)
    stale.progress = 30
    with pytest.raises(Task.DoesNotExist):
        stale.save()  # as the admin's form would, or any other caller
    assert not Task.objects.filter(pk=task.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_a_patch_is_applied_on_top_of_a_change_being_committed(user):
    """A PATCH that arrives while another writer holds the task reads it once that writer
    has committed, and keeps the fields it did not send."""
    task = services.create_task(owner=user, name="t")
    with another_writer_holding(task, status="running", result={"rows": 1}):
        response = api_client(user).patch(f"/api/tasks/{task.pk}/", {"progress": 50}, format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["status"], body["result"], body["progress"], body["seq"]) == (
        "running",
        {"rows": 1},
        50,
        3,
    )
    stored = Task.objects.values("status", "result", "progress", "seq").get(pk=task.pk)
    assert stored == {"status": "running", "result": {"rows": 1}, "progress": 50, "seq": 3}


@pytest.mark.django_db
def test_no_save_leaves_a_finished_status_and_the_callers_transaction_goes_on(user):
    task = services.create_task(owner=user, name="t", status="completed")
    task.status = "running"
    with transaction.atomic():
        with pytest.raises(ValidationError, match="cannot become running"):
            task.save()
        assert Task.objects.filter(pk=task.pk).values_list("status", "seq").get() == (
            "completed",
            1,
        )


@pytest.mark.parametrize("path", ["/metrics", "/metrics/"])
def test_prometheus_scrapes_the_request_counters_with_or_without_the_last_slash(user, path):
    api_client(user).get("/api/tasks/")
    response = APIClient().get(path)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    assert b"django_http_requests_total_by_method_total" in response.content
