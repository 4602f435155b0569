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
from tests.sse import EventReader

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


class SseClient:
    transport = "sse"

    def __init__(self, events: EventReader) -> None:
        self.events = events

    @classmethod
    async def open(cls, stack: AsyncExitStack, server, token: str) -> "SseClient":
        session = await stack.enter_async_context(aiohttp.ClientSession())
        response = await stack.enter_async_context(
            session.get(f"{server.http_url}/events", params={"token": token})
        )
        assert response.status == 200, await response.text()
        client = cls(EventReader(response.content.iter_any()))
        await client.events.next_of("connected")
        return client

    async def next_broadcast(self) -> dict:
        return (await self.events.next_of("broadcast")).json()


async def settle_registry(redis_url: str, live: int, within: float = 5) -> None:
    """Wait until connections of earlier tests, which may still be closing, are gone from
    the shared registry; then it must count exactly the ``live`` ones, which count from
    the moment they were sent ``connected``."""
    with override_settings(REALTIME={**settings.REALTIME, "REDIS_URL": redis_url}):
        registry = make_registry()
    try:
        deadline = time.monotonic() + within
        while (total := (await registry.overview(["websocket", "sse"])).total) > live:
            assert time.monotonic() < deadline, f"registry counts {total}, not {live}"
            await asyncio.sleep(0.05)
        assert total == live
    finally:
        await registry.close()


async def open_clients(stack: AsyncExitStack, servers, tokens: list[str]) -> list:
    """WebSocket and SSE clients, in turn, spread over both servers."""
    kinds = [WebSocketClient, SseClient]
    return [
        await kinds[index % 2].open(stack, servers[index // 2 % len(servers)], token)
        for index, token in enumerate(tokens)
    ]


def expected_counts(clients: list) -> dict[str, int]:
    by_transport = {
        transport: sum(client.transport == transport for client in clients)
        for transport in ("websocket", "sse")
    }
    return {"recipients": len(clients), **by_transport}


def test_rest_broadcast_is_counted_across_processes(daphne_redis_servers, redis_server, make_user):
    first, second = daphne_redis_servers
    staff = make_user(is_staff=True)
    tokens = [token_for(make_user()) for _ in range(5)] + [token_for(staff)]

    async def scenario():
        async with AsyncExitStack() as stack:
            clients = await open_clients(stack, (first, second), tokens)
            await settle_registry(redis_server, len(clients))
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"{second.http_url}/broadcast",
                    json={"message": "Across processes", "level": "info"},
                    headers={"Authorization": f"Bearer {token_for(staff)}"},
                ) as response:
                    assert response.status == 200, await response.text()
                    counts = await response.json()
            assert counts == expected_counts(clients) == {"recipients": 6, "websocket": 3, "sse": 3}
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
    tokens = [token_for(make_user()) for _ in range(4)]

    async def scenario():
        async with AsyncExitStack() as stack:
            clients = await open_clients(stack, daphne_redis_servers, tokens)
            await settle_registry(redis_server, len(clients))
            result = await asyncio.to_thread(
                run_broadcast_command, redis_server, "From the shell", "--type", "ops"
            )
            assert result.returncode == 0, result.stderr
            match = re.fullmatch(
                r"Broadcast sent to (\d+) connection\(s\): (\d+) WebSocket, (\d+) SSE\.\n",
                result.stdout,
            )
            assert match, result.stdout
            assert [int(n) for n in match.groups()] == list(expected_counts(clients).values())
            for client in clients:
                payload = (await client.next_broadcast())["payload"]
                assert payload == {"message": "From the shell", "type": "ops"}

    async_to_sync(scenario)()
    record = Broadcast.objects.get()
    assert (record.sent_by, record.recipients) == (None, len(tokens))
