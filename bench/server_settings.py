"""Settings for project servers on Redis: the project's own, with two changes.

- ``BENCH_CHANNEL_LAYER=core`` swaps the Redis layer for channels-redis's core
  ``RedisChannelLayer`` (the project selects the pub/sub layer whenever ``REDIS_URL`` is set);
  its configuration is kept.
- The layer's ``prefix`` becomes ``bench``: pub/sub channels are shared by every database of
  a Redis server, so without it a benchmark broadcast would reach the test suite's clients
  running beside it, and theirs the benchmark's.
"""

import copy
import os

from mcp_platform.settings import *  # noqa: F403
from mcp_platform.settings import CHANNEL_LAYERS as PROJECT_CHANNEL_LAYERS
from mcp_platform.settings import REDIS_URL

CHANNEL_LAYERS = copy.deepcopy(PROJECT_CHANNEL_LAYERS)
_layer = CHANNEL_LAYERS["default"]
if REDIS_URL:  # the project's layer is Redis's (realtime.redis_layer)
    _layer.setdefault("CONFIG", {})["prefix"] = "bench"
    if os.environ.get("BENCH_CHANNEL_LAYER") == "core":
        _layer["BACKEND"] = "channels_redis.core.RedisChannelLayer"
