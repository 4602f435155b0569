"""CPU time as the benchmark reads it: per thread, to the nanosecond, by process group."""

import os
import subprocess
import sys
import threading
import time

from bench.procstat import CpuMeter, seconds_added, thread_times

#: A child that, told to on stdin, burns ``argv[1]`` seconds of CPU, says so, then idles.
BURN = (
    "import sys, time\n"
    "print('ready', flush=True)\n"
    "sys.stdin.readline()\n"
    "end = time.thread_time() + float(sys.argv[1])\n"
    "while time.thread_time() < end: pass\n"
    "print('done', flush=True)\n"
    "time.sleep(30)"
)


def burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_few_milliseconds_are_counted_finer_than_a_clock_tick():
    me = threading.get_native_id()
    before = thread_times(os.getpid())[me]
    burn(0.003)
    # /proc/PID/stat's 10 ms ticks would show 0 or 0.01.
    assert 0.002 < thread_times(os.getpid())[me] - before < 0.009


def test_every_live_thread_is_counted():
    started, stop = threading.Event(), threading.Event()

    def work() -> None:
        burn(0.05)
        started.set()
        stop.wait()

    worker = threading.Thread(target=work)
    before = thread_times(os.getpid())
    worker.start()
    started.wait()
    try:
        assert seconds_added(before, thread_times(os.getpid())) >= 0.05
    finally:
        stop.set()
        worker.join()


def test_a_thread_that_ends_between_readings_takes_nothing_back():
    busy, end = threading.Event(), threading.Event()

    def work() -> None:
        burn(0.05)  # before the first reading
        busy.set()
        end.wait()

    worker = threading.Thread(target=work)
    worker.start()
    busy.wait()
    before = thread_times(os.getpid())
    end.set()
    worker.join()
    deadline = time.monotonic() + 5
    while worker.native_id in (after := thread_times(os.getpid())):
        assert time.monotonic() < deadline  # the OS thread outlives join() for a moment
        time.sleep(0.01)
    # Summed per process, the ended thread's 0.05 s would come off the total.
    assert worker.native_id in before
    assert seconds_added(before, after) >= 0


def metered_burns(seconds: tuple[float, ...], cpus: set[int] | None = None) -> dict[str, float]:
    """A meter's figures around children ("server") that each burn ``seconds[i]`` of CPU at
    the same time, on ``cpus`` if given."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", BURN, str(burn_for)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
        for burn_for in seconds
    ]
    try:
        for child in children:
            assert child.stdout.readline() == "ready\n"
        meter = CpuMeter({"server": [child.pid for child in children], "client": [os.getpid()]})
        meter.start()
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            assert child.stdout.readline() == "done\n"
        return meter.stop()
    finally:
        for child in children:
            child.kill()
            child.wait()


def test_a_group_of_processes_has_its_total_and_its_busiest():
    figures = metered_burns((0.05, 0.2))
    assert 0.2 <= figures["server_max_cpu_s"] < 0.3
    assert figures["server_cpu_s"] >= figures["server_max_cpu_s"] + 0.05
    assert "client_max_cpu_s" not in figures  # one process: its busiest is its total
    assert figures["wall_s"] >= 0.2


def test_time_spent_waiting_for_a_cpu_is_counted():
    """Two processes that want the same CPU take turns: each waits while the other runs."""
    one_cpu = {min(os.sched_getaffinity(0))}
    figures = metered_burns((0.2, 0.2), cpus=one_cpu)
    assert figures["server_wait_s"] >= 0.15
    assert figures["wall_s"] >= 0.35
