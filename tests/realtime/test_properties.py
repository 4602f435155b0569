"""Properties of the WebSocket endpoint over arbitrary tokens and operation sequences."""

import time
from datetime import timedelta
from urllib.parse import quote

import jwt
import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from rest_framework_simplejwt.tokens import AccessToken, RefreshToken

from mcp_platform.tasks import services
from realtime.connections import get_connection_manager
from realtime.protocol import CloseCode
from tests.conftest import connect_user, make_communicator, open_websocket, token_for

pytestmark = pytest.mark.django_db(transaction=True)

PROPERTY = hypothesis_settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def layer_state() -> tuple[dict[str, set[str]], set[str]]:
    """The default layer's non-empty groups (with their channels) and its live channels."""
    layer = get_channel_layer()
    if hasattr(layer, "_get_layer"):  # channels_redis pub/sub: one layer per event loop
        layer = layer._get_layer()
    groups = {group: set(channels) for group, channels in layer.groups.items() if channels}
    return groups, set(layer.channels)


# 44: valid tokens connect, invalid ones are closed with 4401.


def forged(claims: dict, key: str = settings.SIMPLE_JWT["SIGNING_KEY"]) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


@st.composite
def valid_tokens(draw, users):
    user = draw(st.sampled_from(users))
    token = AccessToken.for_user(user)
    token.set_exp(lifetime=timedelta(seconds=draw(st.integers(30, 10**6))))
    token["extra"] = draw(st.text(max_size=20))
    return user, str(token)


@st.composite
def invalid_tokens(draw, active, inactive):
    kind = draw(
        st.sampled_from(
            [
                "random",
                "wrong_signature",
                "expired",
                "refresh",
                "inactive",
                "unknown_user",
                "no_type",
            ]
        )
    )
    now = int(time.time())
    claims = {
        "token_type": "access",
        "exp": now + 300,
        "iat": now,
        "jti": draw(st.uuids()).hex,
        "user_id": str(active.pk),
    }
    if kind == "random":
        return draw(st.text(min_size=1, max_size=300))
    if kind == "wrong_signature":
        return forged(claims, key=draw(st.text(max_size=40)) + "-a-key-that-is-not-this-project's")
    if kind == "expired":
        return forged({**claims, "exp": now - draw(st.integers(1, 10**6))})
    if kind == "refresh":
        return str(RefreshToken.for_user(active))
    if kind == "inactive":
        return str(AccessToken.for_user(inactive))
    if kind == "unknown_user":
        return forged({**claims, "user_id": str(10**9 + draw(st.integers(0, 10**6)))})
    del claims["token_type"]
    return forged(claims)


def test_44_every_valid_token_connects_and_every_invalid_one_gets_4401(make_user):
    active_users = [make_user() for _ in range(3)]
    inactive = make_user(is_active=False)

    @PROPERTY
    @given(
        valid=valid_tokens(active_users),
        invalid=invalid_tokens(active_users[0], inactive),
    )
    def check(valid, invalid):
        user, token = valid

        async def scenario():
            async with open_websocket(f"/ws?token={quote(token)}") as ws:
                assert (await connect_user(ws))["user_id"] == user.pk
            async with open_websocket(f"/ws?token={quote(invalid)}") as ws:
                accepted, _ = await ws.connect(timeout=5)
                assert accepted
                output = await ws.receive_output(timeout=5)
                assert output == {"type": "websocket.close", "code": CloseCode.UNAUTHORIZED}

        async_to_sync(scenario)()

    check()


# 45: a client receives exactly the updates of the tasks it was subscribed to at the time.

operations = st.lists(
    st.tuples(st.sampled_from(["subscribe", "unsubscribe", "update"]), st.integers(0, 2)),
    max_size=25,
)


def test_45_updates_arrive_exactly_for_subscribed_tasks_in_order(user):
    tasks = [services.create_task(owner=user, name=f"t{i}") for i in range(3)]
    token = token_for(user)

    @PROPERTY
    @given(ops=operations)
    def check(ops):
        async def scenario():
            subscribed: set[int] = set()
            expected, received = [], []
            async with open_websocket(f"/ws?token={token}") as ws:
                await connect_user(ws)
                for op, index in ops:
                    task = tasks[index]
                    if op == "update":
                        await database_sync_to_async(services.update_task)(
                            task=task, progress=(task.progress + 1) % 101
                        )
                        if index in subscribed:
                            expected.append((str(task.pk), task.seq))
                            message = await ws.receive_json_from(timeout=5)
                            received.append((message["task_id"], message["seq"]))
                        continue
                    await ws.send_json_to({"action": op, "task_id": str(task.pk)})
                    reply = await ws.receive_json_from(timeout=5)
                    assert reply["type"] == f"{op}d", reply
                    if op == "subscribe":
                        assert reply["seq"] == task.seq
                        subscribed.add(index)
                    else:
                        subscribed.discard(index)
                # Nothing else is on its way: no late or duplicate update.
                if not await ws.receive_nothing(timeout=0.05):
                    pytest.fail(f"unexpected {await ws.receive_output()}")
            assert received == expected

        async_to_sync(scenario)()

    check()


# 47: after any interleaving, nothing of a closed connection remains.

lifecycle = st.lists(
    st.tuples(
        st.sampled_from(["connect", "subscribe", "disconnect"]),
        st.integers(0, 3),
        st.integers(0, 1),
    ),
    max_size=20,
)


def test_47_no_group_membership_or_entry_of_a_closed_connection_remains(user):
    tasks = [services.create_task(owner=user, name=f"t{i}") for i in range(2)]
    token = token_for(user)

    @PROPERTY
    @given(ops=lifecycle)
    def check(ops):
        async def scenario():
            manager = get_connection_manager()
            open_clients: dict[int, WebsocketCommunicator] = {}
            subscribers: dict[int, set[int]] = {0: set(), 1: set()}
            try:
                for op, client, task_index in ops:
                    ws = open_clients.get(client)
                    if op == "connect" and ws is None:
                        ws = open_clients[client] = make_communicator(f"/ws?token={token}")
                        await connect_user(ws)
                    elif op == "subscribe" and ws is not None:
                        await ws.send_json_to(
                            {"action": "subscribe", "task_id": str(tasks[task_index].pk)}
                        )
                        assert (await ws.receive_json_from(timeout=5))["type"] == "subscribed"
                        subscribers[task_index].add(client)
                    elif op == "disconnect" and ws is not None:
                        await open_clients.pop(client).disconnect()
                        for clients in subscribers.values():
                            clients.discard(client)
                    assert await manager.count_connections() == len(open_clients)
                    for index, clients in subscribers.items():
                        assert await manager.count_task_subscribers(tasks[index].pk) == len(clients)
            finally:
                for ws in open_clients.values():
                    await ws.disconnect()
            assert layer_state() == ({}, set())
            assert await manager.count_connections() == 0
            overview = await manager.overview()
            assert (overview.total, overview.by_user, overview.by_task) == (0, {}, {})

        async_to_sync(scenario)()

    check()
