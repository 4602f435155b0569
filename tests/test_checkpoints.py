"""SQLite's WAL checkpoints run in a server's thread of their own, not in its commits."""

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.db.utils import ConnectionHandler

from mcp_platform import checkpoints

PAGE = 4096


@pytest.fixture(autouse=True)
def _databases_of_their_own(django_db_blocker):
    """These tests open databases of their own, not the test database."""
    with django_db_blocker.unblock():
        yield


def sqlite_databases(tmp_path: Path, *aliases: str, in_memory: str = "") -> ConnectionHandler:
    names = {alias: str(tmp_path / f"{alias}.sqlite3") for alias in aliases}
    if in_memory:
        names[in_memory] = ":memory:"
    return ConnectionHandler(
        {
            alias: {
                "ENGINE": "django.db.backends.sqlite3",
                "NAME": name,
                "OPTIONS": {"init_command": "PRAGMA journal_mode=WAL;"},
            }
            for alias, name in names.items()
        }
    )


def write_pages(handler: ConnectionHandler, alias: str, pages: int) -> None:
    """Commit ``pages`` changes of about a page each, one by one, as requests do."""
    with handler[alias].cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS change (body BLOB)")
        for _ in range(pages):
            cursor.execute("INSERT INTO change VALUES (zeroblob(3000))")


def log_pages(handler: ConnectionHandler, alias: str) -> int:
    return os.path.getsize(handler[alias].settings_dict["NAME"] + "-wal") // PAGE


def autocheckpoint(handler: ConnectionHandler, alias: str) -> int:
    with handler[alias].cursor() as cursor:
        cursor.execute("PRAGMA wal_autocheckpoint")
        return cursor.fetchone()[0]


@contextlib.contextmanager
def checkpointed(handler: ConnectionHandler, interval: float) -> Iterator[None]:
    """The database ``default`` of ``handler`` checkpointed every ``interval`` seconds."""
    name = handler["default"].settings_dict["NAME"]
    checkpointer = checkpoints.Checkpointer("default", name, interval)
    checkpointer.start()
    try:
        yield
    finally:
        checkpointer.stop()
        handler.close_all()


def test_a_servers_connections_leave_checkpoints_to_its_checkpointer(tmp_path):
    handler = sqlite_databases(tmp_path, "default", "other")
    with checkpointed(handler, 3600):
        write_pages(handler, "default", 3_000)
        write_pages(handler, "other", 3_000)
        assert autocheckpoint(handler, "default") == checkpoints.BACKSTOP_PAGES
        # SQLite's own checkpoint, in the commit past 1,000 pages, would have started the
        # log again from its beginning.
        assert log_pages(handler, "default") > 3_000
        assert autocheckpoint(handler, "other") == 1_000
        assert log_pages(handler, "other") < 1_200


def test_the_checkpointer_keeps_the_log_short(tmp_path):
    handler = sqlite_databases(tmp_path, "default")
    with checkpointed(handler, 0.05):
        write_pages(handler, "default", 500)
        one_turns_writes = log_pages(handler, "default")
        for _ in range(5):
            time.sleep(1.0)  # room for a pass and its fsync on a loaded machine
            write_pages(handler, "default", 500)
        assert autocheckpoint(handler, "default") == checkpoints.BACKSTOP_PAGES
        # Each turn's first write, after a checkpoint, started the log from its beginning.
        assert log_pages(handler, "default") < 1.5 * one_turns_writes


class Log:
    """A database whose log grows by the frames given, one count per checkpoint pass."""

    def __init__(self, *frames: int) -> None:
        self.frames = list(frames)
        self.passes = 0

    def execute(self, sql: str) -> "Log":
        assert sql == "PRAGMA wal_checkpoint(PASSIVE)"
        self.passes += 1
        return self

    def fetchone(self) -> tuple[int, int, int]:
        frames = self.frames[min(self.passes, len(self.frames)) - 1]
        return 0, frames, frames


@pytest.mark.parametrize(
    ("frames", "passes"),
    [
        ((300,), 2),  # nothing written during the first pass
        ((300, 320, 335, 335), 4),  # writes landed during the first two
        (tuple(range(100, 10_000, 10)), checkpoints.PASSES),  # writes that never pause
    ],
)
def test_a_turn_checkpoints_until_a_pass_finds_nothing_new(frames, passes):
    """Under steady writes each pass finds some made during the one before, which the log
    keeps until a checkpoint copies them: with one pass a turn, the log was never started
    again. (Timed against real writes, a test of it measured how fast the machine
    commits, and failed on one whose cores other work kept busy.)"""
    log = Log(*frames)
    checkpoints.Checkpointer.checkpoint(log)
    assert log.passes == passes


def test_a_checkpointer_that_fails_says_so_once(tmp_path, caplog):
    checkpointer = checkpoints.Checkpointer("default", str(tmp_path / "missing" / "db"), 0.01)
    checkpointer.start()
    time.sleep(0.3)
    checkpointer.stop()
    [record] = caplog.records
    assert record.getMessage() == (
        "Could not checkpoint the database 'default'; its connections do past 10000 pages "
        "until this works again"
    )


def test_checkpointers_start_for_database_files_only(tmp_path):
    handler = sqlite_databases(tmp_path, "default", in_memory="memory")
    opened_before = autocheckpoint(handler, "default")
    started = checkpoints.start(handler)
    try:
        assert [checkpointer.alias for checkpointer in started] == ["default"]
        assert opened_before == 1_000
        # The connection opened before was closed: the next one leaves checkpoints.
        assert autocheckpoint(handler, "default") == checkpoints.BACKSTOP_PAGES
        assert autocheckpoint(handler, "memory") == 1_000
    finally:
        for checkpointer in started:
            checkpointer.stop()
        handler.close_all()
