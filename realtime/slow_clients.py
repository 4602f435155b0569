"""The slow-client policy at the socket: how many bytes a client that stopped reading may
still be sent.

Twisted accepts every write; for a client that stops reading, what the server sends piles
up in its memory without end. Twisted does say when it happens: it pauses a connection's
push producer once the client's unread bytes pass the transport's buffer size (64 KiB), and
resumes it once they have drained. The transports' protocols (``realtime.websocket_protocol``,
``realtime.http_protocol``) register themselves as that producer, count what they send while
paused, and drop the client past ``REALTIME_SLOW_CLIENT_BUFFER_BYTES``, as the channel layer
does when a connection's queue overflows.
"""

import logging
from typing import Any

from realtime.conf import realtime_settings

logger = logging.getLogger(__name__)


class UnreadBytesProducer:
    """Twisted's push-producer interface, counting the bytes sent while paused."""

    #: Bytes sent since Twisted said the client stopped reading; ``None`` while it reads.
    unread_bytes: int | None = None
    #: Whether the client was found too far behind, and dropped.
    dropped = False

    def pauseProducing(self) -> None:  # noqa: N802 (Twisted's names)
        if self.unread_bytes is None:
            self.unread_bytes = 0

    def resumeProducing(self) -> None:  # noqa: N802
        self.unread_bytes = None

    def stopProducing(self) -> None:  # noqa: N802
        """The connection is gone; the protocol's ``connectionLost()`` cleans up."""

    def too_far_behind(self, size: int) -> bool:
        """Count ``size`` more bytes for a client that has stopped reading; whether they
        take it past ``REALTIME_SLOW_CLIENT_BUFFER_BYTES``."""
        if self.unread_bytes is None:
            return False
        self.unread_bytes += size
        if self.unread_bytes <= realtime_settings.SLOW_CLIENT_BUFFER_BYTES:
            return False
        if not self.dropped:  # once: writes may follow before the connection is gone
            self.dropped = True
            logger.info(
                "Dropped a client that stopped reading, %d bytes unread: %s",
                self.unread_bytes,
                peer_address(self.transport),
            )
        return True


def peer_address(transport: Any) -> str:
    """The client's ``host:port``, for a log line; a Unix socket's (Daphne's ``-u``) has
    neither."""
    peer = transport.getPeer()
    return f"{peer.host}:{peer.port}" if hasattr(peer, "host") else str(peer)
