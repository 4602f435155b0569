"""The WebSocket endpoint over a real Daphne, driven by the ``websockets`` client."""

import asyncio
import json

import aiohttp
import pytest
import websockets
from asgiref.sync import async_to_sync

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


async def obtain_token(session: aiohttp.ClientSession, base: str, username: str) -> str:
    async with session.post(
        f"{base}/api/token/", json={"username": username, "password": "pw-123456"}
    ) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["access"]


async def receive_type(ws, type_: str, timeout: float = 10) -> dict:
    """The next message of a type, failing on anything else."""
    message = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    assert message["type"] == type_, message
    return message


async def rest_to_websocket_round_trip(
    http_base: str, ws_base: str, patch_base: str, username: str
) -> None:
    async with aiohttp.ClientSession() as session:
        token = await obtain_token(session, http_base, username)
        auth = {"Authorization": f"Bearer {token}"}
        async with session.post(
            f"{http_base}/api/tasks/", json={"name": "e2e"}, headers=auth
        ) as response:
            assert response.status == 201, await response.text()
            task = await response.json()
        async with websockets.connect(f"{ws_base}/ws?token={token}") as ws:
            connected = await receive_type(ws, "connected")
            assert connected["user_id"] == task["owner"]
            await ws.send(json.dumps({"action": "subscribe", "task_id": task["id"], "id": "s1"}))
            subscribed = await receive_type(ws, "subscribed")
            assert subscribed["id"] == "s1" and subscribed["seq"] == 1
            assert subscribed["task"] == task
            async with session.patch(
                f"{patch_base}/api/tasks/{task['id']}/",
                json={"status": "running", "progress": 40},
                headers=auth,
            ) as response:
                assert response.status == 200, await response.text()
                patched = await response.json()
            update = await receive_type(ws, "task_update")
            assert update["task_id"] == task["id"]
            assert (update["status"], update["progress"], update["seq"]) == ("running", 40, 2)
            assert update["task"] == patched


def test_rest_change_reaches_websocket_subscriber(daphne_server, user):
    async_to_sync(rest_to_websocket_round_trip)(
        daphne_server.http_url, daphne_server.ws_url, daphne_server.http_url, user.username
    )


@pytest.mark.redis
def test_change_in_one_process_reaches_client_of_another(daphne_redis_servers, user):
    first, second = daphne_redis_servers
    async_to_sync(rest_to_websocket_round_trip)(
        first.http_url, second.ws_url, first.http_url, user.username
    )
