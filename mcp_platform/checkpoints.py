"""SQLite's WAL checkpoints in a thread of their own, off the request path.

SQLite moves its write-ahead log into the database (a checkpoint) inside the COMMIT that
takes the log past 1,000 pages, so one request in a few hundred waited for it. A probe
of the sustained benchmark caught such a COMMIT at 0.2 s on a busy disk, and meanwhile
the other request thread committed and published the task's next change: the late one
arrived after the subscribers' reorder window and was given up on (docs/performance.md).
A server's connections therefore leave checkpoints to a ``Checkpointer``; other
processes, such as management commands, keep SQLite's default.
"""

import logging
import sqlite3
import threading
from typing import Any

from django.db import connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.backends.signals import connection_created
from django.db.utils import ConnectionHandler

logger = logging.getLogger(__name__)

#: Seconds between checkpoints: at the sustained benchmark's 200 changes/s the log
#: grows by a few hundred pages in that time, about what SQLite lets it reach.
INTERVAL = 1.0


class Checkpointer:
    """Checkpoints one SQLite database file every ``interval`` seconds, while the
    connections to it that open from now on, in this process, make none of their own.

    The checkpoints are passive: they wait for no reader or writer, and writers go on
    appending to the log meanwhile; the log starts again from its beginning at the first
    write after a checkpoint that copied all of it."""

    def __init__(self, alias: str, name: str, interval: float = INTERVAL) -> None:
        self.alias = alias
        self.name = name
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"sqlite-checkpoints-{alias}", daemon=True
        )

    def start(self) -> None:
        connection_created.connect(self._leave_checkpoints, weak=False)
        self._thread.start()

    def stop(self) -> None:
        """Stop checkpointing (the connections opened meanwhile still make none)."""
        connection_created.disconnect(self._leave_checkpoints)
        self._stopped.set()
        self._thread.join()

    def _leave_checkpoints(self, sender: Any, connection: BaseDatabaseWrapper, **kwargs) -> None:
        if connection.vendor == "sqlite" and connection.settings_dict["NAME"] == self.name:
            connection.connection.execute("PRAGMA wal_autocheckpoint=0")

    def _run(self) -> None:
        database = sqlite3.connect(self.name, isolation_level=None, check_same_thread=False)
        try:
            while not self._stopped.wait(self.interval):
                try:
                    database.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error:
                    # The next turn tries again; meanwhile the log only grows.
                    logger.exception("Could not checkpoint the database %r", self.alias)
        finally:
            database.close()


def start(handler: ConnectionHandler = connections) -> list[Checkpointer]:
    """Start a ``Checkpointer`` for each SQLite database file of ``handler``, before any
    of this process's requests opens a connection to it."""
    started = []
    for alias in handler:
        connection = handler[alias]
        if connection.vendor != "sqlite" or connection.is_in_memory_db():
            continue
        connection.close()  # opened earlier, it would still make checkpoints of its own
        checkpointer = Checkpointer(alias, str(connection.settings_dict["NAME"]))
        checkpointer.start()
        started.append(checkpointer)
    return started
