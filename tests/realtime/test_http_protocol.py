"""The event stream's HTTP protocol (realtime.http_protocol): chunks written without an
ASGI message take the same path, and count the same, as those sent with one."""

from typing import Any

import pytest
from daphne.http_protocol import WebRequest

from realtime.http_protocol import BoundedWebRequest


@pytest.fixture
def paused_unchunked_stream(monkeypatch) -> tuple[BoundedWebRequest, list[dict[str, Any]]]:
    """A stream under way whose client stopped reading, unchunked (HTTP/1.0), so every
    chunk goes to Daphne's general path, recorded here instead of written."""
    written: list[dict[str, Any]] = []
    monkeypatch.setattr(WebRequest, "handle_reply", lambda self, message: written.append(message))
    request = BoundedWebRequest.__new__(BoundedWebRequest)
    request.producer, request.channel, request.finished = request, object(), False
    request.bounded = True
    request.chunked, request.startedWriting = False, True
    request.pauseProducing()
    return request, written


def test_a_written_chunk_counts_once_towards_the_slow_client_bound(paused_unchunked_stream):
    request, written = paused_unchunked_stream
    request.write_payload(b"x" * 100)
    assert request.unread_bytes == 100
    request.handle_reply({"type": "http.response.body", "body": b"y" * 50, "more_body": True})
    assert request.unread_bytes == 150
    assert [message["body"] for message in written] == [b"x" * 100, b"y" * 50]
