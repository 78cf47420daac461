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
