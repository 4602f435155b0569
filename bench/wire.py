"""Lean client protocols for WebSocket and Server-Sent Events, written on raw asyncio.

A load client must not be the bottleneck of the server it measures: one core has to take in
tens of thousands of messages a second. Each connection here is an ``asyncio.Protocol``, so no
task wakes per message; a read from the socket costs one clock read and a few byte operations,
and messages are kept as bytes with their arrival time and parsed after the measurement.
"""

import asyncio
import base64
import os
import time
from collections.abc import Iterable

#: Arrival time (``time.monotonic()``, one clock for every process) and message bytes.
Message = tuple[float, bytes]


class Refused(Exception):
    """The server refused the connection: an HTTP status, or a WebSocket close code."""

    def __init__(self, status: int, detail: str = "") -> None:
        super().__init__(f"{status} {detail}".strip())
        self.status = status


class Tally:
    """Tells a waiter when every connection holds ``target`` messages since it was cleared."""

    def __init__(self) -> None:
        self.target = 0  # 0: nobody is waiting
        self.done = 0
        self.size = 0
        self.event = asyncio.Event()

    def reached(self) -> None:
        self.done += 1
        if self.done >= self.size:
            self.event.set()

    def lost(self) -> None:
        """A connection closed short of the target: it cannot reach it, so stop waiting for it."""
        self.size -= 1
        if self.done >= self.size:
            self.event.set()

    async def wait(self, receivers: "list[Receiver]", target: int, timeout: float) -> bool:
        """Whether every open receiver got ``target`` messages within ``timeout`` seconds."""
        self.size = sum(r.transport is not None or len(r.messages) >= target for r in receivers)
        self.done = sum(len(r.messages) >= target for r in receivers)
        self.target = target
        self.event.clear()
        try:
            if self.done < self.size:
                await asyncio.wait_for(self.event.wait(), timeout)
        except TimeoutError:
            pass
        finally:
            self.target = 0
        return self.done >= self.size

    def wake(self) -> None:
        """End the current wait now (its caller gave up on it)."""
        self.event.set()


class Receiver(asyncio.Protocol):
    """The part shared by both transports: the opening handshake and the message log."""

    def __init__(self, request: bytes, tally: Tally) -> None:
        self.request = request
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.messages: list[Message] = []
        self.buffer = b""
        self.headers_done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.request)  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if 0 < self.tally.target > len(self.messages):
            self.tally.lost()
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))

    def deliver(self, now: float, payload: bytes) -> None:
        """The first message opens the connection; later ones go to the log."""
        if not self.opened.done():
            self.opened.set_result(payload)
            return
        self.messages.append((now, payload))
        if len(self.messages) == self.tally.target:
            self.tally.reached()

    def fail(self, error: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(error)
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.buffer:
            data = self.buffer + data
        if not self.headers_done:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = data
                return
            self.headers_done = True
            if not self.accept_headers(data[:end]):
                return
            data = data[end + 4 :]
        self.buffer = self.consume(data, now)

    def accept_headers(self, head: bytes) -> bool:
        """Check the response head; on refusal, fail the connection and return False."""
        raise NotImplementedError("subclasses must provide accept_headers()")

    def consume(self, data: bytes, now: float) -> bytes:
        """Handle every complete message in ``data``; return the incomplete rest."""
        raise NotImplementedError("subclasses must provide consume()")


def status_of(head: bytes) -> int:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


def mask_frame(payload: bytes, opcode: int = 0x1) -> bytes:
    """One final client frame; clients must mask what they send (RFC 6455, 5.3)."""
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 65536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    key = os.urandom(4)
    stream = (key * (size // 4 + 1))[:size]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(stream, "big")).to_bytes(size, "big")
    return header + key + masked


class WebSocketClient(Receiver):
    """A WebSocket client whose first text message (``connected``) opens it."""

    def __init__(self, host: str, port: int, path: str, tally: Tally) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        super().__init__(request, tally)
        self.fragments: list[bytes] = []
        self.close_code: int | None = None

    def accept_headers(self, head: bytes) -> bool:
        status = status_of(head)
        if status != 101:
            self.fail(Refused(status, "handshake refused"))
            return False
        return True

    def send_text(self, text: str) -> None:
        if self.transport is not None:
            self.transport.write(mask_frame(text.encode()))

    def consume(self, data: bytes, now: float) -> bytes:
        pos, end = 0, len(data)
        while end - pos >= 2:
            size = data[pos + 1] & 0x7F
            head = 2
            if size == 126:
                if end - pos < 4:
                    break
                size, head = int.from_bytes(data[pos + 2 : pos + 4], "big"), 4
            elif size == 127:
                if end - pos < 10:
                    break
                size, head = int.from_bytes(data[pos + 2 : pos + 10], "big"), 10
            stop = pos + head + size
            if stop > end:
                break
            self.frame(data[pos], data[pos + head : stop], now)
            pos = stop
        return data[pos:]

    def frame(self, first: int, payload: bytes, now: float) -> None:
        opcode, final = first & 0x0F, first & 0x80
        if opcode in (0x0, 0x1, 0x2):
            if not final:
                self.fragments.append(payload)
                return
            if self.fragments:
                payload = b"".join([*self.fragments, payload])
                self.fragments = []
            self.deliver(now, payload)
        elif opcode == 0x8:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self.fail(Refused(self.close_code, "closed by the server"))
        elif opcode == 0x9 and self.transport is not None:
            self.transport.write(mask_frame(payload, opcode=0xA))


class SSEClient(Receiver):
    """An event-stream client whose ``connected`` event opens it; heartbeats are dropped.

    Every other event is logged whole (``event:``, ``id:`` and ``data:`` lines).
    """

    def __init__(self, host: str, port: int, path: str, token: str, tally: Tally) -> None:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        super().__init__(request, tally)
        self.chunked = False
        self.chunk_left = 0  # bytes of the current chunk still to come
        self.events = b""  # decoded body not yet split into events

    def accept_headers(self, head: bytes) -> bool:
        status = status_of(head)
        if status != 200:
            self.fail(Refused(status, "stream refused"))
            return False
        self.chunked = b"transfer-encoding: chunked" in head.lower()
        return True

    def consume(self, data: bytes, now: float) -> bytes:
        if not self.chunked:
            self.split_events(data, now)
            return b""
        pos, end = 0, len(data)
        while pos < end:
            if self.chunk_left:
                take = min(self.chunk_left, end - pos)
                self.split_events(data[pos : pos + take], now)
                self.chunk_left -= take
                pos += take
                continue
            line_end = data.find(b"\r\n", pos)
            if line_end < 0:
                break
            if line_end > pos:  # the size line; an empty line ends the previous chunk
                self.chunk_left = int(data[pos:line_end].split(b";", 1)[0], 16)
                if self.chunk_left == 0:
                    self.close()
                    return b""
            pos = line_end + 2
        return data[pos:]

    def split_events(self, body: bytes, now: float) -> None:
        blocks = (self.events + body).replace(b"\r\n", b"\n").split(b"\n\n")
        self.events = blocks.pop()
        for block in blocks:
            if block.startswith(b"event: heartbeat") or not block.startswith(b"event:"):
                continue  # heartbeats, retry: and comments carry no measured message
            self.deliver(now, block)


def close_all(receivers: Iterable[Receiver]) -> None:
    for receiver in receivers:
        receiver.close()
