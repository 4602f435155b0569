"""A load-client process: holds one share of the connections and serves the driver's calls.

The driver (``bench.pool``) starts one of these per server process. Calls arrive over a pipe
as ``(call_id, method, kwargs)`` and run as tasks on this process's event loop; each answers
``(call_id, ok, value)``. Nothing here reads the clock except to stamp what it receives, so
the driver compares arrival times with its own publish times (``time.monotonic()`` is one
clock for every process of the machine).
"""

import asyncio
import json
import resource
import time
from collections import Counter
from multiprocessing.connection import Connection
from typing import Any

from bench.stats import Arrival
from bench.wire import Receiver, Refused, SSEClient, Tally, WebSocketClient, close_all


def raise_open_file_limit() -> int:
    """Raise this process's open-file limit to the hard limit; return the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def parse_ws(payload: bytes) -> tuple[str, int]:
    try:
        message = json.loads(payload)
        return str(message.get("type")), int(message.get("seq", -1))
    except (ValueError, TypeError, AttributeError):
        return "unparseable", -1


def parse_sse(block: bytes) -> tuple[str, int]:
    """An event block's type and the seq of its ``id: <task_id>:<seq>`` line."""
    event, seq = "unparseable", -1
    for line in block.split(b"\n"):
        if line.startswith(b"event:"):
            event = line[6:].strip().decode(errors="replace")
        elif line.startswith(b"id:"):
            try:
                seq = int(line.rsplit(b":", 1)[1])
            except ValueError:
                pass
    return event, seq


class LoadClient:
    """The connections of one load-client process, in two groups: ``ws`` and ``sse``."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.groups: dict[str, list[Receiver]] = {"ws": [], "sse": []}

    async def open(
        self,
        kind: str,
        host: str,
        port: int,
        paths: list[str],
        tokens: list[str],
        concurrency: int,
        timeout: float,
    ) -> dict[str, Any]:
        """Open one connection per path, ``concurrency`` handshakes at a time.

        A WebSocket is open when its ``connected`` message arrived, a stream when its
        ``connected`` event did. Returns the start and end times and each handshake's time.
        """
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        errors: Counter[str] = Counter()
        durations: list[float] = []

        def factory(path: str, token: str) -> Receiver:
            if kind == "ws":
                return WebSocketClient(host, port, path, self.tally)
            return SSEClient(host, port, path, token, self.tally)

        async def open_one(path: str, token: str) -> None:
            async with gate:
                began = time.monotonic()
                try:
                    _, receiver = await asyncio.wait_for(
                        loop.create_connection(lambda: factory(path, token), host, port), timeout
                    )
                    first = await asyncio.wait_for(receiver.opened, timeout)
                except Refused as exc:
                    errors[f"refused {exc.status}"] += 1
                    return
                except (OSError, TimeoutError) as exc:
                    errors[type(exc).__name__] += 1
                    return
                if kind == "ws" and parse_ws(first)[0] != "connected":
                    errors[f"first message {first[:40]!r}"] += 1
                    receiver.close()
                    return
                durations.append(time.monotonic() - began)
                self.groups[kind].append(receiver)

        start = time.monotonic()
        await asyncio.gather(*(open_one(p, t) for p, t in zip(paths, tokens, strict=True)))
        return {
            "opened": len(durations),
            "errors": dict(errors),
            "start": start,
            "end": time.monotonic(),
            "durations": durations,
        }

    def clear(self, kind: str) -> int:
        """Forget logged messages, so that the next wait counts from here."""
        for receiver in self.groups[kind]:
            receiver.messages = []
        return len(self.groups[kind])

    def send(self, kind: str, text: str) -> int:
        """Send one text message on every open WebSocket of the group."""
        for receiver in self.groups[kind]:
            receiver.send_text(text)  # type: ignore[attr-defined]
        return len(self.groups[kind])

    async def wait(self, kind: str, count: int, timeout: float) -> bool:
        """Whether every connection of the group logged ``count`` messages in time."""
        return await self.tally.wait(self.groups[kind], count, timeout)

    def abandon(self) -> None:
        """End a pending wait early: the driver's trigger failed."""
        self.tally.wake()

    def collect(self, kind: str) -> list[list[Arrival]]:
        """Each connection's logged messages, parsed, in arrival order; clears the logs."""
        parse = parse_ws if kind == "ws" else parse_sse
        arrivals = []
        for receiver in self.groups[kind]:
            arrivals.append([(t, *parse(payload)) for t, payload in receiver.messages])
            receiver.messages = []
        return arrivals

    def closed(self, kind: str) -> int:
        """How many connections of the group the server has closed."""
        return sum(receiver.transport is None for receiver in self.groups[kind])

    async def close(self, kind: str) -> int:
        receivers, self.groups[kind] = self.groups[kind], []
        close_all(receivers)
        await asyncio.sleep(0)  # let the transports flush their FINs
        return len(receivers)


async def serve(conn: Connection) -> None:
    """Run calls from the driver until it sends ``None`` or goes away."""
    loop = asyncio.get_running_loop()
    client = LoadClient()
    finished = loop.create_future()
    tasks: set[asyncio.Task] = set()

    async def run(call_id: int, method: str, kwargs: dict[str, Any]) -> None:
        try:
            result = getattr(client, method)(**kwargs)
            if asyncio.iscoroutine(result):
                result = await result
            conn.send((call_id, True, result))
        except Exception as exc:  # reported to the driver, which raises it
            conn.send((call_id, False, f"{type(exc).__name__}: {exc}"))

    def on_readable() -> None:
        try:
            call = conn.recv()
        except EOFError:
            call = None
        if call is None:
            loop.remove_reader(conn.fileno())
            if not finished.done():
                finished.set_result(None)
            return
        task = loop.create_task(run(*call))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_reader(conn.fileno(), on_readable)
    await finished
    for kind in client.groups:
        await client.close(kind)


def main(conn: Connection) -> None:
    """Entry point of a load-client process."""
    raise_open_file_limit()
    asyncio.run(serve(conn))
