"""The lean frame path of Daphne's WebSocket protocol writes what RFC 6455 reads."""

import asyncio
import json
import logging
import struct
import time

import pytest
import websockets
from asgiref.sync import async_to_sync
from daphne.ws_protocol import WebSocketFactory
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from mcp_platform.tasks import services
from realtime.server import INCOMING_LIMIT, ReadingQueue
from realtime.websocket_protocol import (
    MAX_MESSAGE_PIECES,
    FrameWritingWebSocketProtocol,
    frame_header,
)
from tests.conftest import logged_ends, patch_task, token_for


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


@pytest.mark.parametrize(
    ("length", "header"), [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10), (2**20, 10)]
)
def test_a_frames_length_is_written_in_the_fewest_bytes(length, header):
    """RFC 6455 asks for the shortest form, and strict clients fail a connection whose
    frame uses a longer one; ``websockets`` reads either."""
    assert len(frame_header(length, False)) == header


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("size", [10, 200, 70_000, 200_000])  # the last: 1.2 MB, over 1 MiB
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
            await patch_task(daphne_server.http_url, token, task.pk, {"result": result})
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


class StubServer:
    """What Daphne's WebSocket protocol asks of its server, outside the handshake."""

    def log_action(self, *args) -> None:
        pass

    def protocol_disconnected(self, protocol) -> None:
        pass


class StubTransport(StringTransport):
    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's name)
        self.producerState = "paused"

    def resumeProducing(self) -> None:  # noqa: N802
        self.producerState = "producing"


class QueueingProtocol(FrameWritingWebSocketProtocol):
    """The protocol with the queue Daphne's server gives it, without the server."""

    def onConnect(self, request):  # noqa: N802
        self.server, self.request, self.client_addr = StubServer(), request, None
        self.application_queue = ReadingQueue(self)


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked, unfragmented client frame of a short payload."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


def open_protocol() -> tuple[QueueingProtocol, StubTransport]:
    factory = WebSocketFactory(StubServer, server="test")
    factory.setProtocolOptions(allowNullOrigin=True)
    factory.protocol = QueueingProtocol
    protocol, transport = factory.buildProtocol(None), StubTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert protocol.state == protocol.STATE_OPEN
    transport.clear()
    return protocol, transport


def test_a_client_is_held_back_by_messages_not_by_reads():
    """One socket read (up to 64 KiB) holds thousands of small messages: parsed all at once,
    they were all queued for the application, whose socket was paused only after."""

    async def scenario():
        protocol, transport = open_protocol()
        queue = protocol.application_queue
        protocol.dataReceived(b"".join(client_frame(b"%d" % n) for n in range(5000)))
        assert len(queue.items) == INCOMING_LIMIT and transport.producerState == "paused"
        taken, most = [], 0
        while len(taken) < 5000:
            taken.append((await queue.get())["text"])
            await asyncio.sleep(0)  # what was read is parsed on, soon
            most = max(most, len(queue.items))
        assert taken == [str(n) for n in range(5000)]
        assert most == INCOMING_LIMIT and transport.producerState == "producing"

    asyncio.run(scenario())


def test_a_held_back_client_is_not_pinged():
    """Its pong waited unparsed behind its messages, and the ping's timeout dropped a
    client that had answered (1006): a database slow enough to hold it back that long did."""

    async def scenario():
        protocol, transport = open_protocol()
        protocol.server.websocket_timeout, protocol.server.ping_interval = -1, 20
        protocol.socket_opened = time.time()
        protocol.dataReceived(b"".join(client_frame(b"%d" % n) for n in range(40)))
        assert transport.producerState == "paused"
        protocol.last_ping -= 60  # a minute held back: nothing parsed meanwhile
        protocol.check_timeouts()
        held_back = transport.value(), protocol.autoPingPending
        while protocol.held_back:
            await protocol.application_queue.get()
        protocol.last_ping -= 60
        protocol.check_timeouts()
        return held_back, transport.value()

    held_back, resumed = asyncio.run(scenario())
    assert held_back == (b"", None)
    assert resumed[:1] == b"\x89"  # a ping, once the client is read again


def test_a_server_that_closes_a_held_back_client_reads_its_answer_past_its_messages():
    """Otherwise the client's close answer waits behind its messages, unread, and autobahn
    aborts the connection when its closing handshake times out."""

    async def scenario():
        protocol, transport = open_protocol()
        queue = protocol.application_queue
        backlog = b"".join(client_frame(b"%d" % n) for n in range(1000))
        protocol.dataReceived(backlog + client_frame(struct.pack("!H", 4401), opcode=8))
        assert transport.producerState == "paused"
        protocol.serverClose(code=4401)
        await asyncio.sleep(0)
        assert len(queue.items) == INCOMING_LIMIT  # the rest dropped, unparsed into messages
        assert protocol.state == protocol.STATE_CLOSED and protocol.wasClean

    asyncio.run(scenario())


def test_a_client_too_far_behind_is_closed_4008(settings):
    """Not 4503: a slow client resubscribes and gets the tasks' state; it need not wait."""
    settings.REALTIME = {**settings.REALTIME, "SLOW_CLIENT_BUFFER_BYTES": 1000}

    async def scenario():
        protocol, transport = open_protocol()
        protocol.pauseProducing()  # Twisted: the client stopped reading
        protocol.serverSend("x" * 600)
        protocol.serverSend("x" * 600)
        return transport.value()

    written = asyncio.run(scenario())
    close = written[written.index(b"\x88") :]
    assert close[2:4] == (4008).to_bytes(2, "big")


def test_a_client_that_pings_and_reads_nothing_is_closed_4008(settings):
    """Each ping is answered by a pong: written without bound to a client that read
    nothing, they grew the server by ~33 MB every 2 s."""
    settings.REALTIME = {**settings.REALTIME, "SLOW_CLIENT_BUFFER_BYTES": 1000}

    async def scenario():
        protocol, transport = open_protocol()
        protocol.pauseProducing()  # Twisted: the client stopped reading
        protocol.dataReceived(client_frame(b"p" * 125, opcode=9) * 1000)
        return transport.value()

    written = asyncio.run(scenario())
    pong = b"\x8a\x7d" + b"p" * 125
    assert written.count(pong) == 1000 // len(pong)  # up to the bound, and no further
    close = written[written.index(b"\x88") :]
    assert close[2:4] == (4008).to_bytes(2, "big")


def fragment(payload: bytes, opcode: int, last: bool) -> bytes:
    """A masked client frame of one fragment of a message."""
    mask = b"\x01\x02\x03\x04"
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes(((0x80 if last else 0) | opcode, 0x80 | len(payload))) + mask + masked


def test_a_message_in_too_many_pieces_is_closed_4009(caplog):
    """autobahn keeps each piece as a ``bytes`` of its own: a message of 2-byte frames held
    ~28 MB for every 4 MB sent, however small the message."""
    caplog.set_level(logging.INFO, logger="realtime")

    async def scenario():
        protocol, transport = open_protocol()
        frames = [fragment(b"ab", 1, False)]
        frames += [fragment(b"ab", 0, False)] * MAX_MESSAGE_PIECES
        protocol.dataReceived(b"".join(frames))
        return protocol, transport.value()

    protocol, written = asyncio.run(scenario())
    assert written[:1] == b"\x88" and written[2:4] == (4009).to_bytes(2, "big")
    assert len(protocol.message_data) <= MAX_MESSAGE_PIECES
    assert logged_ends(caplog) == [
        "Closed a WebSocket from 192.168.1.1:54321: a message in over"
        f" {MAX_MESSAGE_PIECES} pieces (4009)"
    ]


def test_a_message_in_as_many_pieces_as_allowed_is_delivered():
    async def scenario():
        protocol, transport = open_protocol()
        frames = [fragment(b"{", 1, False)]
        frames += [fragment(b" ", 0, False)] * (MAX_MESSAGE_PIECES - 2)
        frames += [fragment(b"}", 0, True)]
        protocol.dataReceived(b"".join(frames))
        return transport.value(), await protocol.application_queue.get()

    written, message = asyncio.run(scenario())
    assert written == b""
    assert message["text"] == "{" + " " * (MAX_MESSAGE_PIECES - 2) + "}"
