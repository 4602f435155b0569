"""Daphne's WebSocket protocol with a lean path for the frames a fan-out sends.

Every message to a client goes through autobahn's ``sendMessage()``, ``sendFrame()`` and
``sendData()``: type assertions, traffic counters nobody reads, ``struct`` packing, a
``b"".join`` and two debug log calls per frame, ~16% of a fan-out's time
(docs/performance.md). ``FrameWritingWebSocketProtocol`` writes the frame itself when
nothing about the connection needs autobahn's general path: the connection is open, no
extension (compression) was negotiated, no fragmentation, masking or frame logging is
configured, and nothing is queued. Otherwise it defers to autobahn, as before.
Daphne's size limit (1 MiB) is for what clients send: autobahn applies it to what the
server sends too, and failed the connection (1011) at every update of a task larger than
that. ``python -m mcp_platform.serve`` installs it.

It also bounds what a client that stops reading costs (``realtime.slow_clients``): past
``REALTIME_SLOW_CLIENT_BUFFER_BYTES`` unread, the connection is closed with 4008.
"""

import asyncio
import functools
import logging
import time

from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol

from realtime.protocol import FRAMINGS_KEPT, CloseCode
from realtime.reactor import write_now
from realtime.slow_clients import UnreadBytesProducer, peer_address

logger = logging.getLogger(__name__)

#: First header byte: FIN plus the opcode, by whether the payload is binary.
_FIN_OPCODE = {False: 0x81, True: 0x82}


def frame_header(length: int, binary: bool) -> bytes:
    """The header of one unmasked, unfragmented data frame (RFC 6455, section 5.2)."""
    first = _FIN_OPCODE[binary]
    if length <= 125:
        return bytes((first, length))
    if length <= 0xFFFF:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


@functools.lru_cache(maxsize=FRAMINGS_KEPT)
def data_frame(content: str | bytes, binary: bool) -> tuple[int, bytes]:
    """The payload's length and the whole frame. Cached: a fan-out sends one text to
    every subscriber in turn, and the text's hash is computed once."""
    payload = content if binary else content.encode("utf8")
    return len(payload), frame_header(len(payload), binary) + payload


#: Set by autobahn and Daphne for the opening handshake, and not read after it (autobahn
#: 26.10 reads them only in ``processHandshake()`` and ``succeedHandshake()``).
HANDSHAKE_ONLY = frozenset(
    {
        # the request and the response
        "http_headers",
        "http_request_data",
        "http_request_host",
        "http_request_params",
        "http_request_path",
        "http_request_uri",
        "http_response_data",
        "http_status_line",
        "clean_headers",
        "_raw_query_string",
        "_wskey",
        "websocket_protocols",
        "websocket_extensions",
        # options copied from the factory that only the handshake checks
        "allowNullOrigin",
        "allowedOrigins",
        "allowedOriginsPatterns",
        "flashSocketPolicy",
        "maxConnections",
        "perMessageCompressionAccept",
        "serveFlashSocketPolicy",
        "trustXForwardedFor",
        "versions",
        "webStatus",
    }
)


#: Pieces a client message may be kept in until it is whole (one or more per frame, as the
#: socket's reads cut them): more is closed with 4009, as a message too big. A message of
#: 1 MiB read 1,460 bytes at a time is ~720.
MAX_MESSAGE_PIECES = 8192


class FrameWritingWebSocketProtocol(UnreadBytesProducer, WebSocketProtocol):
    #: Whether the application holds too many of this client's messages
    #: (``realtime.server.ReadingQueue``): until it has taken most of them, nothing more is
    #: read from the socket or parsed from what was read.
    held_back = False

    def connectionMade(self) -> None:  # noqa: N802 (Twisted's name)
        # Daphne hands the connection over from the HTTP request that asked for the
        # upgrade, but that request's channel stays registered as the connection's
        # producer, keeping the request, its headers and its buffers alive for as long
        # as the WebSocket is open (~4 KiB per connection). This protocol takes its place,
        # to be told when the client stops reading.
        if getattr(self.transport, "producer", None) is not None:
            self.transport.unregisterProducer()
        super().connectionMade()
        self.transport.registerProducer(self, True)

    def onOpen(self) -> None:  # noqa: N802
        super().onOpen()
        # An open connection lives for hours with ~100 attributes, a quarter of them for
        # the handshake only: without those the attribute dict fits a table half the
        # size. With the request's headers dropped too (Daphne logs only its path),
        # this saves ~4 KiB per connection.
        self.__dict__ = {k: v for k, v in vars(self).items() if k not in HANDSHAKE_ONLY}
        self.request.headers = self.request.params = {}

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:  # noqa: N802, N803
        # A handshake refused before Daphne's onConnect() (no Sec-WebSocket-Key, say)
        # has nothing of Daphne's to end; its onClose() raised AttributeError for it.
        if hasattr(self, "server"):
            super().onClose(wasClean, code, reason)

    def write_payload(self, text: str) -> None:
        """``websocket.send`` of ``text``, as Daphne's ``handle_reply()`` sends it, without
        the message (``realtime.server.Send.write()``)."""
        if self.state == self.STATE_CONNECTING:
            raise ValueError("Socket has not been accepted, so cannot send over it")
        if text:
            self.serverSend(text, False)

    def serverSend(self, content: str | bytes, binary: bool = False) -> None:  # noqa: N802
        if self.state in (self.STATE_CLOSING, self.STATE_CLOSED):
            return  # going away: autobahn would raise, and the client learns of it anyway
        length, frame = data_frame(content, binary)
        if self.closed_too_far_behind(length):
            return
        if (
            self.state != self.STATE_OPEN
            or self._perMessageCompress is not None
            or self.autoFragmentSize
            or self.maskServerFrames
            or self.logFrames
            or self.logOctets
            or self.send_queue
        ):
            return super().serverSend(content, binary)
        write_now(self.transport, frame)

    def sendPong(self, payload: bytes | None = None) -> None:  # noqa: N802
        """A pong counts towards the slow-client bound as any frame does: autobahn answers
        each ping as it is parsed, and a client that sent pings and read nothing grew the
        server by ~33 MB every 2 s (a frame of 125 bytes answered by one of 127)."""
        if not self.closed_too_far_behind(2 + len(payload or b"")):
            super().sendPong(payload)

    def closed_too_far_behind(self, size: int) -> bool:
        """Count a frame of ``size`` bytes for a client that stopped reading; past the
        bound, close with 4008 (the client resubscribes and gets the current state) instead
        of the server holding an unbounded backlog for it. Whether it closed."""
        if (
            self.unread_bytes is not None
            and self.state == self.STATE_OPEN
            and self.too_far_behind(size)
        ):
            self.serverClose(CloseCode.SLOW_CLIENT.value)
            return True
        return False

    def onMessageFrameData(self, payload: bytes) -> None:  # noqa: N802
        """A message whose pieces (one or more per frame, as they were read) pass
        ``MAX_MESSAGE_PIECES`` is closed with 4009, as one over the size limit: autobahn
        keeps each piece as a ``bytes`` of its own, and a message of 2-byte frames held
        ~28 MB for every 4 MB sent, unbounded by the 1 MiB limit on its size."""
        super().onMessageFrameData(payload)
        if (
            not self.failedByMe
            and len(self.message_data) + len(self.frame_data or ()) > MAX_MESSAGE_PIECES
        ):
            self.close_too_big(f"in over {MAX_MESSAGE_PIECES} pieces")

    def hold_back(self) -> None:
        """Read and parse nothing more of what the client sends, for now. Pausing the socket
        alone stops its next read, but one read holds up to 64 KiB: thousands of small
        messages, which autobahn would all have parsed and handed over."""
        self.held_back = True
        self.transport.pauseProducing()

    def check_timeouts(self) -> None:
        """Daphne's, except that a client held back is not pinged: its messages wait
        unread, so it is there, and its pong would wait behind them, unread, until the
        ping's timeout dropped it (1006). (A ping sent before is timed out by nothing:
        autobahn takes any message that follows it as an answer.)"""
        if self.held_back:
            self.last_ping = time.time()
        super().check_timeouts()

    def go_on(self) -> None:
        """Read again, and parse what was read but not yet parsed (soon, not in the
        application's own call)."""
        self.held_back = False
        self.transport.resumeProducing()
        if self.data:
            asyncio.get_running_loop().call_soon(self.consumeData)

    def consumeData(self) -> None:  # noqa: N802
        if self.state == self.STATE_OPEN:
            # autobahn's loop, which also stops while the client is held back.
            while not self.held_back and self.processData() and self.state != self.STATE_CLOSED:
                pass
        else:
            super().consumeData()

    def sendCloseFrame(  # noqa: N802
        self,
        code: int | None = None,
        reasonUtf8: bytes | None = None,  # noqa: N803 (autobahn's names, passed by keyword)
        isReply: bool = False,  # noqa: N803
    ) -> None:
        """Once the server closes, the client's messages are dropped unparsed into
        messages and the client is read on, for its answer to the close. Held back, the
        answer waited behind them, and autobahn aborted the connection after its closing
        handshake's timeout."""
        super().sendCloseFrame(code=code, reasonUtf8=reasonUtf8, isReply=isReply)
        self.failedByMe = True  # autobahn delivers no more messages
        if self.held_back:
            self.go_on()

    def _max_message_size_exceeded(self, size: int, limit: int, reason: str) -> None:
        """A message over Daphne's limit (``--websocket-max-message-size``, 1 MiB) is
        closed with 4009, as the application closes one over ``REALTIME_MAX_MESSAGE_BYTES``.
        autobahn's hook for it dropped the connection without a close frame: the client saw
        1006 and could not tell why."""
        self.close_too_big(f"over {limit} bytes")

    def close_too_big(self, why: str) -> None:
        """Close with 4009 for a message too big, ``why`` said in the log. The rest of the
        message is read, not kept."""
        self.failedByMe = True  # autobahn drops what follows of the message
        self.utf8validateIncomingCurrentMessage = False  # nor checks it
        if self.state == self.STATE_OPEN:
            logger.info(
                "Closed a WebSocket from %s: a message %s (4009)", peer_address(self.transport), why
            )
            self.sendCloseFrame(
                code=CloseCode.MESSAGE_TOO_BIG.value, reasonUtf8=b"Message too big.", isReply=False
            )


def install() -> None:
    """Make Daphne's WebSocket factory build ``FrameWritingWebSocketProtocol``s."""
    WebSocketFactory.protocol = FrameWritingWebSocketProtocol
