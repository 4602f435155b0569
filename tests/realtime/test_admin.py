"""The admin: the send-a-broadcast form, the read-only history and the live connections page."""

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from redis.exceptions import ConnectionError as RedisConnectionError

from mcp_platform.tasks import services
from realtime.connections import get_connection_manager
from realtime.models import Broadcast
from tests.conftest import connect_user, free_port, open_websocket, token_for
from tests.sse import InProcessStream

pytestmark = pytest.mark.django_db

SEND_URL = "/admin/realtime/broadcast/add/"
HISTORY_URL = "/admin/realtime/broadcast/"
LIVE_URL = "/admin/realtime/liveconnections/"

# Connections through the ASGI stack close the database connection between steps
# (database_sync_to_async), which a test transaction cannot survive.
live_db = pytest.mark.django_db(transaction=True)


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


@live_db
def test_staff_sends_a_broadcast_and_sees_the_count(client, staff_user, user):
    client.force_login(staff_user)

    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            response = await sync_to_async(client.post)(
                SEND_URL,
                {"message": "Deploy at noon", "type": "maintenance", "data": '{"eta": 5}'},
                follow=True,
            )
            assert response.redirect_chain == [(HISTORY_URL, 302)]
            assert messages_of(response) == [
                "Broadcast sent to 1 connection(s): 1 WebSocket, 0 SSE."
            ]
            message = await ws.receive_json_from(timeout=5)
            assert message["type"] == "broadcast"
            assert message["payload"] == {
                "message": "Deploy at noon",
                "type": "maintenance",
                "eta": 5,
            }

    async_to_sync(scenario)()
    record = Broadcast.objects.get()
    assert (record.sent_by, record.recipients) == (staff_user, 1)


def test_unreachable_redis_is_reported_and_nothing_recorded(client, staff_user, settings):
    settings.REALTIME = {**settings.REALTIME, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    client.force_login(staff_user)
    response = client.post(SEND_URL, {"message": "m", "type": "announcement"})
    assert response.status_code == 200
    [message] = messages_of(response)
    assert message.startswith("Nothing was sent. Could not reach the channel layer")
    assert not Broadcast.objects.exists()


def test_send_form_renders_for_staff(client, staff_user):
    client.force_login(staff_user)
    response = client.get(SEND_URL)
    assert response.status_code == 200
    assert b'value="Send broadcast"' in response.content
    assert response.context["form"]["type"].value() == "announcement"


@pytest.mark.parametrize(
    "form, field",
    [
        ({"message": "", "type": "announcement"}, "message"),
        ({"message": "x" * 2001, "type": "announcement"}, "message"),
        ({"message": "m", "type": "t" * 65}, "type"),
        ({"message": "m", "type": "announcement", "data": "{oops"}, "data"),
        ({"message": "m", "type": "announcement", "data": "[1, 2]"}, "data"),
        ({"message": "m", "type": "announcement", "data": '{"message": "x"}'}, "data"),
        ({"message": "m", "type": "announcement", "data": "[" * 5000}, "data"),
        ({"message": "m", "type": "announcement", "data": '{"x": "\\u0000"}'}, "__all__"),
    ],
)
def test_bad_form_input_is_shown_and_nothing_sent(client, staff_user, form, field):
    client.force_login(staff_user)
    response = client.post(SEND_URL, form)
    assert response.status_code == 200
    assert field in response.context["form"].errors
    assert b"errornote" in response.content
    assert not Broadcast.objects.exists()


def test_non_staff_cannot_send(client, make_user):
    holder = make_user()
    holder.user_permissions.add(Permission.objects.get(codename="send_broadcast"))
    client.force_login(holder)
    for response in (client.get(SEND_URL), client.post(SEND_URL, {"message": "m", "type": "t"})):
        assert response.status_code == 302
        assert response["Location"].startswith("/admin/login/")
    assert not Broadcast.objects.exists()


def test_index_links_to_both_pages_for_plain_staff(client, staff_user):
    client.force_login(staff_user)
    content = client.get("/admin/").content.decode()
    assert f'href="{HISTORY_URL}"' in content
    assert f'href="{SEND_URL}"' in content
    assert f'href="{LIVE_URL}"' in content


def test_history_is_read_only(client, staff_user):
    record = Broadcast.objects.create(
        payload={"message": "old", "type": "announcement"}, recipients=2, websocket=1, sse=1
    )
    client.force_login(staff_user)
    listing = client.get(HISTORY_URL)
    assert listing.status_code == 200
    assert b"old" in listing.content
    change_url = f"{HISTORY_URL}{record.pk}/change/"
    detail = client.get(change_url)
    assert detail.status_code == 200
    assert b'name="_save"' not in detail.content
    assert client.post(change_url, {"recipients": 9}).status_code == 403
    assert client.post(f"{HISTORY_URL}{record.pk}/delete/", {"post": "yes"}).status_code == 403
    record.refresh_from_db()
    assert record.recipients == 2


@live_db
def test_live_connections_page_counts_connected_clients(client, staff_user, user):
    task = services.create_task(owner=user, name="watched")
    client.force_login(staff_user)

    async def scenario():
        query = {"token": token_for(user), "task_id": str(task.pk)}
        async with (
            open_websocket(f"/ws?token={token_for(user)}") as ws,
            InProcessStream(query) as stream,
        ):
            await connect_user(ws)
            await ws.send_json_to({"action": "subscribe", "task_id": str(task.pk)})
            assert (await ws.receive_json_from(timeout=5))["type"] == "subscribed"
            await stream.next_of("connected")
            return await sync_to_async(client.get)(LIVE_URL)

    response = async_to_sync(scenario)()
    assert response.status_code == 200
    context = response.context
    assert dict(context["by_transport"]) == {"websocket": 1, "sse": 1}
    assert context["total"] == 2
    assert context["by_user"] == [(user, user.pk, 2)]
    assert context["by_task"] == [(task.pk, 2)]
    content = response.content.decode()
    assert user.username in content and str(task.pk) in content


def test_live_connections_page_when_nobody_is_connected(client, staff_user):
    client.force_login(staff_user)
    response = client.get(LIVE_URL)
    assert response.status_code == 200
    assert response.context["total"] == 0
    assert b"No connections." in response.content


def test_live_connections_page_says_when_the_registry_cannot_be_read(
    client, staff_user, monkeypatch
):
    """Redis away: it was a 500, with a traceback logged."""

    async def away():
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6391. Connection refused.")

    monkeypatch.setattr(get_connection_manager(), "overview", away)
    client.force_login(staff_user)
    response = client.get(LIVE_URL)
    assert response.status_code == 200
    assert [str(message) for message in response.context["messages"]] == [
        "The connections could not be counted just now: ConnectionError: Error 111 connecting"
        " to 127.0.0.1:6391. Connection refused."
    ]


def test_live_connections_page_is_for_staff_only(client, user):
    client.force_login(user)
    response = client.get(LIVE_URL)
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
