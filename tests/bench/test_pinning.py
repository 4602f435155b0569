"""``--pin``: each server process and its load client on CPUs of their own."""

import asyncio
import json
import os

from bench.project import base_env
from bench.servers import ROOT, pinned_cpus, start_server


def test_a_server_and_its_client_never_share_a_cpu():
    cpus = sorted(os.sched_getaffinity(0))
    for index in range(4):
        server, client = pinned_cpus(index)
        assert server <= set(cpus) and client <= set(cpus)
        assert len(server) == len(client) == 1
        if len(cpus) > 1:
            assert server != client
    assert pinned_cpus(0)[0] == {cpus[0]}


def test_a_pinned_server_runs_on_its_cpu_only(tmp_path):
    cpu, _ = pinned_cpus(0)
    env = {**base_env("s" * 40), "BENCH_SECRET": "s" * 40, "BENCH_USERS": json.dumps({1: True})}

    async def started_affinity() -> set[int]:
        server = await start_server("reference", env, tmp_path, [], "/ws", cwd=ROOT, cpus=cpu)
        try:
            return os.sched_getaffinity(server.pid)
        finally:
            server.stop()

    assert asyncio.run(started_affinity()) == cpu
