"""``REALTIME_MAX_CONNECTIONS_PER_USER`` over real Daphne processes: one process on the
in-process layer, and two sharing Redis, where a user's connections are counted in both."""

import asyncio
import contextlib
import json
import time

import aiohttp
import pytest
import websockets
from asgiref.sync import async_to_sync

from tests.conftest import start_server, token_for
from tests.sse import EventReader

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

LIMIT = 2


@pytest.fixture(scope="module")
def limited_server(django_db_setup, django_db_blocker, tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("limited"), {"REALTIME_MAX_CONNECTIONS_PER_USER": str(LIMIT)}
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def limited_redis_servers(django_db_setup, django_db_blocker, tmp_path_factory, redis_server):
    tmp = tmp_path_factory.mktemp("limited-redis")
    env = {"REDIS_URL": redis_server, "REALTIME_MAX_CONNECTIONS_PER_USER": str(LIMIT)}
    servers = [start_server(tmp, env) for _ in range(2)]
    yield servers
    for server in servers:
        server.stop()


async def open_websocket(stack: contextlib.AsyncExitStack, url: str) -> int | None:
    """Open a WebSocket kept open by ``stack``: ``None`` once it is connected, or the code
    it was closed with before anything was sent."""
    ws = await stack.enter_async_context(websockets.connect(url))
    try:
        message = json.loads(await asyncio.wait_for(ws.recv(), 10))
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code
    assert message["type"] == "connected", message
    return None


async def open_stream(
    stack: contextlib.AsyncExitStack, session: aiohttp.ClientSession, base: str, token: str
) -> tuple[int, dict | None]:
    """Open an event stream kept open by ``stack``: its status, and the JSON body of a
    refusal (``None`` once ``connected`` arrived)."""
    response = await stack.enter_async_context(
        session.get(f"{base}/events", headers={"Authorization": f"Bearer {token}"})
    )
    if response.status != 200:
        return response.status, await response.json()
    await EventReader(response.content.iter_any()).next_of("connected")
    return 200, None


async def connects_within(url: str, seconds: float) -> bool:
    """Whether a WebSocket of ``url`` gets ``connected`` within ``seconds``, trying again
    while it is refused 4429 (a connection that ends leaves the count a moment later)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        async with contextlib.AsyncExitStack() as stack:
            code = await open_websocket(stack, url)
            if code is None:
                return True
            assert code == 4429
        await asyncio.sleep(0.1)
    return False


async def the_limit_holds_across_transports(bases: list, user, other_user) -> None:
    """Bases: one server, or two sharing Redis, whose first holds the user's first
    connection and whose second is asked for the rest."""
    first, second = bases[0], bases[-1]
    token = token_for(user)
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        held = contextlib.AsyncExitStack()
        await stack.enter_async_context(held)
        assert await open_websocket(held, f"{first.ws_url}/ws?token={token}") is None
        assert await open_stream(stack, session, second.http_url, token) == (200, None)

        assert await open_websocket(stack, f"{second.ws_url}/ws?token={token}") == 4429
        status, body = await open_stream(stack, session, first.http_url, token)
        assert (status, body["code"]) == (429, "too_many_connections")
        assert body["detail"] == f"A user may hold at most {LIMIT} connections at once."
        # Another user's connections are theirs to count.
        other = token_for(other_user)
        assert await open_websocket(stack, f"{second.ws_url}/ws?token={other}") is None

        await held.aclose()  # the first one ends: there is room for one more
        assert await connects_within(f"{second.ws_url}/ws?token={token}", 10)


def test_a_users_connections_past_the_limit_are_refused(limited_server, user, other_user):
    async_to_sync(the_limit_holds_across_transports)([limited_server], user, other_user)


@pytest.mark.redis
def test_a_users_connections_in_every_process_count_toward_the_limit(
    limited_redis_servers, user, other_user
):
    async_to_sync(the_limit_holds_across_transports)(limited_redis_servers, user, other_user)


async def burst(bases: list, user, count: int) -> list[int | None]:
    """``count`` WebSockets of one user opened at once, dealt out to ``bases``; what each
    got, while all are held open."""
    token = token_for(user)
    async with contextlib.AsyncExitStack() as stack:
        return await asyncio.gather(
            *(
                open_websocket(stack, f"{bases[i % len(bases)].ws_url}/ws?token={token}")
                for i in range(count)
            )
        )


def test_connections_opened_at_once_pass_the_limit_no_more_than_it_allows(limited_server, user):
    outcomes = async_to_sync(burst)([limited_server], user, 12)
    assert sorted(outcomes, key=str) == [4429] * 10 + [None] * LIMIT


@pytest.mark.redis
def test_connections_opened_at_once_in_several_processes_pass_the_limit_no_more(
    limited_redis_servers, user
):
    outcomes = async_to_sync(burst)(limited_redis_servers, user, 12)
    assert sorted(outcomes, key=str) == [4429] * 10 + [None] * LIMIT
