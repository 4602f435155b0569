"""CPU time and memory of processes, and a description of the machine, read from /proc."""

import asyncio
import os
import platform
import time
from collections.abc import Iterable

TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process so far; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # The command name (field 2) may hold spaces; the fields after it do not.
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS_PER_SECOND  # utime, stime


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
    machine, a high value marks a figure as disturbed.
    """

    def __init__(self, groups: dict[str, Iterable[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.started: dict[str, float] = {}
        self.wall = self.busy = 0.0

    def total(self, name: str) -> float:
        return sum(cpu_seconds(pid) for pid in self.groups[name])

    def start(self) -> None:
        self.wall = time.monotonic()
        self.started = {name: self.total(name) for name in self.groups}
        self.busy = machine_busy_seconds()

    def stop(self) -> dict[str, float]:
        """CPU seconds of each group and of the rest, and ``wall`` seconds, since ``start()``."""
        used = {name: self.total(name) - self.started[name] for name in self.groups}
        other = machine_busy_seconds() - self.busy - sum(used.values())
        return {
            **{f"{name}_cpu_s": seconds for name, seconds in used.items()},
            "other_cpu_s": max(0.0, other),
            "wall_s": time.monotonic() - self.wall,
        }


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
