"""What one invocation measures: the command line, parsed into a ``Config``."""

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SCENARIOS = ("connect", "fanout", "broadcast", "sse", "sustained")
SERVERS = ("daphne", "uvicorn")
LAYERS = ("memory", "redis", "redis-pubsub")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Target:
    """One server configuration under test; ``reference`` is the yardstick."""

    server: str  # daphne, uvicorn or reference
    layer: str = ""
    processes: int = 1

    @property
    def is_reference(self) -> bool:
        return self.server == "reference"

    @property
    def label(self) -> str:
        if self.is_reference:
            return "reference"
        return f"{self.server}/{self.layer}" + (f" x{self.processes}" if self.processes > 1 else "")


@dataclass
class Config:
    scenarios: tuple[str, ...] = SCENARIOS
    clients: int = 4000
    sse_clients: int = 1000
    stream_clients: int = 100
    stream_rate: float = 200.0
    stream_seconds: float = 10.0
    stream_in_flight: int = 8
    updates: int = 3
    repeats: int = 3
    targets: list[Target] = field(default_factory=list)
    users: int = 50
    concurrency: int = 50
    timeout: float = 60.0
    drain: float = 30.0
    redis_url: str = "redis://127.0.0.1:6379/13"
    database: str = "sqlite"
    postgres_url: str = "postgres://postgres@127.0.0.1:5432/postgres"
    env: dict[str, str] = field(default_factory=dict)
    server_args: list[str] = field(default_factory=list)
    output: Path | None = None
    update_docs: bool = False
    keep_logs: bool = False
    profile: str = ""
    commit: str | None = None
    wait_quiet: float = 0.0
    pin: bool = False
    from_json: Path | None = None
    command: str = ""

    @property
    def has_project(self) -> bool:
        return any(not target.is_reference for target in self.targets)


def csv(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [value.strip() for value in text.split(",") if value.strip()]
        wrong = [value for value in values if value not in choices]
        if wrong or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)}")
        return values

    return parse


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(value) for value in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("each must be at least 1")
    return values


def positive(kind: type) -> Callable[[str], int | float]:
    """An argument type for a number above zero."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be above zero")
        return value

    return parse


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError("expected NAME=VALUE")
    return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the real-time layer against a minimal aiohttp reference server.",
        epilog="Example: python -m bench --scenario fanout --clients 4000 --layer memory",
    )
    p.add_argument(
        "--scenario",
        type=csv((*SCENARIOS, "all")),
        default=["all"],
        help="comma-separated: connect, fanout, broadcast, sse, sustained, all",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a small smoke run (200 clients, 1 repeat) that ends within a minute",
    )
    p.add_argument("--clients", type=positive(int), help="WebSocket clients (default 4000)")
    p.add_argument("--sse-clients", type=positive(int), help="event streams for sse (default 1000)")
    p.add_argument(
        "--stream-clients", type=positive(int), help="subscribers for sustained (default 100)"
    )
    p.add_argument(
        "--stream-rate", type=positive(float), help="updates/s for sustained (default 200)"
    )
    p.add_argument(
        "--stream-seconds", type=positive(float), help="length of sustained (default 10)"
    )
    p.add_argument(
        "--stream-in-flight",
        type=positive(int),
        default=8,
        help="update requests sustained keeps in flight at most (default 8)",
    )
    p.add_argument(
        "--updates", type=positive(int), help="updates (and broadcasts) per run (default 3)"
    )
    p.add_argument(
        "--repeats", type=positive(int), help="runs of each target, interleaved (default 3)"
    )
    p.add_argument("--server", type=csv(SERVERS), default=["daphne"])
    p.add_argument("--layer", type=csv(LAYERS), default=["memory"])
    p.add_argument(
        "--processes",
        type=positive_ints,
        default=[1],
        help="server processes behind one Redis, e.g. 1,2 (Redis layers only)",
    )
    p.add_argument("--no-reference", action="store_true", help="measure the project only")
    p.add_argument("--reference-only", action="store_true", help="measure the reference only")
    p.add_argument(
        "--users", type=positive(int), default=50, help="watching users the clients share"
    )
    p.add_argument(
        "--concurrency",
        type=positive(int),
        default=50,
        help="handshakes in flight per load client (default 50)",
    )
    p.add_argument(
        "--timeout",
        type=positive(float),
        default=60.0,
        help="seconds to wait for one fan-out (default 60)",
    )
    p.add_argument(
        "--drain",
        type=positive(float),
        default=30.0,
        help="seconds sustained waits for stragglers after its last update",
    )
    p.add_argument(
        "--redis-url",
        default=Config.redis_url,
        help="a Redis database the benchmark may empty (default db 13)",
    )
    p.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="a fresh SQLite file, or a fresh PostgreSQL database (dropped after)",
    )
    p.add_argument("--postgres-url", default=Config.postgres_url)
    p.add_argument(
        "--env",
        type=key_value,
        action="append",
        default=[],
        help="NAME=VALUE for the project's servers, e.g. REALTIME_X=1 (repeatable)",
    )
    p.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="an extra argument for daphne/uvicorn, e.g. --server-arg=-v0",
    )
    p.add_argument("--output", type=Path, help="JSON file (default bench/results/<time>.json)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other work on the machine to stop",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="run each server process and its load client on CPUs of their own: shows how "
        "much of a figure is the scheduler putting both on one CPU (a diagnostic; the "
        "targets are judged without it)",
    )
    p.add_argument(
        "--commit",
        help="measure the project as of this commit (a git archive), not the working tree",
    )
    p.add_argument(
        "--profile",
        nargs="?",
        const="flamegraph",
        default="",
        choices=("flamegraph", "speedscope", "raw"),
        help="sample each project server with py-spy into bench/results/profiles/ "
        "(default format: flamegraph; raw gives collapsed stacks as text)",
    )
    p.add_argument(
        "--keep-logs", action="store_true", help="keep the servers' logs (printed at the end)"
    )
    p.add_argument(
        "--from-json",
        type=Path,
        metavar="FILE",
        help="measure nothing: print (and with --update-docs, document) a results file",
    )
    p.add_argument(
        "--update-docs",
        action="store_true",
        help="rewrite the figures section of docs/performance.md",
    )
    return p


def from_args(argv: list[str] | None = None) -> Config:
    p = parser()
    args = p.parse_args(argv)
    scenarios = SCENARIOS if "all" in args.scenario else tuple(args.scenario)
    quick = {
        "clients": 200,
        "sse_clients": 100,
        "stream_clients": 20,
        "stream_rate": 50.0,
        "stream_seconds": 2.0,
        "updates": 2,
        "repeats": 1,
    }
    defaults = quick if args.quick else {}
    sizes = {}
    for name in quick:
        given = getattr(args, name)
        sizes[name] = given if given is not None else defaults.get(name, getattr(Config, name))
    if args.no_reference and args.reference_only:
        p.error("--no-reference and --reference-only exclude each other")
    if "memory" in args.layer and max(args.processes) > 1:
        p.error("several processes need a Redis layer: --layer redis or redis-pubsub")
    targets = []
    if not args.reference_only:
        targets = [
            Target(server, layer, processes)
            for server in args.server
            for layer in args.layer
            for processes in args.processes
        ]
    if not args.no_reference:
        targets.append(Target("reference"))
    return Config(
        scenarios=scenarios,
        targets=targets,
        users=args.users,
        concurrency=args.concurrency,
        timeout=args.timeout,
        drain=args.drain,
        redis_url=args.redis_url,
        database=args.database,
        postgres_url=args.postgres_url,
        env=dict(args.env),
        server_args=args.server_arg,
        output=args.output,
        update_docs=args.update_docs,
        keep_logs=args.keep_logs,
        stream_in_flight=args.stream_in_flight,
        profile=args.profile,
        commit=args.commit,
        wait_quiet=args.wait_quiet,
        pin=args.pin,
        from_json=args.from_json,
        **sizes,
    )
