"""Atomic writes: ``transaction(conn)`` around a whole operation, ``attempt`` around one step
that may break a constraint."""

from __future__ import annotations

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
