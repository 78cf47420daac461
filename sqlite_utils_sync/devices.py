"""Device identities: this database's own id, the devices it holds operations of, and a new
id for a copied file (:func:`new_device`), with recovery when two files wrote under one id;
device names (:func:`resolve_device` turns a name into an id) and retired devices.

The ownership of devices on a hub (which actor may push a device's new operations) is kept in
``_sync_device_actors`` and checked by the importer.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any, Callable

from .clocks import append_tick, clock, knowledge_at, max_seq, record_knowledge, restart_settling
from .errors import AMBIGUOUS_DEVICE, INVALID_ARGUMENT, TOO_MANY_DEVICES, UNKNOWN_DEVICE, SyncError, shorten
from .oplog import LOCAL, TICK, device_range, encode_clock, is_device_id, load_clock, op_id, op_seq
from .schema import has_table, log_rewrite, migrate, quote_identifier

# Tables that refer to operations by op id, and their op id columns: renumbered with the log.
OP_REFERENCES = (("_sync_conflict_pairs", ["a", "b"]), ("_sync_resolutions", ["op"]), ("_sync_unapplied", ["op"]))


def random_device_id() -> str:
    return os.urandom(16).hex()


def ensure_log(conn: sqlite3.Connection) -> None:
    """Create the sync tables (with a device identity) if missing, else bring them up to date.
    Call inside a transaction."""
    if migrate(conn, create=True) == 0:
        new_local_identity(conn)


def local_device_id(conn: sqlite3.Connection) -> str:
    return conn.execute("SELECT device_id FROM _sync_devices WHERE idx = ?", [LOCAL]).fetchone()[0]


def device_ids(conn: sqlite3.Connection) -> dict[int, str]:
    return dict(conn.execute("SELECT idx, device_id FROM _sync_devices"))


def device_index(conn: sqlite3.Connection, device_id: str, create: bool = True) -> int | None:
    row = conn.execute("SELECT idx FROM _sync_devices WHERE device_id = ?", [device_id]).fetchone()
    if row:
        return row[0]
    if not create:
        return None
    next_idx = next_device_index(conn)
    conn.execute("INSERT INTO _sync_devices (idx, device_id) VALUES (?, ?)", [next_idx, device_id])
    return next_idx


def next_device_index(conn: sqlite3.Connection) -> int:
    idx = conn.execute("SELECT ifnull(max(idx), 0) + 1 FROM _sync_devices WHERE idx < ?", [LOCAL]).fetchone()[0]
    if idx >= LOCAL:
        raise SyncError(
            TOO_MANY_DEVICES,
            f"This database has numbered {LOCAL - 1:,} devices, as many as it can: it cannot take operations of another one",
        )
    return idx


def parse_op_label(conn: sqlite3.Connection, label: str) -> int | None:
    """The op id of a public operation id ``<device id hex>:<seq>`` (None: unknown here)."""
    device_id, _, seq = label.partition(":")
    if not seq.isdigit():
        return None
    idx = device_index(conn, device_id, create=False)
    return None if idx is None else op_id(idx, int(seq))


def new_local_identity(conn: sqlite3.Connection) -> str:
    """Give the local device a fresh random id, keeping older local ops under the old id."""
    device_id = random_device_id()
    conn.execute("INSERT OR REPLACE INTO _sync_devices (idx, device_id) VALUES (?, ?)", [LOCAL, device_id])
    # The sentinel keeps the local range non-empty so rowid allocation stays inside it; its hlc,
    # above every clock held (a copy's history included), is where the new device's clocks start.
    floor = conn.execute("SELECT max(hlc) FROM _sync_ops").fetchone()[0] or 0
    conn.execute(
        "INSERT INTO _sync_ops (op, hlc, tid, kind) VALUES (?, ?, 0, ?)",
        [op_id(LOCAL, 0), floor + 1, TICK],
    )
    known = clock(conn)
    if known:
        # A copy starts out knowing everything the original had: say so in a tick so peers
        # order the copy's edits after those.
        append_tick(conn, known)
    return device_id


def shared_through(conn: sqlite3.Connection) -> int:
    """The highest seq of the local device that a peer has acknowledged holding as it is here.

    Peers' acknowledgements are the clocks recorded in ``_sync_peers`` by imports; for the
    local device an import only records what it checked against its own copy (an anchor or
    the operations it carried), so a peer that holds another database's operations under
    this id never counts.
    """
    local = local_device_id(conn)
    best = 0
    for (text,) in conn.execute("SELECT clock FROM _sync_peers"):
        try:
            seq = load_clock(text).get(local, 0)
        except (ValueError, AttributeError):
            continue
        if isinstance(seq, int):
            best = max(best, seq)
    return min(best, max_seq(conn, LOCAL))


def new_device(conn: sqlite3.Connection, recover: bool = False) -> str:
    """Give this database a new device id; returns it. Call inside
    :func:`~sqlite_utils_sync.writing.writing` (the operations moved keep their clocks, so
    those must be settled) with capture muted.

    Without ``recover`` (a copy made a moment ago, before it was edited): every operation
    written so far stays under the old id, which the original keeps using, and only new
    local operations get the new id.

    With ``recover`` (after ``device_id_clash``: another database holds different operations
    under this id, because the file was copied and both were edited, or because someone
    pushed operations under this id): the rule is that an operation stays under the old id
    only when a peer has acknowledged holding it exactly as it is here
    (:func:`shared_through`); every later one moves to the new id, in order, with its clock,
    values and knowledge unchanged, after a knowledge tick saying the new device had seen the
    old id up to that point. So this database no longer holds any operation under the old id
    that could differ from another database's, and no edit is lost: peers order the moved
    edits by their original clocks, as they would have. An operation that had already reached
    some peer unacknowledged (relayed, or the other copy's shared prefix) then arrives there
    twice, under both ids, with the same clock and values: rows come out the same, but where
    a later edit elsewhere meets the moved copy it can show as a conflict (sync-resolve
    settles it).
    """
    if not recover and never_left(conn):
        return replace_local_id(conn)
    new_id = move_to_new_id(conn, recover)
    conn.execute("INSERT OR IGNORE INTO _sync_fresh_ids VALUES (?)", [new_id])
    return new_id


def move_to_new_id(conn: sqlite3.Connection, recover: bool) -> str:
    old_id = local_device_id(conn)
    old_idx = next_device_index(conn)
    keep = shared_through(conn) if recover else max_seq(conn, LOCAL)
    start = knowledge_at(conn, LOCAL, keep + 1)
    if keep:
        start[old_id] = keep
    moved_hlc = conn.execute("SELECT min(hlc) FROM _sync_ops WHERE op > ?", [op_id(LOCAL, keep)]).fetchone()[0]
    remap = local_remap(old_idx, keep)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(_sync_ops)")]
    remap_rows(conn, "_sync_ops", columns, ["op"], remap, delete_from=op_id(LOCAL, 0))
    for table, op_columns in OP_REFERENCES:
        remap_rows(conn, table, [row[1] for row in conn.execute(f"PRAGMA table_info({table})")], op_columns, remap)
    conn.execute("DELETE FROM _sync_knowledge WHERE device = ? AND from_seq > ?", [LOCAL, keep + 1])
    conn.execute("UPDATE _sync_knowledge SET device = ? WHERE device = ?", [old_idx, LOCAL])
    conn.execute("UPDATE _sync_devices SET device_id = ? WHERE idx = ?", [f"moving-{old_id}", LOCAL])
    conn.execute("INSERT INTO _sync_devices (idx, device_id) VALUES (?, ?)", [old_idx, old_id])
    restart_settling(conn)
    if moved_hlc is None:
        return new_local_identity(conn)
    return restart_moved(conn, start, old_id, keep, moved_hlc)


def local_remap(old_idx: int, keep: int) -> Callable[[str], str]:
    """SQL renumbering an op id column: local seq s <= ``keep`` goes to the old id's index
    ``old_idx``; s > keep becomes the new id's s - keep + 1 (its seq 1 is the knowledge tick
    that starts it); other devices' ops stay."""
    shift = op_id(old_idx, 0) - op_id(LOCAL, 0)
    first, last_kept = op_id(LOCAL, 1), op_id(LOCAL, keep)

    def remap(column: str) -> str:
        return (
            f"CASE WHEN {column} < {first} THEN {column} WHEN {column} <= {last_kept} THEN {column} + {shift} "
            f"ELSE {column} - {keep} + 1 END"
        )

    return remap


def remap_rows(conn, table: str, columns: list[str], op_columns: list[str], remap, delete_from: int | None = None) -> None:
    """Renumber the local operations ``table`` refers to (through a copy: renumbering in
    place could collide with a row not renumbered yet)."""
    low = op_id(LOCAL, 1) if delete_from is None else delete_from
    where = " OR ".join(f"{c} >= {low}" for c in op_columns)
    conn.execute("DROP TABLE IF EXISTS temp._sync_remap")
    conn.execute(f"CREATE TEMP TABLE _sync_remap AS SELECT * FROM {table} WHERE {where}")
    with log_rewrite(conn):
        conn.execute(f"DELETE FROM {table} WHERE {where}")
    names = ", ".join(quote_identifier(c) for c in columns)
    values = ", ".join(remap(c) if c in op_columns else quote_identifier(c) for c in columns)
    # The sentinel (seq 0) is made again for the new id.
    skip = f" WHERE op >= {op_id(LOCAL, 1)} OR op < {op_id(LOCAL, 0)}" if delete_from is not None else ""
    conn.execute(f"INSERT INTO {table} ({names}) SELECT {values} FROM temp._sync_remap{skip}")
    conn.execute("DROP TABLE temp._sync_remap")


def restart_moved(conn: sqlite3.Connection, start: dict[str, int], old_id: str, keep: int, moved_hlc: int) -> str:
    """Finish a recovery: the new id, its sentinel and starting tick at the first moved
    operation's clock (so no moved clock is raised), the moved ticks' knowledge extended to
    the old id's kept operations, and a closing tick above every clock held."""
    device_id = random_device_id()
    conn.execute("UPDATE _sync_devices SET device_id = ? WHERE idx = ?", [device_id, LOCAL])
    conn.executemany(
        "INSERT INTO _sync_ops (op, hlc, tid, kind, rowkey) VALUES (?, ?, 0, ?, ?)",
        [(op_id(LOCAL, 0), moved_hlc, TICK, None), (op_id(LOCAL, 1), moved_hlc, TICK, encode_clock(start))],
    )
    ticks = conn.execute(
        "SELECT op, rowkey FROM _sync_ops WHERE op > ? AND kind = ?", [op_id(LOCAL, 1), TICK]
    ).fetchall()
    with log_rewrite(conn):
        for op, clock_text in ticks:
            known = load_clock(clock_text)
            if keep:
                known[old_id] = max(known.get(old_id, 0), keep)
            conn.execute("UPDATE _sync_ops SET rowkey = ? WHERE op = ?", [encode_clock(known), op])
    for op in [op_id(LOCAL, 1), *(op for op, _ in ticks)]:
        (text,) = conn.execute("SELECT rowkey FROM _sync_ops WHERE op = ?", [op]).fetchone()
        record_knowledge(conn, LOCAL, op_seq(op) + 1, text)
    (floor,) = conn.execute("SELECT max(hlc) FROM _sync_ops").fetchone()
    append_tick(conn, {k: v for k, v in clock(conn).items() if k != device_id}, floor=floor)
    return device_id


# Names -----------------------------------------------------------------------------------

MAX_NAME_CHARS = 64


def name_problem(name: Any) -> str | None:
    """What is wrong with a device name (from a user or a bundle), or None."""
    if not isinstance(name, str) or not name.strip():
        return "a device name must be non-empty text"
    if len(name) > MAX_NAME_CHARS:
        return f"a device name must be at most {MAX_NAME_CHARS} characters"
    if name != name.strip() or any(not c.isprintable() for c in name):
        return "a device name must be printable text without leading or trailing spaces"
    if is_device_id(name):
        return "a device name must not look like a device id (32 hex digits)"
    return None


def device_names(conn: sqlite3.Connection) -> dict[str, str]:
    """``{device id: name}`` of every named device (empty before sync or names exist)."""
    if not has_table(conn, "_sync_device_names"):
        return {}
    return {device_id: name for device_id, name in conn.execute("SELECT device_id, name FROM _sync_device_names")}


def name_records(conn: sqlite3.Connection) -> dict[str, list]:
    """``{device id: [name, clock]}``: what a bundle carries so every copy shows the names."""
    if not has_table(conn, "_sync_device_names"):
        return {}
    return {d: [name, hlc] for d, name, hlc in conn.execute("SELECT device_id, name, hlc FROM _sync_device_names")}


def set_local_name(conn: sqlite3.Connection, name: str) -> None:
    """Name this database's device: a record stamped with its next clock, so that it replaces
    every earlier one on every copy. Call inside :func:`~sqlite_utils_sync.writing.writing`."""
    problem = name_problem(name)
    if problem:
        raise SyncError(INVALID_ARGUMENT, f"{problem}, got {shorten(name)}")
    device_id = local_device_id(conn)
    old = conn.execute("SELECT hlc FROM _sync_device_names WHERE device_id = ?", [device_id]).fetchone()
    hlc = max(announce(conn), old[0] + 1 if old else 0)
    conn.execute("INSERT OR REPLACE INTO _sync_device_names VALUES (?, ?, ?)", [device_id, name, hlc])


def announce(conn: sqlite3.Connection) -> int:
    """Append a knowledge tick, so that the next sync and every ``--for`` export has something
    new of this device to send, and with it the header's device records; returns its clock."""
    local = local_device_id(conn)
    op = append_tick(conn, {d: seq for d, seq in clock(conn).items() if d != local})
    return conn.execute("SELECT hlc FROM _sync_ops WHERE op = ?", [op]).fetchone()[0]


def merge_names(conn: sqlite3.Connection, records: dict[str, list], only: set[str] | None = None) -> None:
    """Take the newer of each device's name records (the higher clock; the name breaks a tie).

    :param only: the devices whose records may be taken (None: all)
    """
    held = name_records(conn)
    for device_id, (name, hlc) in records.items():
        if only is not None and device_id not in only:
            continue
        if device_id not in held or (hlc, name) > (held[device_id][1], held[device_id][0]):
            conn.execute("INSERT OR REPLACE INTO _sync_device_names VALUES (?, ?, ?)", [device_id, name, hlc])


def label(device_id: str | None, names: dict[str, str]) -> str:
    """``laptop (19cecc3d)`` for a named device, ``19cecc3d`` for the others."""
    short = (device_id or "")[:8]
    name = names.get(device_id or "")
    return f"{name} ({short})" if name else short


def describe_device(conn: sqlite3.Connection, device_id: str) -> str:
    """A device for a message: ``laptop (<its whole id>)``, or the id alone."""
    name = device_names(conn).get(device_id)
    return f"{name} ({device_id})" if name else device_id


def resolve_device(conn: sqlite3.Connection, text: str) -> str:
    """The device id ``text`` means: a device id, a device's name, or the start (8 hex digits
    or more) of one known device's id. An ambiguous or unknown name is refused, listing ids."""
    if is_device_id(text):
        return text
    names = device_names(conn)
    named = sorted(d for d, name in names.items() if name == text)
    if len(named) == 1:
        return named[0]
    if len(named) > 1:
        raise SyncError(
            AMBIGUOUS_DEVICE,
            f"Device name {shorten(text)} is ambiguous: it names {', '.join(named)}; use the device id",
        )
    known = list(device_ids(conn).values()) if has_table(conn, "_sync_devices") else []
    lowered = text.lower()
    if len(text) >= 8 and all(c in "0123456789abcdef" for c in lowered):
        matches = sorted(d for d in known if d.startswith(lowered))
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise SyncError(AMBIGUOUS_DEVICE, f"{text} starts several device ids: {', '.join(matches)}")
    shown = ", ".join(label(d, names) for d in sorted(known, key=lambda d: (names.get(d, "~"), d))[:10])
    raise SyncError(
        UNKNOWN_DEVICE, f"No device here is named {shorten(text)} (a device id is 32 hex digits; known: {shown or 'none'})"
    )


# Retired devices ---------------------------------------------------------------------------


def retired_records(conn: sqlite3.Connection) -> dict[str, list]:
    """``{device id: [last seq accepted, retired by, clock]}``."""
    if not has_table(conn, "_sync_retired"):
        return {}
    return {
        d: [seq, by, hlc] for d, seq, by, hlc in conn.execute("SELECT device_id, seq, retired_by, hlc FROM _sync_retired")
    }


def retire(conn: sqlite3.Connection, device_id: str) -> int:
    """Retire a device that will never sync again: its operations after the last one held here
    are refused from now on, here and on every copy this record reaches, and compaction stops
    waiting for it. Returns that last seq. Call inside
    :func:`~sqlite_utils_sync.writing.writing`."""
    local = local_device_id(conn)
    if device_id == local:
        raise SyncError(
            INVALID_ARGUMENT,
            f"{device_id} is this database's own device: retire it from another copy (or run "
            "'sqlite-utils sync-new-device' here to give this file a new id)",
        )
    idx = device_index(conn, device_id, create=False)
    if idx is None:
        raise SyncError(UNKNOWN_DEVICE, f"No device {device_id} is known here: nothing of it to retire")
    seq = max_seq(conn, idx)
    merge_retired(conn, {device_id: [seq, local, announce(conn)]})
    return retired_records(conn)[device_id][0]


def announcement_seq(conn: sqlite3.Connection, by: str, announced_at: int) -> int | None:
    """The seq of the tick with which ``by`` announced a retirement (a record's retired by and
    clock), or None where this database holds no such tick."""
    idx = device_index(conn, by, create=False)
    if idx is None:
        return None
    row = conn.execute(
        f"SELECT op FROM _sync_ops WHERE op BETWEEN ? AND ? AND hlc = ? AND kind = {TICK} ORDER BY op LIMIT 1",
        [*device_range(idx), announced_at],
    ).fetchone()
    return None if row is None else op_seq(row[0])


def merge_retired(conn: sqlite3.Connection, records: dict[str, list]) -> None:
    """Take retirement records: a device stays retired; the highest seq any copy held of it
    when retiring it is accepted (so that the operations one copy held reach all of them)."""
    conn.executemany(
        "INSERT INTO _sync_retired VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
        "seq = excluded.seq, retired_by = excluded.retired_by, hlc = excluded.hlc WHERE excluded.seq > seq",
        [(d, seq, by, hlc) for d, (seq, by, hlc) in records.items()],
    )


# Ids that never left this database ----------------------------------------------------------


def mark_sent(conn: sqlite3.Connection, devices: list[str]) -> None:
    """A bundle carried operations of ``devices``: the local id, if among them, has left."""
    local = local_device_id(conn)
    if local not in devices or not has_table(conn, "_sync_fresh_ids"):
        return
    if conn.execute("SELECT 1 FROM _sync_fresh_ids WHERE device_id = ?", [local]).fetchone():
        try:
            conn.execute("DELETE FROM _sync_fresh_ids WHERE device_id = ?", [local])
        except sqlite3.OperationalError as ex:
            # An export that may not write (a hub's read connection) still sends the bundle;
            # the receivers' clocks, which name this id once they push back, say it left.
            if "readonly" not in str(ex):
                raise


def never_left(conn: sqlite3.Connection) -> bool:
    """Whether the local id may simply be replaced by another: sync-new-device made it here,
    no bundle carried it, no peer names it, and it wrote no data operation (only the knowledge
    ticks that a copy of this file, if any, holds identically)."""
    local = local_device_id(conn)
    if not conn.execute("SELECT 1 FROM _sync_fresh_ids WHERE device_id = ?", [local]).fetchone():
        return False
    if conn.execute(
        f"SELECT 1 FROM _sync_ops WHERE op BETWEEN ? AND ? AND kind != {TICK} LIMIT 1", device_range(LOCAL, 1)
    ).fetchone():
        return False
    for (text,) in conn.execute("SELECT clock FROM _sync_peers"):
        if local in text:
            return False
    return not conn.execute(
        "SELECT 1 FROM _sync_peers WHERE device_id = ?1 UNION ALL SELECT 1 FROM _sync_imports WHERE source_device_id = ?1",
        [local],
    ).fetchone()


def replace_local_id(conn: sqlite3.Connection) -> str:
    """Give the local device a new id in place of one that never left (see :func:`never_left`):
    its operations, knowledge and name go with it, so no peer ever hears of the old one."""
    old, new = local_device_id(conn), random_device_id()
    conn.execute("UPDATE _sync_devices SET device_id = ? WHERE idx = ?", [new, LOCAL])
    for table in ("_sync_device_names", "_sync_horizon", "_sync_fresh_ids"):
        conn.execute(f"UPDATE {table} SET device_id = ? WHERE device_id = ?", [new, old])
    return new
