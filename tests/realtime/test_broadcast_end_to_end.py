"""Broadcasts over real Daphne processes sharing Redis: from ``POST /broadcast`` and from
``manage.py broadcast``, counted across processes and received by every client."""

import asyncio
import json
import os
import re
import subprocess
import sys
import time
from contextlib import AsyncExitStack

import aiohttp
import pytest
import websockets
from asgiref.sync import async_to_sync
from django.conf import settings
from django.test import override_settings

from realtime.connections import make_registry
from realtime.models import Broadcast
from tests.conftest import ROOT, server_database_url, token_for

pytestmark = [pytest.mark.e2e, pytest.mark.redis, pytest.mark.django_db(transaction=True)]


class WebSocketClient:
    transport = "websocket"

    def __init__(self, ws) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, stack: AsyncExitStack, server, token: str) -> "WebSocketClient":
        ws = await stack.enter_async_context(
            websockets.connect(f"{server.ws_url}/ws?token={token}")
        )
        client = cls(ws)
        assert (await client.next_message())["type"] == "connected"
        return client

    async def next_message(self, timeout: float = 10) -> dict:
        return json.loads(await asyncio.wait_for(self.ws.recv(), timeout))

    async def next_broadcast(self) -> dict:
        message = await self.next_message()
        assert message["type"] == "broadcast", message
        return message


async def wait_for_registry_total(redis_url: str, expected: int, within: float = 5) -> None:
    """Wait until the shared registry counts ``expected`` connections: connections of
    earlier tests may still be closing."""
    with override_settings(REALTIME={**settings.REALTIME, "REDIS_URL": redis_url}):
        registry = make_registry()
    try:
        deadline = time.monotonic() + within
        while (total := (await registry.overview(["websocket", "sse"])).total) != expected:
            assert time.monotonic() < deadline, f"registry counts {total}, not {expected}"
            await asyncio.sleep(0.05)
    finally:
        await registry.close()


async def open_clients(stack: AsyncExitStack, servers, tokens: list[str]) -> list:
    """Clients spread over both servers."""
    clients = []
    for index, token in enumerate(tokens):
        server = servers[index % len(servers)]
        clients.append(await WebSocketClient.open(stack, server, token))
    return clients


def test_rest_broadcast_is_counted_across_processes(daphne_redis_servers, redis_server, make_user):
    first, second = daphne_redis_servers
    staff = make_user(is_staff=True)
    tokens = [token_for(make_user()) for _ in range(3)] + [token_for(staff)]

    async def scenario():
        async with AsyncExitStack() as stack:
            clients = await open_clients(stack, (first, second), tokens)
            await wait_for_registry_total(redis_server, len(clients))
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{second.http_url}/broadcast",
                    json={"message": "Across processes", "level": "info"},
                    headers={"Authorization": f"Bearer {token_for(staff)}"},
                ) as response:
                    assert response.status == 200, await response.text()
                    counts = await response.json()
            assert counts == {"recipients": len(clients), "websocket": len(clients), "sse": 0}
            expected = {"message": "Across processes", "level": "info", "type": "announcement"}
            for client in clients:
                assert (await client.next_broadcast())["payload"] == expected

    async_to_sync(scenario)()
    record = Broadcast.objects.get()
    assert (record.sent_by, record.recipients) == (staff, len(tokens))


def run_broadcast_command(redis_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": server_database_url()}
    return subprocess.run(
        [sys.executable, "manage.py", "broadcast", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_command_count_is_seen_by_real_clients(daphne_redis_servers, redis_server, make_user):
    tokens = [token_for(make_user()) for _ in range(3)]

    async def scenario():
        async with AsyncExitStack() as stack:
            clients = await open_clients(stack, daphne_redis_servers, tokens)
            await wait_for_registry_total(redis_server, len(clients))
            result = await asyncio.to_thread(
                run_broadcast_command, redis_server, "From the shell", "--type", "ops"
            )
            assert result.returncode == 0, result.stderr
            match = re.fullmatch(
                r"Broadcast sent to (\d+) connection\(s\): (\d+) WebSocket, (\d+) SSE\.\n",
                result.stdout,
            )
            assert match, result.stdout
            assert [int(n) for n in match.groups()] == [len(clients), len(clients), 0]
            for client in clients:
                payload = (await client.next_broadcast())["payload"]
                assert payload == {"message": "From the shell", "type": "ops"}

    async_to_sync(scenario)()
    record = Broadcast.objects.get()
    assert (record.sent_by, record.recipients) == (None, len(tokens))
