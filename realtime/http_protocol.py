"""Daphne's HTTP request, with the slow-client bound for event streams.

An event stream (``GET /events``) writes for hours; a client that stops reading would
have every event kept in the server's memory. ``BoundedWebRequest`` registers itself as
its stream's producer and, past ``REALTIME_SLOW_CLIENT_BUFFER_BYTES`` unread
(``realtime.slow_clients``), drops the connection: Daphne then tells the application
(``http.disconnect``), which cleans up, and an ``EventSource`` reconnects after ``retry``.
It also refuses a body larger than any application takes (Django's
``DATA_UPLOAD_MAX_MEMORY_SIZE``) as it arrives: Daphne keeps a whole body, then queues it in
memory, before the application can say it is too large, and one anonymous upload of 1 GB
held ~1 GB of the server's memory after its 413.
``python -m mcp_platform.serve`` installs it, and ``QuietHTTPFactory``, which keeps
Twisted from writing an access log line of its own.
"""

import functools
import logging
from typing import Any

import daphne.http_protocol
import daphne.server
from daphne.http_protocol import HTTPFactory, WebRequest
from django.conf import settings

from realtime.protocol import FRAMINGS_KEPT, HttpErrorCode, body_too_large, error_body
from realtime.reactor import write_now
from realtime.redaction import redact
from realtime.slow_clients import UnreadBytesProducer, peer_address

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=FRAMINGS_KEPT)
def as_chunk(body: bytes) -> bytes:
    """``body`` in HTTP/1.1 chunked coding. Cached: a fan-out writes one body to every
    stream in turn."""
    return b"%x\r\n%b\r\n" % (len(body), body)


def is_event_stream(headers: Any) -> bool:
    return any(
        name.lower() == b"content-type"
        and value.partition(b";")[0].strip().lower() == b"text/event-stream"
        for name, value in headers
    )


def payload_too_large(limit: int) -> bytes:
    """The whole answer to a request whose body is over ``limit`` bytes, as the API's
    errors are: JSON ``{"code", "detail"}``. The connection is closed after it."""
    body = error_body(HttpErrorCode.PAYLOAD_TOO_LARGE, body_too_large(limit))
    head = (
        b"HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
    )
    return head + body


class BoundedWebRequest(UnreadBytesProducer, WebRequest):
    #: Whether the response is an event stream, the only kind the bound applies to: any
    #: other has a size its application chose, which Django sends in one go, in 64 KiB
    #: chunks that no client could read as fast.
    bounded = False
    #: Bytes of the body received so far, and whether it was refused as too large.
    body_received = 0
    too_large = False

    def gotLength(self, length: int | None) -> None:  # noqa: N802 (Twisted's names)
        super().gotLength(length)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and length is not None and length > limit:
            self.requestHeaders.removeHeader(b"Expect")  # no "100 Continue" after the 413
            self.refuse_too_large(limit)

    def handleContentChunk(self, data: bytes) -> None:  # noqa: N802
        if self.too_large:
            return  # what arrived with the headers: nothing more is read
        self.body_received += len(data)
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if limit is not None and self.body_received > limit:  # a chunked body
            self.refuse_too_large(limit)
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:  # noqa: N802
        if not self.too_large:
            super().requestReceived(command, path, version)

    def refuse_too_large(self, limit: int) -> None:
        """Answer 413, read nothing more and close: the application never sees the request."""
        self.too_large = True
        self.content.close()
        transport = self.channel.transport
        transport.pauseProducing()
        transport.write(payload_too_large(limit))
        transport.loseConnection()
        logger.warning(
            "Refused a request body over %d bytes from %s", limit, peer_address(transport)
        )

    def __repr__(self) -> str:
        # Twisted's, with the token redacted: Daphne logs it, URI and all, of an
        # application slow to end after its client left, and an event stream's ?token=
        # went into the log in clear.
        uri = redact(self.uri.decode("latin-1"))
        method, protocol = self.method.decode("latin-1"), self.clientproto.decode("latin-1")
        return (
            f"<{type(self).__name__} at 0x{id(self):x} method={method} uri={uri}"
            f" clientproto={protocol}>"
        )

    def handle_reply(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.bounded = is_event_stream(message.get("headers", ()))
        elif (
            message["type"] == "http.response.body"
            and self.bounded
            and not self.finished
            and self.channel is not None
        ):
            if not message.get("more_body", False):
                self.unregisterProducer()  # the connection may serve another request
            elif self.producer is None:
                self.registerProducer(self, True)
            elif self.write_under_way(message.get("body", b"")):
                return
        super().handle_reply(message)

    def connectionLost(self, reason: Any) -> None:  # noqa: N802 (Twisted's name)
        if self.bounded and self._response_started and not self.finished:
            self.log_stream_ended()
        super().connectionLost(reason)

    def log_stream_ended(self) -> None:
        """The access log's line of a stream its client ended, as Daphne writes one for a
        response the server ends: otherwise the streams that clients close, most of them,
        never reached the access log."""
        self.server.log_action(
            "http",
            "complete",
            {
                "path": self.uri.decode("latin-1"),
                "status": self.code,
                "method": self.method.decode("ascii", "replace"),
                "client": ":".join(map(str, self.client_addr)) if self.client_addr else None,
                "time_taken": self.duration(),
                "size": self.sentLength,
            },
        )

    def finish(self) -> None:
        # Daphne finishes a stream itself at its --http-timeout, with this request still
        # its producer, which Twisted would log with the request's URI, token and all.
        if self.producer is not None:
            self.unregisterProducer()
        super().finish()

    def write_payload(self, body: bytes) -> None:
        """``http.response.body`` of ``body`` with ``more_body``, the next chunk of a
        stream, as ``handle_reply()`` sends it, without the message
        (``realtime.server.Send.write()``)."""
        if self.producer is not None and not self.finished and self.channel is not None:
            if self.write_under_way(body):
                return
            # Past the checks handle_reply() makes: the general path, without counting
            # the chunk twice towards the slow-client bound.
            reply = super().handle_reply
        else:
            reply = self.handle_reply
        reply({"type": "http.response.body", "body": body, "more_body": True})

    def write_under_way(self, body: bytes) -> bool:
        """Write ``body`` as the next chunk of a stream under way, as Daphne's and
        Twisted's general path (``Request.write()``) would write it, at a third of the
        cost, or drop a client too far behind; ``False`` if that path must write it."""
        if self.unread_bytes is not None and self.too_far_behind(len(body)):
            self.channel.transport.abortConnection()
            return True
        if body and self.chunked and self.startedWriting:
            self.sentLength += len(body)
            write_now(self.transport, as_chunk(body))
            return True
        return False


class QuietHTTPFactory(HTTPFactory):
    def log(self, request: Any) -> None:
        """Nothing: Daphne writes the access log (with tokens redacted, by
        ``mcp_platform.serve``). Twisted's own line was formatted for every request, and
        thrown away, or with ``-v 2`` logged with the query string's token in it."""


def install() -> None:
    """Make Daphne's HTTP factory build ``BoundedWebRequest``s, and log nothing itself."""
    daphne.http_protocol.WebRequest = BoundedWebRequest
    daphne.server.HTTPFactory = QuietHTTPFactory
