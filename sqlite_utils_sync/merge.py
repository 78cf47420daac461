"""Merge rules: what the operations on a row say its state is, and which of them clash.

The state of a row is a function of the set of operations on it, so every copy that holds
the same operations holds the same row, whatever order they arrived in:

* the row exists when its latest operation (see :func:`latest_key`) is not a delete;
* each column holds the value of its latest writer (inserts write every column, updates the
  columns they changed).

Because the clock of an operation is higher than the clock of everything its author had seen,
"latest" never reverts an edit its author had seen; it only picks between concurrent ones,
and those clash (:func:`record_clashes`) and become conflict records (see :mod:`conflicts`).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Iterator, NamedTuple

from .capture import SyncedTable
from .clocks import knowledge_at
from .devices import device_ids
from .oplog import DELETE, RESOLUTION, SEQ_MASK, TICK, UPDATE, device_range, kind_of, mask_slots, op_device, op_id, op_seq, seq_sql

# -- "latest" ------------------------------------------------------------------------------
#
# The one deterministic order of operations, used wherever "latest" is decided (importing,
# reconciling, conflicts, compaction): by hybrid logical clock, then device id, then seq. The
# clock puts an operation after everything its author had seen; the device id and seq break
# ties between concurrent operations the same way on every copy. Python sorts by
# :func:`latest_key`; SQL compares :func:`latest_sql`, text that sorts the same way.

LatestKey = tuple[int, str, int]  # (hlc, device id, seq)

# hlc (below 2**62: 19 digits), device id (32 hex digits), seq (below 2**40: 13 digits), op id.
_LATEST_FORMAT = "%020d %s %013d %d"
_LATEST_OP_AT = len(_LATEST_FORMAT.rsplit(" ", 1)[0] % (0, "0" * 32, 0)) + 2  # 1-based, past the space


def latest_key(hlc: int, op: int, devices: dict[int, str]) -> LatestKey:
    """Where an operation stands in the "latest" order: the greatest key is the latest."""
    return (hlc, devices[op_device(op)], op_seq(op))


def latest_sql(hlc: str, device_id: str, op: str) -> str:
    """SQL text that sorts like :func:`latest_key`, so ``max()`` picks the latest operation;
    it ends with the op id, which :func:`latest_op_sql` reads back."""
    return f"printf('{_LATEST_FORMAT}', {hlc}, {device_id}, {seq_sql(op)}, {op})"


def latest_op_sql(latest: str) -> str:
    """The op id of a :func:`latest_sql` value."""
    return f"CAST(substr({latest}, {_LATEST_OP_AT}) AS INTEGER)"


# -- effects -------------------------------------------------------------------------------


class Effect(NamedTuple):
    """What one operation does to one row."""

    op: int
    key: LatestKey
    write: bool  # False for a delete (or the old key of a primary-key move)
    mask: int
    values: dict[int, Any]
    new: bool
    resolution: bool
    kind: int  # the operation's kind (INSERT, UPDATE, DELETE), without the resolution flag


def effects_of(record: dict[str, Any], table: SyncedTable, devices: dict[int, str], new: bool) -> list[tuple[str, Effect]]:
    """The row effects of one operation: a primary-key move deletes the old key, writes the new."""
    op = record["op"]
    key = latest_key(record["hlc"], op, devices)
    kind = kind_of(record["kind"])
    resolution = bool(record["kind"] & RESOLUTION)
    values = {slot: record.get(f"c{slot}") for slot in table.slots.values()}
    all_slots = table.mask_for(list(table.slots))
    if kind == DELETE:
        return [(record["rowkey"], Effect(op, key, False, 0, {}, new, resolution, kind))]
    if kind == UPDATE and record["newkey"] is not None:
        return [
            (record["rowkey"], Effect(op, key, False, 0, {}, new, resolution, kind)),
            (record["newkey"], Effect(op, key, True, all_slots, values, new, resolution, kind)),
        ]
    return [(record["rowkey"], Effect(op, key, True, record["mask"] & all_slots, values, new, resolution, kind))]


def cursor_effects(
    cursor: sqlite3.Cursor, tables: dict[int, SyncedTable], devices: dict[int, str], new: bool
) -> Iterator[tuple[int, str, Effect]]:
    """``(tid, row key, effect)`` for every row effect of the operations a cursor returns."""
    names = [d[0] for d in cursor.description]
    for row in cursor:
        record = dict(zip(names, row))
        for rowkey, effect in effects_of(record, tables[record["tid"]], devices, new):
            yield record["tid"], rowkey, effect


def table_history(conn: sqlite3.Connection, table: SyncedTable) -> dict[str, list[Effect]]:
    """Every data operation on a table, by row key, each row's in "latest" order."""
    cursor = conn.execute(f"SELECT * FROM _sync_ops WHERE tid = ? AND kind != {TICK}", [table.tid])
    history: dict[str, list[Effect]] = {}
    for _, rowkey, effect in cursor_effects(cursor, {table.tid: table}, device_ids(conn), False):
        history.setdefault(rowkey, []).append(effect)
    for effects in history.values():
        effects.sort(key=lambda e: e.key)
    return history


def all_effects(conn: sqlite3.Connection, table: SyncedTable, rowkey: str) -> list[Effect]:
    """Every operation ever recorded on one row, in "latest" order (a log scan: only for
    restoring deleted rows)."""
    cursor = conn.execute(
        "SELECT * FROM _sync_ops WHERE tid = ? AND (rowkey = ? OR newkey = ?)", [table.tid, rowkey, rowkey]
    )
    effects = [e for _, key, e in cursor_effects(cursor, {table.tid: table}, device_ids(conn), False) if key == rowkey]
    return sorted(effects, key=lambda e: e.key)


def op_effect(conn: sqlite3.Connection, table: SyncedTable, op: int, rowkey: str, devices: dict[int, str]) -> Effect:
    """What operation ``op`` did to the row ``rowkey``."""
    cursor = conn.execute("SELECT * FROM _sync_ops WHERE op = ?", [op])
    for _, key, effect in cursor_effects(cursor, {table.tid: table}, devices, False):
        if key == rowkey:
            return effect
    raise KeyError(op)


def latest_writers(effects: list[Effect]) -> dict[int, Effect]:
    """For each column slot, the latest operation (effects in "latest" order) that wrote it."""
    writers: dict[int, Effect] = {}
    for effect in effects:
        if effect.write:
            for slot in mask_slots(effect.mask):
                writers[slot] = effect
    return writers


def row_state(effects: list[Effect]) -> tuple[bool, dict[int, Any]]:
    """The row implied by all its operations (in "latest" order): does it exist, and its values."""
    values = {slot: effect.values[slot] for slot, effect in latest_writers(effects).items()}
    return bool(effects) and effects[-1].write, values


def same_value(a: Any, b: Any) -> bool:
    """Equal and of the same type: 1, 1.0 and '1' are different values to sync."""
    return type(a) is type(b) and a == b


# -- concurrency and clashes -----------------------------------------------------------------


class KnowledgeCache:
    """Who had seen what: ``seen(a, b)`` is true when b's author had seen a when writing b."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.cache: dict[int, dict[str, int]] = {}
        self.devices: dict[int, str] = device_ids(conn)
        self.spans: dict[int, tuple[int, int]] | None = None  # per device: its lowest and highest clock
        self.runs: dict[tuple[int, int], tuple[int, int] | None] = {}  # (device, clock): its ops with it
        self.twins: dict[tuple[int, str], list[Effect]] = {}

    def clock_of(self, op: int) -> dict[str, int]:
        if op not in self.cache:
            self.cache[op] = knowledge_at(self.conn, op_device(op), op_seq(op))
        return self.cache[op]

    def seen(self, a: Effect, b: Effect) -> bool:
        if op_device(a.op) == op_device(b.op):
            return a.op < b.op
        return self.clock_of(b.op).get(a.key[1], 0) >= a.key[2]

    def concurrent(self, a: Effect, b: Effect, twins: dict[int, list[Effect]] | None = None) -> bool:
        """Neither author had seen the other's operation, nor a twin of it (see :func:`twins_of`)."""
        if a.op == b.op or self.seen(a, b) or self.seen(b, a):
            return False
        if twins:
            return not any(self.seen(t, b) for t in twins.get(a.op, ())) and not any(
                self.seen(t, a) for t in twins.get(b.op, ())
            )
        return True

    def log_twins(self, table: SyncedTable, rowkey: str, effect: Effect) -> list[Effect]:
        """The twins of ``effect`` anywhere in the log (:func:`twins_of` sees only the effects
        it is given): other devices' operations on the row with its clock and its change."""
        if (effect.op, rowkey) not in self.twins:
            found = []
            for idx in self.devices_at(effect.key[0]):
                run = None if self.devices[idx] == effect.key[1] else self.run_at(idx, effect.key[0])
                if run is None:
                    continue
                cursor = self.conn.execute(
                    "SELECT * FROM _sync_ops WHERE op BETWEEN ? AND ? AND tid = ? AND (rowkey = ? OR newkey = ?)",
                    [*run, table.tid, rowkey, rowkey],
                )
                found += [
                    e for _, key, e in cursor_effects(cursor, {table.tid: table}, self.devices, False)
                    if key == rowkey and change_of(e) == change_of(effect)
                ]
            self.twins[(effect.op, rowkey)] = found
        return self.twins[(effect.op, rowkey)]

    def devices_at(self, hlc: int) -> list[int]:
        """The devices with operations from before ``hlc`` to after it (two lookups each, once)."""
        if self.spans is None:
            edge = "SELECT hlc FROM _sync_ops WHERE op BETWEEN ? AND ? ORDER BY op {} LIMIT 1"
            self.spans = {}
            for idx in self.devices:
                first = self.conn.execute(edge.format("ASC"), device_range(idx)).fetchone()
                if first is not None:
                    last = self.conn.execute(edge.format("DESC"), device_range(idx)).fetchone()
                    self.spans[idx] = (first[0], last[0])
        return [idx for idx, (low, high) in self.spans.items() if low <= hlc <= high]

    def run_at(self, idx: int, hlc: int) -> tuple[int, int] | None:
        """The op ids of device ``idx`` from its first operation with clock ``hlc`` to its last,
        found by binary search: a device's clocks never fall from one operation to the next
        (the importer refuses a bundle where they do)."""
        if (idx, hlc) not in self.runs:
            first = self.first_at(idx, hlc)
            if first is None or first[1] != hlc:
                self.runs[(idx, hlc)] = None
            else:
                after = self.first_at(idx, hlc + 1)
                self.runs[(idx, hlc)] = (first[0], op_id(idx, SEQ_MASK) if after is None else after[0] - 1)
        return self.runs[(idx, hlc)]

    def first_at(self, idx: int, hlc: int) -> tuple[int, int] | None:
        """(op, clock) of the first operation of device ``idx`` with a clock at least ``hlc``."""
        left, right, found = *device_range(idx), None
        while left <= right:
            mid = (left + right) // 2
            row = self.conn.execute(
                "SELECT op, hlc FROM _sync_ops WHERE op BETWEEN ? AND ? ORDER BY op LIMIT 1", [mid, right]
            ).fetchone()
            if row is None:
                right = mid - 1
            elif row[1] >= hlc:
                found, right = tuple(row), mid - 1
            else:
                left = row[0] + 1
        return found


def change_of(effect: Effect) -> tuple:
    """What an effect does, for telling twins: exists, kind, columns written and their values."""
    if not effect.write:
        return (effect.write, effect.kind, effect.mask, ())
    written = tuple(sorted((slot, type(v).__name__, v) for slot, v in effect.values.items() if effect.mask >> slot & 1))
    return (effect.write, effect.kind, effect.mask, written)


def twins_of(effects: list[Effect]) -> dict[int, list[Effect]]:
    """Effects of other devices with the same clock and the same change, by op.

    ``sync-new-device --recover`` moves operations to a new id with their clocks and values:
    a copy that held the original gets the move too. An author who had seen either had seen
    that edit, so neither is concurrent with its later edits (no conflict is made up).
    """
    groups: dict[tuple, list[Effect]] = {}
    for effect in effects:
        groups.setdefault((effect.key[0], *change_of(effect)), []).append(effect)
    twins: dict[int, list[Effect]] = {}
    for group in groups.values():
        for effect in group:
            others = [e for e in group if e.key[1] != effect.key[1]]
            if others:
                twins[effect.op] = others
    return twins


def clash_columns(table: SyncedTable, a: Effect, b: Effect) -> list[str] | None:
    """The columns two concurrent effects disagree on; [] for a write against a delete; None
    when they agree."""
    if not a.write and not b.write:
        return None
    if a.write != b.write:
        return []
    names = table.slot_names()
    differing = [names[s] for s in mask_slots(a.mask & b.mask) if not same_value(a.values[s], b.values[s])]
    return sorted(differing) or None


def record_clashes(
    conn: sqlite3.Connection, table: SyncedTable, rowkey: str, effects: list[Effect], knowledge: KnowledgeCache
) -> bool:
    """Record each pair of concurrent, disagreeing effects on a row where one of them is new;
    returns whether there was any."""
    found = False
    twins = twins_of(effects)
    for i, a in enumerate(effects):
        for b in effects[i + 1 :]:
            if not (a.new or b.new) or not knowledge.concurrent(a, b, twins):
                continue
            columns = clash_columns(table, a, b)
            if columns is None:
                continue
            # A twin the import did not read may have been seen: then they do not clash, as on
            # a copy that read it. Looked up only for pairs that would clash.
            outside = {e.op: [*twins.get(e.op, []), *knowledge.log_twins(table, rowkey, e)] for e in (a, b)}
            if not knowledge.concurrent(a, b, {**twins, **outside}):
                continue
            first, second = sorted((a.op, b.op))
            conn.execute(
                "INSERT OR IGNORE INTO _sync_conflict_pairs VALUES (?, ?, ?, ?, ?)",
                [table.tid, rowkey, first, second, json.dumps(columns)],
            )
            found = True
    return found
