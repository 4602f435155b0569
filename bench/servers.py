"""Starting and stopping the servers under test; every one started is stopped on exit.

Each server runs in its own process, listening on 127.0.0.1 only, with its output in a log
file. Children are asked to die with the benchmark (``PR_SET_PDEATHSIG``), so even a killed
benchmark leaves no server behind; ``stop_all()`` also runs at exit.
"""

import asyncio
import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1
APPLICATION = "mcp_platform.asgi:application"

_started: list[subprocess.Popen] = []


class ServerFailed(RuntimeError):
    """A server exited early or never answered."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def pinned_cpus(index: int) -> tuple[set[int], set[int]]:
    """With ``--pin``: the CPU of server process ``index``, and the CPU of its load
    client, so that the two never share one (server i on the 2i-th CPU this process may
    use, its client on the next, round the list)."""
    cpus = sorted(os.sched_getaffinity(0))
    return {cpus[2 * index % len(cpus)]}, {cpus[(2 * index + 1) % len(cpus)]}


@dataclass
class Server:
    name: str
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        stop_process(self.process)


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if process in _started:
        _started.remove(process)


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet."""
    for process in list(_started):
        stop_process(process)


atexit.register(stop_all)


def server_command(kind: str, port: int, extra: list[str], cwd: Path) -> list[str]:
    """The command line of one server: ``daphne``, ``uvicorn`` or ``reference``.

    Daphne is started the project's way, ``python -m mcp_platform.serve`` (Daphne with the
    project's reactor and logging adjustments), when the measured code has that module, and
    as ``python -m daphne`` otherwise, as older commits need.
    """
    python = sys.executable
    if kind == "daphne":
        has_serve = (cwd / "mcp_platform" / "serve.py").exists()
        module = "mcp_platform.serve" if has_serve else "daphne"
        return [python, "-m", module, "-b", HOST, "-p", str(port), *extra, APPLICATION]
    if kind == "uvicorn":
        return [
            python,
            "-m",
            "uvicorn",
            APPLICATION,
            "--host",
            HOST,
            "--port",
            str(port),
            "--lifespan",
            "off",
            *extra,
        ]
    if kind == "reference":
        return [python, "-m", "bench.reference", "--port", str(port), *extra]
    raise ValueError(f"unknown server {kind!r}")


async def start_server(
    kind: str,
    env: dict[str, str],
    log_dir: Path,
    extra: list[str],
    ready_path: str,
    cwd: Path,
    cpus: set[int] | None = None,
    launcher: tuple[str, ...] = (),
    ready_within: float = 60.0,
) -> Server:
    """Start a server in ``cwd`` on a free port, on ``cpus`` if given (its threads too),
    its command line after ``launcher`` (e.g. valgrind's); return once ``ready_path``
    answers, within ``ready_within`` seconds."""

    def prepare_child() -> None:
        _die_with_parent()
        if cpus:
            os.sched_setaffinity(0, cpus)

    port = free_port()
    log_path = log_dir / f"{kind}-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*launcher, *server_command(kind, port, extra, cwd)],
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=prepare_child,
        )
    _started.append(process)
    server = Server(kind, process, port, log_path)
    deadline = time.monotonic() + ready_within
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                stop_process(process)
                raise ServerFailed(f"{kind} exited with {process.returncode}:\n{server.log_tail()}")
            try:
                async with session.get(server.url + ready_path) as response:
                    if response.status < 500:
                        return server
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    server.stop()
    raise ServerFailed(
        f"{kind} did not answer on port {port} within {ready_within:g} s:\n{server.log_tail()}"
    )


def start_profiler(server: Server, output: Path, form: str) -> subprocess.Popen:
    """Sample ``server`` with py-spy until ``stop_profiler()``, into ``output`` in ``form``."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise ServerFailed("--profile needs py-spy: .venv/bin/pip install py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            py_spy,
            "record",
            "--pid",
            str(server.pid),
            "--output",
            str(output),
            "--rate",
            "250",
            "--format",
            form,
            "--gil",  # only the thread running Python: where the CPU time goes
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    _started.append(process)
    return process


def stop_profiler(process: subprocess.Popen) -> None:
    """Ask py-spy to write its output (it does on SIGINT), then wait for it."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
    stop_process(process)
