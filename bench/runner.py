"""One invocation: set up, run every target ``repeats`` times interleaved, summarize.

Targets alternate within a repeat and the order reverses on every other repeat, so a
machine that drifts (another job starting, a CPU warming up) weighs on every target alike.
Each run starts its servers afresh and stops them afterwards.
"""

import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import redis

from bench.config import RESULTS_DIR, Config, Target
from bench.console import progress
from bench.loadclient import raise_open_file_limit
from bench.pool import ClientPool
from bench.procstat import machine, wait_for_quiet
from bench.project import Accounts, Project, base_env, describe_code, mint_accounts
from bench.scenarios import Run
from bench.servers import (
    ROOT,
    Server,
    pinned_cpus,
    start_profiler,
    start_server,
    stop_profiler,
)
from bench.stats import summarize

PROFILES_DIR = RESULTS_DIR / "profiles"


class Runner:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.secret = secrets.token_urlsafe(40)
        self.workdir = Path(tempfile.mkdtemp(prefix="mcp-bench-"))
        self.project: Project | None = None
        self.accounts: Accounts | None = None
        self.failed = False
        self.lost = False
        self.stamp = f"{datetime.now():%Y%m%d-%H%M%S}"

    async def start(self, target: Target, servers: list[Server]) -> int | None:
        """Start a target's servers into ``servers``; with Redis, empty its database first.

        Returns the pid of the Redis server, whose CPU time counts too.
        """
        if target.is_reference:
            env = {
                **base_env(self.secret),
                "BENCH_SECRET": self.secret,
                "BENCH_USERS": json.dumps(self.accounts.staff_ids()),
            }
            servers.append(
                await start_server(
                    "reference", env, self.workdir, [], "/ws", cwd=ROOT, cpus=self.server_cpus(0)
                )
            )
            return None
        redis_pid = None
        if target.layer != "memory":
            client = redis.Redis.from_url(self.config.redis_url)
            client.flushdb()
            redis_pid = int(client.info("server")["process_id"])
            client.close()
        env = self.project.server_env(target.layer, self.config.redis_url)
        for index in range(target.processes):
            servers.append(
                await start_server(
                    target.server,
                    env,
                    self.workdir,
                    self.config.server_args,
                    "/api/tasks/",
                    cwd=self.project.source,
                    cpus=self.server_cpus(index),
                )
            )
        return redis_pid

    def server_cpus(self, index: int) -> set[int] | None:
        return pinned_cpus(index)[0] if self.config.pin else None

    async def run(self, target: Target, repeat: int) -> dict[str, Any]:
        """Measure one target once; a failure is recorded, and the other targets go on."""
        servers: list[Server] = []
        profilers = []
        try:
            redis_pid = await self.start(target, servers)
            if self.config.profile and not target.is_reference:
                name = re.sub(r"[^a-z0-9-]+", "-", target.label)
                form = self.config.profile
                suffix = {"flamegraph": "svg", "speedscope": "json", "raw": "txt"}[form]
                profilers = [
                    start_profiler(
                        server, PROFILES_DIR / f"{self.stamp}-{name}-{repeat}-{i}.{suffix}", form
                    )
                    for i, server in enumerate(servers)
                ]
            pool = ClientPool(len(servers))
            if self.config.pin:
                for index, pid in enumerate(pool.pids):
                    os.sched_setaffinity(pid, pinned_cpus(index)[1])
            try:
                timeout = aiohttp.ClientTimeout(total=self.config.timeout)
                async with aiohttp.ClientSession(timeout=timeout) as http:
                    run = Run(self.config, servers, pool, http, self.accounts, redis_pid)
                    command = shlex.join(["python", *servers[0].process.args[1:]])
                    results = await run.measure()
                    if any(isinstance(r, dict) and r.get("lost") for r in results.values()):
                        self.lost = True  # the servers' logs may say why
                    return {"server_command": command, **results}
            finally:
                await pool.close()
        except Exception as exc:
            self.failed = True
            logs = "\n".join(f"--- {s.log_path}\n{s.log_tail(1500)}" for s in servers)
            progress(f"{target.label} failed: {type(exc).__name__}: {exc}\n{logs}")
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            for profiler in profilers:
                stop_profiler(profiler)
            for server in servers:
                server.stop()

    async def benchmark(self) -> dict[str, Any]:
        config = self.config
        started = datetime.now(UTC)
        code = describe_code(config.commit)
        if config.has_project:
            progress(f"creating the project's database and {config.users + 1} users")
            self.project = Project(
                self.workdir,
                self.secret,
                config.database,
                config.postgres_url,
                config.env,
                config.commit,
            )
            self.accounts = await asyncio.to_thread(self.project.create, config.users)
        else:
            self.accounts = mint_accounts(self.secret, config.users)
        runs: dict[str, list[dict[str, Any]]] = {t.label: [] for t in config.targets}
        for repeat in range(config.repeats):
            order = config.targets if repeat % 2 == 0 else config.targets[::-1]
            for target in order:
                progress(f"run {repeat + 1}/{config.repeats}: {target.label}")
                busy = await wait_for_quiet(config.wait_quiet) if config.wait_quiet else None
                result = await self.run(target, repeat + 1)
                progress(f"  {headline(result)}")
                if busy is not None:
                    result["machine_busy_cores_before"] = busy
                runs[target.label].append(result)
        return {
            "started": started.isoformat(timespec="seconds"),
            "seconds": round((datetime.now(UTC) - started).total_seconds(), 1),
            "command": config.command,
            "machine": machine(),
            "code": code,
            "config": settings_of(config),
            "results": {
                label: {"summary": summary_of(target_runs), "runs": target_runs}
                for label, target_runs in runs.items()
            },
        }

    def cleanup(self) -> None:
        if self.project is not None:
            self.project.drop()
        if self.failed or self.lost or self.config.keep_logs:
            progress(f"server logs kept in {self.workdir}")
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)


def headline(result: dict[str, Any]) -> str:
    """A run's main figures on one line, for progress."""
    if "error" in result:
        return result["error"]
    parts = []
    for scenario, key, unit in HEADLINE:
        value = result.get(scenario, {}).get(key)
        if isinstance(value, int | float):
            parts.append(f"{scenario} {value:,.1f} {unit}")
    return ", ".join(parts)


HEADLINE = [
    ("connect", "connect_per_s", "conn/s"),
    ("fanout", "deliveries_per_s", "deliveries/s"),
    ("broadcast", "deliveries_per_s", "deliveries/s"),
    ("sse", "deliveries_per_s", "deliveries/s"),
    ("sustained", "lost", "lost"),
]


def summary_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scenario, the median (or, for counts, the sum) over the runs that measured it."""
    scenarios = dict.fromkeys(s for run in runs for s in run if isinstance(run[s], dict))
    summary = {s: summarize([run[s] for run in runs if s in run]) for s in scenarios}
    errors = [run["error"] for run in runs if "error" in run]
    return {**summary, **({"errors": errors} if errors else {})}


def settings_of(config: Config) -> dict[str, Any]:
    return {
        "scenarios": list(config.scenarios),
        "targets": [target.label for target in config.targets],
        "clients": config.clients,
        "sse_clients": config.sse_clients,
        "stream_clients": config.stream_clients,
        "stream_rate": config.stream_rate,
        "stream_seconds": config.stream_seconds,
        "updates": config.updates,
        "repeats": config.repeats,
        "users": config.users,
        "concurrency": config.concurrency,
        "database": config.database,
        "env": config.env,
        "server_args": config.server_args,
        "pin": config.pin,
    }


async def run_benchmark(config: Config) -> dict[str, Any]:
    raise_open_file_limit()
    runner = Runner(config)
    try:
        return await runner.benchmark()
    finally:
        runner.cleanup()
