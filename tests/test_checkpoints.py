"""SQLite's WAL checkpoints run in a server's thread of their own, not in its commits."""

import contextlib
import os
import threading
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
            time.sleep(0.3)
            write_pages(handler, "default", 500)
        assert autocheckpoint(handler, "default") == checkpoints.BACKSTOP_PAGES
        # Each turn's first write, after a checkpoint, started the log from its beginning.
        assert log_pages(handler, "default") < 1.5 * one_turns_writes


def test_the_log_stays_short_under_steady_writes(tmp_path):
    """Writes that never pause land during the checkpoints too."""
    handler = sqlite_databases(tmp_path, "default")
    written = 0

    def write_steadily() -> None:
        nonlocal written
        ends = time.monotonic() + 3
        while time.monotonic() < ends:
            write_pages(handler, "default", 5)
            written += 5
            time.sleep(0.002)

    with checkpointed(handler, 0.1):
        writer = threading.Thread(target=write_steadily)
        writer.start()
        writer.join()
        # Each change adds two or three pages: a log never started again holds them all.
        assert written > 1_000
        assert log_pages(handler, "default") < written


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
