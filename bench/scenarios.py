"""The measurements of one run of one target: connect, fan-out, broadcast, SSE, sustained.

Every figure comes from the same few steps: open clients through the load-client processes,
clear their logs, note the time, send one HTTP trigger (a ``PATCH`` of the task, or ``POST
/broadcast``), wait until every client logged its message, and read the arrival times.
Before each measured step the servers are left to fall idle, so one step's tail (closing
4,000 sockets, say) does not land in the next one's figures.
"""

import asyncio
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp

from bench.config import Config
from bench.console import progress
from bench.pool import ClientPool
from bench.procstat import CpuMeter, rss_kib, seconds_added, thread_times
from bench.project import Accounts
from bench.servers import HOST, Server
from bench.stats import fanout_figures, latency_figures, stream_figures, summarize

#: Clients opened, subscribed and updated once before anything is measured.
WARM_UP_CLIENTS = 10
#: Seconds one handshake (TCP, upgrade, ``connected``) may take.
HANDSHAKE_TIMEOUT = 30.0
#: A sustained stream that the server slows down stops sending after this many times its
#: planned length; ``updates`` then tells how many were sent.
STREAM_OVERRUN = 1.5


def saved_at(task: dict[str, Any]) -> float:
    """When the server saved the change a task's representation shows (its ``updated_at``,
    on the wall clock), on the monotonic clock that arrivals are timed by."""
    wall_offset = time.time() - time.monotonic()
    return datetime.fromisoformat(task["updated_at"]).timestamp() - wall_offset


class Skip(Exception):
    """A scenario the server does not offer (yet): it answered 404."""


class Run:
    """One target's servers and load clients, measured once."""

    def __init__(
        self,
        config: Config,
        servers: list[Server],
        pool: ClientPool,
        http: aiohttp.ClientSession,
        accounts: Accounts,
        redis_pid: int | None,
    ) -> None:
        self.config = config
        self.servers = servers
        self.pool = pool
        self.http = http
        self.accounts = accounts
        self.redis_pid = redis_pid
        self.auth = {"Authorization": f"Bearer {accounts.owner.token}"}
        self.base = servers[0].url  # every trigger goes to the first server process

    # Helpers

    def meter(self) -> CpuMeter:
        groups = {
            "server": [server.pid for server in self.servers],
            "client": [*self.pool.pids, os.getpid()],
        }
        if self.redis_pid:
            groups["redis"] = [self.redis_pid]
        return CpuMeter(groups)

    def server_rss_kib(self) -> int:
        return sum(rss_kib(server.pid) for server in self.servers)

    async def settle(self, limit: float = 15.0) -> None:
        """Wait (at most ``limit`` s) until the servers use under 10% of a core each."""
        window = 0.3
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            before = [thread_times(server.pid) for server in self.servers]
            await asyncio.sleep(window)
            used = sum(
                seconds_added(times, thread_times(server.pid))
                for times, server in zip(before, self.servers, strict=True)
            )
            if used <= 0.1 * window * len(self.servers):
                return

    async def request(self, method: str, path: str, body: dict) -> tuple[int, Any]:
        async with self.http.request(
            method, self.base + path, json=body, headers=self.auth
        ) as response:
            if response.content_type == "application/json":
                return response.status, await response.json()
            return response.status, await response.text()

    async def create_task(self, name: str) -> str:
        status, body = await self.request("POST", "/api/tasks/", {"name": name})
        if status != 201:
            raise RuntimeError(f"POST /api/tasks/ answered {status}: {body}")
        return body["id"]

    async def update_task(self, task_id: str, number: int) -> tuple[int, Any]:
        """PATCH the task (a new ``progress`` each time, though any save is a change)."""
        return await self.request(
            "PATCH", f"/api/tasks/{task_id}/", {"status": "running", "progress": number % 101}
        )

    def spread(self, items: list[Any]) -> list[list[Any]]:
        """Deal items out to the load clients, one share per server process."""
        return [items[i :: self.pool.size] for i in range(self.pool.size)]

    async def open(self, kind: str, paths: list[str], tokens: list[str]) -> dict[str, Any]:
        """Open clients over every server process; the connect figures of the whole batch."""
        meter = self.meter()
        meter.start()
        answers = await asyncio.gather(
            *(
                self.pool.call(
                    i,
                    "open",
                    kind=kind,
                    host=HOST,
                    port=self.servers[i % len(self.servers)].port,
                    paths=share_paths,
                    tokens=share_tokens,
                    concurrency=self.config.concurrency,
                    timeout=HANDSHAKE_TIMEOUT,
                )
                for i, (share_paths, share_tokens) in enumerate(
                    zip(self.spread(paths), self.spread(tokens), strict=True)
                )
            )
        )
        cpu = meter.stop()
        opened = sum(answer["opened"] for answer in answers)
        span = max(a["end"] for a in answers) - min(a["start"] for a in answers)
        handshakes = latency_figures([d for answer in answers for d in answer["durations"]])
        return {
            "clients": len(paths),
            "opened": opened,
            "failed": len(paths) - opened,
            "errors": dict(sum((Counter(a["errors"]) for a in answers), Counter())),
            "connect_per_s": opened / span if span > 0 else 0.0,
            "connect_p50_ms": handshakes["p50_ms"],
            "connect_p99_ms": handshakes["p99_ms"],
            **cpu,
        }

    async def open_websockets(self, count: int) -> dict[str, Any]:
        tokens = self.accounts.client_tokens(count)
        return await self.open("ws", [f"/ws?token={token}" for token in tokens], tokens)

    async def subscribe(self, task_id: str) -> dict[str, Any]:
        """Subscribe every open WebSocket to the task.

        A client the server fails to subscribe stays in the figures that follow, as one
        that receives nothing: ``subscribe_failed`` tells why it did not.
        """
        await self.pool.call_all("clear", kind="ws")
        began = time.monotonic()
        text = f'{{"action":"subscribe","task_id":"{task_id}"}}'
        await self.pool.call_all("send", kind="ws", text=text)
        await self.pool.call_all("wait", kind="ws", count=1, timeout=self.config.timeout)
        elapsed = time.monotonic() - began
        logs = [log for share in await self.pool.call_all("collect", kind="ws") for log in share]
        replies = Counter(log[0][1] if log else "no reply" for log in logs)
        subscribed = replies.pop("subscribed", 0)
        if replies:
            progress(f"not subscribed: {dict(replies)}")
        return {
            "subscribe_per_s": subscribed / elapsed if elapsed > 0 else 0.0,
            "subscribe_failed": dict(replies),
        }

    async def deliver(
        self, kind: str, message_type: str, trigger: Callable[[], Awaitable[dict[str, Any]]]
    ) -> dict[str, Any]:
        """Send one trigger and time its message's arrival at every open client of ``kind``."""
        await self.settle()
        await self.pool.call_all("clear", kind=kind)
        meter = self.meter()
        meter.start()
        waits = [
            self.pool.call(i, "wait", kind=kind, count=1, timeout=self.config.timeout)
            for i in range(self.pool.size)
        ]
        published = time.monotonic()
        try:
            extra = await trigger()
            changed = extra.pop("changed", None)
        except BaseException:
            await self.pool.call_all("abandon")
            await asyncio.gather(*waits, return_exceptions=True)
            raise
        complete = all(await asyncio.gather(*waits))
        cpu = meter.stop()
        logs = [log for share in await self.pool.call_all("collect", kind=kind) for log in share]
        closed = sum(await self.pool.call_all("closed", kind=kind))
        figures = fanout_figures(published, logs, message_type, changed)
        return {**figures, "complete": complete, "closed_by_server": closed, **extra, **cpu}

    def update_trigger(self, task_id: str, number: int) -> Callable[[], Awaitable[dict]]:
        async def trigger() -> dict[str, Any]:
            status, body = await self.update_task(task_id, number)
            if status != 200:
                raise RuntimeError(f"PATCH answered {status}: {body}")
            return {"changed": saved_at(body)}

        return trigger

    def broadcast_trigger(self, expected: int) -> Callable[[], Awaitable[dict]]:
        async def trigger() -> dict[str, Any]:
            status, body = await self.request("POST", "/broadcast", {"message": "bench"})
            if status == 404:
                raise Skip("POST /broadcast answered 404: not built yet")
            if status != 200:
                raise RuntimeError(f"POST /broadcast answered {status}: {body}")
            recipients = body.get("recipients")
            return {"recipients": recipients, "recipients_ok": recipients == expected}

        return trigger

    async def close(self, kind: str) -> None:
        await self.pool.call_all("close", kind=kind)
        await self.settle()

    # Phases

    async def warm_up(self) -> None:
        """Load every code path once, so that first-use costs stay out of the figures."""
        task_id = await self.create_task("warm-up")
        await self.open_websockets(WARM_UP_CLIENTS * self.pool.size)
        await self.subscribe(task_id)
        await self.deliver("ws", "task_update", self.update_trigger(task_id, 1))
        await self.close("ws")

    async def websocket_phase(self) -> dict[str, Any]:
        """connect (with memory per connection), then fan-out and broadcast on those clients."""
        wanted = set(self.config.scenarios)
        results: dict[str, Any] = {}
        task_id = await self.create_task("fanout")
        broadcast = "broadcast" in wanted
        if broadcast:
            try:  # nobody is connected yet, so a server that has the endpoint reaches no one
                await self.broadcast_trigger(0)()
            except Skip as exc:
                results["broadcast"] = {"skipped": str(exc)}
                broadcast = False
        await self.settle()
        before = self.server_rss_kib()
        connect = await self.open_websockets(self.config.clients)
        await self.settle()
        grown = self.server_rss_kib() - before
        connect["rss_per_connection_kib"] = grown / connect["opened"] if connect["opened"] else 0
        results["connect"] = connect
        if "fanout" in wanted:
            subscribed = await self.subscribe(task_id)
            updates = [
                await self.deliver("ws", "task_update", self.update_trigger(task_id, k + 2))
                for k in range(self.config.updates)
            ]
            results["fanout"] = {**summarize(updates), **subscribed}
        if broadcast:
            trigger = self.broadcast_trigger(connect["opened"])
            sends = [
                await self.deliver("ws", "broadcast", trigger) for _ in range(self.config.updates)
            ]
            results["broadcast"] = summarize(sends)
        await self.close("ws")
        return results

    async def sse_phase(self) -> dict[str, Any]:
        task_id = await self.create_task("sse")
        tokens = self.accounts.client_tokens(self.config.sse_clients)
        probe = await self.open("sse", [f"/events?task_id={task_id}"], tokens[:1])
        if probe["errors"].get("refused 404"):
            raise Skip("GET /events answered 404: not built yet")
        await self.settle()
        paths = [f"/events?task_id={task_id}"] * (len(tokens) - 1)
        connect = await self.open("sse", paths, tokens[1:])
        updates = [
            await self.deliver("sse", "task_update", self.update_trigger(task_id, k + 2))
            for k in range(self.config.updates)
        ]
        await self.close("sse")
        return {
            **summarize(updates),
            "connect_per_s": connect["connect_per_s"],
            "failed": probe["failed"] + connect["failed"],
        }

    async def sustained_phase(self) -> dict[str, Any]:
        """``stream_rate`` updates/s of one task to ``stream_clients`` subscribers."""
        config = self.config
        task_id = await self.create_task("sustained")
        connect = await self.open_websockets(config.stream_clients)
        await self.subscribe(task_id)
        await self.settle()
        await self.pool.call_all("clear", kind="ws")
        meter = self.meter()
        meter.start()
        sent: dict[int, float] = {}
        changed: dict[int, float] = {}
        refused: Counter[str] = Counter()
        gate = asyncio.Semaphore(config.stream_in_flight)

        async def send(number: int) -> None:
            began = time.monotonic()
            try:
                status, body = await self.update_task(task_id, number)
            finally:
                gate.release()
            if status == 200:
                sent[body["seq"]] = began
                changed[body["seq"]] = saved_at(body)
            else:
                refused[f"{status} {str(body)[:80]}"] += 1

        total = round(config.stream_rate * config.stream_seconds)
        start = time.monotonic()
        requests = []
        cutoff = start + STREAM_OVERRUN * config.stream_seconds
        for number in range(total):
            delay = start + number / config.stream_rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()  # a server slower than the rate holds the schedule back
            if time.monotonic() > cutoff:
                gate.release()
                break
            requests.append(asyncio.create_task(send(number)))
        await asyncio.gather(*requests)
        sending = time.monotonic() - start
        waits = await self.pool.call_all("wait", kind="ws", count=len(sent), timeout=config.drain)
        cpu = meter.stop()
        logs = [log for share in await self.pool.call_all("collect", kind="ws") for log in share]
        closed = sum(await self.pool.call_all("closed", kind="ws"))
        await self.close("ws")
        return {
            "subscribers": connect["opened"],
            "planned": total,
            "updates": len(sent),
            "failed": sum(refused.values()),
            "errors": {**connect["errors"], **refused},
            "update_rate": len(sent) / sending,
            **stream_figures(sent, changed, logs),
            "complete": all(waits),
            "closed_by_server": closed,
            **cpu,
        }

    async def measure(self) -> dict[str, Any]:
        """Every wanted scenario, in an order that lets one set of clients serve several."""
        wanted = set(self.config.scenarios)
        await self.warm_up()
        results: dict[str, Any] = {}
        if wanted & {"connect", "fanout", "broadcast"}:
            results.update(await self.websocket_phase())
        if "sse" in wanted:
            try:
                results["sse"] = await self.sse_phase()
            except Skip as exc:
                await self.pool.call_all("close", kind="sse")
                results["sse"] = {"skipped": str(exc)}
        if "sustained" in wanted:
            results["sustained"] = await self.sustained_phase()
        return results
