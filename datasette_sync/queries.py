"""Read-only queries behind the sync pages.

Every function takes a ``sqlite3.Connection`` (Datasette's read connection, which may be
``immutable=1``) and only ever runs ``SELECT``s. Each one copes with a database that has no
sync tables at all. Values come back as raw Python values (``bytes`` included); the views
decide how to render them as HTML or JSON.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import sqlite3
import time
from typing import Any

from sqlite_utils_sync import list_conflicts
from sqlite_utils_sync.capture import load_tables
from sqlite_utils_sync.clocks import clock, max_seq
from sqlite_utils_sync.oplog import (
    DELETE,
    INSERT,
    KIND_CODES,
    KIND_NAMES,
    LOCAL,
    SEQ_BITS,
    TICK,
    UPDATE,
    device_range,
    device_sql,
    is_resolution,
    kind_of,
    kind_sql,
    load_clock,
    make_rowkey,
    mask_slots,
    op_device,
    op_id,
    op_label,
    op_seq,
    parse_rowkey,
    resolution_sql,
    seq_sql,
    slot_column,
)
from sqlite_utils_sync.schema import has_table, is_enabled

# Operation types a visitor can filter on: the four kinds plus conflict resolutions.
OP_TYPES = ["insert", "update", "delete", "tick", "resolution"]


def hlc_time(hlc: int | None) -> str | None:
    """The wall-clock part of a hybrid logical clock value, as ISO 8601 UTC."""
    if hlc is None:
        return None
    milliseconds = hlc >> 10
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(milliseconds // 1000)) + f".{milliseconds % 1000:03d}Z"


def devices(conn: sqlite3.Connection, hidden: frozenset[str] = frozenset()) -> list[dict[str, Any]]:
    """Every device this database knows, local first, with the highest seq held from it and
    when it was first and last seen writing (leaving out operations of ``hidden`` tables:
    their clocks are not for the visitor either)."""
    return device_page(conn, hidden)["devices"]


def device_page(
    conn: sqlite3.Connection, hidden: frozenset[str] = frozenset(), after: str | None = None, size: int | None = None
) -> dict[str, Any]:
    """A page of :func:`devices` (all of them without ``size``) after the device id ``after``:
    ``{"devices", "next"}``. A hub importing from many devices knows thousands, and each one
    costs a query here."""
    if not is_enabled(conn):
        if after:
            raise InvalidArgument(f"Invalid next token: {after!r} is not a device id")
        return {"devices": [], "next": None}
    where, params = "", []
    if after:
        row = conn.execute("SELECT idx FROM _sync_devices WHERE device_id = ?", [after]).fetchone()
        if row is None:
            raise InvalidArgument(f"Invalid next token: {after!r} is not a device id")
        where, params = "WHERE idx < ?", [row[0]]
    limit = "" if size is None else f" LIMIT {int(size) + 1}"
    listed = conn.execute(
        f"SELECT idx, device_id FROM _sync_devices {where} ORDER BY idx DESC{limit}", params
    ).fetchall()
    shown = listed if size is None else listed[:size]
    tids = [t.tid for name, t in load_tables(conn).items() if name in hidden]
    where = f" AND tid NOT IN ({', '.join('?' * len(tids))})" if tids else ""
    found = []
    for idx, device_id in shown:
        seq = max_seq(conn, idx)
        # The range scan on the primary key is cheap (with hidden tables, it reads each op's
        # table); the sentinel (seq 0) is not an operation.
        first, last = conn.execute(
            f"SELECT min(hlc), max(hlc) FROM _sync_ops WHERE op BETWEEN ? AND ?{where}", [*device_range(idx), *tids]
        ).fetchone()
        found.append(
            {
                "device_id": device_id,
                "local": idx == LOCAL,
                "seq": seq,
                "first_seen": hlc_time(first),
                "last_seen": hlc_time(last),
            }
        )
    more = size is not None and len(listed) > size
    return {"devices": found, "next": found[-1]["device_id"] if more else None}


def peers(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Peers whose bundles were imported here, with the clock they acknowledged."""
    return peer_page(conn)["peers"]


def peer_page(
    conn: sqlite3.Connection, after: str | None = None, size: int | None = None, devices: list[str] | None = None
) -> dict[str, Any]:
    """A page of :func:`peers` (all of them without ``size``), most recently seen first, after
    the peer ``after``: ``{"peers", "next", "total"}``. With ``devices``, each peer's clock
    holds only those devices: every device a hub imports from is a peer too, so full clocks
    of every peer grow with the square of the devices."""
    if not has_table(conn, "_sync_peers"):
        if after:
            raise InvalidArgument(f"Invalid peers token: {after!r} is not a peer")
        return {"peers": [], "next": None, "total": 0}
    where, params = "", []
    if after:
        row = conn.execute("SELECT last_seen FROM _sync_peers WHERE device_id = ?", [after]).fetchone()
        if row is None:
            raise InvalidArgument(f"Invalid peers token: {after!r} is not a peer")
        where, params = "WHERE last_seen < ? OR (last_seen = ? AND device_id > ?)", [row[0], row[0], after]
    limit = "" if size is None else f" LIMIT {int(size) + 1}"
    # The clocks are read once the page is chosen: sorting every peer's row with its clock
    # (as long as the hub's) would copy them all.
    rows = conn.execute(
        f"SELECT device_id, last_seen FROM _sync_peers {where} ORDER BY last_seen DESC, device_id{limit}", params
    ).fetchall()
    shown = rows if size is None else rows[:size]
    found = []
    for device_id, last_seen in shown:
        held = conn.execute("SELECT clock FROM _sync_peers WHERE device_id = ?", [device_id]).fetchone()[0]
        acknowledged = load_clock(held)
        if devices is not None:
            acknowledged = {device: acknowledged[device] for device in devices if device in acknowledged}
        found.append({"device_id": device_id, "clock": acknowledged, "last_seen": last_seen})
    more = size is not None and len(rows) > size
    total = conn.execute("SELECT count(*) FROM _sync_peers").fetchone()[0]
    return {"peers": found, "next": found[-1]["device_id"] if more else None, "total": total}


def device_owners(conn: sqlite3.Connection) -> dict[str, str]:
    """The actor owning each device that has one (the first to push its operations)."""
    if not has_table(conn, "_sync_device_actors"):
        return {}
    return dict(conn.execute("SELECT device_id, actor FROM _sync_device_actors"))


def activity_span(conn: sqlite3.Connection, hidden: frozenset[str] = frozenset()) -> tuple[int, int] | None:
    """Wall-clock milliseconds of the first and last edit (insert, update or delete) the
    activity chart shows, or None when there is none."""
    if not is_enabled(conn):
        return None
    where, params = activity_filter(conn, hidden)
    low, high = conn.execute(f"SELECT min(hlc), max(hlc) FROM _sync_ops WHERE {where}", params).fetchone()
    return None if low is None else (low >> 10, high >> 10)


def activity(
    conn: sqlite3.Connection, origin: int, step: int, hidden: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Edits per device per slice of ``step`` milliseconds from ``origin``, the edits of each
    device that are versions of an unresolved conflict, and the ticks the chart leaves out.

    ``{"rows": [{"device_id", "local", "counts": {slice: n}, "conflicts": {slice: n}}], "ticks": n}``,
    local device first.
    """
    where, params = activity_filter(conn, hidden)
    counts: dict[int, dict[int, int]] = {}
    for idx, bucket, count in conn.execute(
        f"SELECT {device_sql('op')}, ((hlc >> 10) - ?) / ?, count(*) FROM _sync_ops WHERE {where} GROUP BY 1, 2",
        [origin, step, *params],
    ):
        counts.setdefault(idx, {})[bucket] = count
    in_conflict: dict[int, dict[int, int]] = {}
    for idx, hlc in conflict_versions(conn, hidden):
        bucket = ((hlc >> 10) - origin) // step
        in_conflict.setdefault(idx, {}).setdefault(bucket, 0)
        in_conflict[idx][bucket] += 1
    names = dict(conn.execute("SELECT idx, device_id FROM _sync_devices"))
    rows = [
        {
            "device_id": names.get(idx, str(idx)),
            "local": idx == LOCAL,
            "counts": counts[idx],
            "conflicts": in_conflict.get(idx, {}),
        }
        for idx in sorted(counts, reverse=True)
    ]
    ticks = conn.execute(
        f"SELECT count(*) FROM _sync_ops WHERE {seq_sql('op')} != 0 AND {kind_sql('kind')} = {TICK}"
    ).fetchone()[0]
    return {"rows": rows, "ticks": ticks}


def activity_filter(conn: sqlite3.Connection, hidden: frozenset[str]) -> tuple[str, list[Any]]:
    """WHERE for the edits the chart counts: no ticks, no sentinel, no hidden table."""
    where = f"{seq_sql('op')} != 0 AND {kind_sql('kind')} != {TICK}"
    tables = load_tables(conn)
    tids = [t.tid for name, t in tables.items() if name in hidden]
    if tids:
        where += f" AND tid NOT IN ({', '.join('?' * len(tids))})"
    return where, tids


def conflict_versions(conn: sqlite3.Connection, hidden: frozenset[str]) -> list[tuple[int, int]]:
    """(device index, hlc) of every version of an unresolved conflict on a visible table."""
    if not has_table(conn, "_sync_conflicts"):
        return []
    marks = ", ".join("?" * len(hidden))
    sql = 'SELECT versions FROM _sync_conflicts WHERE resolved_by IS NULL'
    if hidden:
        sql += f' AND "table" NOT IN ({marks})'
    indexes = {device_id: idx for idx, device_id in conn.execute("SELECT idx, device_id FROM _sync_devices")}
    found = []
    for (versions,) in conn.execute(sql, sorted(hidden)):
        for label in json.loads(versions):
            device_id, _, seq = label.rpartition(":")
            if device_id not in indexes:
                continue
            op = op_id(indexes[device_id], int(seq))
            row = conn.execute("SELECT hlc FROM _sync_ops WHERE op = ?", [op]).fetchone()
            if row:
                found.append((indexes[device_id], row[0]))
    return found


# The operation log ----------------------------------------------------------------------


class InvalidArgument(ValueError):
    """A query string argument that cannot mean anything: the page answers 400 with it."""


def parse_pk_filter(conn: sqlite3.Connection, text: str) -> list[str]:
    """Row keys a visitor's ``pk`` filter can mean.

    A JSON array (what the row history link sends) is exact. Anything else is read like a
    Datasette row path: comma-separated values, each either a number or a string, since a
    visitor typing ``7`` cannot say which one the column holds.
    """
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, list) and value:
        candidates = [[decode_json_value(v) for v in value]]
    else:
        choices = []
        for part in text.split(","):
            options: list[Any] = [part]
            # No SQLite integer has more than 20 characters; longer digit runs stay text
            # (int() refuses very long ones).
            if re.fullmatch(r"-?\d{1,20}", part.strip()):
                options.insert(0, int(part))
            elif re.fullmatch(r"-?\d+\.\d*(e-?\d+)?", part.strip()):
                options.insert(0, float(part))
            choices.append(options)
        candidates = [list(values) for values in itertools.islice(itertools.product(*choices), 64)]
    keys = []
    for values in candidates:
        try:
            keys.append(make_rowkey(conn, values))
        except (sqlite3.Error, OverflowError):
            pass  # not a value SQLite can hold (a nested list, a huge number): matches no row
    return keys


def decode_json_value(value: Any) -> Any:
    """Undo ``json_value`` for BLOBs so a JSON pk filter can name a BLOB key."""
    if isinstance(value, dict) and value.get("$base64"):
        encoded = value.get("encoded", "")
        try:
            return base64.b64decode(encoded, validate=True)
        except (TypeError, ValueError):
            raise InvalidArgument(
                f'pk: "encoded" of a {{"$base64": true}} value must be base64 text, got {json.dumps(encoded)}'
            )
    if isinstance(value, str) and not is_unicode(value):
        # JSON can escape a lone surrogate, which no SQLite text value can hold.
        raise InvalidArgument("pk: a string holds a lone surrogate escape (like \\ud800), not valid Unicode")
    return value


def is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Both parts are SQLite integers (hlc and op id): anything larger cannot be a position.
MAX_INTEGER = 2**63 - 1


def parse_next(token: str | None) -> tuple[int, int] | None:
    """The operations page token: ``<hlc>,<op>`` of the last operation shown."""
    if not token:
        return None
    match = re.fullmatch(r"(\d+),(\d+)", token)
    if not match or max(int(match.group(1)), int(match.group(2))) > MAX_INTEGER:
        raise InvalidArgument(f"Invalid next token: {token!r}")
    return int(match.group(1)), int(match.group(2))


def operations(
    conn: sqlite3.Connection,
    table: str | None = None,
    device: str | None = None,
    pk: str | None = None,
    op_type: str | None = None,
    after: tuple[int, int] | None = None,
    size: int = 50,
    hidden: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """A page of the operation log, newest first (by hybrid logical clock, then op).

    ``op`` alone sorts by device, not by time, so pages are keyed on ``(hlc, op)`` of the
    last operation shown (``after``, from :func:`parse_next`). Operations on ``hidden``
    tables are left out.
    """
    empty = {"operations": [], "next": None}
    if not is_enabled(conn):
        return empty
    tables = load_tables(conn)
    filters = operation_filters(conn, tables, table, device, pk, op_type, hidden)
    if filters is None:
        return empty
    where, params = filters
    if after is not None:
        where.append("(hlc < ? OR (hlc = ? AND op < ?))")
        params += [after[0], after[0], after[1]]
    cursor = conn.execute(
        f"SELECT * FROM _sync_ops WHERE {' AND '.join(where)} ORDER BY hlc DESC, op DESC LIMIT ?",
        params + [size + 1],
    )
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    devices_by_idx = dict(conn.execute("SELECT idx, device_id FROM _sync_devices"))
    by_tid = {t.tid: t for t in tables.values()}
    page = [describe_op(record, by_tid, devices_by_idx) for record in rows[:size]]
    token = None
    if len(rows) > size:
        last = rows[size - 1]
        token = f"{last['hlc']},{last['op']}"
    return {"operations": page, "next": token}


def operation_filters(
    conn: sqlite3.Connection,
    tables: dict,
    table: str | None,
    device: str | None,
    pk: str | None,
    op_type: str | None,
    hidden: frozenset[str],
) -> tuple[list[str], list[Any]] | None:
    """The WHERE terms and parameters of :func:`operations` filters (None: nothing can match)."""
    where = [f"{seq_sql('op')} != 0"]  # not the local sentinel
    params: list[Any] = []
    hidden_tids = [t.tid for name, t in tables.items() if name in hidden]
    if hidden_tids:
        where.append(f"tid NOT IN ({', '.join('?' * len(hidden_tids))})")
        params += hidden_tids
    if table is not None:
        if table not in tables or table in hidden:
            return None
        where.append("tid = ?")
        params.append(tables[table].tid)
    if device is not None:
        row = conn.execute("SELECT idx FROM _sync_devices WHERE device_id = ?", [device]).fetchone()
        if row is None:
            return None
        # A range on the primary key: one device's operations.
        where.append("op BETWEEN ? AND ?")
        params += device_range(row[0])
    if pk is not None:
        keys = parse_pk_filter(conn, pk)
        if not keys:
            return None
        marks = ", ".join("?" * len(keys))
        where.append(f"tid != 0 AND (rowkey IN ({marks}) OR newkey IN ({marks}))")
        params += keys + keys
    if op_type == "resolution":
        where.append(resolution_sql("kind"))
    elif op_type in KIND_CODES:
        where.append(f"{kind_sql('kind')} = ?")
        params.append(KIND_CODES[op_type])
    return where, params


def describe_op(record: dict[str, Any], by_tid: dict, devices_by_idx: dict[int, str]) -> dict[str, Any]:
    """One ``_sync_ops`` row in readable form: names instead of slots and masks."""
    idx, seq = op_device(record["op"]), op_seq(record["op"])
    device_id = devices_by_idx.get(idx, str(idx))
    kind = kind_of(record["kind"])
    described: dict[str, Any] = {
        "op": op_label(device_id, seq),
        "device_id": device_id,
        "seq": seq,
        "hlc": record["hlc"],
        "time": hlc_time(record["hlc"]),
        "type": KIND_NAMES[kind],
        "resolution": is_resolution(record["kind"]),
        "table": None,
        "pk": None,
        "new_pk": None,
        "values": {},
    }
    if kind == TICK:
        # A knowledge epoch: its row key holds the clock the device had seen.
        try:
            described["clock"] = load_clock(record["rowkey"])
        except ValueError:
            described["clock"] = {}
        return described
    table = by_tid.get(record["tid"])
    if table is None:
        return described
    described["table"] = table.name
    described["pk"] = safe_rowkey(record["rowkey"])
    if record["newkey"] is not None:
        described["new_pk"] = safe_rowkey(record["newkey"])
    if kind in (INSERT, UPDATE):
        mask = record["mask"] or 0
        written = set(mask_slots(mask))
        described["values"] = {
            name: record.get(slot_column(slot)) for slot, name in table.slot_names().items() if slot in written
        }
    elif kind == DELETE:
        described["values"] = {}
    return described


def safe_rowkey(rowkey: str | None) -> list[Any] | None:
    if rowkey is None:
        return None
    try:
        return parse_rowkey(rowkey)
    except ValueError:
        return [rowkey]


def table_pk(conn: sqlite3.Connection, table: str) -> list[str] | None:
    """The primary key columns of a synced table, or None when it is not synced."""
    if not is_enabled(conn):
        return None
    synced = load_tables(conn, enabled_only=True).get(table)
    return synced.pk if synced else None


def synced_tables(conn: sqlite3.Connection) -> list[str]:
    return sorted(load_tables(conn, enabled_only=True)) if is_enabled(conn) else []


def logged_tables(conn: sqlite3.Connection) -> list[str]:
    """Every table with operations in the log, synced here or only relayed."""
    return sorted(load_tables(conn)) if is_enabled(conn) else []


def without_tables(status: dict[str, Any], conn: sqlite3.Connection, hidden: frozenset[str]) -> dict[str, Any]:
    """``sync_status`` as seen by someone who may not view the ``hidden`` tables."""
    if not hidden or not status["enabled"]:
        return status
    reasons = [info["warning"] for name, info in status["tables"].items() if name in hidden and info["warning"]]
    marks = ", ".join("?" * len(hidden))
    return {
        **status,
        "tables": {name: info for name, info in status["tables"].items() if name not in hidden},
        "unresolved_conflicts": conn.execute(
            f'SELECT count(*) FROM _sync_conflicts WHERE resolved_by IS NULL AND "table" NOT IN ({marks})',
            sorted(hidden),
        ).fetchone()[0],
        "warnings": [w for w in status["warnings"] if not any(w.startswith(r) for r in reasons)],
    }


# Conflicts and imports ------------------------------------------------------------------


def conflicts(
    conn: sqlite3.Connection,
    include_resolved: bool = False,
    table: str | None = None,
    after: str | None = None,
    size: int = 20,
    hidden: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """A page of conflict records (the objects of ``list_conflicts``) after the conflict id
    ``after``, leaving out conflicts on ``hidden`` tables."""
    if after and conflict_table(conn, after) in (None, *hidden):
        raise InvalidArgument(f"Invalid next token: {after!r} is not a conflict id")
    found = list_conflicts(
        conn, include_resolved=include_resolved, table=table, after=after, limit=size + 1, hidden_tables=hidden or ()
    )
    return {"conflicts": found[:size], "next": found[size - 1]["id"] if len(found) > size else None}


def conflict_table(conn: sqlite3.Connection, conflict_id: str) -> str | None:
    """The table of a conflict record, or None when there is no such conflict."""
    if not has_table(conn, "_sync_conflicts"):
        return None
    row = conn.execute('SELECT "table" FROM _sync_conflicts WHERE id = ?', [conflict_id]).fetchone()
    return row[0] if row else None


def conflict_keys(conn: sqlite3.Connection, conflict_ids: list[str]) -> dict[str, list[Any]]:
    """The row key of each conflict as SQLite holds it: a record's ``pk`` is its JSON form,
    where a REAL ±inf and the text ``'inf'`` look alike."""
    if not conflict_ids or not has_table(conn, "_sync_conflicts"):
        return {}
    marks = ", ".join("?" * len(conflict_ids))
    rows = conn.execute(f"SELECT id, rowkey FROM _sync_conflicts WHERE id IN ({marks})", conflict_ids)
    return {conflict_id: safe_rowkey(rowkey) for conflict_id, rowkey in rows}


def imports(
    conn: sqlite3.Connection, after: str | None = None, size: int = 50, hidden: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A page of the import log, newest first, after the bundle id ``after``. With ``hidden``
    tables, no conflict count: each import's counts every table's conflicts."""
    logged = has_table(conn, "_sync_imports")
    if after and not (logged and conn.execute("SELECT 1 FROM _sync_imports WHERE bundle_id = ?", [after]).fetchone()):
        raise InvalidArgument(f"Invalid next token: {after!r} is not a bundle id")
    if not logged:
        return {"imports": [], "next": None}
    where, params = "", []
    if after:
        where = (
            "WHERE (imported_at, bundle_id) < (SELECT imported_at, bundle_id FROM _sync_imports WHERE bundle_id = ?)"
        )
        params.append(after)
    cursor = conn.execute(
        f"SELECT bundle_id, source_device_id, imported_at, total_operations, applied, conflicts, duplicates, actor "
        f"FROM _sync_imports {where} ORDER BY imported_at DESC, bundle_id DESC LIMIT ?",
        params + [size + 1],
    )
    names = [d[0] for d in cursor.description]
    rows = [dict(zip(names, row)) for row in cursor.fetchall()]
    for row in rows if hidden else ():
        row["conflicts"] = None
    return {"imports": rows[:size], "next": rows[size - 1]["bundle_id"] if len(rows) > size else None}


# Panels on Datasette's own pages --------------------------------------------------------


def unresolved_counts(conn: sqlite3.Connection, hidden: frozenset[str] = frozenset()) -> dict[str, int]:
    """Unresolved conflicts per table, leaving out ``hidden`` tables."""
    if not has_table(conn, "_sync_conflicts"):
        return {}
    return {
        table: count
        for table, count in conn.execute(
            'SELECT "table", count(*) FROM _sync_conflicts WHERE resolved_by IS NULL GROUP BY 1 ORDER BY 1'
        )
        if table not in hidden
    }


def row_conflict_ids(conn: sqlite3.Connection, table: str, values: list[Any]) -> list[str]:
    """The unresolved conflicts on the row of ``table`` whose primary key holds ``values``."""
    if not has_table(conn, "_sync_conflicts"):
        return []
    rowkey = make_rowkey(conn, values)
    return [
        conflict_id
        for (conflict_id,) in conn.execute(
            'SELECT id FROM _sync_conflicts WHERE "table" = ? AND rowkey = ? AND resolved_by IS NULL ORDER BY id',
            [table, rowkey],
        )
    ]


def database_summary(conn: sqlite3.Connection, hidden: frozenset[str] = frozenset()) -> dict[str, Any] | None:
    """What the database page's panel says: visible synced tables, operations (the count
    ``sync_status`` gives, without its per-table scan and trigger checks), devices with
    operations, unresolved conflicts per visible table. None when sync is not enabled."""
    if not is_enabled(conn):
        return None
    total = conn.execute("SELECT count(*) FROM _sync_ops").fetchone()[0]
    sentinels = conn.execute(
        f"SELECT count(*) FROM _sync_ops WHERE op IN (SELECT idx << {SEQ_BITS} FROM _sync_devices)"
    ).fetchone()[0]
    return {
        "tables": [name for name in synced_tables(conn) if name not in hidden],
        "operations": total - sentinels,
        "devices": len(clock(conn)),
        "conflicts": unresolved_counts(conn, hidden),
    }
