"""Conflict records: which operations clash on a row, listed and described.

Two operations on the same row *clash* when neither author had seen the other's operation
and they disagree: they set the same column to different values, or one writes the row while
the other deletes it. Identical concurrent edits do not clash, and concurrent edits of
different columns merge.

A conflict record is a connected group of clashing operations on one row. Its id is derived
from the operations alone (``sha256(table, row key, sorted op ids)``), so every copy that
holds the same operations holds the same records. A record is resolved when a resolution
operation (written by :func:`sqlite_utils_sync.resolution.resolve_conflict`) on that row had seen every version in it; a
plain later edit changes the value but not the record. Records are rebuilt from
``_sync_conflict_pairs`` and ``_sync_resolutions`` whenever either changes for a row.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any, Iterable

from . import errors
from .capture import SyncedTable, load_tables
from .devices import device_ids, parse_op_label
from .errors import SyncError
from .oplog import DELETE, KIND_NAMES, json_value, op_device, op_label, op_seq, parse_rowkey
from .merge import KnowledgeCache, op_effect
from .rows import fetch_row
from .schema import connection, is_enabled


def rebuild_conflicts(conn: sqlite3.Connection, rows: Iterable[tuple[int, str]]) -> int:
    """Recompute the conflict records of the given rows; returns how many are unresolved."""
    tables = {t.tid: t for t in load_tables(conn).values()}
    devices = device_ids(conn)
    knowledge = KnowledgeCache(conn)
    unresolved = 0
    for tid, rowkey in rows:
        table = tables[tid]
        resolutions = [
            op_effect(conn, table, op, rowkey, devices)
            for (op,) in conn.execute("SELECT op FROM _sync_resolutions WHERE tid = ? AND rowkey = ?", [tid, rowkey])
        ]
        resolutions.sort(key=lambda e: e.key)
        conn.execute('DELETE FROM _sync_conflicts WHERE "table" = ? AND rowkey = ?', [table.name, rowkey])
        for ops, columns in clash_groups(conn, tid, rowkey):
            versions = sorted(op_effect(conn, table, op, rowkey, devices) for op in ops)
            labels = sorted(op_label(devices[op_device(v.op)], op_seq(v.op)) for v in versions)
            conflict_id = hashlib.sha256("\n".join([table.name, rowkey, *labels]).encode()).hexdigest()[:16]
            resolved_by = None
            for r in resolutions:
                if all(v.op == r.op or knowledge.seen(v, r) for v in versions):
                    resolved_by = op_label(devices[op_device(r.op)], op_seq(r.op))
                    break
            unresolved += resolved_by is None
            conn.execute(
                "INSERT OR REPLACE INTO _sync_conflicts VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    conflict_id,
                    table.name,
                    rowkey,
                    json.dumps([json_value(v) for v in parse_rowkey(rowkey)]),
                    json.dumps(sorted(columns)),
                    json.dumps(labels),
                    resolved_by,
                ],
            )
    return unresolved


def clash_groups(conn: sqlite3.Connection, tid: int, rowkey: str) -> list[tuple[list[int], set[str]]]:
    """The connected groups of clashing operations on a row, each with the columns disputed."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    pairs = conn.execute("SELECT a, b, columns FROM _sync_conflict_pairs WHERE tid = ? AND rowkey = ?", [tid, rowkey]).fetchall()
    for a, b, _ in pairs:
        parent[find(a)] = find(b)
    columns_of: dict[int, set[str]] = {}
    for a, _, columns in pairs:
        columns_of.setdefault(find(a), set()).update(json.loads(columns))
    groups: dict[int, list[int]] = {}
    for op in parent:
        groups.setdefault(find(op), []).append(op)
    return [(ops, columns_of.get(root, set())) for root, ops in groups.items()]


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


def current_row(conn: sqlite3.Connection, table: SyncedTable, rowkey: str) -> dict[str, Any] | None:
    """The row the table holds now under ``rowkey``; None when it holds none, or the table was
    dropped or its key columns renamed outside sync since (it holds no such row either)."""
    if not table.enabled:
        return None
    columns = {row[1] for row in conn.execute("SELECT * FROM pragma_table_xinfo(?)", [table.name])}
    if not set(table.pk) <= columns:
        return None
    return fetch_row(conn, table, rowkey)


def require_enabled(conn: sqlite3.Connection) -> None:
    if not is_enabled(conn):
        raise SyncError(errors.NOT_ENABLED, "This database has no synced tables")


def get_conflict(db: Any, conflict_id: str) -> dict[str, Any]:
    conn = connection(db)
    require_enabled(conn)
    row = conn.execute(
        'SELECT id, "table", rowkey, pk, columns, versions, resolved_by FROM _sync_conflicts WHERE id = ?',
        [conflict_id],
    ).fetchone()
    if row is None:
        raise SyncError(errors.UNKNOWN_CONFLICT, f"No conflict with id {conflict_id}")
    return describe(conn, *row)


def describe(conn, conflict_id, table_name, rowkey, pk, columns, versions, resolved_by) -> dict[str, Any]:
    tables = load_tables(conn)
    table = tables[table_name]
    devices = device_ids(conn)
    names = table.slot_names()
    result_versions = []
    for label in json.loads(versions):
        op = parse_op_label(conn, label)
        effect = op_effect(conn, table, op, rowkey, devices)
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
    current = current_row(conn, table, rowkey)
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
