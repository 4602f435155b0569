"""The benchmark's quick path against the reference server, so that the tool cannot rot.

Nothing here is timed: the run must produce every figure, and every message must arrive.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CLIENTS, STREAMS, UPDATES = 50, 20, 2


def test_quick_reference_run_produces_complete_figures(tmp_path):
    output = tmp_path / "result.json"
    command = [
        sys.executable, "-m", "bench", "--quick", "--reference-only",
        "--clients", str(CLIENTS), "--sse-clients", str(STREAMS), "--updates", str(UPDATES),
        "--stream-clients", "5", "--stream-seconds", "1", "--output", str(output),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deliveries/s" in done.stdout  # the table

    summary = json.loads(output.read_text())["results"]["reference"]["summary"]
    assert summary["connect"]["opened"] == CLIENTS
    assert summary["connect"]["rss_per_connection_kib"] > 0
    for scenario, clients in (("fanout", CLIENTS), ("broadcast", CLIENTS), ("sse", STREAMS)):
        figures = summary[scenario]
        assert figures["expected"] == figures["delivered"] == clients * UPDATES, scenario
        assert figures["deliveries_per_s"] > 0 and figures["p99_ms"] >= figures["p50_ms"]
    assert summary["broadcast"]["recipients_ok"] is True
    sustained = summary["sustained"]
    assert sustained["expected"] == sustained["delivered"] > 0
    assert (sustained["lost"], sustained["out_of_order"], sustained["duplicates"]) == (0, 0, 0)
    # From the saved change to arrival is part of from the trigger's send to arrival.
    assert 0 < sustained["change_p50_ms"] <= sustained["change_max_ms"] <= sustained["max_ms"]


@pytest.mark.parametrize(
    ("chosen", "backend"),
    [
        ("core", "channels_redis.core.RedisChannelLayer"),
        ("pubsub", "realtime.redis_layer.RedisPubSubChannelLayer"),
    ],
)
def test_a_redis_run_chooses_its_layer_and_a_prefix_of_its_own(chosen, backend):
    """The choice never applied once the project's Redis layer was its own class: every
    ``--layer redis`` run measured the pub/sub layer, under the project's prefix."""
    code = "from django.conf import settings; print(json.dumps(settings.CHANNEL_LAYERS))"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DJANGO_SETTINGS_MODULE": "bench.server_settings",
        "DJANGO_SECRET_KEY": "s" * 40,
        "REDIS_URL": "redis://127.0.0.1:6379/13",
        "BENCH_CHANNEL_LAYER": chosen,
    }
    result = subprocess.run(
        [sys.executable, "-c", f"import json, django; django.setup(); {code}"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    layer = json.loads(result.stdout)["default"]
    assert (layer["BACKEND"], layer["CONFIG"]["prefix"]) == (backend, "bench")
