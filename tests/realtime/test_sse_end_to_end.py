"""``GET /events`` over a real Daphne, read by aiohttp and by a plain socket.

Task changes are made through the server's REST API, so they travel the server's own
publish path; the server's registry is read back through ``POST /broadcast``, whose answer
counts the live SSE streams of every process.
"""

import asyncio
import json
from datetime import datetime
from itertools import pairwise

import aiohttp
import pytest
from asgiref.sync import async_to_sync

from mcp_platform.tasks import services
from tests.conftest import broadcast_census, patch_task, start_server, token_for
from tests.sse import EventReader, RawResponse

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

#: The heartbeat of the server started here, in seconds; short, so tests see several.
HEARTBEAT = 1.0


@pytest.fixture(scope="module")
def heartbeat_server(django_db_setup, django_db_blocker, tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("sse-heartbeat"),
        {"REALTIME_SSE_HEARTBEAT_SECONDS": str(HEARTBEAT)},
    )
    yield server
    server.stop()


def assert_update(event, task, patched: dict, seq: int) -> None:
    assert event.type == "task_update"
    assert event.last_event_id == f"{task.pk}:{seq}"
    body = event.json()
    assert (body["type"], body["task_id"], body["seq"]) == ("task_update", str(task.pk), seq)
    assert (body["status"], body["progress"]) == (patched["status"], patched["progress"])
    assert body["task"] == patched


async def header_auth_round_trip(stream_base: str, patch_base: str, user, task) -> None:
    token = token_for(user)
    async with aiohttp.ClientSession() as session:
        async with session.get(
            f"{stream_base}/events",
            params={"task_id": str(task.pk)},
            headers={"Authorization": f"Bearer {token}", "Accept": "text/event-stream"},
        ) as response:
            assert response.status == 200
            assert response.headers.getall("Content-Type") == ["text/event-stream"]
            assert response.headers.getall("Cache-Control") == ["no-store"]
            assert response.headers.getall("X-Accel-Buffering") == ["no"]
            assert response.headers.getall("Connection") == ["keep-alive"]
            assert response.headers.getall("Transfer-Encoding") == ["chunked"]
            events = EventReader(response.content.iter_any())
            connected = (await events.next_of("connected")).json()
            assert connected["user_id"] == user.pk
            assert events.parser.retry == 3000
            patched = await patch_task(
                patch_base, token, task.pk, {"status": "running", "progress": 40}
            )
            assert_update(await events.next_event(), task, patched, seq=2)


def test_header_auth_stream_carries_a_rest_patch(daphne_server, user, task):
    async_to_sync(header_auth_round_trip)(
        daphne_server.http_url, daphne_server.http_url, user, task
    )


@pytest.mark.redis
def test_patch_in_one_process_reaches_stream_of_another(daphne_redis_servers, user, task):
    first, second = daphne_redis_servers
    async_to_sync(header_auth_round_trip)(second.http_url, first.http_url, user, task)


def test_query_token_stream_wire_format(daphne_server, user, task):
    """What a browser's ``EventSource`` sends and gets: the exact header lines and bytes."""

    async def scenario():
        token = token_for(user)
        response = await RawResponse.get(
            daphne_server.port,
            f"/events?token={token}",
            {"Accept": "text/event-stream", "Cache-Control": "no-cache"},
        )
        try:
            assert response.status_line == "HTTP/1.1 200 OK"
            assert response.header("Content-Type") == ["text/event-stream"]
            assert response.header("Cache-Control") == ["no-store"]
            assert response.header("X-Accel-Buffering") == ["no"]
            assert response.header("Connection") == ["keep-alive"]
            assert response.header("Transfer-Encoding") == ["chunked"]
            assert response.header("Content-Length") == []
            events = EventReader(response.chunks())
            connected = await events.next_of("connected")
            assert events.body == (
                b"retry: 3000\n\nevent: connected\ndata: "
                + json.dumps(connected.json(), separators=(",", ":")).encode()
                + b"\n\n"
            )
            assert list(connected.json()) == ["connection_id", "user_id", "expires_at"]
            # Without task_id the stream follows every task the user owns.
            patched = await patch_task(daphne_server.http_url, token, task.pk, {"progress": 7})
            update = await events.next_event()
            assert_update(update, task, patched, seq=2)
            block = events.body.split(b"\n\n")[-2]
            assert block.split(b"\n")[:2] == [b"event: task_update", f"id: {task.pk}:2".encode()]
            assert len(block.split(b"\n")) == 3  # the JSON is on one data line
        finally:
            await response.close()

    async_to_sync(scenario)()


@pytest.mark.parametrize(
    "http_version, headers, connection, transfer_encoding",
    [
        ("1.1", {"Connection": "close"}, ["close"], ["chunked"]),
        ("1.0", {}, [], []),
    ],
)
def test_daphne_manages_the_connection_where_keep_alive_is_not_true(
    daphne_server, user, http_version, headers, connection, transfer_encoding
):
    """Daphne answers ``Connection: close`` itself, and streams HTTP/1.0 unchunked until
    it closes; the view adds no ``keep-alive`` to either."""

    async def scenario():
        response = await RawResponse.get(
            daphne_server.port,
            f"/events?token={token_for(user)}",
            headers,
            http_version=http_version,
        )
        try:
            assert response.status_line == f"HTTP/{http_version} 200 OK"
            assert response.header("Connection") == connection
            assert response.header("Transfer-Encoding") == transfer_encoding
            events = EventReader(response.chunks())
            assert (await events.next_of("connected")).json()["user_id"] == user.pk
        finally:
            await response.close()

    async_to_sync(scenario)()


def test_heartbeat_with_a_short_interval(heartbeat_server, user):
    async def scenario():
        response = await RawResponse.get(heartbeat_server.port, f"/events?token={token_for(user)}")
        try:
            events = EventReader(response.chunks())
            loop = asyncio.get_running_loop()
            await events.next_of("connected")
            arrivals, stamps = [loop.time()], []
            for _ in range(2):
                heartbeat = await events.next_of("heartbeat", timeout=HEARTBEAT + 5)
                arrivals.append(loop.time())
                stamps.append(datetime.fromisoformat(heartbeat.json()["timestamp"]))
            # The server's clock says the interval was kept; the client's, that each
            # heartbeat came about when due (delivery may only add delay).
            assert (stamps[1] - stamps[0]).total_seconds() >= HEARTBEAT
            gaps = [later - earlier for earlier, later in pairwise(arrivals)]
            assert all(gap < HEARTBEAT + 2 for gap in gaps), gaps
        finally:
            await response.close()

    async_to_sync(scenario)()


def test_closing_the_stream_removes_it_from_the_servers_registry(
    heartbeat_server, user, staff_user, task
):
    """Within one heartbeat of the client closing, the server counts the stream no more."""

    async def scenario():
        base, staff_token = heartbeat_server.http_url, token_for(staff_user)
        before = (await broadcast_census(base, staff_token))["sse"]
        response = await RawResponse.get(
            heartbeat_server.port, f"/events?token={token_for(user)}&task_id={task.pk}"
        )
        events = EventReader(response.chunks())
        await events.next_of("connected")
        assert (await broadcast_census(base, staff_token))["sse"] == before + 1
        # The census reached this very stream.
        assert (await events.next_of("broadcast")).json()["payload"]["message"] == "census"
        await response.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HEARTBEAT
        while (count := (await broadcast_census(base, staff_token))["sse"]) != before:
            assert loop.time() < deadline, f"still counted {count - before} stream(s)"
            await asyncio.sleep(0.05)

    async_to_sync(scenario)()


async def refusal(base: str, query: str, headers: dict | None = None) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/events{query}", headers=headers or {}) as response:
            assert response.headers.getall("Content-Type") == ["application/json"]
            return response.status, await response.json()


def test_bad_requests_get_json_errors_and_no_stream(daphne_server, user, other_user, task):
    foreign = services.create_task(owner=other_user, name="not yours")

    async def scenario():
        base, token = daphne_server.http_url, token_for(user)
        status, body = await refusal(base, "")
        assert (status, body["code"]) == (401, "not_authenticated")
        status, body = await refusal(base, "?token=garbage")
        assert (status, body["code"]) == (401, "authentication_failed")
        status, body = await refusal(base, "", {"Authorization": "Bearer garbage"})
        assert (status, body["code"]) == (401, "authentication_failed")
        status, body = await refusal(base, f"?token={token}&task_id=nope")
        assert (status, body["code"]) == (400, "invalid_task_id")
        absent = await refusal(base, f"?token={token}&task_id=00000000-0000-4000-8000-000000000000")
        foreign_task = await refusal(base, f"?token={token}&task_id={foreign.pk}")
        assert absent == foreign_task == (404, {"code": "not_found", "detail": "No such task."})

    async_to_sync(scenario)()


def test_streams_opened_together_all_connect_and_get_the_update(daphne_server, make_user, task):
    """Many streams authenticating and subscribing at one moment share database reads
    (realtime.batching); each must still get its own stream, whichever finishes first."""
    watchers = [make_user(is_staff=True) for _ in range(5)]

    async def scenario():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

            async def open_stream(watcher):
                response = await session.get(
                    f"{daphne_server.http_url}/events",
                    params={"task_id": str(task.pk)},
                    headers={"Authorization": f"Bearer {token_for(watcher)}"},
                )
                assert response.status == 200, await response.text()
                events = EventReader(response.content.iter_any())
                await events.next_of("connected")
                return response, events

            streams = await asyncio.gather(*(open_stream(watchers[i % 5]) for i in range(200)))
            patched = await patch_task(
                daphne_server.http_url, token_for(watchers[0]), task.pk, {"progress": 5}
            )
            for response, events in streams:
                assert_update(await events.next_of("task_update"), task, patched, seq=2)
                response.close()

    async_to_sync(scenario)()
