"""The driver's handle on its load-client processes: one per server process.

Several processes spread the client's work over the cores, and give each server process a
client of its own. A call sends ``(call_id, method, kwargs)`` at once and returns a future
resolved when the answer arrives on the pipe, read from the driver's event loop.
"""

import asyncio
import itertools
import multiprocessing
from typing import Any

from bench import loadclient


class ClientError(RuntimeError):
    """A load-client call raised, or the process went away."""


class ClientPool:
    def __init__(self, size: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.loop = asyncio.get_running_loop()
        self.ids = itertools.count()
        self.pending: dict[int, asyncio.Future] = {}
        self.processes = []
        self.pipes = []
        for index in range(size):
            parent, child = context.Pipe()
            process = context.Process(
                target=loadclient.main, args=(child,), name=f"bench-client-{index}", daemon=True
            )
            process.start()
            child.close()
            self.processes.append(process)
            self.pipes.append(parent)
            self.loop.add_reader(parent.fileno(), self._on_answer, parent)

    @property
    def size(self) -> int:
        return len(self.processes)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def _on_answer(self, pipe: Any) -> None:
        try:
            call_id, ok, value = pipe.recv()
        except EOFError:
            self.loop.remove_reader(pipe.fileno())
            for future in self.pending.values():
                if not future.done():
                    future.set_exception(ClientError("a load client exited"))
            return
        future = self.pending.pop(call_id)
        if not future.done():
            future.set_result(value) if ok else future.set_exception(ClientError(value))

    def call(self, index: int, method: str, **kwargs: Any) -> asyncio.Future:
        """Call ``method`` of load client ``index``; the call is sent before this returns."""
        call_id = next(self.ids)
        future = self.loop.create_future()
        self.pending[call_id] = future
        self.pipes[index].send((call_id, method, kwargs))
        return future

    async def call_all(self, method: str, **kwargs: Any) -> list[Any]:
        """The same call on every load client, answers in client order."""
        return await asyncio.gather(*(self.call(i, method, **kwargs) for i in range(self.size)))

    async def close(self) -> None:
        for pipe in self.pipes:
            self.loop.remove_reader(pipe.fileno())
            try:
                pipe.send(None)
            except OSError:
                pass
        for process in self.processes:
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.kill()
                process.join()
        for pipe in self.pipes:
            pipe.close()
