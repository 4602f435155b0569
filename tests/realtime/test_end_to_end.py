"""The WebSocket endpoint over a real Daphne, driven by the ``websockets`` client."""

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
import threading
import time
import uuid
from datetime import timedelta

import aiohttp
import pytest
import websockets
from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import connection as db_connection
from django.db import transaction
from django.test import Client

from bench.procstat import rss_kib
from mcp_platform.tasks import services
from mcp_platform.tasks.models import Task
from tests.conftest import (
    free_port,
    patch_task,
    run_manage,
    start_server,
    token_for,
)

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


async def create_task(session: aiohttp.ClientSession, base: str, auth: dict, name: str) -> dict:
    async with session.post(f"{base}/api/tasks/", json={"name": name}, headers=auth) as response:
        assert response.status == 201, await response.text()
        return await response.json()


@contextlib.asynccontextmanager
async def subscribed(ws_base: str, token: str, task_id: str):
    """A WebSocket client, connected and subscribed to a task."""
    async with websockets.connect(f"{ws_base}/ws?token={token}") as ws:
        await receive_type(ws, "connected")
        await ws.send(json.dumps({"action": "subscribe", "task_id": task_id}))
        await receive_type(ws, "subscribed")
        yield ws


async def rest_to_websocket_round_trip(
    http_base: str, ws_base: str, patch_base: str, username: str
) -> None:
    async with aiohttp.ClientSession() as session:
        token = await obtain_token(session, http_base, username)
        auth = {"Authorization": f"Bearer {token}"}
        task = await create_task(session, http_base, auth, "e2e")
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


async def expect_close(url: str, code: int, frame: str | None = None, **connect_options) -> None:
    async with websockets.connect(url, max_size=None, **connect_options) as ws:
        if frame is not None:
            assert (await receive_type(ws, "connected"))["type"] == "connected"
            await ws.send(frame)
        with pytest.raises(websockets.ConnectionClosed) as caught:
            await asyncio.wait_for(ws.recv(), 10)
        assert caught.value.rcvd.code == code


def test_bad_token_is_closed_4401_over_daphne(daphne_server):
    async_to_sync(expect_close)(f"{daphne_server.ws_url}/ws?token=forged", 4401)


# Over REALTIME_MAX_MESSAGE_BYTES, the application closes the connection; over Daphne's
# own limit (1 MiB), the server does, at the frame's header.
@pytest.mark.parametrize("size", [65537, 1024 * 1024 + 1])
def test_oversize_frame_is_closed_4009_over_daphne(daphne_server, user, size):
    """The log says why, at either limit: Daphne's closed without a line."""
    url = f"{daphne_server.ws_url}/ws?token={token_for(user)}"

    def logged() -> int:
        return daphne_server.log_path.read_text().count("(4009)")

    before = logged()
    async_to_sync(expect_close)(url, 4009, frame="x" * size)
    deadline = time.monotonic() + 5
    while logged() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logged() == before + 1


def test_a_client_sending_faster_than_it_is_answered_is_held_back_not_buffered(daphne_server, user):
    """Subscribes to unknown tasks, each a database read, sent as fast as the client can
    for a second. Before the server stopped reading such a client, it took in frames as
    they came: these grew it by 126 MiB."""
    url = f"{daphne_server.ws_url}/ws?token={token_for(user)}"

    async def scenario():
        async with websockets.connect(url) as ws:
            await receive_type(ws, "connected")
            answered: list[str] = []

            async def read() -> None:
                async for text in ws:
                    answered.append(json.loads(text)["id"])

            reader = asyncio.create_task(read())
            before = rss_kib(daphne_server.process.pid)
            sent, start = 0, asyncio.get_running_loop().time()
            while asyncio.get_running_loop().time() - start < 1:
                frame = {"action": "subscribe", "task_id": str(uuid.uuid4()), "id": str(sent)}
                await ws.send(json.dumps({**frame, "padding": PADDING}))
                sent += 1
            grown = rss_kib(daphne_server.process.pid) - before
            await ws.send(json.dumps({"action": "ping", "id": "last"}))
            await asyncio.wait_for(reader_reaches(answered, "last"), 60)
            reader.cancel()
        assert grown < 16 * 1024, f"the server grew by {grown} KiB for {sent} frames"
        # Every one was answered, in order: held back, nothing was lost.
        assert answered == [*map(str, range(sent)), "last"]

    async_to_sync(scenario)()


#: Makes each frame 4 KiB: received as fast as they are sent, frames cost the server memory.
PADDING = "x" * 4000


async def reader_reaches(answered: list[str], last: str) -> None:
    while not answered or answered[-1] != last:
        await asyncio.sleep(0.05)


def test_a_connection_is_closed_4401_over_daphne_when_its_token_expires(daphne_server, user):
    token = token_for(user, lifetime=timedelta(seconds=2))

    async def scenario():
        async with websockets.connect(f"{daphne_server.ws_url}/ws?token={token}") as ws:
            await receive_type(ws, "connected")
            with pytest.raises(websockets.ConnectionClosed) as caught:
                await asyncio.wait_for(ws.recv(), 10)
            assert caught.value.rcvd.code == 4401

    async_to_sync(scenario)()


def test_foreign_origin_is_refused_403_and_no_origin_is_allowed(daphne_server, user):
    url = f"{daphne_server.ws_url}/ws?token={token_for(user)}"

    async def scenario():
        with pytest.raises(websockets.InvalidStatus) as caught:
            async with websockets.connect(url, origin="https://evil.example"):
                pass
        assert caught.value.response.status_code == 403
        async with websockets.connect(url, origin=f"http://127.0.0.1:{daphne_server.port}") as ws:
            await receive_type(ws, "connected")
        async with websockets.connect(url) as ws:  # no Origin header at all
            await receive_type(ws, "connected")

    async_to_sync(scenario)()


async def upload_head(port: int, path: str, headers: dict[str, str], first: bytes):
    """A POST's head and the first bytes of its body, sent on a connection of its own."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + first)
    await writer.drain()
    return reader, writer


def answer_of(raw: bytes) -> tuple[str, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)


@pytest.mark.parametrize("coding", ["length", "chunked"])
def test_a_body_over_the_limit_is_refused_413_as_it_arrives(daphne_server, settings, coding):
    """Daphne kept a whole body, then queued it in memory, before Django could refuse it:
    one anonymous upload of 1 GB held ~1 GB of the server after its 413."""
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE  # the server's too: the suite's settings
    piece = b"x" * 65536
    if coding == "length":
        headers = {"Content-Type": "application/json", "Content-Length": str(100 * limit)}
        headers["Expect"] = "100-continue"
        first = piece
    else:
        headers = {"Content-Type": "application/json", "Transfer-Encoding": "chunked"}
        first = b"%x\r\n%b\r\n" % (len(piece), piece)

    async def scenario() -> bytes:
        reader, writer = await upload_head(daphne_server.port, "/api/token/", headers, first)
        try:
            # The rest of a body over the limit, never ended: only a refusal as it arrives
            # is answered.
            for _ in range(limit // len(piece) + 1 if coding == "chunked" else 0):
                writer.write(first)
                await writer.drain()
            return await asyncio.wait_for(reader.read(), 10)  # answered, then closed
        finally:
            writer.close()

    status, body = answer_of(async_to_sync(scenario)())
    assert status == "HTTP/1.1 413 Request Entity Too Large"
    assert body == {
        "code": "payload_too_large",
        "detail": f"The body must be at most {limit} bytes.",
    }


def test_a_body_over_the_limit_is_refused_413_on_a_unix_socket_too(
    django_db_setup, tmp_path, settings
):
    """The refusal's log line read the peer's host, which a Unix socket's address has not:
    the connection was dropped without its 413."""
    socket_path = tmp_path / "server.sock"
    server = start_server(tmp_path, args=["-u", str(socket_path)])
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    head = f"POST /api/token/ HTTP/1.1\r\nHost: localhost\r\nContent-Length: {limit + 1}\r\n"

    async def scenario() -> bytes:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            writer.write(head.encode() + b"Content-Type: application/json\r\n\r\n")
            await writer.drain()
            return await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    try:
        status, body = answer_of(async_to_sync(scenario)())
    finally:
        server.stop()
    assert (status, body["code"]) == ("HTTP/1.1 413 Request Entity Too Large", "payload_too_large")


def test_a_body_within_the_limit_still_reaches_the_api(daphne_server, user):
    body = json.dumps({"username": user.username, "password": "x" * 100_000}).encode()
    headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}

    async def scenario() -> bytes:
        reader, writer = await upload_head(daphne_server.port, "/api/token/", headers, body)
        try:
            return await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        finally:
            writer.close()

    assert async_to_sync(scenario)().startswith(b"HTTP/1.1 401")  # read, and refused


async def served_here(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """The real-time gauges a server's ``/metrics`` reports."""
    async with session.get(f"{base}/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in text.splitlines())
        if name.startswith("realtime_")
    }


def test_the_servers_metrics_count_its_connections_and_subscriptions(daphne_server, user):
    task = services.create_task(owner=user, name="counted")
    token = token_for(user)
    websocket = 'realtime_connections{transport="websocket"}'
    sse = 'realtime_connections{transport="sse"}'

    async def scenario() -> tuple[dict, dict, dict]:
        async with aiohttp.ClientSession() as session:
            before = await served_here(session, daphne_server.http_url)
            stream_url = f"{daphne_server.http_url}/events?token={token}&task_id={task.pk}"
            async with (
                subscribed(daphne_server.ws_url, token, str(task.pk)),
                websockets.connect(f"{daphne_server.ws_url}/ws?token={token}") as idle,
                session.get(stream_url) as stream,
            ):
                await receive_type(idle, "connected")
                assert (await stream.content.readuntil(b"event: connected")).endswith(b"connected")
                during = await served_here(session, daphne_server.http_url)
            deadline = asyncio.get_running_loop().time() + 5
            while (after := await served_here(session, daphne_server.http_url)) != before:
                assert asyncio.get_running_loop().time() < deadline, after
                await asyncio.sleep(0.05)
            return before, during, after

    before, during, after = async_to_sync(scenario)()
    assert during[websocket] - before[websocket] == 2
    assert during[sse] - before[sse] == 1
    assert during["realtime_subscriptions"] - before["realtime_subscriptions"] == 2


def test_a_handshake_on_a_path_with_no_endpoint_is_refused_403_quietly(daphne_server, user):
    logged = daphne_server.log_path.stat().st_size
    origin = f"http://127.0.0.1:{daphne_server.port}"

    async def scenario():
        for path in ("/nope", "/events", "/ws/extra"):
            url = f"{daphne_server.ws_url}{path}?token={token_for(user)}"
            assert await handshake_status(url, origin, {}, open_timeout=3) == 403

    async_to_sync(scenario)()
    assert "Traceback" not in daphne_server.log_path.read_text(errors="replace")[logged:]


def test_a_session_handshake_from_another_port_of_the_host_is_refused_403(daphne_server, user):
    url, port = f"{daphne_server.ws_url}/ws", daphne_server.port
    headers = session_headers(user)

    async def scenario():
        assert await handshake_status(url, f"http://127.0.0.1:{port}", headers) == 101
        assert await handshake_status(url, f"http://127.0.0.1:{port + 1}", headers) == 403

    async_to_sync(scenario)()


def session_headers(user) -> dict[str, str]:
    client = Client()
    client.force_login(user)
    cookie = client.cookies[settings.SESSION_COOKIE_NAME]
    return {"Cookie": f"{cookie.key}={cookie.value}"}


async def handshake_status(url: str, origin: str, headers: dict, **options) -> int:
    """101 if the handshake was accepted (and ``connected`` followed), else its status."""
    try:
        connecting = websockets.connect(url, origin=origin, additional_headers=headers, **options)
        async with connecting as ws:
            await receive_type(ws, "connected")
            return 101
    except websockets.InvalidStatus as refused:
        return refused.response.status_code


@pytest.fixture(scope="module")
def tls_server(django_db_setup, tmp_path_factory):
    """A server that also listens with TLS, on a certificate of its own."""
    tmp = tmp_path_factory.mktemp("tls")
    key, cert = tmp / "key.pem", tmp / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"]
        + ["-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    port = free_port()
    endpoint = f"ssl:{port}:interface=127.0.0.1:privateKey={key}:certKey={cert}"
    server = start_server(tmp, args=["-e", endpoint])
    context = ssl.create_default_context(cafile=str(cert))
    yield f"wss://127.0.0.1:{port}/ws", f"https://127.0.0.1:{port}", context
    server.stop()


def test_a_session_handshake_over_tls_must_come_from_the_https_origin(tls_server, user):
    """Daphne's WebSocket scope had no scheme: the site's own https page was refused, and a
    plain-http page of it let in."""
    url, own, context = tls_server
    headers = session_headers(user)

    async def scenario():
        assert await handshake_status(url, own, headers, ssl=context) == 101
        plain = own.replace("https://", "http://")
        assert await handshake_status(url, plain, headers, ssl=context) == 403

    async_to_sync(scenario)()


@pytest.fixture(scope="module")
def proxied_server(django_db_setup, tmp_path_factory):
    """A server behind a proxy that terminates TLS, told so by X-Forwarded-Proto."""
    server = start_server(tmp_path_factory.mktemp("proxied"), args=["--proxy-headers"])
    yield server
    server.stop()


def test_a_session_handshake_through_a_tls_proxy_must_come_from_the_https_origin(
    proxied_server, user
):
    url, host = f"{proxied_server.ws_url}/ws", f"127.0.0.1:{proxied_server.port}"
    forwarded = {**session_headers(user), "X-Forwarded-For": "10.0.0.1"}

    async def scenario():
        https = {**forwarded, "X-Forwarded-Proto": "https"}
        assert await handshake_status(url, f"https://{host}", https) == 101
        assert await handshake_status(url, f"http://{host}", https) == 403
        assert await handshake_status(url, f"http://{host}", forwarded) == 101  # plain http

    async_to_sync(scenario)()


@pytest.fixture(scope="module")
def server_without_redis(django_db_setup, tmp_path_factory):
    """A process configured for Redis where nothing listens."""
    unused = f"redis://127.0.0.1:{free_port()}/0"
    server = start_server(tmp_path_factory.mktemp("no-redis"), {"REDIS_URL": unused})
    yield server
    server.stop()


@pytest.mark.redis
def test_management_command_in_another_process_reaches_websocket_client(
    daphne_redis_servers, redis_server, user
):
    task = services.create_task(owner=user, name="from a command")
    server = daphne_redis_servers[0]

    async def scenario():
        async with websockets.connect(f"{server.ws_url}/ws?token={token_for(user)}") as ws:
            await receive_type(ws, "connected")
            await ws.send(json.dumps({"action": "subscribe", "task_id": str(task.pk)}))
            await receive_type(ws, "subscribed")
            await run_manage(redis_server, "update_task", str(task.pk), "--progress", "75")
            update = await receive_type(ws, "task_update", timeout=20)
            assert (update["progress"], update["seq"]) == (75, 2)

    async_to_sync(scenario)()


def test_concurrent_changes_of_one_task_all_succeed_and_arrive_in_order(daphne_server, user):
    """Requests run in threads of their own; overlapping writers must queue, not fail."""

    async def scenario():
        async with aiohttp.ClientSession() as session:
            token = await obtain_token(session, daphne_server.http_url, user.username)
            auth = {"Authorization": f"Bearer {token}"}
            task = await create_task(session, daphne_server.http_url, auth, "busy")
            async with subscribed(daphne_server.ws_url, token, task["id"]) as ws:

                async def patch(progress: int) -> int:
                    async with session.patch(
                        f"{daphne_server.http_url}/api/tasks/{task['id']}/",
                        json={"progress": progress},
                        headers=auth,
                    ) as response:
                        return response.status

                statuses = await asyncio.gather(*(patch(p) for p in range(1, 25)))
                assert statuses == [200] * 24
                seqs = [(await receive_type(ws, "task_update"))["seq"] for _ in range(24)]
                assert seqs == list(range(2, 26))

    async_to_sync(scenario)()


@pytest.mark.parametrize(
    "servers", ["daphne_server", pytest.param("daphne_redis_servers", marks=pytest.mark.redis)]
)
def test_a_stream_of_changes_reaches_every_subscriber_whole_and_in_order(request, servers, user):
    """Changes kept in flight 8 at a time, as the benchmark's sustained stream sends them:
    every subscriber gets every one, the last included, once and in order; on Redis, the
    subscribers are split between the publishing process and another."""
    servers = request.getfixturevalue(servers)
    servers = list(servers) if isinstance(servers, tuple) else [servers]
    publisher = servers[0]
    subscribers, changes, in_flight = 20, 200, 8

    async def scenario():
        async with aiohttp.ClientSession() as session:
            token = await obtain_token(session, publisher.http_url, user.username)
            auth = {"Authorization": f"Bearer {token}"}
            task = await create_task(session, publisher.http_url, auth, "stream")
            gate = asyncio.Semaphore(in_flight)

            async def patch(progress: int) -> int:
                async with gate:
                    async with session.patch(
                        f"{publisher.http_url}/api/tasks/{task['id']}/",
                        json={"progress": progress % 101},
                        headers=auth,
                    ) as response:
                        return (await response.json())["seq"]

            async def updates(ws) -> list[int]:
                seqs = []
                with contextlib.suppress(TimeoutError):
                    while len(seqs) < changes:
                        seqs.append((await receive_type(ws, "task_update", 30))["seq"])
                return seqs

            async with contextlib.AsyncExitStack() as stack:
                clients = [
                    await stack.enter_async_context(
                        subscribed(servers[i % len(servers)].ws_url, token, task["id"])
                    )
                    for i in range(subscribers)
                ]
                received = asyncio.gather(*(updates(ws) for ws in clients))
                seqs = await asyncio.gather(*(patch(p) for p in range(changes)))
                expected = list(range(2, changes + 2))
                assert sorted(seqs) == expected
                short = {
                    f"subscriber {i} of server {i % len(servers)}": (
                        len(got),
                        sorted(set(expected) - set(got)),
                    )
                    for i, got in enumerate(await received)
                    if got != expected
                }
                assert not short, f"missing or out of order: {short}"

    async_to_sync(scenario)()


@contextlib.contextmanager
def silent_redis_url():
    """The URL of a server that accepts connections and never answers, as a Redis that
    has stalled."""
    import socket
    import threading

    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"
    finally:
        listener.close()
        for connection in accepted:
            connection.close()


def test_changes_are_answered_while_redis_does_not_answer(tmp_path, user):
    """Each PATCH waited out redis-py's 5 s timeout, in one of the two request threads,
    and those queued behind it waited their turn: three took 5, 5 and 10 s."""
    task = services.create_task(owner=user, name="t")
    token = token_for(user)
    with silent_redis_url() as url:
        server = start_server(tmp_path, {"REDIS_URL": url})
        try:

            async def patch(progress):
                started = asyncio.get_running_loop().time()
                await patch_task(server.http_url, token, task.pk, {"progress": progress})
                return asyncio.get_running_loop().time() - started

            async def scenario():
                return await asyncio.gather(*(patch(n) for n in (10, 20, 30)))

            took = async_to_sync(scenario)()
        finally:
            server.stop()
    assert max(took) < 3.5, took
    assert "Publishing task" in server.log() and "goes on without the request" in server.log()


def test_connections_a_server_cannot_serve_with_redis_away_are_refused_in_one_logged_line(
    server_without_redis, user
):
    """Redis unreachable: a WebSocket closes 4503 and a stream is a 503 JSON ``unavailable``,
    at once, as when the database cannot check the credentials; nothing is half made. Each
    was a 500 (an HTML page on ``/events``) and a traceback of ~40 lines in the log, per
    connection."""
    server = server_without_redis
    logged = server.log_path.stat().st_size
    token = token_for(user)

    async def attempts():
        for _ in range(2):  # the second finds the layer as the first left it
            async with websockets.connect(f"{server.ws_url}/ws?token={token}") as ws:
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 4503
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{server.http_url}/events?token={token}") as response:
                    assert response.status == 503
                    assert response.content_type == "application/json"
                    assert (await response.json())["code"] == "unavailable"

    async def scenario():
        await asyncio.wait_for(attempts(), 10)

    async_to_sync(scenario)()
    log = server.log_path.read_text(errors="replace")[logged:]
    assert "Traceback" not in log
    refusals = [line for line in log.splitlines() if "refused it" in line]
    assert len(refusals) == 4, log
    assert all("ConnectionError: Error 111 connecting to 127.0.0.1:" in line for line in refusals)


@pytest.mark.parametrize(
    "headers",
    [
        "Sec-WebSocket-Version: 13",  # no key
        "Sec-WebSocket-Version: 99\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Origin: http://[::1",
    ],
    ids=["no-key", "bad-version", "bad-origin"],
)
def test_a_handshake_refused_before_it_began_is_answered_400_without_an_error(
    daphne_server, headers
):
    """Daphne's onClose() raised for it, which ended the flush of every connection written
    in the same loop turn: their answers were never sent."""
    logged = daphne_server.log_path.stat().st_size
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"{headers}\r\n\r\n"
    ).encode()

    async def scenario() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", daphne_server.port)
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        return answer

    assert async_to_sync(scenario)().startswith(b"HTTP/1.1 400 ")
    time.sleep(0.2)  # for the log line of an error, had there been one
    log = daphne_server.log_path.read_text(errors="replace")[logged:]
    assert "Traceback" not in log and "Exception in callback" not in log


def hold_the_write_lock(task: Task, locked: threading.Event, release: threading.Event) -> None:
    """Hold what a change of ``task`` and a broadcast wait for until ``release``: SQLite's
    write lock (IMMEDIATE); on PostgreSQL the task's row, and the broadcasts' table."""
    with transaction.atomic():
        Task.objects.select_for_update().get(pk=task.pk)
        if db_connection.vendor == "postgresql":
            with db_connection.cursor() as cursor:
                cursor.execute("LOCK TABLE realtime_broadcast IN EXCLUSIVE MODE")
        locked.set()
        release.wait(30)
    db_connection.close()


def request_in_background(method: str, url: str, token: str, body: str) -> subprocess.Popen:
    """curl's request, printing the answer's status (000: none came)."""
    return subprocess.Popen(
        ["curl", "-s", "-m", "30", "-X", method, "-o", "/dev/null", "-w", "%{http_code}"]
        + ["-H", f"Authorization: Bearer {token}"]
        + ["-H", "Content-Type: application/json", "-d", body, url],
        stdout=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("request_kind", ["task change", "broadcast"])
def test_a_request_under_way_when_its_server_is_told_to_stop_is_finished_and_answered(
    tmp_path, make_user, request_kind
):
    """Its client was dropped unanswered, while the request went on: a change was committed,
    then its publish failed on the stopped loop and reached no one. (Before that, the call
    waited for the stopped loop for ever, and the process with it.)"""
    user = make_user(is_staff=True)
    task = services.create_task(owner=user, name="locked")
    server = start_server(tmp_path)
    locked, release = threading.Event(), threading.Event()
    if request_kind == "task change":
        method, path, body = "PATCH", f"/api/tasks/{task.pk}/", '{"progress": 14}'
    else:
        method, path, body = "POST", "/broadcast", '{"message": "going down"}'
    holder = threading.Thread(target=hold_the_write_lock, args=(task, locked, release))
    holder.start()
    try:
        assert locked.wait(10)
        requester = request_in_background(method, server.http_url + path, token_for(user), body)
        time.sleep(1)  # the request waits for the lock
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no new connection is taken meanwhile
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
        release.set()
        holder.join(10)
        status, _ = requester.communicate(timeout=30)
        assert server.process.wait(timeout=20) == 0
    finally:
        release.set()
        server.stop()
    assert status == "200"
    log = server.log_path.read_text(errors="replace")
    assert "Could not publish" not in log and "Traceback" not in log
    if request_kind == "task change":
        assert Task.objects.get(pk=task.pk).progress == 14


def test_a_request_that_outlasts_the_stops_wait_is_dropped_and_the_process_leaves(
    tmp_path, make_user
):
    """Python joins a request's thread at exit: the process stayed for as long as the
    request waited (a lock held elsewhere, for minutes)."""
    user = make_user()
    task = services.create_task(owner=user, name="locked")
    server = start_server(tmp_path, args=["--application-close-timeout", "1"])
    locked, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold_the_write_lock, args=(task, locked, release))
    holder.start()
    try:
        assert locked.wait(10)
        url = f"{server.http_url}/api/tasks/{task.pk}/"
        requester = request_in_background("PATCH", url, token_for(user), '{"progress": 14}')
        time.sleep(1)
        stopped_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=10) == 0
        assert time.monotonic() - stopped_at < 5
        assert holder.is_alive()  # the lock was held throughout
        status, _ = requester.communicate(timeout=30)
    finally:
        release.set()
        holder.join(10)
        server.stop()
    assert status == "000"  # dropped, its transaction ended with the process
    assert Task.objects.get(pk=task.pk).progress == 0
    assert "Applications still running 1 s after the stop began, dropped: 1" in server.log()


def test_a_server_that_stops_closes_websockets_4503_and_ends_streams(tmp_path, user):
    """Clients saw their connections dropped: a WebSocket without a close frame (1006), an
    event stream without its last chunk, as from a server that had crashed; and Daphne's
    wait for its applications to end failed at once beside a kept-alive HTTP connection."""
    server = start_server(tmp_path)
    token = token_for(user)

    async def scenario():
        async with (
            aiohttp.ClientSession() as idle,  # its connection, kept alive, has no application
            websockets.connect(f"{server.ws_url}/ws?token={token}") as ws,
            aiohttp.ClientSession() as session,
            session.get(f"{server.http_url}/events?token={token}") as stream,
        ):
            async with idle.get(f"{server.http_url}/metrics") as response:
                await response.read()
            await receive_type(ws, "connected")
            assert (await stream.content.readuntil(b"event: connected")).endswith(b"connected")
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 4503
            await asyncio.wait_for(stream.content.read(), 10)  # to its end, not cut short

    try:
        async_to_sync(scenario)()
        assert server.process.wait(timeout=20) == 0
    finally:
        server.stop()
