"""Log compaction: remove operations that no copy can ever need again.

An operation can go when all of these hold:

* it is **stable**: every device this database knows of (but retired ones, which write
  nothing more) had seen it, according to the latest knowledge epoch (tick) held from that device. Every later operation from those devices was
  written after seeing it, so it can never be concurrent with, and never conflict with,
  anything still to come;
* it is **superseded**: on every row it touched, a later operation (in the deterministic
  "latest" order) decided whether the row exists, and later operations wrote every column
  it wrote. The tables are a function of the latest operations only, so they do not change;
* nothing refers to it: it is no version of a conflict, no resolution, not waiting in
  ``_sync_unapplied``, and not the last operation of its device (which carries the clock).
  A table with operations waiting there keeps all of its history: the clashes among them
  are only found when the table is enabled, and any older operation may be a version;
* it is a data operation: knowledge epochs (ticks) are kept, they are few.

The highest sequence removed from each device is the database's **horizon**
(``_sync_horizon``). Bundles carry it, which allows two things:

* **snapshot bootstrap**: a database holding no data operations yet (a new device) may import
  a bundle with holes at or below the horizon, and adopts that horizon;
* **refusal of the unknowable**: operations written without having seen everything up to the
  horizon (by a device that was not known when the log was compacted) would have to be
  compared with operations that are gone, so they are refused with a clear error instead of
  being merged differently here than on copies that kept their whole log.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

from . import errors
from .capture import load_tables
from .clocks import clock, horizon, max_seq, raise_horizon
from .devices import device_ids, retired_records
from .errors import SyncError
from .merge import latest_op_sql, latest_sql
from .oplog import DELETE, KIND_MASK, LOCAL, TICK, UPDATE, device_sql, load_clock, op_id, seq_sql
from .schema import connection, is_enabled, log_rewrite
from .writing import writing


@dataclass
class CompactResult:
    removed: int
    kept: int
    horizon: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"removed": self.removed, "kept": self.kept, "horizon": self.horizon}


def stable_clock(conn: sqlite3.Connection) -> dict[int, int]:
    """For each device index, the highest seq that every known device had seen."""
    devices = device_ids(conn)
    retired = retired_records(conn)
    views = [clock(conn)]  # this database has seen what it holds
    for idx, device in devices.items():
        if idx == LOCAL or device in retired:
            # A retired device writes nothing more: what it had not seen cannot conflict.
            continue
        row = conn.execute(
            "SELECT clock FROM _sync_knowledge WHERE device = ? ORDER BY from_seq DESC LIMIT 1", [idx]
        ).fetchone()
        view = load_clock(row[0] if row else None)
        view[device] = max_seq(conn, idx)  # a device has seen its own operations
        views.append(view)
    return {idx: min(view.get(device, 0) for view in views) for idx, device in devices.items()}


def compact_log(db: Any) -> CompactResult:
    """Remove every operation no copy can need again (see the module docs); the tables and the
    conflict records do not change. The file keeps its size until ``VACUUM``.
    """
    conn = connection(db)
    if not is_enabled(conn):
        raise SyncError(errors.NOT_ENABLED, "This database has no synced tables")
    # writing() settles the local clocks first: which operations are latest depends on them.
    with writing(conn):
        devices = device_ids(conn)
        stable = stable_clock(conn)
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS _sync_keep (op INTEGER PRIMARY KEY)")
        conn.execute("DELETE FROM temp._sync_keep")
        for table in load_tables(conn).values():
            keep_needed_ops(conn, table.tid, sorted(table.slots.values()))
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS _sync_drop (op INTEGER PRIMARY KEY)")
        conn.execute("DELETE FROM temp._sync_drop")
        for idx, seq in stable.items():
            last = max_seq(conn, idx) - 1  # the last op of a device carries its clock
            if min(seq, last) < 1:
                continue
            conn.execute(
                f"""INSERT INTO temp._sync_drop SELECT op FROM _sync_ops o
                WHERE op BETWEEN ? AND ? AND kind != {TICK}
                AND op NOT IN (SELECT op FROM temp._sync_keep)
                AND op NOT IN (SELECT a FROM _sync_conflict_pairs UNION SELECT b FROM _sync_conflict_pairs)
                AND op NOT IN (SELECT op FROM _sync_resolutions)
                AND tid NOT IN (SELECT tid FROM _sync_unapplied)""",
                [op_id(idx, 1), op_id(idx, min(seq, last))],
            )
        removed_to = {
            devices[idx]: seq
            for idx, seq in conn.execute(f"SELECT {device_sql('op')}, max({seq_sql('op')}) FROM temp._sync_drop GROUP BY 1")
        }
        removed = 0
        if removed_to:  # else leave the file as it was, not even a trigger rebuilt
            with log_rewrite(conn):
                removed = conn.execute("DELETE FROM _sync_ops WHERE op IN (SELECT op FROM temp._sync_drop)").rowcount
            raise_horizon(conn, removed_to)
        kept = conn.execute("SELECT count(*) FROM _sync_ops").fetchone()[0] - 1  # not the local sentinel
        return CompactResult(removed, kept, horizon(conn))


def keep_needed_ops(conn: sqlite3.Connection, tid: int, slots: list[int]) -> None:
    """Add to ``temp._sync_keep`` the operations the state of a table's rows depends on: on each
    row, the latest one (does the row exist?) and the latest writer of each column.

    One ``GROUP BY`` in SQL, so memory stays bounded: "latest" is compared as the text
    :func:`merge.latest_sql` makes, which sorts in the "latest" order and ends with the op id.
    """
    all_slots = sum(1 << s for s in slots)
    order = latest_sql("o.hlc", "d.device_id", "o.op")
    ops = f"_sync_ops o JOIN _sync_devices d ON d.idx = {device_sql('o.op')} WHERE o.tid = {tid} AND o.kind != {TICK}"
    moved = f"o.kind & {KIND_MASK} = {UPDATE} AND o.newkey IS NOT NULL"
    # A delete, and a move on the key it left, write no column; a move writes the whole row
    # under its new key.
    writes = f"CASE WHEN o.kind & {KIND_MASK} = {DELETE} OR ({moved}) THEN 0 ELSE ifnull(o.mask, 0) & {all_slots} END"
    effects = (
        f"SELECT o.rowkey AS rowkey, {order} AS latest, {writes} AS mask FROM {ops} "
        f"UNION ALL SELECT o.newkey, {order}, {all_slots} FROM {ops} AND {moved}"
    )
    writers = "".join(f", max(CASE WHEN mask & {1 << s} THEN latest END) AS w{s}" for s in slots)
    picks = " UNION ".join(["SELECT latest AS k FROM per_row"] + [f"SELECT w{s} FROM per_row" for s in slots])
    conn.execute(
        f"WITH per_row AS MATERIALIZED (SELECT max(latest) AS latest{writers} FROM ({effects}) GROUP BY rowkey) "
        "INSERT OR IGNORE INTO temp._sync_keep "
        f"SELECT {latest_op_sql('k')} FROM ({picks}) WHERE k IS NOT NULL"
    )
