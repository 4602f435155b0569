"""``realtime.expiry``: connections whose tokens end in the same second share one timer."""

import asyncio
import time

from realtime import expiry


class Watcher:
    def __init__(self, name: str, expired: list[str]) -> None:
        self.name, self.expired = name, expired

    def deadline_passed(self) -> None:
        self.expired.append(self.name)


def test_tokens_ending_in_one_second_share_a_timer_and_unwatched_ones_are_not_called():
    expired: list[str] = []
    first, second, gone = (Watcher(name, expired) for name in ("first", "second", "gone"))

    async def scenario():
        loop = asyncio.get_running_loop()
        at = time.time() + 0.5
        for watcher in (first, second, gone):
            expiry.watch(at, watcher)
        expiry.unwatch(at, gone)
        assert list(expiry._due[loop]) == [int(at) + 1]  # one second due: one timer
        await asyncio.sleep(1.6)
        assert sorted(expired) == ["first", "second"]
        assert loop not in expiry._due

    asyncio.run(scenario())
