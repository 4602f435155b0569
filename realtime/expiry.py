"""When connections' deadlines pass (a token's expiry, a session's next check): one timer per
second, shared by every connection of the event loop whose deadline falls in that second.

A timer per connection cost ~2% of a connect's instructions and ~1 KiB of its memory
(docs/performance.md). Tokens minted in the same second expire in the same second (a JWT's
``exp`` is in whole seconds), so a server whose clients log in at a steady rate holds at
most one timer per second of the token lifetime.
"""

import asyncio
import math
import time
from typing import Protocol


class Expiring(Protocol):
    def deadline_passed(self) -> None: ...


#: By event loop (each test runs its own): the watchers due, by second.
_due: dict[asyncio.AbstractEventLoop, dict[int, set[Expiring]]] = {}


def watch(expires_at: float, watcher: Expiring) -> None:
    """Call ``watcher.deadline_passed()`` once the wall clock passes ``expires_at``."""
    loop = asyncio.get_running_loop()
    due = _due.setdefault(loop, {})
    second = math.ceil(expires_at)
    watchers = due.get(second)
    if watchers is None:
        watchers = due[second] = set()
        loop.call_later(max(0.0, second - time.time()), _expire, loop, second)
    watchers.add(watcher)


def unwatch(expires_at: float, watcher: Expiring) -> None:
    """Undo ``watch()``; harmless if it has been called already."""
    due = _due.get(asyncio.get_running_loop())
    if due is not None:
        due.get(math.ceil(expires_at), set()).discard(watcher)


def _expire(loop: asyncio.AbstractEventLoop, second: int) -> None:
    due = _due[loop]
    watchers = due.pop(second)
    if not due:
        del _due[loop]
    for watcher in watchers:
        watcher.deadline_passed()
