"""Daphne's HTTP request, with the slow-client bound for streamed responses.

An event stream (``GET /events``) writes for hours; a client that stops reading would
have every event kept in the server's memory. ``BoundedWebRequest`` registers itself as
its stream's producer and, past ``REALTIME_SLOW_CLIENT_BUFFER_BYTES`` unread
(``realtime.slow_clients``), drops the connection: Daphne then tells the application
(``http.disconnect``), which cleans up, and an ``EventSource`` reconnects after ``retry``.
``python -m mcp_platform.serve`` installs it.
"""

from typing import Any

import daphne.http_protocol
from daphne.http_protocol import WebRequest

from realtime.slow_clients import UnreadBytesProducer


class BoundedWebRequest(UnreadBytesProducer, WebRequest):
    def handle_reply(self, message: dict[str, Any]) -> None:
        if (
            message["type"] == "http.response.body"
            and not self.finished
            and self.channel is not None
        ):
            if not message.get("more_body", False):
                self.unregisterProducer()  # the connection may serve another request
            elif self.producer is None:
                self.registerProducer(self, True)
            elif self.too_far_behind(len(message.get("body", b""))):
                self.channel.transport.abortConnection()
                return
        super().handle_reply(message)


def install() -> None:
    """Make Daphne's HTTP factory build ``BoundedWebRequest``s."""
    daphne.http_protocol.WebRequest = BoundedWebRequest
