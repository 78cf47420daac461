"""Log compaction: remove operations that no copy can ever need again.

An operation can go when all of these hold:

* it is **stable**: every device this database knows of had seen it, according to the latest
  knowledge epoch (tick) held from that device. Every later operation from those devices was
  written after seeing it, so it can never be concurrent with, and never conflict with,
  anything still to come. A retired device writes nothing more, but what it wrote before may
  still come through a copy that has not heard of the retirement: it counts until every other
  device's latest tick shows it heard (a copy writes a tick when it hears), and this database
  holds all of the device that any of them held then;
* it is **superseded**: on every row it touched, a later operation (in the deterministic
  "latest" order) decided whether the row exists, and later operations wrote every column
  it wrote. The tables are a function of the latest operations only, so they do not change;
* nothing refers to it: it is no version of a conflict, no resolution, not waiting in
  ``_sync_unapplied``, and not the last operation of its device (which carries the clock).
  A table with operations waiting there keeps all of its history: the clashes among them
  are only found when the table is enabled, and any older operation may be a version;
* it is a data operation: knowledge epochs (ticks) are kept, they are few;
* its **twins** go with it: operations of other devices with the same clock and change count
  as one edit when clashes are found, so one is removed only with all of them.

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
from .devices import announcement_seq, device_ids, retired_records
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
    live = [latest_view(conn, idx, d) for idx, d in devices.items() if idx != LOCAL and d not in retired]
    views = [clock(conn), *live]  # this database has seen what it holds
    for idx, device in devices.items():
        if device in retired and may_still_arrive(conn, idx, device, retired[device], live):
            views.append(latest_view(conn, idx, device))
    return {idx: min(view.get(device, 0) for view in views) for idx, device in devices.items()}


def latest_view(conn: sqlite3.Connection, idx: int, device: str) -> dict[str, int]:
    """What a device had seen, as far as this database knows: its latest knowledge tick, and
    its own operations held here."""
    row = conn.execute(
        "SELECT clock FROM _sync_knowledge WHERE device = ? ORDER BY from_seq DESC LIMIT 1", [idx]
    ).fetchone()
    view = load_clock(row[0] if row else None)
    view[device] = max_seq(conn, idx)
    return view


def may_still_arrive(conn: sqlite3.Connection, idx: int, device: str, record: list, live: list[dict[str, int]]) -> bool:
    """Whether operations a retired device wrote may still reach this database: a copy that
    has not heard of the retirement takes them and passes them on, and one that has heard
    accepts what it held then. Only when every live device's latest knowledge includes the
    tick that announced the retirement, and none had more of the device than this database
    holds, does compaction stop waiting for it (what it had not seen then cannot conflict)."""
    _, by, announced_at = record
    announced = announcement_seq(conn, by, announced_at)
    if announced is None:
        return True
    held = max_seq(conn, idx)
    return any(view.get(by, 0) < announced or view.get(device, 0) > held for view in live)


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
        keep_twins_together(conn)
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


def keep_twins_together(conn: sqlite3.Connection) -> None:
    """Take out of ``temp._sync_drop`` the operations with a twin that stays: operations of
    other devices on the same row with the same clock and change count as one edit when
    finding clashes (:func:`merge.twins_of`), so removing one of them alone would make this
    copy find clashes that copies with their whole log do not. Compared by kind and columns
    written, not values: a few more kept is harmless, one fewer is not."""
    if len(device_ids(conn)) < 2:
        return  # twins are operations of two devices
    conn.execute("DROP TABLE IF EXISTS temp._sync_twin_groups")
    conn.execute(
        "CREATE TEMP TABLE _sync_twin_groups (tid, hlc, rowkey, kind, mask, PRIMARY KEY (tid, hlc, rowkey, kind, mask))"
    )
    conn.execute(
        f"""INSERT INTO temp._sync_twin_groups SELECT tid, hlc, rowkey, kind, ifnull(mask, -1) FROM _sync_ops
        WHERE kind != {TICK} GROUP BY 1, 2, 3, 4, 5 HAVING count(DISTINCT {device_sql('op')}) > 1"""
    )
    if conn.execute("SELECT 1 FROM temp._sync_twin_groups LIMIT 1").fetchone():
        twins = f"""SELECT o.op, g.rowid AS grp FROM _sync_ops o JOIN temp._sync_twin_groups g
            ON (g.tid, g.hlc, g.rowkey, g.kind, g.mask) = (o.tid, o.hlc, o.rowkey, o.kind, ifnull(o.mask, -1))"""
        conn.execute(
            f"""WITH twins AS MATERIALIZED ({twins}) DELETE FROM temp._sync_drop WHERE op IN (
            SELECT op FROM twins WHERE grp IN (
                SELECT grp FROM twins WHERE op NOT IN (SELECT op FROM temp._sync_drop)))"""
        )
    conn.execute("DROP TABLE temp._sync_twin_groups")


def keep_needed_ops(conn: sqlite3.Connection, tid: int, slots: list[int]) -> None:
    """Add to ``temp._sync_keep`` the operations the state of a table's rows depends on: on each
    row, the latest one (does the row exist?) and the latest writer of each column. The
    importer relies on the first (``Importer.check_horizon``): a row no operation here touches
    had none removed, so a blind operation on it merges as on a copy with its whole log.

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
