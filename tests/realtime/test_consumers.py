"""The WebSocket consumer through the full ASGI stack (origin check, auth, routing)."""

import asyncio
import contextlib
import json
import logging
import math
import uuid
from datetime import timedelta

import channels.auth
import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db import OperationalError
from django.test import override_settings
from hypothesis import given
from hypothesis import strategies as st
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from mcp_platform.tasks import services
from mcp_platform.tasks.models import Task
from mcp_platform.tasks.realtime import TaskSource
from realtime import api, auth, connections, inbox_consumer
from realtime.connections import get_connection_manager
from realtime.consumers import TaskConsumer, utf8_length_exceeds
from realtime.failures import failure_text
from realtime.inbox import Inbox
from realtime.inbox_consumer import DEADLINE_PASSED
from realtime.protocol import CloseCode, expiry_iso
from realtime.sources import TaskSnapshot
from tests.conftest import (
    connect_user,
    logged_ends,
    make_communicator,
    open_websocket,
    run,
    token_for,
)

pytestmark = pytest.mark.django_db(transaction=True)


async def request(communicator, message, timeout=5):
    await communicator.send_to(
        text_data=json.dumps(message) if not isinstance(message, str) else message
    )
    return await communicator.receive_json_from(timeout=timeout)


async def assert_closed_with(communicator, code):
    output = await communicator.receive_output(timeout=5)
    assert output == {"type": "websocket.close", "code": code}


def test_connected_names_the_connection_and_user(user):
    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            message = await connect_user(ws)
            assert message["user_id"] == user.pk
            uuid.UUID(message["connection_id"])
            assert await get_connection_manager().count_user_connections(user.pk) == 1

    run(scenario)


def test_the_handshake_is_answered_once_the_connection_is_recorded(user, monkeypatch):
    """A client whose handshake completed is already counted, and its answer and
    ``connected`` go out together: nothing is sent while the registry write is pending."""
    manager = get_connection_manager()
    recording = asyncio.Event()
    release = asyncio.Event()
    add = manager.registry.add

    async def slow_add(entry, limit=0):
        recording.set()
        await release.wait()
        return await add(entry, limit)

    monkeypatch.setattr(manager.registry, "add", slow_add)

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await ws.send_input({"type": "websocket.connect"})
            await asyncio.wait_for(recording.wait(), 5)
            assert await ws.receive_nothing(timeout=0.2)
            release.set()
            accepted = await ws.receive_output(timeout=5)
            assert accepted == {"type": "websocket.accept", "subprotocol": None}
            assert (await ws.receive_json_from(timeout=5))["type"] == "connected"
            assert await manager.count_user_connections(user.pk) == 1

    run(scenario)


def test_trailing_slash_route(user):
    async def scenario():
        async with open_websocket(f"/ws/?token={token_for(user)}") as ws:
            await connect_user(ws)

    run(scenario)


@pytest.mark.parametrize("path", ["/", "/nope", "/ws/extra", "/wss", "/events", "/broadcast"])
def test_a_handshake_on_another_path_is_refused_before_credentials_are_read(
    user, path, monkeypatch
):
    def read(*args):
        raise AssertionError("credentials read for a path with no endpoint")

    monkeypatch.setattr(auth, "validated_token", read)
    monkeypatch.setattr(auth, "session_user", read)

    async def scenario():
        async with open_websocket(f"{path}?token={token_for(user)}") as ws:
            accepted, _ = await ws.connect(timeout=5)
            assert not accepted

    run(scenario)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/ws", "no credentials given"),
        ("/ws?token=", "No token given."),
        ("/ws?token=garbage", "Token is invalid"),
    ],
)
def test_missing_or_bad_credentials_are_accepted_then_closed_4401(path, why, caplog):
    async def scenario():
        async with open_websocket(path) as ws:
            accepted, _ = await ws.connect(timeout=5)
            assert accepted
            await assert_closed_with(ws, CloseCode.UNAUTHORIZED)
            assert await ws.receive_nothing(timeout=0.1)

    caplog.set_level(logging.INFO, logger="realtime")
    run(scenario)
    assert logged_ends(caplog) == [f"Refused a WebSocket 4401: {why}"]


@pytest.fixture
def session_cookie(client, user) -> tuple[bytes, bytes]:
    """The cookie header of a logged-in session of ``user``."""
    client.force_login(user)
    return (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())


def test_session_login_authenticates(session_cookie, user):
    async def scenario():
        async with open_websocket("/ws", headers=[session_cookie]) as ws:
            connected = await connect_user(ws)
            assert (connected["user_id"], connected["expires_at"]) == (user.pk, None)

    run(scenario)


@pytest.mark.parametrize("ending", ["logout", "deactivation", "password change"])
def test_a_session_connection_ends_4401_once_a_check_finds_its_session_ended(
    client, session_cookie, user, task, ending, caplog
):
    """It used to live on, streaming, after its user logged out or was deactivated."""

    def end_session():
        if ending == "logout":
            client.logout()
        elif ending == "deactivation":
            type(user).objects.filter(pk=user.pk).update(is_active=False)
        else:
            user.set_password("another-secret-9")
            user.save()

    async def scenario():
        manager = get_connection_manager()
        async with open_websocket("/ws", headers=[session_cookie]) as ws:
            await connect_user(ws)
            await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            await asyncio.sleep(0.5)  # checked, and still valid
            assert (await request(ws, {"action": "ping"}))["type"] == "pong"
            await database_sync_to_async(end_session)()
            await assert_closed_with(ws, CloseCode.UNAUTHORIZED)
            assert await manager.count_connections() == 0
            await database_sync_to_async(services.update_task)(task=task, progress=5)
            assert await ws.receive_nothing(timeout=0.2)

    caplog.set_level(logging.INFO, logger="realtime")
    with override_settings(REALTIME={**settings.REALTIME, "SESSION_RECHECK_SECONDS": 0.2}):
        run(scenario)
    # A new password is an access change, told at once; the others wait for the check.
    [why] = logged_ends(caplog)
    assert why in ("its session ended", "its user's access changed")


def test_a_session_check_that_fails_leaves_the_connection_to_the_next(
    client, session_cookie, user, monkeypatch
):
    """Ending every session's connection when the database fails over would have them
    all reconnect at once; the check is made again later."""
    failed = []

    async def unreachable(*args):
        failed.append(args)
        raise OperationalError("the database is unreachable")

    async def scenario():
        async with open_websocket("/ws", headers=[session_cookie]) as ws:
            await connect_user(ws)
            with monkeypatch.context() as patched:
                patched.setattr(inbox_consumer, "session_user", unreachable)
                await asyncio.sleep(2.2)  # checks that failed (timers keep whole seconds)
                assert (await request(ws, {"action": "ping"}))["type"] == "pong"
            await database_sync_to_async(client.logout)()
            await assert_closed_with(ws, CloseCode.UNAUTHORIZED)

    with override_settings(REALTIME={**settings.REALTIME, "SESSION_RECHECK_SECONDS": 0.2}):
        run(scenario)
    assert len(failed) >= 1


@pytest.mark.parametrize(
    ("failure", "logged"),
    [
        (OperationalError("server closed the connection unexpectedly"), ("WARNING", False)),
        (RuntimeError("a bug of the source's"), ("ERROR", True)),
        (None, ("ERROR", True)),  # no exception: an answer short
    ],
    ids=["database", "source", "answers short"],
)
def test_a_subscribe_the_source_fails_is_answered_unavailable_and_nothing_ends(
    user, task, monkeypatch, caplog, failure, logged
):
    """Raised, the failure ended every connection whose subscribe was read in the same
    batch (1011 under Daphne). It is logged once for the batch: a database's in one line,
    a bug of the source's with its traceback."""
    read = TaskSource.get_visible_many
    failures = []

    def fails_once(self, requests):
        if not failures:
            failures.append(len(requests))
            if failure is None:
                return read(self, requests)[:-1]
            raise failure
        return read(self, requests)

    monkeypatch.setattr(TaskSource, "get_visible_many", fails_once)

    async def scenario():
        manager = get_connection_manager()
        async with (
            open_websocket(f"/ws?token={token_for(user)}") as first,
            open_websocket(f"/ws?token={token_for(user)}") as second,
        ):
            for ws in (first, second):
                await connect_user(ws)
            for number, ws in enumerate((first, second)):  # read in one batch, mostly
                await ws.send_json_to(
                    {"action": "subscribe", "task_id": str(task.pk), "id": number}
                )
            replies = [await ws.receive_json_from(timeout=5) for ws in (first, second)]
            refused = [reply for reply in replies if reply["type"] == "error"]
            assert [reply["code"] for reply in refused] == ["unavailable"] * failures[0]
            subscribed = len(replies) - len(refused)
            assert await manager.count_task_subscribers(task.pk) == subscribed
            for ws in (first, second):  # neither ended
                reply = await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
                assert reply["type"] == "subscribed"
        # On Redis the second may join once the first's join was confirmed, and be read
        # in a batch of its own.
        assert failures in ([2], [1])

    with caplog.at_level(logging.WARNING, logger="realtime.connections"):
        run(scenario)
    assert [
        (record.levelname, record.exc_info is not None, record.getMessage())
        for record in caplog.records
        if record.name == "realtime.connections"
    ] == [
        (
            *logged,
            f"Could not read tasks for {failures[0]} subscriptions: {failure_text(failure)}"
            if not logged[1]
            else f"The task source failed to read tasks for {failures[0]} subscriptions",
        )
    ]


def test_a_subscribe_the_channel_layer_fails_is_answered_unavailable_and_nothing_ends(
    user, task, monkeypatch, caplog
):
    """Raised, a failed join (Redis away, or not confirming the subscription) ended the
    connection. It is logged in one line: with a traceback each, one client asking again
    and again during an outage wrote 130,000 lines in 40 s."""
    manager = get_connection_manager()
    join = type(manager.layer).group_add
    failures = []

    async def fails_once(self, group, channel):
        if group.startswith("task.") and not failures:
            failures.append(group)
            raise ConnectionError("Redis is away")
        await join(self, group, channel)

    monkeypatch.setattr(type(manager.layer), "group_add", fails_once)

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            reply = await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            assert (reply["type"], reply["code"]) == ("error", "unavailable"), reply
            assert await manager.count_task_subscribers(task.pk) == 0
            reply = await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            assert reply["type"] == "subscribed"
            assert await manager.count_task_subscribers(task.pk) == 1
        assert failures == [f"task.{task.pk}"]

    run(scenario)
    [logged] = [record for record in caplog.records if record.name == "realtime.connections"]
    assert "Redis is away" in logged.getMessage() and logged.exc_info is None


@pytest.mark.parametrize("refusal", ["not_found", "unavailable"])
def test_a_refused_subscribe_whose_group_cannot_be_left_is_still_answered(
    user, task, monkeypatch, caplog, refusal
):
    """Leaving the group again after a refusal (Redis away since the join) raised, and
    ended the connection with 1011 instead of the refusal's answer."""
    manager = get_connection_manager()
    leave = type(manager.layer).group_discard
    failures = []

    async def fails(self, group, channel):
        if group.startswith("task."):
            failures.append(group)
            raise ConnectionError("Redis is away")
        await leave(self, group, channel)

    def unreadable(self, requests):
        raise OperationalError("the database is unreachable")

    monkeypatch.setattr(type(manager.layer), "group_discard", fails)
    if refusal == "unavailable":
        monkeypatch.setattr(TaskSource, "get_visible_many", unreadable)
    task_id = uuid.uuid4() if refusal == "not_found" else task.pk

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            reply = await request(ws, {"action": "subscribe", "task_id": str(task_id)})
            assert (reply["type"], reply["code"]) == ("error", refusal), reply
            assert (await request(ws, {"action": "ping"}))["type"] == "pong"

    run(scenario)
    assert failures == [f"task.{task_id}"]
    assert f"Could not leave the group of task {task_id}: ConnectionError: Redis is away" in [
        record.getMessage() for record in caplog.records if record.name == "realtime.connections"
    ]


def test_a_subscription_the_registry_fails_to_count_is_served_and_ends_all_the_same(
    user, task, monkeypatch
):
    """Raised, a failed registry write (Redis away) ended the connection. The registry
    only counts; its next renewal writes what this process holds."""
    manager = get_connection_manager()
    failed = []

    async def away(entry, task_id):
        failed.append(task_id)
        raise ConnectionError("Redis is away")

    monkeypatch.setattr(manager.registry, "add_subscription", away)
    monkeypatch.setattr(manager.registry, "remove_subscription", away)

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            reply = await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            assert reply["type"] == "subscribed"
            await database_sync_to_async(services.update_task)(task=task, progress=5)
            assert (await ws.receive_json_from(timeout=5))["seq"] == 2
            reply = await request(ws, {"action": "unsubscribe", "task_id": str(task.pk)})
            assert reply["type"] == "unsubscribed"
            assert (await request(ws, {"action": "ping"}))["type"] == "pong"

    run(scenario)
    assert failed == [task.pk, task.pk]


def test_an_unsubscribe_the_channel_layer_fails_ends_the_subscription_not_the_connection(
    user, task, monkeypatch
):
    """The connection may still be a member of the task's group: its updates are dropped
    all the same."""
    layer = type(get_connection_manager().layer)
    leave = layer.group_discard

    async def fails_for_tasks(self, group, channel):
        if group.startswith("task."):
            raise ConnectionError("Redis is away")
        await leave(self, group, channel)

    monkeypatch.setattr(layer, "group_discard", fails_for_tasks)

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            reply = await request(ws, {"action": "unsubscribe", "task_id": str(task.pk)})
            assert reply["type"] == "unsubscribed"
            await database_sync_to_async(services.update_task)(task=task, progress=5)
            assert await ws.receive_nothing(timeout=0.3)
            assert (await request(ws, {"action": "ping"}))["type"] == "pong"

    run(scenario)


@pytest.mark.parametrize("how", ["token", "session"])
def test_credentials_the_database_cannot_check_are_closed_4503(
    user, monkeypatch, caplog, session_cookie, how
):
    """Raised, the failure was a 500 with a traceback logged, for every handshake while the
    database was away."""

    async def unreachable(*args):
        raise OperationalError("server closed the connection unexpectedly")

    if how == "token":
        path, headers = f"/ws?token={token_for(user)}", []
        monkeypatch.setattr(auth._user_batcher, "fetch_many", unreachable)
    else:
        path, headers = "/ws", [session_cookie]
        monkeypatch.setattr(channels.auth, "get_user", unreachable)

    async def scenario():
        async with open_websocket(path, headers=headers) as ws:
            accepted, _ = await ws.connect(timeout=5)
            assert accepted
            await assert_closed_with(ws, CloseCode.UNAVAILABLE)

    run(scenario)
    assert not [record for record in caplog.records if record.levelname == "ERROR"]
    # Said, in one line: an operator whose clients only connect saw no sign of the outage.
    [warning] = [record for record in caplog.records if record.name == "realtime.auth"]
    what = "user" if how == "token" else "session"
    assert warning.getMessage() == (
        f"Could not read a connection's {what}: OperationalError: server closed the connection"
        " unexpectedly"
    )


@pytest.mark.parametrize("token", ["bad", ""])
def test_bad_token_beside_a_valid_session_is_refused(session_cookie, token):
    async def scenario():
        async with open_websocket(f"/ws?token={token}", headers=[session_cookie]) as ws:
            await ws.connect(timeout=5)
            await assert_closed_with(ws, CloseCode.UNAUTHORIZED)

    run(scenario)


def test_a_bad_token_beside_a_valid_one_is_refused(user):
    """Two ``token`` parameters: the last one was taken, and a bad first one dropped."""

    async def scenario():
        async with open_websocket(f"/ws?token=bad&token={token_for(user)}") as ws:
            await ws.connect(timeout=5)
            await assert_closed_with(ws, CloseCode.UNAUTHORIZED)

    run(scenario)


@pytest.mark.parametrize(
    ("origin", "accepted"),
    [
        (None, True),
        (b"http://localhost:8000", True),
        (b"https://evil.example", False),
        (b"http://[::1", False),  # no URL at all (an unclosed IPv6 bracket)
    ],
)
def test_origin_must_be_an_allowed_host_when_sent(user, origin, accepted):
    headers = [] if origin is None else [(b"origin", origin)]

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}", headers=headers) as ws:
            # Refused before accepting, which Daphne answers with 403 (see the end-to-end test).
            result, _ = await ws.connect(timeout=5)
            assert result is accepted

    run(scenario)


@pytest.mark.parametrize(
    ("origin", "trusted", "accepted"),
    [
        (None, [], True),
        (b"http://localhost:8000", [], True),  # the server's own
        (b"http://localhost:1234", [], False),  # another port of the same host
        (b"https://localhost:8000", [], False),  # another scheme
        (b"http://127.0.0.1:8000", [], False),  # another allowed host
        (b"http://localhost:1234", ["http://localhost:1234"], True),
        (b"https://localhost", ["https://*.localhost"], True),
        (b"https://app.example.com", ["https://*.example.com"], True),  # no allowed host
        (b"http://app.example.com", ["https://*.example.com"], False),  # not its scheme
    ],
)
def test_a_session_handshake_must_come_from_the_servers_own_origin(
    session_cookie, user, origin, trusted, accepted
):
    """The allowed hosts let any port and scheme of a host through: a page on another port,
    or a plain-http page of the site, opened a WebSocket on the user's session. Others are
    let in as Django's CSRF protection lets them post (``CSRF_TRUSTED_ORIGINS``)."""
    headers = [(b"host", b"localhost:8000"), session_cookie]
    headers += [] if origin is None else [(b"origin", origin)]

    async def scenario():
        async with open_websocket("/ws", headers=headers) as ws:
            result, _ = await ws.connect(timeout=5)
            assert result is accepted
            if accepted:
                assert (await ws.receive_json_from(timeout=5))["user_id"] == user.pk

    with override_settings(CSRF_TRUSTED_ORIGINS=trusted):
        run(scenario)


def test_a_session_handshake_with_a_query_of_undecodable_bytes_is_checked_not_crashed(
    session_cookie, user
):
    """The origin check built Django's request of the handshake, whose query it decodes."""
    headers = [(b"host", b"localhost:8000"), (b"origin", b"http://localhost:8000"), session_cookie]

    communicator = make_communicator("/ws", headers=headers)
    communicator.scope["query_string"] = b"x=\xff"

    async def scenario():
        try:
            assert (await connect_user(communicator))["user_id"] == user.pk
        finally:
            await communicator.disconnect()

    run(scenario)


def test_a_token_handshake_may_come_from_any_allowed_host(user):
    """A token is no ambient credential: a page holds it only if its script was given it."""
    headers = [(b"host", b"localhost:8000"), (b"origin", b"http://localhost:1234")]

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}", headers=headers) as ws:
            assert (await connect_user(ws))["user_id"] == user.pk

    run(scenario)


def test_subscribe_ping_and_unsubscribe_echo_ids(user, task):
    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            subscribed = await request(
                ws, {"action": "subscribe", "task_id": str(task.pk), "id": 7}
            )
            assert subscribed == {
                "type": "subscribed",
                "task_id": str(task.pk),
                "seq": 1,
                "task": subscribed["task"],
                "id": 7,
            }
            assert subscribed["task"]["id"] == str(task.pk)
            assert subscribed["task"]["status"] == "pending"
            pong = await request(ws, {"action": "ping", "id": "p"})
            assert pong["type"] == "pong" and pong["id"] == "p" and "T" in pong["timestamp"]
            for _ in range(2):  # idempotent
                reply = await request(ws, {"action": "unsubscribe", "task_id": str(task.pk)})
                assert reply == {"type": "unsubscribed", "task_id": str(task.pk)}

    run(scenario)


def test_subscribing_twice_delivers_each_update_once(user, task):
    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            for _ in range(2):
                reply = await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
                assert reply["type"] == "subscribed"
            await database_sync_to_async(services.update_task)(task=task, progress=10)
            update = await ws.receive_json_from(timeout=5)
            assert (update["type"], update["seq"], update["progress"]) == ("task_update", 2, 10)
            assert await ws.receive_nothing(timeout=0.3)

    run(scenario)


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{oops", "invalid_json"),
        ("[" * 5_000, "invalid_json"),  # nested deeper than Python's parser goes
        ("[]", "invalid_message"),
        ('{"id": 1}', "invalid_message"),
        ('{"action": ["subscribe"]}', "invalid_message"),
        ('{"action": "fly"}', "unknown_action"),
        ('{"action": "subscribe"}', "invalid_task_id"),
        ('{"action": "subscribe", "task_id": "1234"}', "invalid_task_id"),
        ('{"action": "unsubscribe", "task_id": null}', "invalid_task_id"),
        (json.dumps({"action": "subscribe", "task_id": str(uuid.uuid4())}), "not_found"),
    ],
)
def test_bad_input_gets_an_error_and_the_connection_stays_open(user, frame, code):
    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            error = await request(ws, frame)
            assert error["type"] == "error" and error["code"] == code and error["message"]
            assert (await request(ws, {"action": "ping"}))["type"] == "pong"

    run(scenario)


def test_another_users_task_is_not_found_like_a_missing_one(user, other_user):
    theirs = services.create_task(owner=other_user, name="private")

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            error = await request(ws, {"action": "subscribe", "task_id": str(theirs.pk), "id": "x"})
            missing = await request(
                ws, {"action": "subscribe", "task_id": str(uuid.uuid4()), "id": "x"}
            )
            assert (
                error
                == missing
                == {
                    "type": "error",
                    "code": "not_found",
                    "message": "No such task.",
                    "id": "x",
                }
            )
            # Nothing of the other user's task leaks through afterwards.
            await database_sync_to_async(services.update_task)(task=theirs, progress=50)
            assert await ws.receive_nothing(timeout=0.3)
            assert await get_connection_manager().count_task_subscribers(theirs.pk) == 0

    run(scenario)


@pytest.mark.parametrize(
    ("change", "notice"), [("given away", "unsubscribed"), ("deleted", "task_deleted")]
)
def test_a_subscription_whose_task_is_given_away_or_deleted_ends_with_a_notice(
    user, other_user, change, notice
):
    task = services.create_task(owner=user, name="mine, then not")

    def end_it() -> None:
        if change == "deleted":
            Task.objects.filter(pk=task.pk).delete()
        else:
            task.owner = other_user  # as the admin may
            task.save()

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            await database_sync_to_async(end_it)()
            received = await ws.receive_json_from(timeout=5)
            assert (received["type"], received["task_id"]) == (notice, str(task.pk))
            if change == "given away":  # nothing more of it reaches its former owner
                await database_sync_to_async(services.update_task)(task=task, progress=60)
                assert await ws.receive_nothing(timeout=0.3)
            assert await get_connection_manager().count_task_subscribers(task.pk) == 0
            assert (await request(ws, {"action": "ping"}))["type"] == "pong"

    run(scenario)


def test_subscribing_again_to_a_task_no_longer_visible_ends_the_subscription(
    staff_user, other_user
):
    theirs = services.create_task(owner=other_user, name="seen while staff")

    def demote() -> None:
        staff_user.is_staff = False
        staff_user.save()

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(staff_user)}") as ws:
            await connect_user(ws)
            await request(ws, {"action": "subscribe", "task_id": str(theirs.pk)})
            await database_sync_to_async(demote)()
            error = await request(ws, {"action": "subscribe", "task_id": str(theirs.pk)})
            assert error["code"] == "not_found"
            assert await get_connection_manager().count_task_subscribers(theirs.pk) == 0
            await database_sync_to_async(services.update_task)(task=theirs, progress=5)
            assert await ws.receive_nothing(timeout=0.3)

    run(scenario)


@pytest.mark.parametrize("through", ["save", "queryset update"])
@pytest.mark.parametrize("change", ["promoted", "demoted"])
def test_updates_follow_the_staff_status_read_at_the_last_subscribe(
    user, other_user, change, through
):
    """Promoted since connecting: another user's task, subscribed to, goes on updating.
    Demoted: their own task, given away, ends like any other user's. A change that sends
    no signal (``QuerySet.update()``) is read at the subscribe all the same."""
    user.is_staff = change == "demoted"
    user.save()
    token = token_for(user)
    task = services.create_task(owner=other_user if change == "promoted" else user, name="t")

    def change_status() -> None:
        user.is_staff = change == "promoted"
        if through == "save":
            user.save()
        else:
            type(user).objects.filter(pk=user.pk).update(is_staff=user.is_staff)

    def give_away() -> None:
        task.owner = other_user
        task.save()

    async def scenario():
        async with open_websocket(f"/ws?token={token}") as ws:
            await connect_user(ws)
            await database_sync_to_async(change_status)()
            await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            if change == "promoted":
                await database_sync_to_async(services.update_task)(task=task, progress=5)
                update = await ws.receive_json_from(timeout=5)
                assert (update["type"], update["seq"]) == ("task_update", 2)
            else:
                await database_sync_to_async(give_away)()
                notice = await ws.receive_json_from(timeout=5)
                assert (notice["type"], notice["task_id"]) == ("unsubscribed", str(task.pk))
                assert await ws.receive_nothing(timeout=0.3)

    run(scenario)


def test_staff_may_subscribe_to_any_task(staff_user, task):
    async def scenario():
        async with open_websocket(f"/ws?token={token_for(staff_user)}") as ws:
            await connect_user(ws)
            reply = await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            assert reply["type"] == "subscribed"

    run(scenario)


def test_subscription_limit(user, settings):
    settings.REALTIME = {**settings.REALTIME, "SUBSCRIPTION_LIMIT": 2}
    tasks = [services.create_task(owner=user, name=f"t{i}") for i in range(3)]

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            for task in tasks[:2]:
                assert (await request(ws, {"action": "subscribe", "task_id": str(task.pk)}))[
                    "type"
                ] == "subscribed"
            error = await request(ws, {"action": "subscribe", "task_id": str(tasks[2].pk)})
            assert error["code"] == "subscription_limit"
            # Re-subscribing to a held task is still fine at the limit.
            again = await request(ws, {"action": "subscribe", "task_id": str(tasks[0].pk)})
            assert again["type"] == "subscribed"

    run(scenario)


def test_binary_frames_are_invalid_messages(user):
    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            await ws.send_to(bytes_data=b'{"action": "ping"}')
            error = await ws.receive_json_from(timeout=5)
            assert error["code"] == "invalid_message"

    run(scenario)


@given(text=st.text(max_size=100), limit=st.integers(0, 400))
def test_a_frames_length_is_its_utf8_bytes_whatever_its_characters(text, limit):
    """Four bytes each, emoji could have let a frame of twice the limit through."""
    for frame in (text, "\U0001f600" * (limit // 4 + 1)):  # the latter just over the limit
        assert utf8_length_exceeds(frame, limit) == (
            len(frame.encode("utf-8", "surrogatepass")) > limit
        )


def test_frame_of_exactly_64_kib_is_served_and_one_byte_more_closes_4009(user, caplog):
    base = '{"action": "ping", "pad": "x'
    # "é" is two bytes of UTF-8, so the limit is counted in bytes, not characters.
    fitting = base + "é" * ((65536 - len(base) - 2) // 2) + '"}'
    assert len(fitting.encode()) == 65536

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            assert (await request(ws, fitting))["type"] == "pong"
            await ws.send_to(text_data=fitting[:-2] + 'x"}')
            await assert_closed_with(ws, CloseCode.MESSAGE_TOO_BIG)

    caplog.set_level(logging.INFO, logger="realtime")
    run(scenario)
    assert logged_ends(caplog) == ["a frame over 65536 bytes (4009)"]


def test_disconnect_drops_registry_entries(user, task):
    async def scenario():
        manager = get_connection_manager()
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            assert await manager.count_task_subscribers(task.pk) == 1
        assert await manager.count_connections() == 0
        assert await manager.count_task_subscribers(task.pk) == 0

    run(scenario)


def expiring_token(user, seconds: float = 2) -> tuple[str, str]:
    """A token that expires within ``seconds``, and its expiry as messages say it."""
    token = token_for(user, lifetime=timedelta(seconds=seconds))
    return token, expiry_iso(AccessToken(token)["exp"])


def test_a_connection_whose_token_expires_is_closed_4401_and_gets_nothing_more(user, task, caplog):
    token, expires_at = expiring_token(user)

    async def scenario():
        manager = get_connection_manager()
        async with open_websocket(f"/ws?token={token}") as ws:
            assert (await connect_user(ws))["expires_at"] == expires_at
            await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            await assert_closed_with(ws, CloseCode.UNAUTHORIZED)
            assert await manager.count_connections() == 0
            assert await manager.count_task_subscribers(task.pk) == 0
            await database_sync_to_async(services.update_task)(task=task, progress=5)
            assert await ws.receive_nothing(timeout=0.2)

    caplog.set_level(logging.INFO, logger="realtime")
    run(scenario)
    assert logged_ends(caplog) == ["its token expired"]


@pytest.fixture
def first_expiry_refused(monkeypatch) -> list:
    """The inbox is full when the first expiry comes: what it refused, once it has."""
    refused = []
    put_nowait = Inbox.put_nowait

    def full_once(self, item):
        if item.get("type") == DEADLINE_PASSED and not refused:
            refused.append(item)
            return False
        return put_nowait(self, item)

    monkeypatch.setattr(Inbox, "put_nowait", full_once)
    return refused


def test_an_expiry_that_finds_the_inbox_full_is_tried_again(
    user, monkeypatch, first_expiry_refused
):
    monkeypatch.setattr(inbox_consumer, "EXPIRY_RETRY_SECONDS", 0.2)
    token, _ = expiring_token(user)

    async def scenario():
        async with open_websocket(f"/ws?token={token}") as ws:
            await connect_user(ws)
            await assert_closed_with(ws, CloseCode.UNAUTHORIZED)
        assert len(first_expiry_refused) == 1

    run(scenario)


def test_an_expiry_tried_again_after_a_new_token_came_is_dropped(
    user, monkeypatch, first_expiry_refused
):
    """Tried again, it read the deadline of the token given since, and took it for its
    own: the connection was closed with a valid token."""
    monkeypatch.setattr(inbox_consumer, "EXPIRY_RETRY_SECONDS", 1.0)
    token, _ = expiring_token(user)

    async def scenario():
        async with open_websocket(f"/ws?token={token}") as ws:
            await connect_user(ws)
            while not first_expiry_refused:
                await asyncio.sleep(0.02)
            reply = await request(ws, {"action": "authenticate", "token": token_for(user)})
            assert reply["type"] == "authenticated"
            await asyncio.sleep(1.5)  # the retry came, and went
            assert (await request(ws, {"action": "ping"}))["type"] == "pong"

    run(scenario)


def test_a_new_token_keeps_the_connection_open_past_the_old_ones_expiry(user, task):
    old, _ = expiring_token(user)
    new, new_expiry = expiring_token(user, seconds=300)

    async def scenario():
        async with open_websocket(f"/ws?token={old}") as ws:
            await connect_user(ws)
            await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
            reply = await request(ws, {"action": "authenticate", "token": new, "id": 1})
            assert reply == {"type": "authenticated", "expires_at": new_expiry, "id": 1}
            await asyncio.sleep(2.2)
            assert await ws.receive_nothing(timeout=0.1)
            await database_sync_to_async(services.update_task)(task=task, progress=5)
            update = await ws.receive_json_from(timeout=5)
            assert (update["type"], update["seq"]) == ("task_update", 2)

    run(scenario)


def test_a_refused_token_changes_nothing(user, other_user):
    token, _ = expiring_token(user)
    # Each token, and what the message says of it.
    refused = {
        "another user's": (token_for(other_user), "another user's"),
        "expired": (token_for(user, lifetime=-timedelta(seconds=1)), "Token is expired"),
        "refresh": (str(RefreshToken.for_user(user)), "Token has wrong type"),
        "garbage": ("not.a.jwt", "Token is invalid"),
    }

    async def scenario():
        async with open_websocket(f"/ws?token={token}") as ws:
            await connect_user(ws)
            for name, (bad, reason) in refused.items():
                reply = await request(ws, {"action": "authenticate", "token": bad, "id": name})
                assert (reply["type"], reply["code"], reply["id"]) == (
                    "error",
                    "authentication_failed",
                    name,
                ), reply
                assert reason in reply["message"], reply
            reply = await request(ws, {"action": "authenticate"})
            assert (reply["type"], reply["code"]) == ("error", "invalid_message")
            await assert_closed_with(ws, CloseCode.UNAUTHORIZED)

    run(scenario)


def test_an_authenticate_the_database_fails_is_answered_unavailable_and_changes_nothing(
    user, monkeypatch
):
    """User reads are batched: raised, the failure ended every connection authenticating
    just then (1011 under Daphne)."""
    token, _ = expiring_token(user)

    async def unreachable(user_ids):
        raise OperationalError("server closed the connection unexpectedly")

    async def scenario():
        async with open_websocket(f"/ws?token={token}") as ws:
            await connect_user(ws)
            with monkeypatch.context() as patched:
                patched.setattr(auth._user_batcher, "fetch_many", unreachable)
                fresh = token_for(user)
                reply = await request(ws, {"action": "authenticate", "token": fresh, "id": 1})
            assert (reply["type"], reply["code"], reply["id"]) == ("error", "unavailable", 1)
            assert (await request(ws, {"action": "ping"}))["type"] == "pong"
            await assert_closed_with(ws, CloseCode.UNAUTHORIZED)  # at the first token's end

    run(scenario)


def test_lone_surrogate_in_an_echoed_id_is_escaped_not_fatal(user):
    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            await ws.send_to(text_data='{"action": "ping", "id": "\\ud800é"}')
            output = await ws.receive_output(timeout=5)
            output["text"].encode("utf-8")  # a frame Daphne can send
            assert json.loads(output["text"])["id"] == "\ud800é"

    run(scenario)


def test_a_failing_channel_layer_ends_the_consumer_instead_of_hanging(user, settings):
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "tests.realtime.broken_layer.BrokenLayer"}}
    from channels.layers import channel_layers

    channel_layers.backends = {}

    async def scenario():
        ws = make_communicator(f"/ws?token={token_for(user)}")
        await connect_user(ws)
        with pytest.raises(ConnectionError, match="layer is down"):
            await asyncio.wait_for(asyncio.shield(ws.future), 5)

    run(scenario)


@pytest.mark.parametrize(
    "credentials, code",
    [
        ("none", CloseCode.UNAUTHORIZED),
        ("bad", CloseCode.UNAUTHORIZED),
        ("valid", CloseCode.UNAVAILABLE),
    ],
)
def test_with_the_channel_layer_unreachable_refusals_still_say_why(
    user, caplog, settings, credentials, code
):
    """Redis away. A refusal makes no channel (4401): each was a 500, and an error logged
    with its traceback, for any anonymous client. A valid handshake is closed 4503, in one
    logged line: it was a 500 too."""
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "tests.realtime.broken_layer.UnreachableLayer"}
    }
    query = {"none": "", "bad": "?token=bad", "valid": f"?token={token_for(user)}"}[credentials]

    async def scenario():
        async with open_websocket(f"/ws{query}") as ws:
            await ws.connect(timeout=5)
            await assert_closed_with(ws, code)

    run(scenario)
    refused = (
        "Could not open a channel for a connection; refused it: ConnectionError: layer is down"
    )
    assert (refused in caplog.text) is (credentials == "valid")


def test_a_connection_the_registry_cannot_record_is_closed_4503_and_leaves_nothing(
    user, monkeypatch, caplog
):
    manager = get_connection_manager()

    async def away(entry, limit=0):
        raise ConnectionError("Redis is away")

    monkeypatch.setattr(manager.registry, "add", away)

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await ws.connect(timeout=5)
            await assert_closed_with(ws, CloseCode.UNAVAILABLE)
        assert await manager.count_connections() == 0
        assert not any(manager.layer.groups.values())  # joined, then left again

    run(scenario)
    assert "Could not record a connection; closed it 4503: ConnectionError: Redis is away" in (
        caplog.text
    )


@pytest.mark.parametrize(
    "failure, raised",
    [(ConnectionError("Redis is away"), None), (KeyError("a bug, not an outage"), KeyError)],
    ids=["outage", "bug"],
)
def test_a_connection_that_cannot_be_handed_back_ends_in_one_logged_line_if_redis_is_away(
    user, monkeypatch, caplog, failure, raised
):
    """Raised, an outage's failure ended each consumer with a traceback logged; a bug's
    still does, with its traceback."""
    manager = get_connection_manager()

    async def fails(connection):
        raise failure

    monkeypatch.setattr(manager, "disconnect", fails)

    async def scenario():
        ws = make_communicator(f"/ws?token={token_for(user)}")
        await connect_user(ws)
        await ws.send_input({"type": "websocket.disconnect", "code": 1000})
        if raised is None:
            await asyncio.wait_for(ws.future, 5)  # ended, not raised
        else:
            with pytest.raises(raised):
                await asyncio.wait_for(ws.future, 5)

    run(scenario)
    logged = "Could not hand a connection back: ConnectionError: Redis is away" in caplog.text
    assert logged is (raised is None)


def test_a_server_that_stops_closes_4503_and_does_not_wait_long_to_hand_connections_back(
    user, monkeypatch
):
    """Daphne cancels every application as it stops; each left its groups and the registry
    for as long as a Redis that did not answer took, 12 s in all."""
    manager = get_connection_manager()
    unanswered = asyncio.Event()

    async def hangs(connection):
        await unanswered.wait()

    monkeypatch.setattr(manager, "disconnect", hangs)
    monkeypatch.setattr(inbox_consumer, "LEAVE_WHEN_STOPPING", 0.2)

    async def scenario():
        ws = make_communicator(f"/ws?token={token_for(user)}")
        await connect_user(ws)
        ws.future.cancel()  # as Daphne's kill_all_applications()
        await assert_closed_with(ws, CloseCode.UNAVAILABLE)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(ws.future, 2)

    run(scenario)


class NowaitSend:
    """A server's ``send`` that can also send without waiting, as Daphne's under
    ``python -m mcp_platform.serve`` (``realtime.server.Send``)."""

    def __init__(self, send, sent_nowait: list) -> None:
        self.send = send
        self.sent_nowait = sent_nowait

    def __call__(self, message):
        return self.send(message)

    def write(self, text: str) -> None:
        self.sent_nowait.append(text)
        # The communicator's output queue, as the awaited send would put it.
        self.send.__self__.put_nowait({"type": "websocket.send", "text": text})


def nowait_communicator(path: str, sent_nowait: list) -> WebsocketCommunicator:
    from mcp_platform.asgi import application

    async def serve_with_nowait(scope, receive, send):
        await application(scope, receive, NowaitSend(send, sent_nowait))

    return WebsocketCommunicator(serve_with_nowait, path)


def test_an_idle_consumer_is_sent_updates_without_being_woken(user, task):
    sent_nowait = []

    async def scenario():
        ws = nowait_communicator(f"/ws?token={token_for(user)}", sent_nowait)
        await connect_user(ws)
        assert (await request(ws, {"action": "subscribe", "task_id": str(task.pk)}))["seq"] == 1
        for progress in (10, 20, 30):
            await database_sync_to_async(services.update_task)(task=task, progress=progress)
        await api.asend_broadcast({"message": "hello"})
        received = [await ws.receive_json_from(timeout=5) for _ in range(4)]
        await ws.disconnect()
        return received

    received = run(scenario)
    assert [(m["type"], m.get("seq")) for m in received] == [
        ("task_update", 2),
        ("task_update", 3),
        ("task_update", 4),
        ("broadcast", None),
    ]
    assert [json.loads(text) for text in sent_nowait] == received


def test_what_no_client_could_parse_is_refused_by_the_public_api_and_never_sent(user, task):
    """A state or broadcast no JSON parser reads (``NaN``), or a payload that is no object:
    the call raises and the subscriber gets nothing. It got ``"progress":NaN``, on which a
    browser's ``JSON.parse()`` threw, and a broadcast whose payload was a string."""
    snapshot = TaskSnapshot(
        task_id=task.pk, owner_id=user.pk, seq=2, state={"status": "running", "progress": math.nan}
    )

    async def scenario():
        ws = make_communicator(f"/ws?token={token_for(user)}")
        await connect_user(ws)
        await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
        with pytest.raises(ValueError, match="not JSON compliant"):
            await api.apublish_task_update(snapshot)
        with pytest.raises(TypeError, match="a dict, not str"):
            await api.asend_broadcast("hello")
        with pytest.raises(ValueError, match="not JSON compliant"):
            await api.asend_broadcast({"message": "m", "x": math.inf})
        nothing = await ws.receive_nothing(timeout=0.3)
        await ws.disconnect()
        return nothing

    assert run(scenario)


def test_a_personal_message_reaches_every_connection_of_its_user_and_no_one_else(user, other_user):
    async def scenario():
        async with (
            open_websocket(f"/ws?token={token_for(user)}") as first,
            open_websocket(f"/ws?token={token_for(user)}") as second,
            open_websocket(f"/ws?token={token_for(other_user)}") as others,
        ):
            for ws in (first, second, others):
                await connect_user(ws)
            # From synchronous code (a view, a command), as from async code.
            await database_sync_to_async(api.send_personal_message)(user.pk, {"n": 1})
            await api.asend_personal_message(user.pk, {"n": 2})
            with pytest.raises(TypeError, match="a dict, not list"):
                await api.asend_personal_message(user.pk, [1])
            for ws in (first, second):
                received = [await ws.receive_json_from(timeout=5) for _ in range(2)]
                assert [(m["type"], m["payload"]) for m in received] == [
                    ("message", {"n": 1}),
                    ("message", {"n": 2}),
                ]
                assert await ws.receive_nothing(timeout=0.1)
            assert await others.receive_nothing(timeout=0.3)

    run(scenario)


def test_a_failure_in_one_direct_delivery_ends_that_connection_not_the_sender(
    user, task, monkeypatch
):
    replies = TaskConsumer.task_update_replies
    failing = set()

    def fail_for_some(consumer, event):
        if str(consumer.connection.connection_id) in failing:
            raise RuntimeError("cannot render")
        return replies(consumer, event)

    monkeypatch.setitem(TaskConsumer.reply_builders, "task.update", fail_for_some)

    async def scenario():
        broken = nowait_communicator(f"/ws?token={token_for(user)}", [])
        healthy = nowait_communicator(f"/ws?token={token_for(user)}", [])
        failing.add((await connect_user(broken))["connection_id"])
        await connect_user(healthy)
        for ws in (broken, healthy):
            await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
        await database_sync_to_async(services.update_task)(task=task, progress=50)
        assert (await healthy.receive_json_from(timeout=5))["progress"] == 50
        with pytest.raises(RuntimeError, match="cannot render"):
            await asyncio.wait_for(asyncio.shield(broken.future), 5)
        await healthy.disconnect()

    run(scenario)


class GatedSnapshots:
    """The manager's task reads, where the read of one task waits until released: a
    consumer busy with a subscribe while changes queue up behind it."""

    def __init__(self, inner, gated_task_id) -> None:
        self.inner, self.gated = inner, gated_task_id
        self.entered, self.release = asyncio.Event(), asyncio.Event()

    async def load(self, key):
        if key[1] == self.gated:
            self.entered.set()
            await self.release.wait()
        return await self.inner.load(key)


def give(task_id, owner) -> None:
    task = Task.objects.get(pk=task_id)
    task.owner = owner
    task.save()


@contextlib.asynccontextmanager
async def busy_consumer(user, task, monkeypatch):
    """A connection subscribed to ``task``, whose consumer is then busy with a subscribe
    to another task (``id`` "busy"), its read held until ``release()`` is called: what
    happens meanwhile queues up behind it."""
    busy = await database_sync_to_async(services.create_task)(owner=user, name="busy")
    gate = GatedSnapshots(connections._snapshots, busy.pk)
    monkeypatch.setattr(connections, "_snapshots", gate)
    async with open_websocket(f"/ws?token={token_for(user)}") as ws:
        await connect_user(ws)
        await request(ws, {"action": "subscribe", "task_id": str(task.pk)})
        await ws.send_json_to({"action": "subscribe", "task_id": str(busy.pk), "id": "busy"})
        await asyncio.wait_for(gate.entered.wait(), 5)
        yield ws, gate.release.set


def test_a_subscription_made_again_after_its_task_came_back_is_not_ended_by_the_old_news(
    user, other_user, task, monkeypatch
):
    """The task was given away (seq 2), subscribed to again and given back (seq 3) while
    the consumer was busy: the note that seq 2 hid it ended the new subscription, after
    the client had been told ``subscribed``, and seq 4 was lost."""

    async def scenario():
        async with busy_consumer(user, task, monkeypatch) as (ws, release):
            await database_sync_to_async(give)(task.pk, other_user)
            await ws.send_json_to({"action": "subscribe", "task_id": str(task.pk), "id": 3})
            await database_sync_to_async(give)(task.pk, user)
            release()
            assert (await ws.receive_json_from(timeout=5))["id"] == "busy"
            again = await ws.receive_json_from(timeout=5)
            assert (again["type"], again["id"], again["seq"]) == ("subscribed", 3, 3)
            assert await ws.receive_nothing(timeout=0.5)
            await database_sync_to_async(services.update_task)(task=task, progress=77)
            update = await ws.receive_json_from(timeout=5)
            assert (update["type"], update["seq"]) == ("task_update", 4)

    run(scenario)


def test_a_task_given_away_then_deleted_ends_its_former_owners_subscription_unsaid(
    user, other_user, task, monkeypatch
):
    """Its deletion was news to its new owner only: the former owner heard of it."""

    async def scenario():
        async with busy_consumer(user, task, monkeypatch) as (ws, release):
            await database_sync_to_async(give)(task.pk, other_user)
            await database_sync_to_async(Task.objects.filter(pk=task.pk).delete)()
            release()
            assert (await ws.receive_json_from(timeout=5))["id"] == "busy"
            notice = await ws.receive_json_from(timeout=5)
            assert (notice["type"], notice["task_id"]) == ("unsubscribed", str(task.pk))
            assert await ws.receive_nothing(timeout=0.5)

    run(scenario)
