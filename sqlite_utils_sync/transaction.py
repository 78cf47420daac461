"""Atomic writes: ``transaction(conn)`` around a whole operation, ``attempt`` around one step
that may break a constraint."""

from __future__ import annotations

import pathlib
import sqlite3
from contextlib import contextmanager
from typing import Any, Callable, Iterator


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One atomic write: a transaction, or a savepoint inside the caller's transaction."""
    if conn.in_transaction:
        conn.execute("SAVEPOINT datasette_sync")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO datasette_sync")
            conn.execute("RELEASE datasette_sync")
            raise
        conn.execute("RELEASE datasette_sync")
    else:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            # Inside: a deferred foreign key can still fail the COMMIT, which leaves it open.
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def holds_write_lock(conn: sqlite3.Connection) -> bool:
    """Whether ``conn``'s open transaction holds the write lock, so that no other connection
    can commit until it ends. ``BEGIN IMMEDIATE`` on a file opened read-only (or not writable)
    succeeds without it; a statement that writes nothing still fails there."""
    try:
        conn.execute("DELETE FROM _sync_ops WHERE 0")
    except sqlite3.Error:
        return False
    return True


@contextmanager
def writers_held_off(conn: sqlite3.Connection) -> Iterator[Callable[[], None] | None]:
    """Hold the write lock of ``conn``'s database file on a connection of its own, so that no
    commit can come between the snapshots two connections begin meanwhile (a read-only
    connection, such as Datasette's, cannot take it itself). Yields the function that lets
    writers in again, called at the latest on leaving; None when the lock cannot be had at
    once: an in-memory or temporary database, a file that cannot be written, a writer at work.
    """
    path = conn.execute("PRAGMA database_list").fetchone()[2]
    lock = None
    try:
        if path:
            # No waiting: a writer at work means the export reads on one connection, as before.
            lock = sqlite3.connect(f"{pathlib.Path(path).as_uri()}?mode=rw", uri=True, isolation_level=None, timeout=0)
            lock.execute("BEGIN IMMEDIATE")
    except sqlite3.Error:
        pass
    if lock is None or not lock.in_transaction or not holds_write_lock(lock):
        if lock is not None:
            lock.close()
        yield None
        return

    def let_writers_in() -> None:
        lock.close()  # ends its transaction, which wrote nothing

    try:
        yield let_writers_in
    finally:
        let_writers_in()


def attempt(conn: sqlite3.Connection, write: Callable[[], Any]) -> sqlite3.IntegrityError | None:
    """Run ``write`` in a savepoint; if it breaks a constraint, undo only it and return why."""
    conn.execute("SAVEPOINT _sync_attempt")
    try:
        write()
    except sqlite3.IntegrityError as ex:
        conn.execute("ROLLBACK TO _sync_attempt")
        return ex
    finally:
        conn.execute("RELEASE _sync_attempt")
    return None
