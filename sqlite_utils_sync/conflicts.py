"""Conflict records and their resolution.

Two operations on the same row *clash* when neither author had seen the other's operation
and they disagree: they set the same column to different values, or one writes the row while
the other deletes it. Identical concurrent edits do not clash, and concurrent edits of
different columns merge.

A conflict record is a connected group of clashing operations on one row. Its id is derived
from the operations alone (``sha256(table, row key, sorted op ids)``), so every copy that
holds the same operations holds the same records. A record is resolved when a resolution
operation (written by :func:`resolve_conflict`) on that row had seen every version in it; a
plain later edit changes the value but not the record. Records are rebuilt from
``_sync_clashes`` and ``_sync_resolutions`` whenever either changes for a row.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any, Iterable

from .apply import Effect, KnowledgeCache, all_effects, cursor_effects, fetch_row, key_slots, row_state, transaction, write_row
from .capture import SyncedTable, load_tables, muted
from .clocks import append_local, settle_clocks
from .devices import device_ids, parse_op_label
from .errors import SyncError
from .oplog import (
    DELETE,
    INSERT,
    KIND_NAMES,
    RESOLUTION,
    SEQ_MASK,
    UPDATE,
    exact_text,
    json_value,
    op_label,
    parse_rowkey,
    text_as,
)
from .schema import connection, is_enabled
from .writing import repair_capture as repair_drift


def _effect(conn: sqlite3.Connection, table: SyncedTable, op: int, rowkey: str, devices: dict[int, str]) -> Effect:
    """What operation ``op`` did to the row ``rowkey``."""
    cursor = conn.execute("SELECT * FROM _sync_ops WHERE op = ?", [op])
    for _, key, effect in cursor_effects(cursor, {table.tid: table}, devices, False):
        if key == rowkey:
            return effect
    raise KeyError(op)


def rebuild_conflicts(conn: sqlite3.Connection, rows: Iterable[tuple[int, str]]) -> int:
    """Recompute the conflict records of the given rows; returns how many are unresolved."""
    tables = {t.tid: t for t in load_tables(conn).values()}
    devices = device_ids(conn)
    knowledge = KnowledgeCache(conn)
    unresolved = 0
    for tid, rowkey in rows:
        table = tables[tid]
        parent: dict[int, int] = {}

        def find(x: int) -> int:
            while parent.setdefault(x, x) != x:
                x = parent[x]
            return x

        columns_of: dict[int, set[str]] = {}
        pairs = conn.execute("SELECT a, b, columns FROM _sync_clashes WHERE tid = ? AND rowkey = ?", [tid, rowkey]).fetchall()
        for a, b, columns in pairs:
            parent[find(a)] = find(b)
        for a, b, columns in pairs:
            columns_of.setdefault(find(a), set()).update(json.loads(columns))
        groups: dict[int, list[int]] = {}
        for op in parent:
            groups.setdefault(find(op), []).append(op)
        resolutions = [
            _effect(conn, table, op, rowkey, devices)
            for (op,) in conn.execute("SELECT op FROM _sync_resolutions WHERE tid = ? AND rowkey = ?", [tid, rowkey])
        ]
        resolutions.sort(key=lambda e: e.key)
        conn.execute('DELETE FROM _sync_conflicts WHERE "table" = ? AND rowkey = ?', [table.name, rowkey])
        for root, ops in groups.items():
            versions = sorted(_effect(conn, table, op, rowkey, devices) for op in ops)
            labels = sorted(op_label(devices[v.op >> 40], v.op & SEQ_MASK) for v in versions)
            conflict_id = hashlib.sha256("\n".join([table.name, rowkey, *labels]).encode()).hexdigest()[:16]
            resolved_by = None
            for r in resolutions:
                if all(v.op == r.op or knowledge.seen(v, r) for v in versions):
                    resolved_by = op_label(devices[r.op >> 40], r.op & SEQ_MASK)
                    break
            unresolved += resolved_by is None
            conn.execute(
                "INSERT OR REPLACE INTO _sync_conflicts VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    conflict_id,
                    table.name,
                    rowkey,
                    json.dumps([json_value(v) for v in parse_rowkey(rowkey)]),
                    json.dumps(sorted(columns_of.get(find(root), set()))),
                    json.dumps(labels),
                    resolved_by,
                ],
            )
    return unresolved


def list_conflicts(
    db: Any,
    include_resolved: bool = False,
    table: str | None = None,
    after: str | None = None,
    limit: int | None = None,
    hidden_tables: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Conflict records as ``{"id", "table", "pk", "columns", "versions", "current", "resolved"}``.

    :param after: a conflict id: only records that sort after it (for paging)
    :param limit: at most this many records
    :param hidden_tables: leave out records on these tables
    """
    conn = connection(db)
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = '_sync_conflicts'").fetchone():
        return []
    where, params = [], []
    hidden = sorted(hidden_tables)
    if hidden:
        where.append(f'"table" NOT IN ({", ".join("?" * len(hidden))})')
        params += hidden
    if not include_resolved:
        where.append("resolved_by IS NULL")
    if table:
        where.append('"table" = ?')
        params.append(table)
    if after:
        where.append('("table", rowkey, id) > (SELECT "table", rowkey, id FROM _sync_conflicts WHERE id = ?)')
        params.append(after)
    sql = 'SELECT id, "table", rowkey, pk, columns, versions, resolved_by FROM _sync_conflicts'
    if where:
        sql += " WHERE " + " AND ".join(where)
    sql += ' ORDER BY "table", rowkey, id'
    if limit is not None:
        sql += " LIMIT ?"
        params.append(limit)
    return [describe(conn, *row) for row in conn.execute(sql, params).fetchall()]


def get_conflict(db: Any, conflict_id: str) -> dict[str, Any]:
    conn = connection(db)
    if not is_enabled(conn):
        raise SyncError("not_enabled", "This database has no synced tables")
    row = conn.execute(
        'SELECT id, "table", rowkey, pk, columns, versions, resolved_by FROM _sync_conflicts WHERE id = ?',
        [conflict_id],
    ).fetchone()
    if row is None:
        raise SyncError("unknown_conflict", f"No conflict with id {conflict_id}")
    return describe(conn, *row)


def describe(conn, conflict_id, table_name, rowkey, pk, columns, versions, resolved_by) -> dict[str, Any]:
    tables = load_tables(conn)
    table = tables[table_name]
    devices = device_ids(conn)
    names = {slot: name for name, slot in table.slots.items()}
    result_versions = []
    for label in json.loads(versions):
        op = parse_op_label(conn, label)
        effect = _effect(conn, table, op, rowkey, devices)
        values = (
            {names[s]: json_value(effect.values[s]) for s in sorted(effect.values) if effect.mask >> s & 1}
            if effect.write
            else None
        )
        result_versions.append(
            {
                "op": label,
                "device_id": label.split(":")[0],
                # the old key of a primary-key move shows as a "move" away from this row
                "kind": KIND_NAMES[effect.kind] if effect.write or effect.kind == DELETE else "move",
                "hlc": effect.key[0],
                "values": values,
            }
        )
    current = fetch_row(conn, table, rowkey) if table.enabled else None
    return {
        "id": conflict_id,
        "table": table_name,
        "pk": json.loads(pk),
        "columns": json.loads(columns),
        "versions": result_versions,
        "current": None if current is None else {k: json_value(v) for k, v in current.items()},
        "resolved": resolved_by is not None,
        "resolved_by": resolved_by,
    }


def resolve_conflict(db: Any, conflict_id: str, keep: str | None = None) -> str:
    """Resolve a conflict with a new operation that syncs like any other.

    :param keep: an op id (``<device id>:<seq>``) of one of the conflict's versions to restore;
        without it the value currently in the table is accepted
    :returns: the id of the resolution operation
    """
    conn = connection(db)
    try:
        # Values pass through Python here: read them exactly (a Datasette connection would
        # replace what is not UTF-8, and the resolution would write the changed value).
        with text_as(conn, exact_text):
            return _resolve(conn, conflict_id, keep)
    except sqlite3.IntegrityError as ex:
        # Restoring a version can need a UNIQUE value another row holds now.
        raise SyncError(
            "constraint_failed",
            f"Conflict {conflict_id} cannot be resolved that way: {ex} here. Nothing was changed; "
            "change the row that holds that value first, then resolve again",
        )


def _resolve(conn: sqlite3.Connection, conflict_id: str, keep: str | None) -> str:
    with transaction(conn):
        # The resolution is a new operation: it needs capture in step with the table's columns.
        repair_drift(conn)
        record = get_conflict(conn, conflict_id)
        settle_clocks(conn)  # the versions' clocks decide what the table holds
        if record["resolved"]:
            raise SyncError("already_resolved", f"Conflict {conflict_id} is already resolved (by {record['resolved_by']})")
        table = load_tables(conn)[record["table"]]
        if not table.enabled:
            raise SyncError("not_enabled", f"Table '{table.name}' is not synced here")
        rowkey = conn.execute("SELECT rowkey FROM _sync_conflicts WHERE id = ?", [conflict_id]).fetchone()[0]
        labels = [v["op"] for v in record["versions"]]
        current = fetch_row(conn, table, rowkey)
        columns = table.current_columns(conn)
        if keep is not None and keep not in labels:
            raise SyncError(
                "unknown_version", f"{keep} is not a version of conflict {conflict_id}; versions: {', '.join(labels)}"
            )
        # Columns the resolution writes: the disputed ones while the row stays (so concurrent
        # edits of other columns still merge), the whole row when it comes back or when the
        # dispute was about the row's existence. The table and the logged op get the same.
        disputed = [c for c in record["columns"] if c in columns]
        changing = disputed if disputed and current is not None else columns
        if keep is None:
            target = current
        else:
            devices = device_ids(conn)
            effect = _effect(conn, table, parse_op_label(conn, keep), rowkey, devices)
            if not effect.write:
                target = None
            else:
                if current is None:
                    _, implied = row_state(all_effects(conn, table, rowkey))
                    names = {slot: name for name, slot in table.slots.items()}
                    target = {names[s]: v for s, v in implied.items() if names[s] in columns}
                else:
                    target = dict(current)
                for name in changing:
                    if effect.mask >> table.slots[name] & 1:
                        target[name] = effect.values[table.slots[name]]
        with muted(conn):
            if target is None:
                write_row(conn, table, rowkey, False, {}, current is not None)
                op = append_local(conn, table.tid, DELETE | RESOLUTION, 0, rowkey, slots=key_slots(table, rowkey))
            else:
                for pk_column, value in zip(table.pk, parse_rowkey(rowkey)):
                    target.setdefault(pk_column, value)
                write_row(conn, table, rowkey, True, target, current is not None)
                slots = {table.slots[c]: target.get(c) for c in columns}
                mask = table.mask_for(changing)
                kind = (UPDATE if current is not None else INSERT) | RESOLUTION
                op = append_local(conn, table.tid, kind, mask, rowkey, slots=slots)
        conn.execute("INSERT OR IGNORE INTO _sync_resolutions VALUES (?, ?, ?)", [table.tid, rowkey, op])
        rebuild_conflicts(conn, [(table.tid, rowkey)])
        devices = device_ids(conn)
        return op_label(devices[op >> 40], op & SEQ_MASK)
