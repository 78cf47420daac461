"""The one context every engine write runs in (:func:`writing`), and the capture repair it does.

Import, enable, disable, export (with repair), resolve, compaction and a new device id all
write through :func:`writing`, so each finds the schema current, the local clocks settled and
capture in step with the tables, in the same order.
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from .capture import install_capture, load_tables, refresh_capture, table_drift, table_exists
from .clocks import settle_clocks
from .devices import ensure_log
from .errors import INVALID_ARGUMENT, SyncError
from .oplog import exact_text, text_as
from .reconcile import reconcile_table
from .schema import is_enabled, migrate
from .transaction import transaction


@dataclass
class Writing:
    """What :func:`writing` did before handing over."""

    unsettled: list[tuple[int, int]] = field(default_factory=list)
    """``(clock, op)`` of local clocks that could not be settled (a read-only file)"""
    repaired: dict[str, int] = field(default_factory=dict)
    """per table whose capture was repaired, how many missed changes were logged"""


@contextmanager
def writing(conn: sqlite3.Connection, create: bool = False, repair: bool = True, applies_rows: bool = False) -> Iterator[Writing]:
    """The context of every engine write. In this order, inside one transaction:

    1. TEXT is read exactly (:func:`~sqlite_utils_sync.oplog.exact_text`): rows compared with
       the log or written back pass through Python unchanged, even TEXT that is not UTF-8;
    2. the sync tables are brought up to the current schema version (created, with a device
       identity, when ``create``; a database without them is left alone otherwise);
    3. local clocks are settled (a wall clock set back left some lower than earlier ones):
       what is merged, compacted or sent next compares clocks;
    4. capture is repaired: tables whose triggers are missing or stale get current ones, and
       the changes the old ones missed are logged (``repair=False`` leaves that to the
       caller, e.g. ``enable_sync`` repairs the tables it is given and reports the counts).

    Nothing is written by steps 2-4 when nothing needs it, and a rollback undoes them all.

    Foreign key enforcement is off meanwhile (:func:`foreign_keys_off`); ``applies_rows``: the
    write applies rows with capture muted (an import, enable-sync, a resolution), so it is
    refused inside a caller's transaction that has foreign keys on.
    """
    with foreign_keys_off(conn, applies_rows), text_as(conn, exact_text), transaction(conn):
        if create:
            ensure_log(conn)
        else:
            migrate(conn)
        state = Writing()
        if is_enabled(conn):
            state.unsettled = settle_clocks(conn)
            if repair:
                state.repaired = repair_capture(conn)
        yield state


@contextmanager
def foreign_keys_off(conn: sqlite3.Connection, applies_rows: bool = True) -> Iterator[None]:
    """Turn ``PRAGMA foreign_keys`` off for an engine write, and back on after. With it on,
    SQLite would run ``ON DELETE`` and ``ON UPDATE`` actions on rows sync writes with capture
    muted (applied operations, adopted values, resolutions): changes no copy logs, so the
    copies would part for good. The author's copy logged what its own actions did, and those
    operations arrive with the rest. The pragma does nothing inside a transaction, so a
    caller's open transaction with it on is refused for a write that ``applies_rows`` (others,
    an export say, go ahead as they are)."""
    if not conn.execute("PRAGMA foreign_keys").fetchone()[0]:
        yield
        return
    if conn.in_transaction:
        if not applies_rows:
            yield
            return
        raise SyncError(
            INVALID_ARGUMENT,
            "PRAGMA foreign_keys is on in this connection's open transaction: SQLite would run ON DELETE and "
            "ON UPDATE actions on the rows sync writes, which no copy logs. Commit first (sync turns foreign "
            "keys off while it writes, and back on after), or turn them off",
        )
    conn.execute("PRAGMA foreign_keys = OFF")
    try:
        yield
    finally:
        conn.execute("PRAGMA foreign_keys = ON")


def capture_table(conn: sqlite3.Connection, name: str, on_kept: Callable[[str, str], None] | None = None) -> int:
    """Install (or repair) capture for one table and log the changes missed meanwhile: every
    existing row when sync is first enabled; returns how many operations were logged.
    ``on_kept``: see :func:`~sqlite_utils_sync.reconcile.reconcile_table`."""
    installed = install_capture(conn, name)
    if installed is None:
        return 0
    table, captured = installed
    return reconcile_table(conn, table, captured, on_kept)


def repair_capture(conn: sqlite3.Connection, on_refused: Callable[[str, SyncError], None] | None = None) -> dict[str, int]:
    """Re-install stale or missing triggers and log the changes they missed.

    :param on_refused: where a table cannot be repaired (its primary key changed, too many
        columns), leave it as it is and tell this, instead of raising: a hub repairs on behalf
        of a write or a pull of other tables, which must not fail for it
    """
    repaired = {}
    for name, table in load_tables(conn, enabled_only=True).items():
        if table_drift(conn, table) is None:
            refresh_capture(conn, table)
        elif table_exists(conn, name):
            if on_refused is None:
                repaired[name] = capture_table(conn, name)
                continue
            try:
                with transaction(conn):
                    repaired[name] = capture_table(conn, name)
            except SyncError as ex:
                on_refused(name, ex)
    return repaired
