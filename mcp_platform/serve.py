"""Serve the project with Daphne: ``python -m mcp_platform.serve [daphne options]``.

Use it instead of the ``daphne`` command. It differs in these ways:

- it installs ``realtime.reactor.CoalescingWriteReactor``, which runs on uvloop's event
  loop and writes fan-out frames without an event-loop registration per write
  (docs/performance.md), and ``realtime.websocket_protocol``, which frames them without
  autobahn's general path, and ``realtime.http_protocol``; both also drop a client that
  stops reading once ``REALTIME_SLOW_CLIENT_BUFFER_BYTES`` wait for it;
- it gives applications a ``send`` that can also send without waiting
  (``realtime.server``), so a message for an idle connection is written without waking
  its consumer;
- it stops autobahn from decorating the text of debug log lines it never emits: colouring
  it for every frame cost ~12% of a fan-out, pretty-printing it ~10% of a connect (a
  plain `repr` of it still ~2%);
- it lets Daphne's HTTP protocol reach ``twisted.web.http`` directly rather than through
  Twisted's deprecation proxy of the module, a lookup that cost ~40% as much as writing
  an event-stream chunk;
- it collects garbage less often (``gc.set_threshold``): with thousands of long-lived
  connection objects the default thresholds spent ~25% of a fan-out in the collector,
  while young generations of 50,000 objects paused the loop for up to 0.5 s;
- once it serves, it leaves what start-up loaded (~120,000 objects: modules, classes,
  Django's registries) out of every later collection (``gc.freeze``): they live as long as
  the process, and a full collection, such as the one that follows thousands of clients
  leaving at once, walked them each time (169 ms against 85 ms with them left out);
- it hands the GIL back to the event loop sooner (``sys.setswitchinterval``), so a request
  thread does not hold up the writes of a fan-out;
- its access log shows ``token=[redacted]`` instead of a query-string token, since browsers'
  ``EventSource`` must put the JWT in the URL, and leaves out ``WSCONNECTING``: the
  ``WSCONNECT`` or ``WSREJECT`` line follows within milliseconds, and writing both cost
  ~3% of a connect; Twisted writes no access log line of its own, which it formatted for
  every request and, with ``-v 2``, logged with the query string's token;
- its access log writes the lines of one event-loop turn together (``LinesPerTurn``);
- it tells the real-time app which event loop serves requests, so that a request waits for
  its change's publish at most ``REALTIME_PUBLISH_WAIT_SECONDS`` (``realtime.api``);
- on SQLite, it makes the write-ahead log's checkpoints in a thread of their own, where
  a request's commit made one every thousand pages and took up to 0.2 s doing it
  (``mcp_platform.checkpoints``);
- it runs Django's system checks first, as ``runserver`` does, and stops on an error.
- stopped (SIGTERM, SIGINT), it finishes and answers the requests under way for up to
  ``--application-close-timeout`` seconds, then leaves without waiting for the threads of
  those still running (``realtime.server.NowaitServer.kill_all_applications()``).

Without arguments it serves ``mcp_platform.asgi:application`` on 127.0.0.1:8000.
"""

import asyncio
import atexit
import gc
import os
import pprint
import sys
from typing import Any, TextIO

from realtime.reactor import install, new_event_loop

#: Allocations between young collections, and collections between older ones: few enough
#: young ones that thousands of connection objects are rarely walked, small enough that a
#: collection pauses the loop for milliseconds (docs/performance.md).
GC_THRESHOLDS = (5_000, 20, 100)

#: Seconds a thread that wants the GIL waits before asking its holder to let go. Each
#: socket write of a fan-out lets the GIL go, and a request thread still at work (the
#: PATCH that published) then kept the event loop waiting up to Python's default 5 ms
#: each time: writing 1,000 event streams took 15-20 ms instead of ~4.
SWITCH_INTERVAL = 0.001


class LinesPerTurn:
    """A log stream that writes the lines of one event-loop turn in one go, at its end.

    Daphne logs each request and each WebSocket connect and disconnect; to an unbuffered
    stdout (``PYTHONUNBUFFERED``, usual in containers) every line was a ``write()`` of its
    own, ~3% of a connect's CPU in a profile (docs/performance.md). Lines still leave
    within the turn they were logged in, the stream flushed, and any left at exit are
    written then: to a buffered stdout (a pipe, a file, a service manager's journal) the
    access log reached nobody until the process ended, and none of it if it was killed."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.lines: list[str] = []
        atexit.register(self.flush)

    def write(self, text: str) -> None:
        if not self.lines:
            try:
                asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop: nothing to wait for
                self.stream.write(text)
                return
        self.lines.append(text)

    def flush(self) -> None:
        if self.lines:
            text = "".join(self.lines)
            self.lines.clear()
            self.stream.write(text)
            self.stream.flush()


def _qualified_name(obj: object) -> str:
    return getattr(obj, "__qualname__", type(obj).__qualname__)


class PrettyWhenWritten:
    """A value whose pretty-printed text is made only if a log line shows it."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __format__(self, spec: str) -> str:
        return pprint.pformat(self.value)


def quiet_autobahn_debug_text() -> None:
    """Make the text of autobahn's debug log lines cheap: it is built even when debug
    logging is off, with a function's module path looked up and coloured for every frame
    sent, and the whole configuration pretty-printed for every connection."""
    import autobahn.util
    import autobahn.websocket.protocol

    autobahn.util._HAS_CLICK = False
    autobahn.websocket.protocol.pformat = PrettyWhenWritten
    autobahn.websocket.protocol.hltype = _qualified_name


def unproxied_twisted_http() -> None:
    """Daphne writes each response chunk with ``http.Request.write(self, …)``, and
    ``twisted.web.http`` is a module proxy that checks every attribute lookup for a
    deprecation warning. Give Daphne the module itself; it uses nothing deprecated."""
    import types

    import daphne.http_protocol

    proxy = daphne.http_protocol.http
    if type(proxy) is not types.ModuleType:
        daphne.http_protocol.http = object.__getattribute__(proxy, "_module")


def prepare() -> None:
    """Install everything above into Daphne, Twisted and autobahn, before Daphne starts."""
    loop = new_event_loop()
    reactor = install(loop)  # before Daphne imports Twisted's reactor
    gc.set_threshold(*GC_THRESHOLDS)
    reactor.callWhenRunning(gc.freeze)  # once Daphne has loaded the application
    reactor.callWhenRunning(serve_requests_on, loop)
    sys.setswitchinterval(SWITCH_INTERVAL)
    quiet_autobahn_debug_text()
    unproxied_twisted_http()
    from daphne import cli

    from realtime import http_protocol, redaction, server, websocket_protocol

    http_protocol.install()
    websocket_protocol.install()
    server.install()
    from daphne.access import AccessLogGenerator

    class RedactingAccessLog(AccessLogGenerator):
        def __init__(self, stream: TextIO) -> None:
            super().__init__(LinesPerTurn(stream))

        def __call__(self, protocol: str, action: str, details: dict[str, Any]) -> None:
            if protocol == "websocket" and action == "connecting":
                return  # WSCONNECT or WSREJECT follows at once
            if "path" in details:
                details = {**details, "path": redaction.redact(details["path"])}
            super().__call__(protocol, action, details)

    cli.AccessLogGenerator = RedactingAccessLog


def serve_requests_on(loop: asyncio.AbstractEventLoop) -> None:
    """Tell the real-time app that ``loop`` serves requests for the process's life: a
    request then waits for its change's publish at most ``REALTIME_PUBLISH_WAIT_SECONDS``."""
    from realtime import sync

    sync.set_server_loop(loop)


def checkpoint_in_background() -> None:
    """Take SQLite's checkpoints out of the requests' commits (``mcp_platform.checkpoints``).
    (Once Django is set up, before the first request.)"""
    from mcp_platform import checkpoints

    checkpoints.start()


def check() -> None:
    """Run Django's system checks, and say whether migrations are unapplied, as
    ``runserver`` does before it serves (Daphne does neither): a setting they refuse would
    otherwise break the server quietly, and a database without its tables answered every
    request 500. Exits on a check's error; a database it cannot read is a warning."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mcp_platform.settings")
    import django
    from django.core.management import BaseCommand, call_command
    from django.core.management.base import SystemCheckError
    from django.db import DatabaseError, connections

    from realtime.failures import reason_of

    django.setup(set_prefix=False)
    try:
        call_command("check")
    except SystemCheckError as exc:
        sys.exit(str(exc))
    try:
        BaseCommand().check_migrations()
    except DatabaseError as exc:
        print(f"Warning: the database could not be read: {reason_of(exc)}", file=sys.stderr)
    finally:
        connections.close_all()  # the requests' threads open their own
    check_redis()


def check_redis() -> None:
    """Say if the Redis the server is to use cannot be reached: it serves all the same, and
    answers each connection 4503 until Redis can be reached, which said nothing of why."""
    import redis

    from realtime.conf import realtime_settings
    from realtime.failures import failure_text

    url = realtime_settings.REDIS_URL
    if not url:
        return
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        print(f"Warning: Redis could not be reached: {failure_text(exc)}", file=sys.stderr)
    finally:
        client.close()


def main(argv: list[str] | None = None) -> None:
    from django.core.exceptions import ImproperlyConfigured

    args = sys.argv[1:] if argv is None else argv
    if "-h" in args or "--help" in args:
        from daphne import cli

        cli.CommandLineInterface().run(args)  # Daphne's usage, and exit: no settings needed
    try:
        prepare()
        check()  # after prepare(): the apps may import Twisted's reactor
    except ImproperlyConfigured as exc:  # a setting's value: its message says which
        sys.exit(f"ImproperlyConfigured: {exc}")
    checkpoint_in_background()
    from daphne import cli

    if not args:
        args = ["-b", "127.0.0.1", "-p", "8000", "mcp_platform.asgi:application"]
    interface = cli.CommandLineInterface()
    interface.run(args)
    if interface.server is not None and interface.server.outlasted:
        # A request still in its thread when the stop's wait ran out (one waiting for a
        # lock held elsewhere, say) would hold the process for as long as it takes:
        # Python joins every executor's threads at exit. Its transaction ends with the
        # process's database connection, uncommitted.
        atexit._run_exitfuncs()  # the log lines still held, logging's own flush
        os._exit(0)


if __name__ == "__main__":
    main()
