"""Instructions per WebSocket connect and per update fanned out, counted by callgrind:
figures the machine's speed does not move.

On the shared 2-core machines CPU time per connect varied by ±20-25% from run to run, more
than any change under 10% could be told from, and an event-stream fan-out's wall time
depended on where the kernel put the load client (docs/performance.md). valgrind's
callgrind counts the instructions a process runs, the same for the same code and input
whatever else the machine does. Each server here runs under it, and each scenario counts
a window between zeroing the counts and dumping them:

- ``connect``: ``--warm-up`` clients connect, then the window: ``--clients`` more connect
  (``--concurrency`` handshakes at a time). Per connect.
- ``fanout`` and ``sse``: ``--followers`` WebSockets subscribe to one task (or as many
  event streams follow it) and one update reaches them all, then the window: ``--updates``
  more, each sent once the last has reached every follower. Per update: the ``PATCH`` and
  its fan-out, as the benchmark's fan-out figures time them.

Periodic work is kept out of the windows, since whether it falls into one depends on
callgrind's pace: the Redis registry's lease renewals (a lease of an hour), event-stream
heartbeats (the reference's too) and Daphne's WebSocket pings (an hour's interval each).
What is left still varies by a few per cent between runs of one code in the update
windows, where timing decides how much a client reads at once and when the collector
runs. Instructions are not time (a cache miss costs more than an addition, and the
kernel's share, a socket's ``send()`` for one, is not counted), but their ratio to the
reference's followed the connect rates' ratios of the full runs.

    python -m bench.instructions [--scenario connect,fanout,sse] [--layer memory,redis-pubsub]

Each server takes ~50 times its usual CPU; the defaults take three to four minutes per
target. Needs valgrind (``callgrind_control`` on the PATH).
"""

import argparse
import asyncio
import functools
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import redis

from bench.config import LAYERS, Config, csv, key_value, positive
from bench.loadclient import LoadClient, raise_open_file_limit
from bench.project import Accounts, Project, base_env
from bench.servers import HOST, ROOT, Server, start_server

#: Seconds a server under callgrind may take to answer its first request.
STARTUP_SECONDS = 600.0
#: Seconds one handshake may take under callgrind.
HANDSHAKE_TIMEOUT = 600.0
TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)
SCENARIOS = ("connect", "fanout", "sse")


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


async def open_clients(
    client: LoadClient,
    kind: str,
    server: Server,
    paths: list[str],
    tokens: list[str],
    concurrency: int,
) -> None:
    opened = await client.open(
        kind, HOST, server.port, paths, tokens, concurrency, HANDSHAKE_TIMEOUT
    )
    if opened["opened"] != len(paths):
        raise RuntimeError(
            f"{len(paths) - opened['opened']} of {len(paths)} {kind} clients failed: "
            f"{opened['errors']}"
        )


class Window:
    """callgrind's counts of one server between ``zero()`` and ``dump()``."""

    def __init__(self, server: Server, out: Path) -> None:
        self.server = server
        self.out = out

    async def zero(self) -> None:
        await asyncio.sleep(1)  # let the last step's stragglers finish outside the window
        callgrind_control("--zero", str(self.server.pid))

    def dump(self) -> int:
        callgrind_control("--dump", str(self.server.pid))
        return dumped_instructions(self.out)


async def count_connects(
    server: Server, window: Window, accounts: Accounts, args: argparse.Namespace
) -> float:
    """Instructions per WebSocket connect."""
    client = LoadClient()
    tokens = accounts.client_tokens(args.warm_up + args.clients)
    paths = [f"/ws?token={token}" for token in tokens]
    warm = args.warm_up
    await open_clients(client, "ws", server, paths[:warm], tokens[:warm], args.concurrency)
    await window.zero()
    await open_clients(client, "ws", server, paths[warm:], tokens[warm:], args.concurrency)
    count = window.dump()
    await client.close("ws")
    return count / args.clients


async def count_updates(
    kind: str, server: Server, window: Window, accounts: Accounts, args: argparse.Namespace
) -> float:
    """Instructions per update of a task that ``--followers`` clients follow: WebSockets
    subscribed to it (``ws``) or event streams of it (``sse``)."""
    auth = {"Authorization": f"Bearer {accounts.owner.token}"}
    async with aiohttp.ClientSession(
        server.url, timeout=aiohttp.ClientTimeout(total=HANDSHAKE_TIMEOUT)
    ) as http:

        async def request(method: str, path: str, body: dict) -> dict:
            async with http.request(method, path, json=body, headers=auth) as response:
                if response.status not in (200, 201):
                    raise RuntimeError(f"{method} {path} answered {response.status}")
                return await response.json()

        task_id = (await request("POST", "/api/tasks/", {"name": "instructions"}))["id"]
        client = LoadClient()
        tokens = accounts.client_tokens(args.followers)
        if kind == "ws":
            paths = [f"/ws?token={token}" for token in tokens]
        else:
            paths = [f"/events?task_id={task_id}"] * len(tokens)
        await open_clients(client, kind, server, paths, tokens, args.concurrency)
        if kind == "ws":
            client.clear("ws")
            client.send("ws", json.dumps({"action": "subscribe", "task_id": task_id}))
            if not await client.wait("ws", 1, HANDSHAKE_TIMEOUT):
                raise RuntimeError("a client was not subscribed")

        async def update(number: int) -> None:
            client.clear(kind)
            change = {"status": "running", "progress": number}
            await request("PATCH", f"/api/tasks/{task_id}/", change)
            if not await client.wait(kind, 1, HANDSHAKE_TIMEOUT):
                raise RuntimeError("an update did not reach every client")

        await update(1)
        await window.zero()
        for number in range(2, 2 + args.updates):
            await update(number)
        count = window.dump()
        await client.close(kind)
    return count / args.updates


async def count_target(
    label: str,
    env: dict[str, str],
    cwd: Path,
    workdir: Path,
    accounts: Accounts,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Each scenario's instructions for one server under callgrind."""
    out = workdir / f"callgrind-{label.replace('/', '-')}.out"
    launcher = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}")
    if label == "reference":
        kind, ready_path, extra = "reference", "/ws", []
    else:
        # Under callgrind a handshake can outlast Daphne's 5 s limit.
        kind, ready_path = "daphne", "/api/tasks/"
        extra = ["--websocket_connect_timeout", "600", "--ping-interval", "3600"]
    server = await start_server(
        kind,
        env,
        workdir,
        extra,
        ready_path,
        cwd=cwd,
        launcher=launcher,
        ready_within=STARTUP_SECONDS,
    )
    counters = {
        "connect": count_connects,
        "fanout": functools.partial(count_updates, "ws"),
        "sse": functools.partial(count_updates, "sse"),
    }
    window = Window(server, out)
    try:
        return {
            scenario: await counters[scenario](server, window, accounts, args)
            for scenario in args.scenario
        }
    finally:
        server.stop()


def dumped_instructions(out: Path) -> int:
    """The instructions counted in the latest dump ``callgrind_control --dump`` wrote
    beside ``out`` (``<out>.1``, ``<out>.2``, …), not in ``out`` itself, which callgrind
    writes at exit."""
    dumps = sorted(
        (path for path in out.parent.glob(f"{out.name}.*") if path.suffix[1:].isdigit()),
        key=lambda path: int(path.suffix[1:]),
    )
    match = TOTALS.search(dumps[-1].read_bytes()) if dumps else None
    if match is None:
        raise RuntimeError(f"no callgrind dump beside {out}")
    return int(match.group(1))


UNITS = {"connect": "per connect", "fanout": "per update", "sse": "per update"}


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    """Each target's instructions, by scenario."""
    secret = secrets.token_urlsafe(40)
    env = {
        "REALTIME_CONNECTION_LEASE_SECONDS": "3600",
        "REALTIME_SSE_HEARTBEAT_SECONDS": "3600",
        **dict(args.env),
    }
    project = Project(workdir, secret, args.database, args.postgres_url, env, args.commit)
    try:
        accounts = await asyncio.to_thread(project.create, 50)
        targets = []
        for layer in args.layer:
            targets.append((f"daphne/{layer}", project.server_env(layer, args.redis_url)))
        if not args.no_reference:
            reference_env = {
                **base_env(secret),
                "BENCH_SECRET": secret,
                "BENCH_USERS": json.dumps(accounts.staff_ids()),
                "BENCH_HEARTBEAT_SECONDS": "3600",
            }
            targets.append(("reference", reference_env))
        counts = {}
        for label, target_env in targets:
            if "REDIS_URL" in target_env:
                redis.Redis.from_url(args.redis_url).flushdb()
            cwd = ROOT if label == "reference" else project.source
            counts[label] = await count_target(label, target_env, cwd, workdir, accounts, args)
            for scenario, count in counts[label].items():
                unit = UNITS[scenario]
                print(f"{label} {scenario}: {count:,.0f} instructions {unit}", flush=True)
        return counts
    finally:
        project.drop()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    p.add_argument("--scenario", type=csv(SCENARIOS), default=list(SCENARIOS))
    p.add_argument("--layer", type=csv(LAYERS), default=["memory", "redis-pubsub"])
    p.add_argument("--clients", type=positive(int), default=300)
    p.add_argument("--followers", type=positive(int), default=500)
    p.add_argument("--updates", type=positive(int), default=3)
    p.add_argument("--warm-up", type=positive(int), default=100)
    p.add_argument("--concurrency", type=positive(int), default=Config.concurrency)
    p.add_argument("--no-reference", action="store_true")
    p.add_argument("--redis-url", default=Config.redis_url)
    p.add_argument("--database", choices=["sqlite", "postgres"], default=Config.database)
    p.add_argument("--postgres-url", default=Config.postgres_url)
    p.add_argument("--env", type=key_value, action="append", default=[])
    p.add_argument("--commit", help="measure this commit's code instead of the working tree")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if shutil.which("callgrind_control") is None:
        sys.exit("bench.instructions needs valgrind: callgrind_control is not on the PATH")
    raise_open_file_limit()
    with tempfile.TemporaryDirectory(prefix="mcp-instructions-") as workdir:
        counts = asyncio.run(measure(args, Path(workdir)))
    reference = counts.get("reference", {})
    for scenario in args.scenario:
        print(f"instructions {UNITS[scenario]} ({scenario})")
        for label, count in counts.items():
            ratio = ""
            if scenario in reference and label != "reference":
                ratio = f" ({reference[scenario] / count[scenario]:.2f}x the reference's rate)"
            print(f"  {label:<22} {count[scenario]:>14,.0f}{ratio}")


if __name__ == "__main__":
    main()
