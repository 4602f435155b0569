"""SQLite's WAL checkpoints in a thread of their own, off the request path.

SQLite moves its write-ahead log into the database (a checkpoint) inside the COMMIT that
takes the log past 1,000 pages, so one request in a few hundred waited for it. A probe
of the sustained benchmark caught such a COMMIT at 0.2 s on a busy disk, and meanwhile
the other request thread committed and published the task's next change: the late one
arrived after the subscribers' reorder window and was given up on (docs/performance.md).
A server's connections therefore leave checkpoints to a ``Checkpointer``, short of a
backstop; other processes, such as management commands, keep SQLite's default.
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
#: Pages past which a connection still makes a checkpoint of its own, in case the
#: thread falls behind or fails (SQLite's default is 1,000).
BACKSTOP_PAGES = 10_000
#: Passes of one turn at most (``Checkpointer.checkpoint()``).
PASSES = 10


class Checkpointer:
    """Checkpoints one SQLite database file every ``interval`` seconds, while the
    connections to it that open from now on, in this process, make none of their own
    below ``BACKSTOP_PAGES``."""

    def __init__(self, alias: str, name: str, interval: float = INTERVAL) -> None:
        self.alias = alias
        self.name = str(name)
        self.interval = interval
        self._stopped = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"sqlite-checkpoints-{alias}", daemon=True
        )

    def start(self) -> None:
        """Leave checkpoints to this thread from the next connection on, and start it."""
        connection_created.connect(self._leave_checkpoints, weak=False)
        self._thread.start()

    def stop(self) -> None:
        """Stop checkpointing; the connections opened meanwhile keep only the backstop."""
        connection_created.disconnect(self._leave_checkpoints)
        self._stopped.set()
        self._thread.join()

    def _leave_checkpoints(
        self, sender: Any, connection: BaseDatabaseWrapper, **kwargs: Any
    ) -> None:
        if connection.vendor == "sqlite" and str(connection.settings_dict["NAME"]) == self.name:
            connection.connection.execute(f"PRAGMA wal_autocheckpoint={BACKSTOP_PAGES}")

    @staticmethod
    def checkpoint(database: sqlite3.Connection) -> None:
        """Checkpoint until a pass finds no change that the one before did not. The log
        starts again only at a write that follows a checkpoint of all of it, and what is
        committed during a pass is left for the next: with one pass a second, steady
        writes grew the log without end."""
        seen = None
        for _ in range(PASSES):
            _, frames, _ = database.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if frames == seen:
                return
            seen = frames

    def _run(self) -> None:
        database = None
        failing = False
        while not self._stopped.wait(self.interval):
            try:
                if database is None:
                    # As Django opens it: NAME may be a URI.
                    database = sqlite3.connect(self.name, uri=True, isolation_level=None)
                self.checkpoint(database)
            except sqlite3.Error:
                if not failing:  # once, not every second
                    logger.exception(
                        "Could not checkpoint the database %r; its connections do past %d "
                        "pages until this works again",
                        self.alias,
                        BACKSTOP_PAGES,
                    )
                failing = True
            else:
                if failing:
                    logger.info("Checkpoints of the database %r work again", self.alias)
                failing = False
        if database is not None:
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
