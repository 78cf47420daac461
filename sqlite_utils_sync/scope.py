"""Partial copies: the scope of a copy and the operations it withholds.

The **scope** of a copy is the set of tables it holds values for (``_sync_scope``; no rows: a
full copy, every table). A **withheld** operation is one whose existence (device, seq) a copy
knows but whose values it never received: ``_sync_withheld`` keeps them as seq ranges per
device. ``_sync_ops`` holds only real operations.

The invariant everything rests on: a copy with scope S holds every operation of every table
in S up to its vector clock; its withheld ranges are only ever operations of tables outside
S; a full copy holds none. So the vector clock is the highest seq held per device, counting
withheld seqs (:func:`~sqlite_utils_sync.clocks.max_seq`), and gap checks and deltas work as
for a full copy. A withheld operation says nothing but its device and seq.
"""

from __future__ import annotations

import sqlite3
from typing import Iterable, Iterator

from .errors import INVALID_ARGUMENT, SyncError
from .schema import has_table


def load_scope(conn: sqlite3.Connection) -> set[str] | None:
    """The tables this copy holds values for; None: every table (a full copy)."""
    if not has_table(conn, "_sync_scope"):
        return None
    names = {name for (name,) in conn.execute("SELECT name FROM _sync_scope")}
    return names or None


def store_scope(conn: sqlite3.Connection, names: Iterable[str] | None) -> None:
    """Replace the scope (None: a full copy). Call inside a transaction, after the checks of
    :func:`check_scope_change`."""
    names = None if names is None else set(names)
    if names is not None and not names:
        # No rows already mean a full copy: a copy of no table would read back as one of all.
        raise SyncError(INVALID_ARGUMENT, "A partial copy holds at least one table: none was named")
    conn.execute("DELETE FROM _sync_scope")
    conn.executemany("INSERT INTO _sync_scope (name) VALUES (?)", [[n] for n in sorted(names or ())])


def check_scope_change(conn: sqlite3.Connection, new: set[str] | None) -> None:
    """Narrowing a scope is always safe; widening it is not once the copy withholds operations:
    their tables are unknown, so the new table's past operations may be among them."""
    old = load_scope(conn)
    widening = old is not None and (new is None or not new <= old)
    if widening and withheld_count(conn):
        added = "every table" if new is None else ", ".join(sorted(new - old))
        raise SyncError(
            INVALID_ARGUMENT,
            f"This copy holds only tables {', '.join(sorted(old))} and withholds operations of others, "
            f"so it cannot add {added}: some of their past operations may be among the withheld ones. "
            "Start a new copy (a new database) that pulls the wider set of tables",
        )


def withheld_ranges(conn: sqlite3.Connection, idx: int, after: int = 0, upto: int | None = None) -> Iterator[tuple[int, int]]:
    """The withheld ranges ``(lo, hi)`` of a device that reach above seq ``after`` (and start
    at or below ``upto``), clipped to that window, lowest first."""
    if not has_table(conn, "_sync_withheld"):
        return iter(())
    top = (1 << 62) if upto is None else upto
    # Ranges never overlap: only the last one starting at or before ``after + 1`` may reach
    # above ``after`` among those, so the search starts there, not at the device's first range
    # (a copy of tables written in turn holds a range per operation of the others).
    rows = conn.execute(
        "SELECT max(lo, :after + 1), min(hi, :top) FROM _sync_withheld WHERE device = :idx AND hi > :after "
        "AND lo BETWEEN ifnull((SELECT max(lo) FROM _sync_withheld WHERE device = :idx AND lo <= :after + 1), 0) "
        "AND :top ORDER BY lo",
        {"after": after, "top": top, "idx": idx},
    ).fetchall()
    return iter(rows)


def max_withheld(conn: sqlite3.Connection, idx: int) -> int:
    """The highest seq of a device held as withheld (0: none)."""
    try:
        row = conn.execute("SELECT max(hi) FROM _sync_withheld WHERE device = ?", [idx]).fetchone()
    except sqlite3.OperationalError:  # a database read as it is, older than version 3
        return 0
    return row[0] or 0


def withheld_count(conn: sqlite3.Connection) -> int:
    """How many operations this copy knows exist and holds no values of."""
    if not has_table(conn, "_sync_withheld"):
        return 0
    return conn.execute("SELECT ifnull(sum(hi - lo + 1), 0) FROM _sync_withheld").fetchone()[0]


def withheld_between(conn: sqlite3.Connection, idx: int, after: int, upto: int) -> int:
    """How many seqs of a device in ``after + 1 .. upto`` are held as withheld."""
    return sum(hi - lo + 1 for lo, hi in withheld_ranges(conn, idx, after, upto))


def add_withheld(conn: sqlite3.Connection, idx: int, lo: int, hi: int) -> None:
    """Record seqs ``lo..hi`` of a device as withheld, merged with the ranges they touch."""
    # Ranges never overlap nor touch: of those starting before ``lo`` only the last may touch
    # it, so the search starts there (not at the device's first range: a copy of tables
    # written in turn adds a range per operation of the others, which made imports quadratic).
    touching = (
        "FROM _sync_withheld WHERE device = :idx AND hi >= :lo - 1 AND lo BETWEEN "
        "ifnull((SELECT max(lo) FROM _sync_withheld WHERE device = :idx AND lo < :lo), :lo) AND :hi + 1"
    )
    found = conn.execute(f"SELECT min(lo), max(hi) {touching}", {"idx": idx, "lo": lo, "hi": hi}).fetchone()
    if found[0] is not None:
        conn.execute(f"DELETE {touching}", {"idx": idx, "lo": lo, "hi": hi})
        lo, hi = min(lo, found[0]), max(hi, found[1])
    conn.execute("INSERT INTO _sync_withheld (device, lo, hi) VALUES (?, ?, ?)", [idx, lo, hi])


def add_withheld_ranges(conn: sqlite3.Connection, ranges: Iterable[tuple[int, int, int]]) -> None:
    """:func:`add_withheld` of ranges ``(device, lo, hi)`` sorted by device and ``lo``, none
    overlapping another: adjacent ones are merged first, and those above every range their
    device holds (the new seqs a bundle withholds) are inserted together, not looked up one
    by one (a bundle of tables written in turn withholds a range per operation of the others)."""
    merged: list[list[int]] = []
    for idx, lo, hi in ranges:
        if merged and merged[-1][0] == idx and merged[-1][2] + 1 == lo:
            merged[-1][2] = hi
        else:
            merged.append([idx, lo, hi])
    tops: dict[int, int | None] = {}
    above = []
    for idx, lo, hi in merged:
        if idx not in tops:
            # Ranges never overlap: the one starting last ends last.
            row = conn.execute("SELECT hi FROM _sync_withheld WHERE device = ? ORDER BY lo DESC LIMIT 1", [idx]).fetchone()
            tops[idx] = row[0] if row else None
        top = tops[idx]
        if top is None or lo > top + 1:
            above.append((idx, lo, hi))
        else:
            add_withheld(conn, idx, lo, hi)
    conn.executemany("INSERT INTO _sync_withheld (device, lo, hi) VALUES (?, ?, ?)", above)
