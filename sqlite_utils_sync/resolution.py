"""Resolving a conflict: a new operation that restores one version (or accepts the row as it
is) and syncs like any other change; every copy that receives it marks the conflict resolved.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

from . import errors
from .capture import SyncedTable, load_tables, muted, table_exists
from .clocks import append_local
from .conflicts import get_conflict, rebuild_conflicts, require_enabled
from .devices import device_ids, parse_op_label
from .errors import SyncError
from .merge import Effect, all_effects, op_effect, row_state
from .oplog import DELETE, INSERT, RESOLUTION, UPDATE, op_device, op_label, op_seq, parse_rowkey, row_actions
from .rows import fetch_row, key_slots, write_row
from .schema import connection
from .writing import writing


def resolve_conflict(
    db: Any, conflict_id: str, keep: str | None = None, authorize: Callable[[dict[str, set[str]]], None] | None = None
) -> str:
    """Resolve a conflict with a new operation that syncs like any other.

    :param keep: an op id (``<device id>:<seq>``) of one of the conflict's versions to restore;
        without it the value currently in the table is accepted
    :param authorize: called before the row is written with ``{table: actions}``, the row
        actions the resolution takes there, as a pushed one would need them (``update-row``,
        plus ``insert-row`` to restore a deleted row or ``delete-row`` to keep a deletion); it
        raises to refuse, and nothing is written
    :returns: the id of the resolution operation
    """
    conn = connection(db)
    try:
        return _resolve(conn, conflict_id, keep, authorize)
    except sqlite3.IntegrityError as ex:
        # Restoring a version can need a UNIQUE value another row holds now.
        raise SyncError(
            errors.CONSTRAINT_FAILED,
            f"Conflict {conflict_id} cannot be resolved that way: {ex} here. Nothing was changed; "
            "change the row that holds that value first, then resolve again",
        )


def _resolve(
    conn: sqlite3.Connection, conflict_id: str, keep: str | None, authorize: Callable[[dict[str, set[str]]], None] | None
) -> str:
    require_enabled(conn)
    # The resolution is a new operation: writing() puts capture in step with the table's
    # columns and settles the clocks that decide what the table holds. It also reads values
    # exactly: a Datasette connection would replace TEXT that is not UTF-8, and the
    # resolution would write the changed value back.
    with writing(conn, applies_rows=True):
        record = get_conflict(conn, conflict_id)
        if record["resolved"]:
            raise SyncError(errors.ALREADY_RESOLVED, f"Conflict {conflict_id} is already resolved (by {record['resolved_by']})")
        table = load_tables(conn)[record["table"]]
        if not table.enabled:
            raise SyncError(errors.NOT_ENABLED, f"Table '{table.name}' is not synced here")
        if not table_exists(conn, table.name):
            raise SyncError(
                errors.TABLE_MISSING,
                f"Table '{table.name}' no longer exists here: conflict {conflict_id} cannot be resolved until it is created again",
            )
        labels = [v["op"] for v in record["versions"]]
        if keep is not None and keep not in labels:
            raise SyncError(
                errors.UNKNOWN_VERSION, f"{keep} is not a version of conflict {conflict_id}; versions: {', '.join(labels)}"
            )
        rowkey = conn.execute("SELECT rowkey FROM _sync_conflicts WHERE id = ?", [conflict_id]).fetchone()[0]
        current = fetch_row(conn, table, rowkey)
        columns = table.current_columns(conn)
        # Columns the resolution writes: the disputed ones while the row stays (so concurrent
        # edits of other columns still merge), the whole row when it comes back or when the
        # dispute was about the row's existence. Disputed columns dropped since leave nothing
        # to write: the resolution only marks the conflict resolved (writing the whole row
        # would undo later edits of its other columns). The table and the logged op get the same.
        disputed = [c for c in record["columns"] if c in columns]
        # The record's columns are those of every clashing pair: a delete among the versions
        # disputes the row's existence even when another pair names columns.
        row_disputed = not record["columns"] or any(v["kind"] in ("delete", "move") for v in record["versions"])
        changing = columns if current is None or row_disputed else disputed
        carried: dict[str, Any] = {}
        if keep is None:
            target = current
        else:
            version = op_effect(conn, table, parse_op_label(conn, keep), rowkey, device_ids(conn))
            target = _restored(conn, table, rowkey, version, current, columns, changing)
            if target is not None and current is not None:
                carried = _dropped_values(table, version, record["columns"], columns)
        if authorize is not None:
            authorize({table.name: row_actions(resolution_kind(target, current))})
        op = _write_resolution(conn, table, rowkey, target, current, columns, changing, carried)
        conn.execute("INSERT OR IGNORE INTO _sync_resolutions VALUES (?, ?, ?)", [table.tid, rowkey, op])
        rebuild_conflicts(conn, [(table.tid, rowkey)])
        return op_label(device_ids(conn)[op_device(op)], op_seq(op))


def resolution_kind(target: dict[str, Any] | None, current: dict[str, Any] | None) -> int:
    """The kind of the operation that makes the row ``target`` from ``current`` (None: no row)."""
    if target is None:
        return DELETE | RESOLUTION
    return (UPDATE if current is not None else INSERT) | RESOLUTION


def _restored(
    conn: sqlite3.Connection,
    table: SyncedTable,
    rowkey: str,
    version: Effect,
    current: dict[str, Any] | None,
    columns: list[str],
    changing: list[str],
) -> dict[str, Any] | None:
    """The row with one version kept: its values in the ``changing`` columns it wrote, the row
    as it is (or as its history implies, when it is gone) elsewhere; None for a delete."""
    if not version.write:
        return None
    if current is None:
        _, implied = row_state(all_effects(conn, table, rowkey))
        names = table.slot_names(columns)
        target = {names[s]: v for s, v in implied.items() if s in names}
    else:
        target = dict(current)
    for name in changing:
        if version.mask >> table.slots[name] & 1:
            target[name] = version.values[table.slots[name]]
    return target


def _dropped_values(table: SyncedTable, version: Effect, disputed: list[str], columns: list[str]) -> dict[str, Any]:
    """The kept version's values of disputed columns dropped here: copies that still have them
    restore them, as they would had the column stayed."""
    return {
        name: version.values[table.slots[name]]
        for name in disputed
        if name not in columns and name in table.slots and version.mask >> table.slots[name] & 1
    }


def _write_resolution(
    conn: sqlite3.Connection,
    table: SyncedTable,
    rowkey: str,
    target: dict[str, Any] | None,
    current: dict[str, Any] | None,
    columns: list[str],
    changing: list[str],
    carried: dict[str, Any],
) -> int:
    """Make the row ``target`` (None: deleted) and log that as a resolution operation, with the
    ``carried`` values of columns this table no longer has."""
    with muted(conn):
        if target is None:
            write_row(conn, table, rowkey, False, {}, current is not None)
            return append_local(conn, table.tid, resolution_kind(target, current), 0, rowkey, slots=key_slots(table, rowkey))
        for pk_column, value in zip(table.pk, parse_rowkey(rowkey)):
            target.setdefault(pk_column, value)
        write_row(conn, table, rowkey, True, target, current is not None)
        slots = {table.slots[c]: target.get(c) for c in columns}
        slots.update((table.slots[c], v) for c, v in carried.items())
        kind = resolution_kind(target, current)
        return append_local(conn, table.tid, kind, table.mask_for([*changing, *carried]), rowkey, slots=slots)
