"""The slow-client bound at the socket (realtime.slow_clients), on both transports: a
client that stops reading is dropped once ``REALTIME_SLOW_CLIENT_BUFFER_BYTES`` wait for
it, instead of having every message kept in the server's memory."""

import asyncio
import json
import os
import socket
import time

import aiohttp
import pytest
from asgiref.sync import async_to_sync
from twisted.internet.testing import StringTransport

from mcp_platform.tasks import services
from realtime.slow_clients import UnreadBytesProducer
from tests.conftest import broadcast_census, start_server, token_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


class Producer(UnreadBytesProducer):
    transport = StringTransport()


def test_the_unread_bytes_count_on_through_every_pause_until_the_client_reads(settings):
    """Twisted pauses the producer again at each write while the buffer stays full: begun
    again at each pause, the count never reached the bound for updates of an ordinary
    size, and the server held everything for a client that read nothing."""
    settings.REALTIME = {**settings.REALTIME, "SLOW_CLIENT_BUFFER_BYTES": 1000}
    producer = Producer()
    producer.pauseProducing()
    assert not producer.too_far_behind(600)
    producer.pauseProducing()
    assert not producer.too_far_behind(400)  # at the bound: not yet past it
    producer.pauseProducing()
    assert producer.too_far_behind(1)
    producer.resumeProducing()  # it read: counted afresh from the next pause
    producer.pauseProducing()
    assert not producer.too_far_behind(1000)


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


def open_websocket(sock: socket.socket, token: str, task_id: str) -> None:
    sock.sendall(
        f"GET /ws?token={token} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    data = read_until(sock, b'"connected"')
    sock.sendall(masked_text_frame(json.dumps({"action": "subscribe", "task_id": task_id})))
    read_until(sock, b'"subscribed"', data)


def open_event_stream(sock: socket.socket, token: str, task_id: str) -> None:
    sock.sendall(
        f"GET /events?task_id={task_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\n\r\n".encode()
    )
    read_until(sock, b"event: connected")


@pytest.mark.parametrize(
    ("transport", "open_client"), [("websocket", open_websocket), ("sse", open_event_stream)]
)
def test_a_client_that_stops_reading_is_dropped_not_buffered_without_bound(
    small_buffer_server, user, staff_user, transport, open_client
):
    task = services.create_task(owner=user, name="firehose")
    token, base = token_for(user), small_buffer_server.http_url
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # little kernel buffering
    sock.settimeout(10)
    sock.connect(("127.0.0.1", small_buffer_server.port))
    sock_port = sock.getsockname()[1]
    open_client(sock, token, str(task.pk))
    dropped = "INFO realtime.slow_clients: Dropped a client that stopped reading, "
    log = small_buffer_server.log_path
    before = log.read_text().count(dropped)
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
            if (await broadcast_census(base, token_for(staff_user)))[transport] == 0:
                return True
            await asyncio.sleep(0.2)
        return False

    try:
        assert async_to_sync(flood)(), "the server kept the connection that stopped reading"
    finally:
        sock.close()
    # Said once, with the client's address: the access log said only that it ended.
    deadline = time.monotonic() + 5
    while log.read_text().count(dropped) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = [line for line in log.read_text().splitlines() if dropped in line][before:]
    assert line.endswith(f"bytes unread: 127.0.0.1:{sock_port}")
