"""A change of a user's access reaches their live connections at once (``realtime.signals``).

Every test here keeps the session check at its default (60 s) and tokens at five minutes:
what ends a connection within seconds is the change itself, not a periodic check.
"""

import asyncio
import json
import logging

import pytest
import websockets
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db import IntegrityError, OperationalError, transaction
from django.test import Client, override_settings
from rest_framework_simplejwt.tokens import AccessToken
from rest_framework_simplejwt.utils import get_md5_hash_password

from mcp_platform.tasks import services
from realtime import inbox_consumer, signals
from realtime.connections import get_connection_manager
from realtime.consumers import TaskConsumer
from realtime.protocol import CloseCode
from tests.conftest import (
    connect_user,
    logged_ends,
    open_websocket,
    run,
    run_manage,
    token_for,
)
from tests.sse import InProcessStream

pytestmark = pytest.mark.django_db(transaction=True)


async def request(ws, message: dict) -> dict:
    await ws.send_json_to(message)
    return await ws.receive_json_from(timeout=5)


async def assert_closed_4401(ws) -> None:
    output = await ws.receive_output(timeout=5)
    assert output == {"type": "websocket.close", "code": CloseCode.UNAUTHORIZED}


async def still_open(ws) -> bool:
    """Whether the connection is open a moment after a change: its ping is answered."""
    await asyncio.sleep(0.3)
    return (await request(ws, {"action": "ping"}))["type"] == "pong"


def stays_connected(user, change) -> bool:
    """Whether a token connection of ``user`` outlives ``change()``, run in a thread of its
    own as a view or a command would run it."""

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            await database_sync_to_async(change)()
            return await still_open(ws)

    return run(scenario)


def session_cookie(user) -> tuple[bytes, bytes]:
    client = Client()
    client.force_login(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME]
    return (b"cookie", f"{cookie.key}={cookie.value}".encode())


def deactivate(user) -> None:
    user.is_active = False
    user.save()


def set_staff(user, is_staff: bool) -> None:
    user.is_staff = is_staff
    user.save()


@pytest.fixture
def checks(monkeypatch) -> list[int]:
    """The users whose connections checked their tokens again, in order."""
    checked = []
    check = inbox_consumer.token_user

    async def counted(user_claim, password_claim):
        checked.append(int(user_claim))
        return await check(user_claim, password_claim)

    monkeypatch.setattr(inbox_consumer, "token_user", counted)
    return checked


@pytest.mark.parametrize("change", ["deactivated", "deleted"])
@pytest.mark.parametrize("credentials", ["token", "session"])
def test_a_connection_ends_4401_at_once_when_its_user_is_deactivated_or_deleted(
    user, other_user, change, credentials, checks, caplog
):
    """It went on streaming the user's tasks until the token expired or the session's next
    check (up to five minutes, and a minute)."""
    task = services.create_task(owner=user, name="watched")
    if credentials == "token":
        path, headers = f"/ws?token={token_for(user)}", []
    else:
        path, headers = "/ws", [session_cookie(user)]

    async def scenario():
        manager = get_connection_manager()
        async with (
            open_websocket(path, headers=headers) as ws,
            open_websocket(f"/ws?token={token_for(other_user)}") as bystander,
        ):
            await connect_user(ws)
            await connect_user(bystander)
            assert (await request(ws, {"action": "subscribe", "task_id": str(task.pk)}))[
                "type"
            ] == "subscribed"
            if change == "deactivated":
                await database_sync_to_async(deactivate)(user)
            else:
                await database_sync_to_async(user.delete)()
                deleted = await ws.receive_json_from(timeout=5)
                assert deleted["type"] == "task_deleted"
            await assert_closed_4401(ws)
            assert await manager.count_user_connections(user_id) == 0
            assert await manager.count_task_subscribers(task.pk) == 0
            # Another user's connection is not checked, and stays.
            assert (await request(bystander, {"action": "ping"}))["type"] == "pong"

    user_id = user.pk  # a deletion forgets it
    caplog.set_level(logging.INFO, logger="realtime")
    run(scenario)
    assert logged_ends(caplog) == ["its user's access changed"]
    assert checks == ([user_id] if credentials == "token" else [])


def test_a_user_saved_from_an_instance_made_anew_is_read_as_stored(user):
    """An instance built with the pk of a stored user is saved as an UPDATE of that row."""
    fields = {"pk": user.pk, "username": user.username, "password": user.password}

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            await database_sync_to_async(type(user)(**fields, is_active=False).save)()
            await assert_closed_4401(ws)

    run(scenario)


def test_a_token_connection_of_a_user_no_longer_staff_stops_getting_others_tasks_at_once(
    staff_user, other_user
):
    """Its subscription to another user's task went on updating until the token expired."""
    theirs = services.create_task(owner=other_user, name="theirs")

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(staff_user)}") as ws:
            await connect_user(ws)
            await request(ws, {"action": "subscribe", "task_id": str(theirs.pk)})
            await database_sync_to_async(set_staff)(staff_user, False)
            # Checked: the ping is answered after the check, which its inbox held first.
            assert (await request(ws, {"action": "ping"}))["type"] == "pong"
            await database_sync_to_async(services.update_task)(task=theirs, progress=5)
            notice = await ws.receive_json_from(timeout=5)
            assert (notice["type"], notice["task_id"]) == ("unsubscribed", str(theirs.pk))
            assert await ws.receive_nothing(timeout=0.3)

    run(scenario)


def test_a_new_token_brings_what_its_user_may_see_now(staff_user, other_user):
    """A change that reached no connection (``QuerySet.update()``) waits for the next check
    of the credentials; a new token is one: before, it carried the connection past its old
    token's expiry with the staff status of its connect, another user's updates with it."""
    theirs = services.create_task(owner=other_user, name="theirs")

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(staff_user)}") as ws:
            await connect_user(ws)
            await request(ws, {"action": "subscribe", "task_id": str(theirs.pk)})
            await database_sync_to_async(
                lambda: type(staff_user).objects.filter(pk=staff_user.pk).update(is_staff=False)
            )()
            answer = await request(ws, {"action": "authenticate", "token": token_for(staff_user)})
            assert answer["type"] == "authenticated"
            await database_sync_to_async(services.update_task)(task=theirs, progress=5)
            notice = await ws.receive_json_from(timeout=5)
            assert (notice["type"], notice["task_id"]) == ("unsubscribed", str(theirs.pk))
            assert await ws.receive_nothing(timeout=0.3)

    run(scenario)


def test_an_event_stream_of_every_task_ends_at_once_when_its_user_becomes_staff(user):
    """Its feed was the user's own tasks: it ends, and the client reconnects to every task's."""

    async def scenario():
        async with InProcessStream({"token": token_for(user)}) as stream:
            await stream.next_of("connected")
            await database_sync_to_async(set_staff)(user, True)
            events = await asyncio.wait_for(stream.until_end(), 5)
            assert [event.type for event in events] == ["token_expired"]
            assert events[0].json() == {"expires_at": None}  # not the token's expiry

    run(scenario)


def test_an_event_stream_ends_with_token_expired_null_when_its_user_is_deactivated(user):
    task = services.create_task(owner=user, name="watched")

    async def scenario():
        query = {"token": token_for(user), "task_id": str(task.pk)}
        async with InProcessStream(query) as stream:
            await stream.next_of("connected")
            await database_sync_to_async(deactivate)(user)
            events = await asyncio.wait_for(stream.until_end(), 5)
            assert [(event.type, event.json()) for event in events] == [
                ("token_expired", {"expires_at": None})
            ]
        assert await get_connection_manager().count_user_connections(user.pk) == 0

    run(scenario)


@pytest.mark.parametrize("revoke", [False, True])
def test_a_password_change_ends_a_token_connection_only_where_it_revokes_tokens(user, revoke):
    """As simplejwt's REST authentication: with ``CHECK_REVOKE_TOKEN``, a token made before
    the change no longer authenticates."""

    def change_password() -> None:
        user.set_password("another-secret-9")
        user.save()

    token = AccessToken.for_user(user)
    # simplejwt's token classes keep the settings they were imported with: the claim is
    # added here, as they add it with CHECK_REVOKE_TOKEN on.
    token["hash_password"] = get_md5_hash_password(user.password)

    async def scenario():
        async with open_websocket(f"/ws?token={token}") as ws:
            await connect_user(ws)
            await database_sync_to_async(change_password)()
            if revoke:
                await assert_closed_4401(ws)
            else:
                assert await still_open(ws)

    with override_settings(SIMPLE_JWT={**settings.SIMPLE_JWT, "CHECK_REVOKE_TOKEN": revoke}):
        run(scenario)


def test_saves_that_leave_access_alone_check_nothing(user, checks, django_assert_num_queries):
    """A login's ``last_login`` and a changed name neither read the stored access nor have
    the user's connections check their credentials."""

    def edit() -> None:
        with django_assert_num_queries(1):  # the UPDATE alone
            user.save(update_fields=["last_login"])
        user.first_name = "Ada"
        user.save()

    assert stays_connected(user, edit)
    assert checks == []


def test_a_connection_authenticated_otherwise_is_left_as_it_is(user):
    """Behind another authentication middleware, a connection has neither token nor
    session to check again: it was ended by any change, being made staff included."""
    communicator = WebsocketCommunicator(TaskConsumer.as_asgi(), "/ws")
    communicator.scope["user"] = user

    async def scenario():
        try:
            await connect_user(communicator)
            await database_sync_to_async(set_staff)(user, True)
            assert await still_open(communicator)
        finally:
            await communicator.disconnect()

    run(scenario)


def test_a_failed_save_leaves_nothing_for_the_next_to_compare(user, other_user, checks):
    """What the failed save read was compared by the next save of other fields, with a
    change the caller had yet to save."""

    def edit() -> None:
        user.username = other_user.username
        with pytest.raises(IntegrityError), transaction.atomic():
            user.save()
        user.refresh_from_db()
        user.is_staff = True  # not saved: the save below writes the name alone
        user.first_name = "Ada"
        user.save(update_fields=["first_name"])

    assert stays_connected(user, edit)
    assert checks == []


def test_a_deactivation_rolled_back_checks_nothing(user, checks):
    def deactivate_then_fail() -> None:
        with pytest.raises(RuntimeError), transaction.atomic():
            deactivate(user)
            raise RuntimeError("roll back")

    assert stays_connected(user, deactivate_then_fail)
    assert checks == []


def test_a_check_the_database_fails_keeps_the_connection(user, monkeypatch, caplog):
    """Ending every connection at a database's failover would have them all reconnect at
    once; the token's expiry still ends it."""

    async def unreachable(user_claim, password_claim):
        raise OperationalError("the database is unreachable")

    def fail_then_deactivate() -> None:
        monkeypatch.setattr(inbox_consumer, "token_user", unreachable)  # connected: now it fails
        deactivate(user)

    assert stays_connected(user, fail_then_deactivate)
    assert "Could not check a connection's credentials" in caplog.text


def test_each_access_field_the_user_model_has_is_watched(django_user_model):
    assert signals.access_fields(django_user_model, None) == ["is_active", "is_staff", "password"]
    assert signals.access_fields(django_user_model, {"last_login", "is_staff"}) == ["is_staff"]
    assert signals.access_fields(django_user_model, frozenset({"first_name"})) == []


@pytest.mark.redis
def test_a_deactivation_in_another_process_ends_the_connection_over_daphne(
    daphne_redis_servers, redis_server, user
):
    """A `manage.py shell` on Redis deactivates the user; the server's connection ends."""
    server = daphne_redis_servers[1]
    script = (
        "from django.contrib.auth import get_user_model\n"
        f"user = get_user_model().objects.get(pk={user.pk})\n"
        "user.is_active = False\n"
        "user.save()\n"
    )

    async def scenario():
        async with websockets.connect(f"{server.ws_url}/ws?token={token_for(user)}") as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] == "connected"
            await run_manage(redis_server, "shell", "-c", script)
            with pytest.raises(websockets.ConnectionClosed) as caught:
                await asyncio.wait_for(ws.recv(), 10)
            assert caught.value.rcvd.code == CloseCode.UNAUTHORIZED

    run(scenario)
