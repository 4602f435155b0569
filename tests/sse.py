"""Test clients for ``GET /events``: a WHATWG event-stream parser, and the endpoint driven
in-process through the full ASGI application.

The parser follows HTML's "event stream interpretation" (§9.2.6) as a browser's
``EventSource`` does, so tests see what a browser would see.
"""

import asyncio
import codecs
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from asgiref.testing import ApplicationCommunicator

LINE_END = re.compile(r"[\r\n]")


@dataclass(frozen=True)
class Event:
    """One dispatched event, as a ``MessageEvent`` would carry it."""

    type: str
    data: str
    #: The stream's last event ID when this event was dispatched; it persists across
    #: events until an ``id:`` field changes it.
    last_event_id: str

    def json(self) -> Any:
        return json.loads(self.data)


class EventStreamParser:
    """Incremental event-stream interpretation: feed bytes, get the events dispatched."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._at_start = True
        self._after_cr = False
        self._data = ""
        self._event_type = ""
        self.last_event_id = ""
        #: The reconnection time set by the last valid ``retry:`` field, in milliseconds.
        self.retry: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        self._buffer += self._decoder.decode(chunk)
        if self._at_start and self._buffer:
            self._at_start = False
            self._buffer = self._buffer.removeprefix("\ufeff")
        events = []
        while True:
            # A CR at the end of one chunk and an LF at the start of the next are one CRLF.
            if self._after_cr and self._buffer:
                self._after_cr = False
                self._buffer = self._buffer.removeprefix("\n")
            end = LINE_END.search(self._buffer)
            if end is None:
                return events
            line, self._buffer = self._buffer[: end.start()], self._buffer[end.end() :]
            self._after_cr = end.group() == "\r"
            event = self._process_line(line)
            if event is not None:
                events.append(event)

    def _process_line(self, line: str) -> Event | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon:
            value = value.removeprefix(" ")
        if name == "event":
            self._event_type = value
        elif name == "data":
            self._data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        data, event_type = self._data, self._event_type
        self._data = self._event_type = ""
        if not data:
            return None
        return Event(event_type or "message", data.removesuffix("\n"), self.last_event_id)


def parse_all(body: bytes) -> tuple[EventStreamParser, list[Event]]:
    parser = EventStreamParser()
    return parser, parser.feed(body)


class InProcessStream:
    """``GET /events`` on the full ASGI application, read as a client reads it.

    Use as ``async with InProcessStream(query, headers) as stream``; leaving sends
    ``http.disconnect`` and waits for the application to finish, as a server would.
    """

    def __init__(
        self,
        query: dict[str, Any] | list[tuple[str, str]] | None = None,
        *,
        headers: list[tuple[bytes, bytes]] | None = None,
        http_version: str = "1.1",
        path: str = "/events",
    ) -> None:
        headers = list(headers or [])
        if not any(name.lower() == b"host" for name, _ in headers):
            headers.insert(0, (b"host", b"testserver"))
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": http_version,
            "method": "GET",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": urlencode(query or {}, doseq=True).encode(),
            "headers": headers,
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        self.parser = EventStreamParser()
        self.pending: list[Event] = []
        self.status: int | None = None
        self.response_headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.complete = False

    async def __aenter__(self) -> "InProcessStream":
        from mcp_platform.asgi import application

        self.communicator = ApplicationCommunicator(application, self.scope)
        await self.communicator.send_input({"type": "http.request", "body": b""})
        start = await self.communicator.receive_output(timeout=10)
        assert start["type"] == "http.response.start", start
        self.status = start["status"]
        self.response_headers = start["headers"]
        if self.status != 200:
            while not self.complete:
                await self._read(timeout=5)
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()

    async def close(self) -> None:
        """Disconnect, and wait until the application has finished (its cleanup included)."""
        if not self.complete:
            await self.communicator.send_input({"type": "http.disconnect"})
        await self.communicator.wait(timeout=5)

    def header(self, name: str) -> list[str]:
        """Every value of one response header (names compare without case)."""
        key = name.lower().encode()
        return [
            value.decode("latin-1") for head, value in self.response_headers if head.lower() == key
        ]

    def json(self) -> Any:
        return json.loads(self.body)

    async def _read(self, timeout: float) -> None:
        message = await self.communicator.receive_output(timeout=timeout)
        assert message["type"] == "http.response.body", message
        chunk = message.get("body", b"")
        self.body += chunk
        self.pending.extend(self.parser.feed(chunk))
        self.complete = not message.get("more_body", False)

    async def next_event(self, timeout: float = 5) -> Event:
        """The next dispatched event; ``TimeoutError`` if none comes within ``timeout``."""
        while not self.pending:
            assert not self.complete, "the stream ended"
            await self._read(timeout)
        return self.pending.pop(0)

    async def next_of(self, event_type: str, timeout: float = 5) -> Event:
        """The next event, which must be of ``event_type``."""
        event = await self.next_event(timeout)
        assert event.type == event_type, event
        return event

    async def until_end(self, timeout: float = 5) -> list[Event]:
        """Every event not yet taken, once the application has ended the response."""
        while not self.complete:
            await self._read(timeout)
        events, self.pending = self.pending, []
        return events


def bearer(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


class EventReader:
    """Events from a stream of body chunks, in the order a client dispatches them."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self.chunks = chunks
        self.parser = EventStreamParser()
        self.pending: list[Event] = []
        self.body = b""

    async def next_event(self, timeout: float = 10) -> Event:
        while not self.pending:
            chunk = await asyncio.wait_for(anext(self.chunks), timeout)
            self.body += chunk
            self.pending.extend(self.parser.feed(chunk))
        return self.pending.pop(0)

    async def next_of(self, event_type: str, timeout: float = 10) -> Event:
        event = await self.next_event(timeout)
        assert event.type == event_type, event
        return event


class RawResponse:
    """An HTTP/1.1 response read off a plain socket: the exact status line and header
    lines, then the body, de-chunked as it arrives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status_line = ""
        self.header_lines: list[str] = []

    @classmethod
    async def get(
        cls,
        port: int,
        target: str,
        headers: dict[str, str] | None = None,
        *,
        http_version: str = "1.1",
    ) -> "RawResponse":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = [f"GET {target} HTTP/{http_version}", f"Host: 127.0.0.1:{port}"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        response = cls(reader, writer)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        response.status_line, *response.header_lines = head.decode("latin-1").split("\r\n")[:-2]
        return response

    def header(self, name: str) -> list[str]:
        """Every value of one header, exactly as sent (names compare without case)."""
        values = []
        for line in self.header_lines:
            key, _, value = line.partition(":")
            if key.lower() == name.lower():
                values.append(value.strip())
        return values

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body: chunked transfer coding decoded, else ``Content-Length`` bytes, else
        what arrives until the server closes."""
        if self.header("Transfer-Encoding") != ["chunked"]:
            length = self.header("Content-Length")
            if length:
                yield await self.reader.readexactly(int(length[0]))
                return
            while chunk := await self.reader.read(65536):
                yield chunk
            return
        while True:
            size = int((await self.reader.readuntil(b"\r\n"))[:-2].split(b";")[0], 16)
            if size == 0:
                return
            chunk = await self.reader.readexactly(size + 2)
            assert chunk.endswith(b"\r\n"), chunk
            yield chunk[:-2]

    async def body(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()
