"""Transactions: one atomic write, nested as a savepoint inside the caller's transaction."""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Iterator


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
