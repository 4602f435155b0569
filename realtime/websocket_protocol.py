"""Daphne's WebSocket protocol with a lean path for the frames a fan-out sends.

Every message to a client goes through autobahn's ``sendMessage()``, ``sendFrame()`` and
``sendData()``: type assertions, traffic counters nobody reads, ``struct`` packing, a
``b"".join`` and two debug log calls per frame, ~16% of a fan-out's time
(docs/performance.md). ``FrameWritingWebSocketProtocol`` writes the frame itself when
nothing about the connection needs autobahn's general path: the connection is open, no
extension (compression) was negotiated, no fragmentation, masking or frame logging is
configured, nothing is queued, and the payload is within the size limit. Otherwise it
defers to autobahn, as before. ``python -m mcp_platform.serve`` installs it.
"""

from daphne.ws_protocol import WebSocketFactory, WebSocketProtocol

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


class FrameWritingWebSocketProtocol(WebSocketProtocol):
    def serverSend(self, content: str | bytes, binary: bool = False) -> None:  # noqa: N802
        payload = content if binary else content.encode("utf8")
        if (
            self.state != self.STATE_OPEN
            or self._perMessageCompress is not None
            or self.autoFragmentSize
            or self.maskServerFrames
            or self.logFrames
            or self.logOctets
            or self.send_queue
            or 0 < self.maxMessagePayloadSize < len(payload)
        ):
            return super().serverSend(content, binary)
        self.transport.write(frame_header(len(payload), binary) + payload)


def install() -> None:
    """Make Daphne's WebSocket factory build ``FrameWritingWebSocketProtocol``s."""
    WebSocketFactory.protocol = FrameWritingWebSocketProtocol
