"""Broadcasts: the shared validation, ``POST /broadcast`` and its bad input, and
property 48 (a broadcast reaches exactly the live connections and counts them)."""

import json
from contextlib import AsyncExitStack

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.contrib.auth.models import Permission
from django.core.exceptions import ValidationError
from django.db import transaction
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from realtime import api, broadcasts, protocol
from realtime.connections import Transport, get_connection_manager
from realtime.models import Broadcast
from tests.conftest import api_client, connect_user, free_port, open_websocket, token_for
from tests.sse import InProcessStream

pytestmark = pytest.mark.django_db


def post(client: APIClient, body, path: str = "/broadcast"):
    data = body if isinstance(body, bytes) else json.dumps(body)
    return client.post(path, data, content_type="application/json")


# The shared validation


def test_type_defaults_to_announcement_and_other_fields_pass_through():
    payload = broadcasts.validate_payload({"message": "Hi", "level": "info", "n": [1]})
    assert payload == {"message": "Hi", "type": "announcement", "level": "info", "n": [1]}


@pytest.mark.parametrize(
    "data, field, code",
    [
        ({}, "message", "required"),
        ({"message": ""}, "message", "blank"),
        ({"message": "  \n"}, "message", "blank"),
        ({"message": 7}, "message", "invalid"),
        ({"message": "x" * 2001}, "message", "max_length"),
        ({"message": "m", "type": ""}, "type", "blank"),
        ({"message": "m", "type": None}, "type", "invalid"),
        ({"message": "m", "type": "t" * 65}, "type", "max_length"),
    ],
)
def test_bad_fields_are_named_with_a_code(data, field, code):
    with pytest.raises(ValidationError) as caught:
        broadcasts.validate_payload(data)
    assert [error.code for error in caught.value.error_dict[field]] == [code]


@pytest.mark.parametrize(
    "data, code",
    [
        (["message"], "invalid"),
        ("message", "invalid"),
        ({"message": "m", "padding": "p" * 16384}, "payload_too_large"),
    ],
)
def test_bad_payloads_as_a_whole(data, code):
    with pytest.raises(ValidationError) as caught:
        broadcasts.validate_payload(data)
    assert caught.value.code == code


def test_a_payload_is_measured_as_the_compact_json_a_client_sends(settings):
    """A body as large as the limit, with a separator per value, is accepted: what a
    client can send whole is what may be broadcast."""
    data = {"type": "t", "message": "m", "values": [1] * 3000}
    size = len(json.dumps(data, separators=(",", ":")).encode())
    settings.REALTIME = {**settings.REALTIME, "BROADCAST_MAX_BYTES": size}
    assert broadcasts.validate_payload(data) == data
    settings.REALTIME = {**settings.REALTIME, "BROADCAST_MAX_BYTES": size - 1}
    with pytest.raises(ValidationError) as caught:
        broadcasts.validate_payload(data)
    assert caught.value.code == "payload_too_large"


def test_compose_merges_data_and_rejects_clashes_and_non_objects():
    assert broadcasts.compose(message="m", type="t", data='{"k": 1}') == {
        "k": 1,
        "message": "m",
        "type": "t",
    }
    assert (
        broadcasts.compose(message="m")
        == broadcasts.compose(message="m", data="")
        == {"message": "m"}
    )
    for data in ("[1]", '"x"', "{oops", '{"x": NaN}', "[" * 5000, '{"message": "other"}'):
        with pytest.raises(ValidationError) as caught:
            broadcasts.compose(message="m", data=data)
        assert list(caught.value.error_dict) == ["data"], data


JSON_TEXT = st.text(st.one_of(st.characters(), st.characters(categories=["Cs", "Cc"])))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats() | JSON_TEXT,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(JSON_TEXT, children, max_size=3)
    ),
    max_leaves=12,
)
BODIES = st.dictionaries(
    st.sampled_from(["message", "type"]) | JSON_TEXT, JSON_VALUES | JSON_TEXT, max_size=4
) | st.fixed_dictionaries({"message": JSON_TEXT}, optional={"x": JSON_VALUES})


def numbers_as_floats(value):
    """PostgreSQL's jsonb keeps numbers as numerics: 1e16 comes back as an int."""
    if isinstance(value, dict):
        return {key: numbers_as_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [numbers_as_floats(item) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


@settings(max_examples=150, deadline=None)
@given(data=BODIES | JSON_VALUES)
def test_what_validation_accepts_every_layer_can_carry(data):
    """Anything accepted encodes to UTF-8 JSON that decodes back to it, and is stored."""
    try:
        payload = broadcasts.validate_payload(data)
    except ValidationError:
        return
    text = protocol.encode(protocol.broadcast(payload))
    assert json.loads(text.encode("utf-8"))["payload"] == payload
    with transaction.atomic():
        record = Broadcast.objects.create(payload=payload, recipients=0, websocket=0, sse=0)
    record.refresh_from_db()
    assert numbers_as_floats(record.payload) == numbers_as_floats(payload)


def nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    "value",
    ["nul \x00 inside", "lone \ud800 surrogate", {"key \x00": 1}, float("inf"), nested(40)],
)
def test_values_no_transport_or_database_can_carry_are_refused(value):
    with pytest.raises(ValidationError) as caught:
        broadcasts.validate_payload({"message": "m", "x": value})
    assert caught.value.code == "invalid"


def test_nesting_up_to_the_limit_is_accepted():
    assert broadcasts.validate_payload({"message": "m", "x": nested(broadcasts.MAX_DEPTH)})


def test_who_may_send(user, staff_user, make_user):
    holder = make_user()
    holder.user_permissions.add(Permission.objects.get(codename="send_broadcast"))
    holder = type(holder).objects.get(pk=holder.pk)  # a fresh permission cache
    inactive_staff = make_user(is_staff=True, is_active=False)
    assert broadcasts.can_send(staff_user) and broadcasts.can_send(holder)
    assert not broadcasts.can_send(user) and not broadcasts.can_send(inactive_staff)


# POST /broadcast


# Connections through the ASGI stack close the database connection between steps
# (database_sync_to_async), which a test transaction cannot survive.
live_db = pytest.mark.django_db(transaction=True)


@live_db
def test_staff_broadcast_reaches_a_websocket_and_is_recorded(staff_user, user):
    async def scenario():
        async with open_websocket(f"/ws?token={token_for(user)}") as ws:
            await connect_user(ws)
            response = await sync_to_async(post)(
                api_client(staff_user), {"message": "Maintenance at 18:00", "level": "warn"}
            )
            assert response.status_code == 200, response.content
            assert response.json() == {"recipients": 1, "websocket": 1, "sse": 0}
            message = await ws.receive_json_from(timeout=5)
            assert message["type"] == "broadcast"
            assert message["payload"] == {
                "message": "Maintenance at 18:00",
                "level": "warn",
                "type": "announcement",
            }
            assert isinstance(message["timestamp"], str)
            assert await ws.receive_nothing(timeout=0.1)

    async_to_sync(scenario)()
    record = Broadcast.objects.get()
    assert record.sent_by == staff_user
    assert record.payload["message"] == "Maintenance at 18:00"
    assert (record.recipients, record.websocket, record.sse) == (1, 1, 0)


def test_trailing_slash_is_accepted_and_type_kept(staff_user):
    response = post(api_client(staff_user), {"message": "m", "type": "outage"}, "/broadcast/")
    assert response.status_code == 200, response.content
    assert response.json() == {"recipients": 0, "websocket": 0, "sse": 0}
    assert Broadcast.objects.get().payload == {"message": "m", "type": "outage"}


def test_non_staff_gets_403_and_nothing_is_sent(user):
    response = post(api_client(user), {"message": "m"})
    assert response.status_code == 403
    assert response.json()["code"] == "permission_denied"
    assert not Broadcast.objects.exists()


def test_holder_of_the_permission_may_send(user):
    user.user_permissions.add(Permission.objects.get(codename="send_broadcast"))
    response = post(api_client(user), {"message": "m"})
    assert response.status_code == 200, response.content


def test_anonymous_gets_401():
    response = post(api_client(), {"message": "m"})
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"


def test_session_auth_needs_the_csrf_token(staff_user):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(staff_user)
    refused = post(client, {"message": "m"})
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]
    secret = "a" * 32
    client.cookies["csrftoken"] = secret
    accepted = client.post("/broadcast", {"message": "m"}, format="json", HTTP_X_CSRFTOKEN=secret)
    assert accepted.status_code == 200, accepted.content


def test_oversize_body_is_413_before_parsing(staff_user):
    client = api_client(staff_user)
    too_big_json = {"message": "m", "padding": "p" * 16384}
    not_json_at_all = b"{" * 16385
    for body in (too_big_json, not_json_at_all):
        response = post(client, body)
        assert response.status_code == 413
        assert response.json()["code"] == "payload_too_large"
    assert not Broadcast.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_a_chunked_body_over_djangos_own_limit_is_413_over_daphne(daphne_server, staff_user):
    """Without ``Content-Length`` (``Transfer-Encoding: chunked``), a body larger than
    Django reads into memory is still the documented 413, not Django's 400."""
    import aiohttp

    async def chunks():
        yield b'{"message": "m", "padding": "'
        for _ in range(48):
            yield b"p" * 65536
        yield b'"}'

    async def scenario():
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{daphne_server.http_url}/broadcast",
                data=chunks(),
                headers={
                    "Authorization": f"Bearer {token_for(staff_user)}",
                    "Content-Type": "application/json",
                },
            ) as response:
                assert response.request_info.headers.get("Content-Length") is None
                return response.status, await response.json()

    status, answer = async_to_sync(scenario)()
    assert (status, answer["code"]) == (413, "payload_too_large")


def test_body_at_the_limit_is_accepted(staff_user):
    body = {"message": "m", "type": "t", "padding": ""}
    body["padding"] = "p" * (16384 - len(json.dumps(body).encode()))
    assert len(json.dumps(body).encode()) == 16384
    assert post(api_client(staff_user), body).status_code == 200


@pytest.mark.parametrize(
    "body, code",
    [
        (["message"], "invalid"),
        ("message", "invalid"),
        (42, "invalid"),
        (None, "invalid"),
        ({}, "required"),
        ({"type": "announcement"}, "required"),
        ({"message": ""}, "blank"),
        ({"message": "x" * 2001}, "max_length"),
        ({"message": "m", "type": "t" * 65}, "max_length"),
        (b"{not json", "parse_error"),
        (b"[" * 5000 + b"]" * 5000, "parse_error"),
        (b'{"message": "m", "x": "\\u0000"}', "invalid"),
        (b'{"message": "\\ud800"}', "invalid"),
        (b'{"message": "m", "x": NaN}', "parse_error"),
    ],
)
def test_bad_bodies_get_400_with_a_code(staff_user, body, code):
    response = post(api_client(staff_user), body)
    assert response.status_code == 400, response.content
    assert response.json()["code"] == code
    assert not Broadcast.objects.exists()


def test_message_of_2000_characters_is_accepted(staff_user):
    assert post(api_client(staff_user), {"message": "é" * 2000}).status_code == 200


def test_missing_message_names_the_field(staff_user):
    body = post(api_client(staff_user), {}).json()
    assert body["errors"] == {"message": ["This field is required."]}


def test_an_error_of_the_payload_as_a_whole_is_a_non_field_error(staff_user):
    """As a serializer's are: ``errors`` was a bare list, where clients read an object."""
    body = post(api_client(staff_user), {"message": "m", "x": "\u0000"}).json()
    assert list(body["errors"]) == ["non_field_errors"] and body["errors"]["non_field_errors"]


def test_form_encoded_body_is_415(staff_user):
    response = api_client(staff_user).post("/broadcast", {"message": "m"}, format="multipart")
    assert response.status_code == 415
    assert response.json()["code"] == "unsupported_media_type"


def test_bad_token_is_401(staff_user):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer not-a-token")
    response = post(client, {"message": "m"})
    assert response.status_code == 401
    assert response.json()["code"] == "token_not_valid"


def test_unreachable_redis_is_503_and_nothing_recorded(staff_user, settings):
    settings.REALTIME = {**settings.REALTIME, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    response = post(api_client(staff_user), {"message": "m"})
    assert response.status_code == 503
    assert response.json()["code"] == "service_unavailable"
    assert not Broadcast.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_no_transaction_is_held_while_a_broadcast_is_sent(staff_user, monkeypatch):
    """On SQLite a transaction holds the database's one write lock: held over a send that
    waited for a stalled Redis, every task's change in every process waited behind it."""
    seen = []
    send = api.send_broadcast

    def watching(payload):
        seen.append((transaction.get_connection().in_atomic_block, Broadcast.objects.count()))
        return send(payload)

    monkeypatch.setattr(api, "send_broadcast", watching)
    broadcasts.send(payload={"message": "m"}, sent_by=staff_user)
    assert seen == [(False, 1)]  # recorded and committed, then sent


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("failure", [ConnectionError("Redis is away"), RuntimeError("a bug")])
def test_a_broadcast_whose_send_fails_is_not_recorded(staff_user, monkeypatch, failure):
    def failing(payload):
        raise failure

    monkeypatch.setattr(api, "send_broadcast", failing)
    expected = broadcasts.BroadcastUnavailable if isinstance(failure, OSError) else RuntimeError
    with pytest.raises(expected):
        broadcasts.send(payload={"message": "m"}, sent_by=staff_user)
    assert not Broadcast.objects.exists()


@pytest.mark.parametrize("method", ["get", "put", "delete", "options"])
@pytest.mark.parametrize("who", ["staff", "user", "anonymous"])
def test_only_post_is_allowed(staff_user, user, method, who):
    """Whoever asks: the method is checked before the credentials (DRF checks it after)."""
    client = {"staff": api_client(staff_user), "user": api_client(user), "anonymous": APIClient()}
    response = getattr(client[who], method)("/broadcast")
    assert response.status_code == 405
    assert response.json()["code"] == "method_not_allowed"
    assert response["Allow"] == "POST"


# Property 48


class WebSocketClient:
    transport = Transport.WEBSOCKET

    def __init__(self, communicator) -> None:
        self.communicator = communicator

    @classmethod
    async def open(cls, stack: AsyncExitStack, token: str) -> "WebSocketClient":
        communicator = await stack.enter_async_context(open_websocket(f"/ws?token={token}"))
        await connect_user(communicator)
        return cls(communicator)

    async def next_broadcast(self) -> dict:
        return await self.communicator.receive_json_from(timeout=5)

    async def has_nothing_more(self) -> bool:
        return await self.communicator.receive_nothing(timeout=0.01)

    async def close(self) -> None:
        await self.communicator.disconnect()


class SseClient:
    transport = Transport.SSE

    def __init__(self, stream: InProcessStream) -> None:
        self.stream = stream

    @classmethod
    async def open(cls, stack: AsyncExitStack, token: str) -> "SseClient":
        stream = await stack.enter_async_context(InProcessStream({"token": token}))
        assert stream.status == 200
        await stream.next_of("connected")
        return cls(stream)

    async def next_broadcast(self) -> dict:
        return (await self.stream.next_of("broadcast")).json()

    async def has_nothing_more(self) -> bool:
        return not self.stream.pending and await self.stream.communicator.receive_nothing(0.01)

    async def close(self) -> None:
        await self.stream.close()


CLIENTS = {client.transport: client for client in (WebSocketClient, SseClient)}


async def churn_then_broadcast(ops: list, tokens: list[str]) -> None:
    """Open and close clients as ``ops`` say, broadcast, and check who got it."""
    message = f"after {len(ops)} steps"
    async with AsyncExitStack() as stack:
        live: list = []
        for step, (op, arg) in enumerate(ops):
            if op == "open":
                live.append(await CLIENTS[arg].open(stack, tokens[step % len(tokens)]))
            elif live:
                await live.pop(arg % len(live)).close()
        record = await sync_to_async(broadcasts.send)(payload={"message": message})
        assert record.recipients == len(live)
        assert record.websocket == sum(client.transport == Transport.WEBSOCKET for client in live)
        assert record.sse == sum(client.transport == Transport.SSE for client in live)
        for client in live:
            received = await client.next_broadcast()
            assert received["type"] == "broadcast"
            assert received["payload"] == {"message": message, "type": "announcement"}
        for client in live:
            assert await client.has_nothing_more()
    assert await get_connection_manager().count_connections() == 0


CHURN = st.lists(
    st.one_of(
        st.tuples(st.just("open"), st.sampled_from(Transport)),
        st.tuples(st.just("close"), st.integers(min_value=0, max_value=20)),
    ),
    max_size=10,
)


@live_db
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(ops=CHURN)
@example(ops=[])
@example(ops=[("open", Transport.SSE), ("open", Transport.WEBSOCKET), ("close", 0), ("close", 0)])
def test_property_48_broadcast_reaches_exactly_the_live_connections(ops, user, other_user):
    """For any WebSocket and SSE clients (none included) after connect/disconnect churn, a
    broadcast reaches exactly the live ones, and ``recipients`` counts them."""
    async_to_sync(churn_then_broadcast)(ops, [token_for(user), token_for(other_user)])
