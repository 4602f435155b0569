"""The lean frame path of Daphne's WebSocket protocol writes what RFC 6455 reads."""

import asyncio
import json
import os
import socket
import time

import aiohttp
import pytest
import websockets
from asgiref.sync import async_to_sync
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from mcp_platform.tasks import services
from realtime.websocket_protocol import frame_header
from tests.conftest import broadcast_census, start_server, token_for


def parse(data: bytes) -> Frame:
    """One server frame, read by the ``websockets`` library's own parser."""
    reader = StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        return done.value
    raise AssertionError("incomplete frame")


# Lengths around the 7-bit, 16-bit and 64-bit length encodings.
payloads = st.one_of(
    st.binary(max_size=300),
    st.integers(65_530, 65_540).map(lambda n: b"x" * n),
)


@settings(max_examples=60, deadline=None)
@given(payload=payloads, binary=st.booleans())
def test_frames_parse_back_to_their_payload(payload, binary):
    frame = parse(frame_header(len(payload), binary) + payload)
    assert frame.fin
    assert frame.opcode is (Opcode.BINARY if binary else Opcode.TEXT)
    assert frame.data == payload


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("size", [10, 200, 70_000])
def test_updates_of_every_frame_length_arrive_whole_over_daphne(daphne_server, user, size):
    task = services.create_task(owner=user, name="big")
    result = {"text": "é" * size}

    token = token_for(user)

    async def scenario():
        async with websockets.connect(
            f"{daphne_server.ws_url}/ws?token={token}", max_size=None
        ) as ws:
            assert json.loads(await ws.recv())["type"] == "connected"
            await ws.send(json.dumps({"action": "subscribe", "task_id": str(task.pk)}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            async with aiohttp.ClientSession() as session:
                async with session.patch(
                    f"{daphne_server.http_url}/api/tasks/{task.pk}/",
                    json={"result": result},
                    headers={"Authorization": f"Bearer {token}"},
                ) as response:
                    assert response.status == 200, await response.text()
            update = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert update["type"] == "task_update"
            assert update["task"]["result"] == result

    async_to_sync(scenario)()


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_an_open_connection_keeps_what_it_needs_after_shedding_its_handshake(daphne_server, user):
    """Subscribing, pinging, closing and the access log's path all work once the
    protocol has dropped its handshake-only state."""
    task = services.create_task(owner=user, name="t")

    async def scenario():
        async with websockets.connect(
            f"{daphne_server.ws_url}/ws?token={token_for(user)}&marker=shed"
        ) as ws:
            assert json.loads(await ws.recv())["type"] == "connected"
            await ws.send(json.dumps({"action": "subscribe", "task_id": str(task.pk)}))
            assert json.loads(await ws.recv())["type"] == "subscribed"
            await ws.send(json.dumps({"action": "ping", "id": 7}))
            pong = json.loads(await ws.recv())
            assert (pong["type"], pong["id"]) == ("pong", 7)
            await ws.ping()
        assert ws.close_code == 1000

    async_to_sync(scenario)()
    deadline = time.monotonic() + 10
    while "WSDISCONNECT /ws" not in daphne_server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = daphne_server.log()
    assert "WSCONNECT /ws" in log and "WSDISCONNECT /ws" in log
    assert "WSCONNECTING" not in log  # the launcher leaves it out


@pytest.fixture(scope="module")
def small_buffer_server(django_db_setup, django_db_blocker, tmp_path_factory):
    server = start_server(
        tmp_path_factory.mktemp("slow-client"), {"REALTIME_SLOW_CLIENT_BUFFER_BYTES": "200000"}
    )
    yield server
    server.stop()


def masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    return (
        bytes((0x81, 0x80 | len(payload)))
        + mask
        + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )


def read_until(sock: socket.socket, marker: bytes, data: bytes = b"") -> bytes:
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_client_that_stops_reading_is_dropped_not_buffered_without_bound(
    small_buffer_server, user, staff_user
):
    task = services.create_task(owner=user, name="firehose")
    token, base = token_for(user), small_buffer_server.http_url
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little kernel buffering
    sock.settimeout(10)
    sock.connect(("127.0.0.1", small_buffer_server.port))
    sock.sendall(
        f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    data = read_until(sock, b'"connected"')
    sock.sendall(masked_text_frame(json.dumps({"action": "subscribe", "task_id": str(task.pk)})))
    read_until(sock, b'"subscribed"', data)
    # From here on the client reads nothing. Each update carries ~200 KB: 8 MB in all,
    # more than the kernel buffers on both sides of a local socket can hold.

    async def flood():
        async with aiohttp.ClientSession() as session:
            for progress in range(40):
                async with session.patch(
                    f"{base}/api/tasks/{task.pk}/",
                    json={"progress": progress, "result": {"blob": "x" * 200_000}},
                    headers={"Authorization": f"Bearer {token}"},
                ) as response:
                    assert response.status == 200, await response.text()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if (await broadcast_census(base, token_for(staff_user)))["websocket"] == 0:
                return True
            await asyncio.sleep(0.2)
        return False

    try:
        assert async_to_sync(flood)(), "the server kept the connection that stopped reading"
    finally:
        sock.close()
