"""The project's side of a run: its code, a fresh database, environment, users and tokens.

The code is a snapshot taken at the start: of the working tree, or with ``--commit`` of a
commit (``git archive``), so a change can be measured against the code before it. Servers
get a clean environment (nothing inherited but ``PATH`` and the locale) so a ``REDIS_URL``
or ``REALTIME_*`` in the caller's shell cannot change what is measured; ``--env`` adds
variables on purpose.
"""

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt

from bench.servers import ROOT

INHERITED = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
#: Long enough for every repeat of a run; tokens are minted once.
TOKEN_LIFETIME_SECONDS = 4 * 3600
#: The Redis layers selected by ``--layer``, as ``bench.server_settings`` reads them.
REDIS_LAYERS = {"redis": "core", "redis-pubsub": "pubsub"}


@dataclass(frozen=True)
class Account:
    id: int
    token: str


@dataclass(frozen=True)
class Accounts:
    """The task owner (who also broadcasts) and the users whose clients watch."""

    owner: Account
    watchers: list[Account]

    def staff_ids(self) -> dict[int, bool]:
        return {account.id: True for account in [self.owner, *self.watchers]}

    def client_tokens(self, count: int) -> list[str]:
        """A token for each of ``count`` clients, spread over the watchers."""
        return [self.watchers[i % len(self.watchers)].token for i in range(count)]


def base_env(secret: str) -> dict[str, str]:
    env = {name: os.environ[name] for name in INHERITED if name in os.environ}
    return {
        **env,
        "DJANGO_SECRET_KEY": secret,
        "DJANGO_DEBUG": "0",
        "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "JWT_ACCESS_LIFETIME_SECONDS": str(TOKEN_LIFETIME_SECONDS),
        "PYTHONUNBUFFERED": "1",
    }


def layer_env(layer: str, redis_url: str) -> dict[str, str]:
    """What selects a channel layer: no ``REDIS_URL`` for memory, else the bench settings."""
    if layer == "memory":
        return {"DJANGO_SETTINGS_MODULE": "mcp_platform.settings"}
    return {
        "REDIS_URL": redis_url,
        "DJANGO_SETTINGS_MODULE": "bench.server_settings",
        "BENCH_CHANNEL_LAYER": REDIS_LAYERS[layer],
    }


def mint_accounts(secret: str, watchers: int) -> Accounts:
    """Accounts for a reference-only run: tokens shaped like simplejwt's, signed HS256."""

    def account(user_id: int) -> Account:
        now = int(time.time())
        claims = {
            "token_type": "access",
            "exp": now + TOKEN_LIFETIME_SECONDS,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "user_id": str(user_id),
        }
        return Account(user_id, jwt.encode(claims, secret, algorithm="HS256"))

    return Accounts(account(1), [account(i + 2) for i in range(watchers)])


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


#: Not part of what the servers run; their changes do not change the figures.
NOT_SERVED = ("bench/", "docs/", "tests/")


def describe_code(commit: str | None) -> dict[str, object]:
    """Which code is measured: a commit, or the working tree and the served files changed."""
    try:
        if commit:
            return {"source": "commit", "commit": git("rev-parse", commit)}
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        changed = [line[3:] for line in status.splitlines() if not line[3:].startswith(NOT_SERVED)]
        return {"source": "working tree", "commit": git("rev-parse", "HEAD"), "changed": changed}
    except (OSError, subprocess.CalledProcessError):
        return {"source": "working tree", "commit": "unknown"}


def export_commit(commit: str, destination: Path) -> None:
    """Write the files of ``commit`` to ``destination``, leaving the repository untouched."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", commit], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(destination)], input=archive.stdout, check=True)


def copy_working_tree(destination: Path) -> None:
    """Copy the working tree's files (tracked or not, unless ignored) to ``destination``."""
    listed = git("ls-files", "--cached", "--others", "--exclude-standard", "-z")
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def snapshot(commit: str | None, destination: Path) -> Path:
    """The code to serve, frozen for the whole invocation: a commit, or the working tree.

    Someone may edit or commit while a long benchmark runs; every run must serve the same
    code. The snapshot's own ``bench`` is left out: set-up and settings come from this one.
    """
    destination.mkdir(parents=True)
    if commit:
        export_commit(commit, destination)
    else:
        copy_working_tree(destination)
    shutil.rmtree(destination / "bench", ignore_errors=True)
    return destination


class Project:
    """The project's code, database and environment for one benchmark invocation."""

    def __init__(
        self,
        workdir: Path,
        secret: str,
        database: str,
        postgres_url: str,
        extra_env: dict[str, str],
        commit: str | None = None,
    ) -> None:
        self.source = snapshot(commit, workdir / "source")
        self.postgres_url = postgres_url.rstrip("/")
        self.postgres_db = ""
        if database == "postgres":
            self.postgres_db = f"mcp_bench_{secrets.token_hex(4)}"
            server = self.postgres_url.rsplit("/", 1)[0]
            database_url = f"{server}/{self.postgres_db}"
        else:
            database_url = f"sqlite:///{workdir / 'bench.sqlite3'}"
        self.env = {
            **base_env(secret),
            "DATABASE_URL": database_url,
            # The bench's own modules (set-up, settings) come from here, the project's
            # from the working directory, which Python searches first.
            "PYTHONPATH": str(ROOT),
            **extra_env,
        }

    def server_env(self, layer: str, redis_url: str) -> dict[str, str]:
        return {**self.env, **layer_env(layer, redis_url)}

    def _run(self, *args: str) -> str:
        env = self.server_env("memory", "")
        done = subprocess.run(
            [sys.executable, *args], cwd=self.source, env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{done.stdout}{done.stderr}"[-4000:])
        return done.stdout

    def create(self, watchers: int) -> Accounts:
        """Create the database and its schema, then the users; return their tokens."""
        if self.postgres_db:
            self._postgres(f'CREATE DATABASE "{self.postgres_db}"')
        self._run("manage.py", "migrate", "--noinput")
        made = json.loads(self._run("-m", "bench.setup_project", "--watchers", str(watchers)))
        return Accounts(
            Account(**made["owner"]), [Account(**account) for account in made["watchers"]]
        )

    def drop(self) -> None:
        if self.postgres_db:
            self._postgres(f'DROP DATABASE IF EXISTS "{self.postgres_db}" WITH (FORCE)')

    def _postgres(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.postgres_url, autocommit=True) as connection:
            connection.execute(statement)
