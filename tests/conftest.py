"""Shared fixtures: users and tokens, WebSocket communicators that always disconnect,
real services (Redis) that fail loudly in CI, and real Daphne servers on free ports."""

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.core.cache import cache
from django.db import connection
from django.db.models.sql.compiler import SQLCompiler
from rest_framework.test import APIClient
from rest_framework_simplejwt.tokens import AccessToken

# The ASGI application sets Django up again, which configures logging anew and drops the
# handlers of pytest's caplog: imported here, it does that once, before any test.
import mcp_platform.asgi  # noqa: F401
from mcp_platform.tasks import services
from realtime.conf import realtime_settings
from realtime.connections import make_registry, reset_connection_manager
from realtime.redis_registry import RedisRegistry

ROOT = Path(__file__).resolve().parent.parent
IN_CI = bool(os.environ.get("CI"))


# Runs that share a Redis (a developer's beside a benchmark's, say) must not hear each
# other's broadcasts or count each other's connections: each run gets its own prefix, in
# this process's settings and in the environment of the servers it starts.
REDIS_PREFIX = f"test{os.getpid()}"
os.environ["REDIS_PREFIX"] = REDIS_PREFIX
settings.REALTIME["REDIS_PREFIX"] = REDIS_PREFIX
if "prefix" in settings.CHANNEL_LAYERS["default"].get("CONFIG", {}):
    settings.CHANNEL_LAYERS["default"]["CONFIG"]["prefix"] = f"{REDIS_PREFIX}:layer:"
realtime_settings.reload()


def service_unavailable(message: str) -> None:
    """Missing services fail the run in CI and skip the test elsewhere."""
    if IN_CI:
        pytest.fail(f"{message} (CI is set, so this fails instead of skipping)")
    pytest.skip(message)


# Databases


@pytest.fixture(scope="session")
def django_db_modify_db_settings() -> None:
    """Give this run's test database a name of its own, so concurrent runs on one machine
    (a developer's and a benchmark's, say) never drop each other's database."""
    suffix = f"_{os.getpid()}"
    for db in settings.DATABASES.values():
        test = db.setdefault("TEST", {})
        name = test.get("NAME")
        if db["ENGINE"].endswith("sqlite3"):
            base = Path(name) if name else ROOT / "test_db.sqlite3"
            test["NAME"] = str(base.with_name(f"{base.stem}{suffix}{base.suffix}"))
        else:
            test["NAME"] = f"{name or 'test_' + db['NAME']}{suffix}"


# Users and tokens


PASSWORD = "pw-123456"


@pytest.fixture(scope="session")
def password_hash() -> str:
    """The hash of ``PASSWORD``, made once: hashing is slow by design."""
    return make_password(PASSWORD)


@pytest.fixture
def make_user(django_user_model, password_hash) -> Callable[..., Any]:
    """Make a user whose password is ``PASSWORD``."""
    counter = iter(range(1_000_000))

    def make(**fields: Any) -> Any:
        username = fields.pop("username", None) or f"user{next(counter)}-{time.monotonic_ns()}"
        return django_user_model.objects.create(username=username, password=password_hash, **fields)

    return make


@pytest.fixture
def user(make_user):
    return make_user()


@pytest.fixture
def other_user(make_user):
    return make_user()


@pytest.fixture
def staff_user(make_user):
    return make_user(is_staff=True)


@pytest.fixture
def task(user):
    """A task of ``user``'s, for tests that watch one."""
    return services.create_task(owner=user, name="watched")


def record_compiled_sql(monkeypatch: pytest.MonkeyPatch, compiler: type = SQLCompiler) -> list[str]:
    """The SQL that ``compiler``'s queries compile to from now on, one entry each: what
    the ORM builds afresh, which compiled reads and writes must not."""
    compiled: list[str] = []
    stock = compiler.as_sql

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        sql, params = stock(self, *args, **kwargs)
        compiled.append(sql)
        return sql, params

    monkeypatch.setattr(compiler, "as_sql", recording)
    return compiled


def run(coroutine_function: Callable[[], Any]) -> Any:
    """Run a test's async scenario to its end, from the test's sync code."""
    return async_to_sync(coroutine_function)()


def token_for(user: Any, lifetime: timedelta | None = None) -> str:
    """An access token for ``user``; one that expires ``lifetime`` from now if given (the
    claim is in whole seconds, so up to a second sooner)."""
    token = AccessToken.for_user(user)
    if lifetime is not None:
        token.set_exp(lifetime=lifetime)
    return str(token)


async def broadcast_census(base: str, staff_token: str) -> dict[str, int]:
    """``POST /broadcast`` on a live server: how many connections, by transport, it reached."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base}/broadcast",
            json={"message": "census"},
            headers={"Authorization": f"Bearer {staff_token}"},
        ) as response:
            assert response.status == 200, await response.text()
            return await response.json()


def api_client(user: Any = None) -> APIClient:
    """A REST client, authenticated with an access token when ``user`` is given."""
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Bearer {token_for(user)}")
    return client


# Channel layer and connection manager


@pytest.fixture(autouse=True)
def fresh_realtime_state() -> Iterator[None]:
    """Each test gets new channel layers, a new connection manager, an empty registry and
    an empty cache (the sign-in throttle's counts)."""
    cache.clear()
    channel_layers.backends = {}
    reset_connection_manager()
    registry = make_registry()
    if isinstance(registry, RedisRegistry):
        async_to_sync(registry.flush)()
    yield
    channel_layers.backends = {}
    reset_connection_manager()


def make_communicator(path: str, *, headers: list | None = None) -> WebsocketCommunicator:
    """A communicator on the full ASGI application (origin check, auth, routing)."""
    from mcp_platform.asgi import application

    return WebsocketCommunicator(application, path, headers=headers or [])


@asynccontextmanager
async def open_websocket(path: str, *, headers: list | None = None):
    """A communicator on the full ASGI application; always disconnected afterwards."""
    communicator = make_communicator(path, headers=headers)
    try:
        yield communicator
    finally:
        await communicator.disconnect()


async def connect_user(communicator: WebsocketCommunicator) -> dict:
    """Complete the handshake and return the ``connected`` message."""
    accepted, _ = await communicator.connect(timeout=5)
    assert accepted
    message = await communicator.receive_json_from(timeout=5)
    assert message["type"] == "connected", message
    return message


# Real services


def redis_url() -> str:
    return os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_server() -> str:
    """The URL of a reachable Redis server."""
    import redis

    url = redis_url()
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        service_unavailable(f"Redis at {url} is not reachable: {exc}")
    return url


# Real Daphne servers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_database_url() -> str:
    """The URL of the test database, for server processes started by the tests."""
    settings = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{settings['NAME']}"
    user = settings.get("USER") or ""
    password = f":{settings['PASSWORD']}" if settings.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    port = f":{settings['PORT']}" if settings.get("PORT") else ""
    return f"postgres://{auth}{settings.get('HOST') or ''}{port}/{settings['NAME']}"


async def run_manage(redis_url: str, *args: str) -> None:
    """``manage.py`` with ``args`` in a process of its own, on the live servers' database and
    ``redis_url``, as an operator's command runs beside them; it must succeed."""
    command = await asyncio.create_subprocess_exec(
        sys.executable,
        "manage.py",
        *args,
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url, "DATABASE_URL": server_database_url()},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(command.communicate(), 60)
    assert command.returncode == 0, stderr.decode()


async def patch_task(base: str, token: str, task_id: Any, changes: dict) -> dict:
    """PATCH a task over HTTP at ``base``, as a client does; its answer, which must be 200."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.patch(
            f"{base}/api/tasks/{task_id}/",
            json=changes,
            headers={"Authorization": f"Bearer {token}"},
        ) as response:
            assert response.status == 200, await response.text()
            return await response.json()


@dataclass
class LiveServer:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(
    tmp_dir: Path, env: dict[str, str] | None = None, args: list[str] | None = None
) -> LiveServer:
    """Serve ``mcp_platform.asgi:application`` with the project's Daphne launcher on a free
    port, with Daphne's ``args`` if any, and wait until it listens."""
    port = free_port()
    log_path = tmp_dir / f"daphne-{port}.log"
    process_env = {**os.environ, "DATABASE_URL": server_database_url(), **(env or {})}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mcp_platform.serve",
                "-b",
                "127.0.0.1",
                "-p",
                str(port),
                *(args or []),
                "mcp_platform.asgi:application",
            ],
            cwd=ROOT,
            env=process_env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = LiveServer(process, port, log_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"Daphne exited with {process.returncode}:\n{server.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.stop()
    pytest.fail(f"Daphne did not listen on {port} within 30 s:\n{server.log()}")


@pytest.fixture(scope="session")
def daphne_server(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[LiveServer]:
    """One Daphne process with the suite's configuration, shared by the session."""
    server = start_server(tmp_path_factory.mktemp("live"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def daphne_redis_servers(
    django_db_setup, django_db_blocker, tmp_path_factory, redis_server
) -> Iterator[tuple[LiveServer, LiveServer]]:
    """Two Daphne processes sharing one Redis, as in a multi-process deployment."""
    tmp = tmp_path_factory.mktemp("redis-live")
    servers = [start_server(tmp, {"REDIS_URL": redis_server}) for _ in range(2)]
    yield tuple(servers)
    for server in servers:
        server.stop()


def logged_ends(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Why the server said it ended connections or refused them (``realtime`` loggers): the
    log lines that follow ``Ended <transport> connection <id> of user <id>: ``, and the
    others whole."""
    lines = []
    for record in caplog.records:
        message = record.getMessage()
        if record.name.startswith("realtime") and message.startswith(
            ("Ended ", "Refused ", "Dropped ", "Closed ")
        ):
            lines.append(message.split(": ", 1)[1] if message.startswith("Ended ") else message)
    return lines
