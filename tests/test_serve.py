"""The Daphne launcher: what it installs, its reactor writes every frame, its server's
``send`` can send without waiting, and its access log hides tokens."""

import asyncio
import contextlib
import json
import os
import pprint
import queue
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvloop

from mcp_platform import checkpoints
from mcp_platform.serve import LinesPerTurn, PrettyWhenWritten
from mcp_platform.tasks import services
from realtime.http_protocol import BoundedWebRequest
from realtime.reactor import new_event_loop
from realtime.redaction import redact
from realtime.server import INCOMING_LIMIT, INCOMING_RESUME, NowaitServer, ReadingQueue
from tests.conftest import ROOT, LiveServer, free_port, server_database_url, start_server, token_for


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/events?token=abc.def.ghi", "/events?token=[redacted]"),
        ("/events?task_id=1&token=abc&x=2", "/events?task_id=1&token=[redacted]&x=2"),
        ("/ws?mytoken=keep", "/ws?mytoken=keep"),
        ("/events?%74oken=abc&to%6Ben=def", "/events?%74oken=[redacted]&to%6Ben=[redacted]"),
        ("/ws?token=abc&token=def", "/ws?token=[redacted]&token=[redacted]"),
        ("/ws?token=", "/ws?token=[redacted]"),
        ("/events?token+=abc&Token=def", "/events?token+=[redacted]&Token=[redacted]"),
        ("/events?token%3Dabc&x=1", "/events?[redacted]&x=1"),
        ("/events?x=1;token=abc&y=2", "/events?x=[redacted]&y=2"),
        ("/events?x=1%26token=abc", "/events?x=[redacted]"),
        ("/events?x=1%3Btoken%3Dabc", "/events?x=[redacted]"),
        ("/api/tasks/", "/api/tasks/"),
        ("/events?access_token=eyJhbGc.eyJzdWI.c2ln&x=1", "/events?access_token=[redacted]&x=1"),
        ("/events;token=eyJhbGc.eyJzdWI.c2ln", "/events;token=[redacted]"),
        ("/x?access_token=eyJhbGc%2EeyJzdWI%2Ec2ln", "/x?access_token=[redacted]"),
        ("/static/js/surveyJS.min.js", "/static/js/surveyJS.min.js"),  # no token
    ],
)
def test_tokens_are_redacted_from_logged_paths(path, expected):
    assert redact(path) == expected


def test_redacting_a_path_takes_time_in_proportion_to_its_length():
    """Any client could send a path of 'eyJ' repeated, each the start of a search to the
    end of the run and back: 160 ms of the event loop for 15 KB, growing with its square.
    A megabyte of it would take hours that way."""
    started = time.process_time()
    assert redact("/" + "eyJ" * 350_000) == "/" + "eyJ" * 350_000
    assert time.process_time() - started < 5


def test_a_request_shows_its_uri_without_its_token():
    """Daphne logs a request's ``repr()`` when its application is slow to end after the
    client left: an event stream's token went into the log in clear."""
    request = BoundedWebRequest.__new__(BoundedWebRequest)  # no server to make it for
    request.method, request.uri, request.clientproto = b"GET", b"/events?token=abc.d", b"HTTP/1.1"
    shown = repr(request)
    assert "uri=/events?token=[redacted] clientproto=HTTP/1.1>" in shown and "abc.d" not in shown


class Writes(list):
    """A stream's writes, each flush as ``FLUSHED``."""

    def write(self, text: str) -> None:
        self.append(text)

    def flush(self) -> None:
        self.append(FLUSHED)


FLUSHED = object()


def test_log_lines_of_one_loop_turn_are_written_together_at_its_end():
    async def scenario() -> None:
        writes = Writes()
        stream = LinesPerTurn(writes)
        stream.write("one\n")
        stream.write("two\n")
        assert writes == []
        await asyncio.sleep(0)
        assert writes == ["one\ntwo\n", FLUSHED]
        stream.write("three\n")
        await asyncio.sleep(0)
        assert writes == ["one\ntwo\n", FLUSHED, "three\n", FLUSHED]

    asyncio.run(scenario())


def test_log_lines_outside_a_loop_or_left_at_exit_are_written_once():
    writes = Writes()
    stream = LinesPerTurn(writes)
    stream.write("no loop\n")
    assert writes == ["no loop\n"]

    async def log_then_exit() -> None:
        stream.write("last\n")
        stream.flush()  # as at exit, before the turn ends
        assert writes == ["no loop\n", "last\n", FLUSHED]
        await asyncio.sleep(0)

    asyncio.run(log_then_exit())
    assert writes == ["no loop\n", "last\n", FLUSHED]


INSTALLED_SCRIPT = r"""
from mcp_platform import serve
serve.prepare()
import daphne.cli, daphne.http_protocol, daphne.ws_protocol
from twisted.internet import reactor
from realtime import http_protocol, reactor as realtime_reactor, server, websocket_protocol

import gc, sys
assert isinstance(reactor, realtime_reactor.CoalescingWriteReactor)
assert sys.getswitchinterval() == serve.SWITCH_INTERVAL
assert gc.get_threshold() == serve.GC_THRESHOLDS
assert daphne.cli.CommandLineInterface.server_class is server.NowaitServer
assert daphne.http_protocol.WebRequest is http_protocol.BoundedWebRequest
import daphne.server
assert daphne.server.HTTPFactory is http_protocol.QuietHTTPFactory
ws_factory = daphne.ws_protocol.WebSocketFactory
assert ws_factory.protocol is websocket_protocol.FrameWritingWebSocketProtocol
import autobahn.websocket.protocol
assert autobahn.websocket.protocol.pformat is serve.PrettyWhenWritten
print("installed")
"""


def test_the_launcher_installs_the_projects_server_parts():
    result = subprocess.run(
        [sys.executable, "-c", INSTALLED_SCRIPT], cwd=ROOT, capture_output=True, text=True
    )
    assert result.stdout.strip() == "installed", result.stderr


def test_the_launchers_usage_needs_no_settings():
    """Its settings were read first: without a secret key, ``--help`` printed only that."""
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("DJANGO_")
    }
    result = subprocess.run(
        [sys.executable, "-m", "mcp_platform.serve", "--help"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    assert "--application-close-timeout" in result.stdout


FROZEN_SCRIPT = r"""
import gc
from mcp_platform import serve
serve.prepare()
import mcp_platform.asgi  # as Daphne loads the application before it runs the reactor
from twisted.internet import reactor
loaded = gc.get_freeze_count()
reactor.callLater(0, lambda: (print(loaded, gc.get_freeze_count()), reactor.stop()))
reactor.run()
"""


def test_what_start_up_loaded_is_left_out_of_collections_once_the_server_runs():
    result = subprocess.run(
        [sys.executable, "-c", FROZEN_SCRIPT], cwd=ROOT, capture_output=True, text=True
    )
    before, serving = map(int, result.stdout.split())
    assert before == 0
    assert serving > 50_000, result.stderr  # modules, classes, Django's registries


CHECKPOINT_SCRIPT = r"""
import contextlib, io, threading
from mcp_platform import serve
with contextlib.redirect_stdout(io.StringIO()):  # main()'s steps before serving
    serve.prepare()
    serve.check()
    serve.checkpoint_in_background()
from django.db import connection
with connection.cursor() as cursor:
    cursor.execute("PRAGMA wal_autocheckpoint")
    print(cursor.fetchone()[0], *sorted(thread.name for thread in threading.enumerate()))
"""


def test_a_server_on_sqlite_checkpoints_in_a_thread_of_its_own(tmp_path):
    database = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    result = subprocess.run(
        [sys.executable, "-c", CHECKPOINT_SCRIPT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "DATABASE_URL": database},
    )
    assert result.returncode == 0, result.stderr
    autocheckpoint, *threads = result.stdout.split()
    assert int(autocheckpoint) == checkpoints.BACKSTOP_PAGES
    assert "sqlite-checkpoints-default" in threads


def test_a_debug_lines_pretty_text_is_made_only_when_the_line_is_written():
    shown: list[str] = []

    class Option:
        def __repr__(self) -> str:
            shown.append("repr")
            return "Option()"

    configuration = [(f"option{i}", Option(), "WebSocketServerFactory") for i in range(5)]
    text = PrettyWhenWritten(configuration)
    assert shown == []
    assert f"{text}" == pprint.pformat(configuration)  # as a log line formats it
    assert shown


def test_the_servers_send_also_sends_without_waiting_until_the_connection_is_gone():
    """A payload written goes to the protocol as it is; a WebSocket application's input is
    a ``ReadingQueue`` of its connection."""

    class Protocol:
        transport = None  # no TLS

        def __init__(self) -> None:
            self.sent = []

        def handle_reply(self, message) -> None:
            self.sent.append(message["text"])

        def write_payload(self, text) -> None:
            self.sent.append(text)

    sends = []

    async def application(scope, receive, send):
        assert scope["scheme"] == "ws"  # which Daphne leaves out
        sends.append(send)

    async def scenario():
        server = NowaitServer(application=application, endpoints=["tcp:port=0"])
        server.connections = {}  # as run() starts it
        protocol = Protocol()
        server.protocol_connected(protocol)
        queue = server.create_application(protocol, {"type": "websocket"})
        assert isinstance(queue, ReadingQueue) and queue.reader is protocol
        await asyncio.sleep(0)
        [send] = sends
        send.write("now")
        await send({"type": "websocket.send", "text": "awaited"})
        server.protocol_disconnected(protocol)
        send.write("after it went")
        await send({"type": "websocket.send", "text": "awaited after it went"})
        return protocol.sent

    assert asyncio.run(scenario()) == ["now", "awaited"]


class Reader:
    """What a WebSocket protocol says of its reading of the client."""

    held_back = False

    def hold_back(self) -> None:
        self.held_back = True

    def go_on(self) -> None:
        self.held_back = False


def test_a_websocket_is_not_read_while_its_application_has_too_many_of_its_messages():
    async def scenario():
        reader = Reader()
        queue = ReadingQueue(reader)
        reading = []
        for number in range(INCOMING_LIMIT + 2):  # Twisted may hand over a few more
            queue.put_nowait(number)
            reading.append(not reader.held_back)
        assert reading == [True] * (INCOMING_LIMIT - 1) + [False] * 3
        taken = []
        while reader.held_back:
            taken.append(await queue.get())
        assert taken == list(range(INCOMING_LIMIT + 2 - INCOMING_RESUME))
        rest = [await queue.get() for _ in range(INCOMING_RESUME)]
        assert taken + rest == list(range(INCOMING_LIMIT + 2)) and not reader.held_back

    asyncio.run(scenario())


@contextlib.contextmanager
def script_connecting_to_us(
    script: str, *arguments: str, backlog: int = 1, **options: Any
) -> Iterator[tuple[socket.socket, subprocess.Popen]]:
    """A socket listening on a free port, and ``script`` run in a process of its own with
    that port and ``arguments`` for its arguments (``options`` for ``Popen``)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(backlog)
        port = str(server.getsockname()[1])
        process = subprocess.Popen(
            [sys.executable, "-c", script, port, *arguments], cwd=ROOT, **options
        )
        server.settimeout(30)
        yield server, process


REACTOR_SCRIPT = r"""
import socket, sys
from realtime.reactor import CoalescingWriteReactor, install, write_now
reactor = install()
from twisted.internet import protocol

port, size, how = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
payload = bytes(range(256)) * (size // 256)
write = {"write": lambda transport, data: transport.write(data), "write_now": write_now}[how]

class Sender(protocol.Protocol):
    def connectionMade(self):
        for start in range(0, len(payload), 1000):
            write(self.transport, payload[start:start + 1000])
        self.transport.loseConnection()

class Factory(protocol.ClientFactory):
    protocol = Sender
    def clientConnectionLost(self, connector, reason):
        reactor.stop()

reactor.connectTCP("127.0.0.1", port, Factory())
assert isinstance(reactor, CoalescingWriteReactor)
reactor.run()
"""


@pytest.mark.parametrize("how", ["write", "write_now"])
@pytest.mark.parametrize("size", [25_600, 8_000_000])
def test_reactor_delivers_every_byte_in_order_then_closes(size, how):
    """Small writes go out at once; 8 MB overruns the socket buffer, and what it does not
    take must wait in Twisted's buffer, ahead of later writes."""
    with script_connecting_to_us(REACTOR_SCRIPT, str(size), how) as (server, sender):
        connection, _ = server.accept()
        received = bytearray()
        with connection:
            connection.settimeout(30)
            while chunk := connection.recv(1 << 20):
                received += chunk
        assert sender.wait(timeout=30) == 0
    assert received == bytes(range(256)) * (size // 256)


RESET_SCRIPT = r"""
import sys
from realtime.reactor import install, write_now
reactor = install()
from twisted.internet import protocol

class Sender(protocol.Protocol):
    def connectionMade(self):
        print("connected", flush=True)
        sys.stdin.readline()  # the peer resets meanwhile, before the reactor reads again
        write_now(self.transport, b"x" * 1000)
        # The send() failed, so the data went to Twisted's buffer, whose send ends it.
        print(self.transport._tempDataBuffer == [b"x" * 1000])

    def connectionLost(self, reason):
        print(reason.type.__name__)
        reactor.stop()

class Factory(protocol.ClientFactory):
    protocol = Sender

reactor.connectTCP("127.0.0.1", int(sys.argv[1]), Factory())
reactor.run()
"""


FAILING_WRITER_SCRIPT = r"""
import sys
from realtime.reactor import install
reactor = install()
from twisted.internet import protocol

connected = []

class Client(protocol.Protocol):
    def connectionMade(self):
        connected.append(self)
        if len(connected) == 2:
            reactor.callLater(0.1, write_both)

    def connectionLost(self, reason):
        if self is connected[0]:
            raise RuntimeError("this protocol fails as it ends")

def write_both():
    breaking, sending = connected
    breaking.transport.write(b"never")
    breaking.transport.socket.close()  # its flush finds no socket, and ends it
    sending.transport.write(b"hello")  # flushed after it, in the same loop turn
    reactor.callLater(1, reactor.stop)

class Factory(protocol.ClientFactory):
    protocol = Client

port = int(sys.argv[1])
reactor.connectTCP("127.0.0.1", port, Factory())
reactor.connectTCP("127.0.0.1", port, Factory())
reactor.run()
"""


def test_a_writer_that_fails_as_it_ends_leaves_the_others_written():
    """A protocol whose connectionLost() raised (Daphne's, for a handshake refused before
    it began) ended the flush: the writes of the connections after it were never sent."""
    with script_connecting_to_us(
        FAILING_WRITER_SCRIPT, backlog=2, stderr=subprocess.PIPE, text=True
    ) as (server, sender):
        first, _ = server.accept()
        second, _ = server.accept()
        received = []
        with first, second:
            for connection in (first, second):  # whichever the sender made first
                connection.settimeout(3)
                try:
                    received.append(connection.recv(100))
                except (TimeoutError, ConnectionResetError):
                    received.append(b"")
        _, errors = sender.communicate(timeout=30)
    assert b"hello" in received
    assert "this protocol fails as it ends" in errors  # logged, as Twisted's loop logs it


def test_the_reactor_runs_on_uvloop():
    loop = new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_a_write_to_a_reset_connection_ends_it_as_twisted_would():
    with script_connecting_to_us(
        RESET_SCRIPT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as (server, sender):
        connection, _ = server.accept()
        # Only once the sender has seen the connection made: reset earlier, a loaded
        # machine's sender could find its connect failed instead.
        assert sender.stdout.readline() == "connected\n"
        # Closed with a reset, not a FIN: the sender's next send() fails.
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        connection.close()
        output, _ = sender.communicate("go\n", timeout=30)
    assert sender.returncode == 0
    buffered, reason = output.split()
    assert buffered == "True"
    # Ended either way: asyncio's loop flushes the buffer first, whose send fails
    # (ConnectionLost); uvloop's reads the reset first (ConnectionDone).
    assert reason in {"ConnectionLost", "ConnectionDone"}


@pytest.fixture(scope="module")
def verbose_daphne_server(django_db_setup, tmp_path_factory) -> Iterator[LiveServer]:
    """A server at Daphne's most verbose, which also logs Twisted's messages, and ends
    every response after a second."""
    server = start_server(
        tmp_path_factory.mktemp("verbose"), args=["-v", "2", "--http-timeout", "1"]
    )
    yield server
    server.stop()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("server", ["daphne_server", "verbose_daphne_server"])
def test_served_access_log_never_shows_a_query_token(server, request):
    import urllib.error
    import urllib.request

    server = request.getfixturevalue(server)
    secret = "eyJhbGciOiJIUzI1NiJ9.not-a-real-token.but-secret"
    # Misplaced tokens too: another parameter's name, after a ';' (a 404, which Django
    # also logs as a warning of its own).
    for path, status in [
        (f"/events?token={secret}", 401),
        (f"/api/tasks/?token={secret}", 401),
        (f"/api/tasks/?access_token={secret}", 401),
        (f"/events;token={secret}", 404),
    ]:
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"{server.http_url}{path}", timeout=10)
        assert caught.value.code == status
    deadline = time.monotonic() + 10
    while "/events;token=[redacted]" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log()
    assert "/events?token=[redacted]" in log and "/api/tasks/?token=[redacted]" in log
    assert "/api/tasks/?access_token=[redacted]" in log and "/events;token=[redacted]" in log
    assert secret not in log


@pytest.mark.django_db(transaction=True)
def test_the_access_log_is_written_as_requests_are_served_to_a_buffered_stdout(
    tmp_path, monkeypatch
):
    """Without ``PYTHONUNBUFFERED`` (a service manager, ``make run | tee``), stdout to a pipe
    or a file is buffered: no access line left until the process ended."""
    import urllib.error
    import urllib.request

    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    server = start_server(tmp_path)
    try:
        marker = f"served-{time.monotonic_ns()}"
        with pytest.raises(urllib.error.HTTPError):  # 401: the line is what counts
            urllib.request.urlopen(f"{server.http_url}/api/tasks/?{marker}=1", timeout=10)
        deadline = time.monotonic() + 10
        while marker not in server.log():
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
    finally:
        server.stop()


@pytest.mark.django_db(transaction=True)
def test_a_stream_its_client_ends_is_in_the_access_log(daphne_server, user):
    """Only streams the server ended were: most are ended by their clients."""
    marker = f"closed-by-client-{time.monotonic_ns()}"
    path = f"/events?token={token_for(user)}&{marker}=1"
    with socket.create_connection(("127.0.0.1", daphne_server.port), timeout=10) as client:
        client.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        received = b""
        while b"event: connected" not in received:
            received += client.recv(4096)
    deadline = time.monotonic() + 10
    while marker not in daphne_server.log():
        assert time.monotonic() < deadline, daphne_server.log()
        time.sleep(0.05)
    [line] = [line for line in daphne_server.log().splitlines() if marker in line]
    assert '"GET /events?token=[redacted]&' in line and '" 200 ' in line


@pytest.mark.django_db(transaction=True)
def test_a_stream_that_daphne_times_out_leaves_its_token_out_of_the_log(
    verbose_daphne_server, user
):
    import urllib.request

    token = token_for(user)
    url = f"{verbose_daphne_server.http_url}/events?token={token}"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert b"event: connected" in response.read()  # to the end, at --http-timeout
    deadline = time.monotonic() + 10
    while "/events?token=[redacted]" not in verbose_daphne_server.log():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    log = verbose_daphne_server.log()
    assert token not in log and "Producer was not unregistered" not in log


@pytest.mark.django_db(transaction=True)
def test_a_response_larger_than_the_slow_client_bound_arrives_whole(daphne_server, user):
    """The bound is for event streams: Django writes any other response in one go."""
    import urllib.request

    task = services.create_task(owner=user, name="big", error="x" * 1_500_000)
    request = urllib.request.Request(
        f"{daphne_server.http_url}/api/tasks/{task.pk}/",
        headers={"Authorization": f"Bearer {token_for(user)}"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["error"] == task.error


@pytest.mark.parametrize(
    "command",
    [
        ["-m", "mcp_platform.serve", "-b", "127.0.0.1", "-p", "0"],
        ["manage.py", "check"],
    ],
    ids=["serve", "manage"],
)
def test_a_bad_setting_stops_start_up_in_one_line(command):
    """Each printed a traceback of 35 lines or more before the line that said which."""
    result = subprocess.run(
        [sys.executable, *command],
        cwd=ROOT,
        env={**os.environ, "DJANGO_DEBUG": "1", "DJANGO_REQUEST_THREADS": "0"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr == (
        "ImproperlyConfigured: DJANGO_REQUEST_THREADS must be at least 1, not 0.\n"
    )


def start_up_lines(env: dict[str, str]) -> list[str]:
    """What the launcher prints until it listens."""
    server = subprocess.Popen(
        [sys.executable, "-m", "mcp_platform.serve", "-b", "127.0.0.1", "-p", "0"]
        + ["mcp_platform.asgi:application"],
        cwd=ROOT,
        env={**os.environ, "DJANGO_DEBUG": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Read in a thread, so that a launcher that says nothing more is not waited for past
    # the deadline. (A select() on the pipe missed lines already in the reader's buffer.)
    printed: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: [*map(printed.put, server.stdout)], daemon=True).start()
    try:
        lines = []
        deadline = time.monotonic() + 30
        while not any("Listening" in line for line in lines):
            try:
                lines.append(printed.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
    finally:
        server.terminate()
        server.wait(timeout=10)
    return lines


def test_the_launcher_says_when_migrations_are_unapplied(tmp_path):
    """As runserver does: a database without its tables answered every request 500, and
    nothing said why until then."""
    lines = start_up_lines({"DATABASE_URL": f"sqlite:///{tmp_path / 'empty.sqlite3'}"})
    assert any("unapplied migration(s)" in line for line in lines), lines
    assert any("Run 'python manage.py migrate'" in line for line in lines), lines


def test_the_launcher_serves_when_its_postgresql_never_answers():
    """A server that takes the connection and says nothing (or a firewall that drops it):
    libpq waited for it without end, and the launcher never got to listen. Now the
    migrations check gives up after the default ``connect_timeout`` (10 s)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the handshake; nothing ever answers
        port = silent.getsockname()[1]
        started = time.monotonic()
        lines = start_up_lines({"DATABASE_URL": f"postgres://u@127.0.0.1:{port}/db"})
    assert any(line.startswith("Warning: the database could not be read: ") for line in lines), (
        lines
    )
    assert any("Listening" in line for line in lines), lines
    assert time.monotonic() - started < 25


@pytest.mark.django_db(transaction=True)
def test_the_launcher_says_when_redis_cannot_be_reached():
    """It served, and refused every connection 4503, without a word of why until then."""
    url = f"redis://127.0.0.1:{free_port()}/0"
    lines = start_up_lines({"DATABASE_URL": server_database_url(), "REDIS_URL": url})
    assert any(line.startswith("Warning: Redis could not be reached: ") for line in lines), lines
    assert any("Listening" in line for line in lines), lines
