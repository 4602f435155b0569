"""CPU time and memory of processes, and a description of the machine, read from /proc."""

import asyncio
import os
import platform
import time
from collections.abc import Iterable

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


#: Seconds of each live thread of a process so far, by thread id (``thread_times()``).
ThreadTimes = dict[int, float]


def thread_schedstats(pid: int) -> dict[int, tuple[float, float]]:
    """Of each live thread of a process, the seconds it has so far run on a CPU and waited
    for one (runnable, in a run queue), to the nanosecond; none once the process is gone.

    The scheduler's own count (``/proc/PID/task/*/schedstat``), not ``/proc/PID/stat``'s
    utime and stime: those advance in 10 ms ticks, as coarse as a whole fan-out to 1,000
    event streams."""
    stats: dict[int, tuple[float, float]] = {}
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return stats
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as schedstat:
                ran, waited = schedstat.read().split()[:2]
        except (OSError, ValueError):
            continue  # the thread ended meanwhile
        stats[int(task)] = (int(ran) / 1e9, int(waited) / 1e9)
    return stats


def thread_times(pid: int) -> ThreadTimes:
    """CPU seconds of each live thread of a process so far (``thread_schedstats()``)."""
    return {tid: ran for tid, (ran, _) in thread_schedstats(pid).items()}


def seconds_added(before: ThreadTimes, after: ThreadTimes) -> float:
    """Seconds a process's threads added between two readings of ``thread_times()`` (or
    of either count of ``thread_schedstats()``): the CPU time it used.

    A thread that started in between counts whole; one that ended in between is left out
    (its time since the first reading is lost, but the total never goes back)."""
    total = 0.0
    for tid, seconds in after.items():
        earlier = before.get(tid, 0.0)
        total += seconds - earlier if seconds >= earlier else seconds  # a reused thread id
    return total


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (``VmRSS`` of /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def machine_busy_seconds() -> float:
    """CPU time the whole machine has spent busy (all cores, every process, the kernel)."""
    with open("/proc/stat") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / TICKS_PER_SECOND


class CpuMeter:
    """CPU seconds that groups of processes spend between ``start()`` and ``stop()``.

    ``other_cpu_s`` is what everything else on the machine used meanwhile: on a shared
    machine, a high value marks a figure as disturbed. A group of several processes also
    has its busiest one's (``server_max_cpu_s``): with a core each, the work that sets
    the pace. ``{group}_wait_s`` is the time its threads were ready to run but waited for
    a CPU: a fan-out whose wall time exceeds its CPU time by that much was held up by
    whatever ran on its core meanwhile, not by its own work.
    """

    def __init__(self, groups: dict[str, Iterable[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.started: dict[int, dict[int, tuple[float, float]]] = {}
        self.wall = self.busy = 0.0

    def _each(self) -> dict[int, dict[int, tuple[float, float]]]:
        return {pid: thread_schedstats(pid) for pids in self.groups.values() for pid in pids}

    def start(self) -> None:
        self.wall = time.monotonic()
        self.started = self._each()
        self.busy = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        """CPU seconds of each group and of the rest, and ``wall`` seconds, since ``start()``."""
        used, waited = {}, {}
        for pid, now in self._each().items():
            before = self.started[pid]
            for field, totals in enumerate((used, waited)):
                totals[pid] = seconds_added(
                    {tid: stat[field] for tid, stat in before.items()},
                    {tid: stat[field] for tid, stat in now.items()},
                )
        figures: dict[str, float] = {}
        for name, pids in self.groups.items():
            shares = [used[pid] for pid in pids]
            figures[f"{name}_cpu_s"] = sum(shares)
            figures[f"{name}_wait_s"] = sum(waited[pid] for pid in pids)
            if len(shares) > 1:
                figures[f"{name}_max_cpu_s"] = max(shares)
        other = machine_busy_seconds() - self.busy - sum(used.values())
        return {**figures, "other_cpu_s": max(0.0, other), "wall_s": time.monotonic() - self.wall}


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as meminfo:
            memory_kib = int(meminfo.readline().split()[1])
    except OSError:
        memory_kib = 0
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model or platform.processor(),
        "memory_gib": round(memory_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "load_average": list(os.getloadavg()),
    }


async def wait_for_quiet(limit: float, cores: float = 0.3) -> float:
    """Wait (at most ``limit`` s) until the machine's busy time falls to ``cores`` cores.

    Returns the cores busy in the last second sampled: between runs nothing of the
    benchmark runs, so that is other work, which would disturb the next run.
    """
    deadline = time.monotonic() + limit
    while True:
        before = machine_busy_seconds()
        await asyncio.sleep(1.0)
        busy = machine_busy_seconds() - before
        if busy <= cores or time.monotonic() >= deadline:
            return busy
