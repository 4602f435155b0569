"""Instructions per WebSocket connect, counted by callgrind: a figure the machine's speed
does not move.

On the shared 2-core machines CPU time per connect varied by ±20-25% from run to run, more
than any change under 10% could be told from (docs/performance.md). valgrind's callgrind
counts the instructions a process runs, the same for the same code and input whatever else
the machine does. Each server here runs under it: ``--warm-up`` clients connect, the counts
are zeroed, ``--clients`` more connect (``--concurrency`` handshakes at a time), and the
counts are dumped. The Redis registry's lease renewals, periodic rather than per connect,
are kept out of the window (a lease of an hour). Instructions are not time (a cache miss
costs more than an addition), but their ratio to the reference's followed the connect
rates' ratios of the full runs.

    python -m bench.instructions [--layer memory,redis-pubsub] [--clients 300] [--commit C]

Each server takes ~50 times its usual CPU; a run of 300 clients takes a minute or two per
target. Needs valgrind (``callgrind_control`` on the PATH).
"""

import argparse
import asyncio
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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


def callgrind_control(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True)


async def open_clients(server: Server, accounts: Accounts, count: int, concurrency: int) -> None:
    client = LoadClient()
    tokens = accounts.client_tokens(count)
    paths = [f"/ws?token={token}" for token in tokens]
    opened = await client.open(
        "ws", HOST, server.port, paths, tokens, concurrency, HANDSHAKE_TIMEOUT
    )
    if opened["opened"] != count:
        raise RuntimeError(
            f"{count - opened['opened']} of {count} clients failed: {opened['errors']}"
        )


async def count_connects(
    label: str,
    env: dict[str, str],
    cwd: Path,
    workdir: Path,
    accounts: Accounts,
    args: argparse.Namespace,
) -> float:
    """Instructions per connect of one server under callgrind."""
    out = workdir / f"callgrind-{label.replace('/', '-')}.out"
    launcher = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}")
    if label == "reference":
        kind, ready_path, extra = "reference", "/ws", []
    else:
        # Under callgrind a handshake can outlast Daphne's 5 s limit.
        kind, ready_path, extra = "daphne", "/api/tasks/", ["--websocket_connect_timeout", "600"]
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
    try:
        await open_clients(server, accounts, args.warm_up, args.concurrency)
        await asyncio.sleep(1)
        callgrind_control("--zero", str(server.pid))
        await open_clients(server, accounts, args.clients, args.concurrency)
        callgrind_control("--dump", str(server.pid))
    finally:
        server.stop()
    return dumped_instructions(out) / args.clients


def dumped_instructions(out: Path) -> int:
    """The instructions counted in the dump ``callgrind_control --dump`` wrote beside
    ``out`` (``<out>.1``), not in ``out`` itself, which callgrind writes at exit."""
    dumps = sorted(out.parent.glob(f"{out.name}.*"))
    match = TOTALS.search(dumps[-1].read_bytes()) if dumps else None
    if match is None:
        raise RuntimeError(f"no callgrind dump beside {out}")
    return int(match.group(1))


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    secret = secrets.token_urlsafe(40)
    env = {"REALTIME_CONNECTION_LEASE_SECONDS": "3600", **dict(args.env)}
    project = Project(workdir, secret, args.database, args.postgres_url, env, args.commit)
    try:
        accounts = await asyncio.to_thread(project.create, 50)
        counts = {}
        for layer in args.layer:
            if layer != "memory":
                redis.Redis.from_url(args.redis_url).flushdb()
            env = project.server_env(layer, args.redis_url)
            label = f"daphne/{layer}"
            counts[label] = await count_connects(
                label, env, project.source, workdir, accounts, args
            )
            print(f"{label}: {counts[label]:,.0f} instructions per connect", flush=True)
        if not args.no_reference:
            env = {
                **base_env(secret),
                "BENCH_SECRET": secret,
                "BENCH_USERS": json.dumps(accounts.staff_ids()),
            }
            counts["reference"] = await count_connects(
                "reference", env, ROOT, workdir, accounts, args
            )
            print(f"reference: {counts['reference']:,.0f} instructions per connect", flush=True)
        return counts
    finally:
        project.drop()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    p.add_argument("--layer", type=csv(LAYERS), default=["memory", "redis-pubsub"])
    p.add_argument("--clients", type=positive(int), default=300)
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
    reference = counts.get("reference")
    for label, count in counts.items():
        ratio = ""
        if reference and label != "reference":
            ratio = f" ({reference / count:.2f}x the reference's rate)"
        print(f"{label:<22} {count:>12,.0f}{ratio}")


if __name__ == "__main__":
    main()
