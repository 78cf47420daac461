"""The append-only operation log, device identities, vector clocks and knowledge epochs.

Layout
------

``_sync_ops`` holds every operation, local and remote, keyed by one integer::

    op = device_index << 40 | seq

The local device always uses the top index :data:`LOCAL`, so the local range sorts last and
SQLite's own rowid allocation (``max(rowid) + 1``) hands the capture triggers the next local
sequence number for free. A sentinel row with ``seq = 0`` keeps that range non-empty.
Remote devices get small indexes in ``_sync_devices``. Values live in untyped slot columns
``c0, c1, …`` (one per user column, mapped in ``_sync_tables``) so every value keeps its exact
type and bits: no encoding in the triggers, none on replay.

Operation kinds: ``0`` insert (full row), ``1`` update (full new row, ``mask`` = changed
columns, ``newkey`` set when the primary key changed), ``2`` delete (old primary key),
``3`` tick (a knowledge epoch: the device's vector clock after an import, in ``rowkey``).
``RESOLUTION`` (8) is or-ed into the kind of an operation written by ``sync-resolve``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sqlite3
import time
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

from .errors import SyncError

LOCAL = (1 << 22) - 1
SEQ_BITS = 40
SEQ_MASK = (1 << SEQ_BITS) - 1
MAX_COLUMNS = 62

INSERT, UPDATE, DELETE, TICK = 0, 1, 2, 3
RESOLUTION = 8
KIND_NAMES = {INSERT: "insert", UPDATE: "update", DELETE: "delete", TICK: "tick"}

SCHEMA_VERSION = 1

# Hybrid logical clock: milliseconds since the epoch, times 1024 (the unit bundles carry). A
# device's clocks never decrease and stay above every clock it has imported; operations of one
# device that share a clock are ordered by seq.
HLC_NOW_SQL = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) * 1024"
# Bundles may not carry clocks above this, so counting up from any clock seen stays an integer.
MAX_HLC = 1 << 62
HLC_PER_SECOND = 1000 * 1024
# How far ahead of the receiver's wall clock an imported clock may be, in seconds. An accepted
# clock becomes the floor of every later local clock (here and wherever this copy syncs), so
# a far-future one would stop ordering edits by time until the wall clock caught up with it.
# A week tolerates devices that are days fast (a wrong date, a time zone error) and keeps the
# damage of a wrong clock to a week; the limit is configurable for odder setups.
DEFAULT_MAX_CLOCK_SKEW = 7 * 86400
# A bound far below MAX_HLC (2^62 units is about 142,000 years), so that a copy's clocks, at
# most the wall clock plus the bound plus one unit per relay, never leave the valid range.
MAX_CLOCK_SKEW_LIMIT = 100 * 365 * 86400
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS _sync_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    schema_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _sync_devices (
    idx INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS _sync_tables (
    tid INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    columns TEXT NOT NULL,
    pk TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _sync_ops (
    op INTEGER PRIMARY KEY,
    hlc INTEGER NOT NULL,
    tid INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    mask INTEGER,
    rowkey TEXT,
    newkey TEXT
);
-- An index of the tick operations: ops of `device` from `from_seq` on had seen `clock`.
CREATE TABLE IF NOT EXISTS _sync_knowledge (
    device INTEGER NOT NULL,
    from_seq INTEGER NOT NULL,
    clock TEXT NOT NULL,
    PRIMARY KEY (device, from_seq)
) WITHOUT ROWID;
-- Operations kept for a table this database did not sync when they arrived: not applied yet.
CREATE TABLE IF NOT EXISTS _sync_unapplied (
    tid INTEGER NOT NULL,
    op INTEGER NOT NULL,
    PRIMARY KEY (tid, op)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _sync_peers (
    device_id TEXT PRIMARY KEY,
    clock TEXT NOT NULL,
    last_seen TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _sync_imports (
    bundle_id TEXT PRIMARY KEY,
    source_device_id TEXT NOT NULL,
    imported_at TEXT NOT NULL,
    total_operations INTEGER NOT NULL,
    applied INTEGER NOT NULL,
    conflicts INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    actor TEXT
);
CREATE TABLE IF NOT EXISTS _sync_clashes (
    tid INTEGER NOT NULL,
    rowkey TEXT NOT NULL,
    a INTEGER NOT NULL,
    b INTEGER NOT NULL,
    columns TEXT NOT NULL,
    PRIMARY KEY (tid, rowkey, a, b)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _sync_resolutions (
    tid INTEGER NOT NULL,
    rowkey TEXT NOT NULL,
    op INTEGER NOT NULL,
    PRIMARY KEY (tid, rowkey, op)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _sync_conflicts (
    id TEXT PRIMARY KEY,
    "table" TEXT NOT NULL,
    rowkey TEXT NOT NULL,
    pk TEXT NOT NULL,
    columns TEXT NOT NULL,
    versions TEXT NOT NULL,
    resolved_by TEXT
);
CREATE INDEX IF NOT EXISTS _sync_conflicts_row ON _sync_conflicts ("table", rowkey);
CREATE TRIGGER IF NOT EXISTS _sync_ops_append_only_update BEFORE UPDATE ON _sync_ops
BEGIN SELECT RAISE(ABORT, '_sync_ops is append-only: operations cannot be changed'); END;
CREATE TRIGGER IF NOT EXISTS _sync_ops_append_only_delete BEFORE DELETE ON _sync_ops
BEGIN SELECT RAISE(ABORT, '_sync_ops is append-only: operations cannot be deleted'); END;
"""


def parse_duration(value: Any, what: str = "max_clock_skew") -> float:
    """Seconds from a number of seconds or a string like ``90s``, ``36h`` or ``7d``, checked
    against :data:`MAX_CLOCK_SKEW_LIMIT`."""
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", value.lower())
        if match:
            seconds = float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
    if seconds is None or not 0 <= seconds <= MAX_CLOCK_SKEW_LIMIT:
        raise SyncError(
            "invalid_argument",
            f"{what} must be a duration like 90s, 36h or 7d (at most {MAX_CLOCK_SKEW_LIMIT // 86400}d), got {value!r}",
        )
    return seconds


def connection(db: Any) -> sqlite3.Connection:
    """Accept a ``sqlite_utils.Database`` or a ``sqlite3.Connection``."""
    return getattr(db, "conn", db)


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def op_id(device_index: int, seq: int) -> int:
    return (device_index << SEQ_BITS) | seq


def is_enabled(conn: sqlite3.Connection) -> bool:
    return bool(
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sync_ops'"
        ).fetchone()
    )


def ensure_schema(conn: sqlite3.Connection) -> None:
    """Create the internal tables and this database's device identity if missing."""
    if is_enabled(conn):
        return
    _exec_script(conn, SCHEMA_SQL)
    conn.execute(
        "INSERT OR IGNORE INTO _sync_state (id, schema_version) VALUES (1, ?)",
        [SCHEMA_VERSION],
    )
    new_local_identity(conn)


def _exec_script(conn: sqlite3.Connection, script: str) -> None:
    for statement in split_statements(script):
        conn.execute(statement)


def split_statements(script: str) -> list[str]:
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    return [s for s in statements if s]


def random_device_id() -> str:
    return os.urandom(16).hex()


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


def append_tick(conn: sqlite3.Connection, known: dict[str, int], floor: int = 0) -> int:
    """Record a knowledge epoch: the local ops after this one had seen ``known``."""
    text = json.dumps(known, sort_keys=True, separators=(",", ":"))
    op = append_local(conn, 0, TICK, None, text, floor=floor)
    conn.execute(
        "INSERT OR REPLACE INTO _sync_knowledge (device, from_seq, clock) VALUES (?, ?, ?)",
        [LOCAL, (op & SEQ_MASK) + 1, text],
    )
    return op


HORIZON_SQL = "CREATE TABLE IF NOT EXISTS _sync_horizon (device_id TEXT PRIMARY KEY, seq INTEGER NOT NULL)"


def horizon(conn: sqlite3.Connection) -> dict[str, int]:
    """The highest seq of each device whose operations may be missing here (compacted)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sync_horizon'").fetchone():
        return {}
    return {device: seq for device, seq in conn.execute("SELECT device_id, seq FROM _sync_horizon")}


def raise_horizon(conn: sqlite3.Connection, seqs: dict[str, int]) -> None:
    conn.execute(HORIZON_SQL)
    conn.executemany(
        "INSERT INTO _sync_horizon VALUES (?, ?) ON CONFLICT (device_id) DO UPDATE SET seq = max(seq, excluded.seq)",
        list(seqs.items()),
    )


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
    next_idx = conn.execute("SELECT ifnull(max(idx), 0) + 1 FROM _sync_devices WHERE idx < ?", [LOCAL]).fetchone()[0]
    conn.execute("INSERT INTO _sync_devices (idx, device_id) VALUES (?, ?)", [next_idx, device_id])
    return next_idx


def max_seq(conn: sqlite3.Connection, idx: int) -> int:
    row = conn.execute(
        "SELECT max(op) FROM _sync_ops WHERE op BETWEEN ? AND ?", [op_id(idx, 0), op_id(idx, SEQ_MASK)]
    ).fetchone()
    return 0 if row[0] is None else row[0] & SEQ_MASK


def clock(conn: sqlite3.Connection) -> dict[str, int]:
    """The vector clock: highest contiguous seq held from each device, by device id hex."""
    result = {}
    for idx, device_id in conn.execute("SELECT idx, device_id FROM _sync_devices ORDER BY idx"):
        seq = max_seq(conn, idx)
        if seq:
            result[device_id] = seq
    return result


def last_hlc(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT hlc FROM _sync_ops ORDER BY op DESC LIMIT 1").fetchone()[0]


def capture_hlc_sql(floor: int) -> str:
    """The clock a capture trigger gives an operation: the wall clock, but not below ``floor``
    (the local clock when the trigger was made, which is above everything imported by then).

    Reading the last operation's clock instead would cost a lookup per captured row; a wall
    clock set back is caught by :func:`settle_clocks` before any operation leaves.
    """
    return f"max({floor}, {HLC_NOW_SQL})"


def with_floor(trigger_sql: str, floor: int | None) -> str:
    """``trigger_sql`` with its clock floor replaced (None: a placeholder, for comparisons).

    Quoted names and strings are passed over whole, so a column named like the clock is not.
    """

    def replace(match: re.Match) -> str:
        if match.group(1) is None:
            return match.group(0)
        return f"{match.group(1)}{'?' if floor is None else floor}, "

    return CAPTURE_FLOOR.sub(replace, trigger_sql)


CAPTURE_FLOOR = re.compile(r""""(?:[^"]|"")*"|'(?:[^']|'')*'|(VALUES \(max\()(?:\d+|\?), """)


def next_local_hlc(conn: sqlite3.Connection, floor: int = 0) -> int:
    (now,) = conn.execute(f"SELECT {HLC_NOW_SQL}").fetchone()  # the clock the triggers read
    return max(now, last_hlc(conn), floor + 1)


# Local operations up to ``op`` have settled clocks (see settle_clocks).
SETTLED_SQL = "CREATE TABLE IF NOT EXISTS _sync_settled (id INTEGER PRIMARY KEY CHECK (id = 1), op INTEGER NOT NULL)"
# The marker only bounds the next scan, so it moves only when that saves a real one: small
# exports and imports leave the file as it was.
SETTLE_MARK_EVERY = 4096


def settled_through(conn: sqlite3.Connection) -> int:
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sync_settled'").fetchone():
        row = conn.execute("SELECT op FROM _sync_settled").fetchone()
        if row:
            return row[0]
    return op_id(LOCAL, 0)


def settle_start(conn: sqlite3.Connection) -> int:
    base = op_id(LOCAL, 0)
    (start,) = conn.execute(
        "SELECT ifnull(max(op), ?) FROM _sync_ops WHERE op BETWEEN ? AND ?", [base, base, settled_through(conn)]
    ).fetchone()
    return start


def unsettled_clocks(conn: sqlite3.Connection, start: int | None = None) -> list[tuple[int, int]]:
    """``(clock, op)`` for each local operation whose clock is below an earlier one's (the wall
    clock was set back), with the clock it should have: the highest before it."""
    return conn.execute(
        "SELECT top, op FROM (SELECT op, hlc, max(hlc) OVER (ORDER BY op ROWS UNBOUNDED PRECEDING) AS top "
        "FROM _sync_ops WHERE op >= ?) WHERE hlc < top",
        [settle_start(conn) if start is None else start],
    ).fetchall()


def settle_clocks(conn: sqlite3.Connection) -> list[tuple[int, int]]:
    """Make the local clocks non-decreasing before anything reads them.

    Capture triggers take the wall clock, so a clock set back gives a later operation a lower
    clock than an earlier one. Such operations are raised to the clock before them here, while
    they are still local: every export, import, resolution and compaction settles first. The
    result is a function of the log alone, so an export from a database it cannot write sends
    the same clocks (see :func:`unsettled_clocks`). Call inside a transaction.

    :returns: the ``(clock, op)`` changes it could not write (a read-only database)
    """
    start = settle_start(conn)
    fixes = unsettled_clocks(conn, start)
    last = conn.execute("SELECT max(op) FROM _sync_ops").fetchone()[0]  # the local range sorts last
    if not fixes and last - start < SETTLE_MARK_EVERY:
        return []
    conn.execute("SAVEPOINT settle_clocks")
    try:
        if fixes:
            with log_rewrite(conn):
                conn.executemany("UPDATE _sync_ops SET hlc = ? WHERE op = ?", fixes)
        conn.execute(SETTLED_SQL)
        conn.execute("INSERT OR REPLACE INTO _sync_settled (id, op) VALUES (1, ?)", [last])
    except sqlite3.OperationalError as ex:
        conn.execute("ROLLBACK TO settle_clocks")
        conn.execute("RELEASE settle_clocks")
        if "readonly" not in str(ex):
            raise
        return fixes
    conn.execute("RELEASE settle_clocks")
    return []


class RawText(bytes):
    """A TEXT value that is not valid UTF-8 (SQLite stores what a client hands it), as its
    bytes: written back with ``CAST(? AS TEXT)`` (see :func:`marker`) it is the same value."""


def exact_text(data: bytes) -> str | RawText:
    """A ``text_factory`` that changes no value: ``str`` where TEXT is valid UTF-8, else RawText."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return RawText(data)


def marker(value: Any) -> str:
    """The SQL parameter for a value read with :func:`exact_text`: RawText goes back as TEXT."""
    return "CAST(? AS TEXT)" if isinstance(value, RawText) else "?"


def append_local(
    conn: sqlite3.Connection,
    tid: int,
    kind: int,
    mask: int | None,
    rowkey: str | None,
    newkey: str | None = None,
    slots: dict[int, Any] | None = None,
    floor: int = 0,
) -> int:
    """Append one local operation written by Python (ticks, resolutions, repairs)."""
    slots = slots or {}
    columns = ["hlc", "tid", "kind", "mask", "rowkey", "newkey"] + [f"c{s}" for s in slots]
    values = [next_local_hlc(conn, floor), tid, kind, mask, rowkey, newkey] + list(slots.values())
    cursor = conn.execute(
        f"INSERT INTO _sync_ops ({', '.join(columns)}) VALUES ({', '.join(marker(v) for v in values)})", values
    )
    return cursor.lastrowid


def ensure_slots(conn: sqlite3.Connection, count: int) -> None:
    existing = {row[1] for row in conn.execute("PRAGMA table_info(_sync_ops)")}
    for slot in range(count):
        if f"c{slot}" not in existing:
            conn.execute(f"ALTER TABLE _sync_ops ADD COLUMN c{slot}")


def op_label(device_id: str, seq: int) -> str:
    """The public id of an operation: ``<device id hex>:<seq>``."""
    return f"{device_id}:{seq}"


def parse_op_label(conn: sqlite3.Connection, label: str) -> int | None:
    device_id, _, seq = label.partition(":")
    if not seq.isdigit():
        return None
    idx = device_index(conn, device_id, create=False)
    return None if idx is None else op_id(idx, int(seq))


def knowledge_at(conn: sqlite3.Connection, idx: int, seq: int) -> dict[str, int]:
    """The vector clock the author of op ``(idx, seq)`` had seen when writing it."""
    row = conn.execute(
        "SELECT clock FROM _sync_knowledge WHERE device = ? AND from_seq <= ? ORDER BY from_seq DESC LIMIT 1",
        [idx, seq],
    ).fetchone()
    return json.loads(row[0]) if row else {}


# Row keys ---------------------------------------------------------------------------------
#
# A row is identified by its primary key values rendered with SQLite's quote(), joined by
# commas: exact (quote() round-trips REAL and BLOB), computable inside a trigger, and
# comparable as one TEXT value.

_LITERAL = re.compile(
    r"\s*(?:(NULL)|X'([0-9A-Fa-f]*)'|'((?:[^']|'')*)'|(-?Inf)|([-+]?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?))\s*(,|$)"
)


def parse_rowkey(rowkey: str) -> list[Any]:
    """Decode a row key (quote() literals joined by commas) back into Python values."""
    values: list[Any] = []
    position = 0
    while position < len(rowkey):
        match = _LITERAL.match(rowkey, position)
        if not match:
            raise ValueError(f"bad row key: {rowkey!r}")
        null, blob, text, inf, number, _ = match.groups()
        if null:
            values.append(None)
        elif blob is not None:
            values.append(bytes.fromhex(blob))
        elif text is not None:
            values.append(text.replace("''", "'"))
        elif inf:
            values.append(float(inf.replace("Inf", "inf")))
        elif "." in number or "e" in number or "E" in number:
            values.append(float(number))
        else:
            values.append(int(number))
        position = match.end()
    return values


def rowkey_sql(expressions: Iterable[str], typed: Iterable[bool] | None = None) -> str:
    """SQL for a row key. SQLite treats 1 and 1.0 as the same key, so an integral REAL is keyed
    as the integer; ``typed`` marks expressions (columns with type affinity) that can skip that."""
    expressions = list(expressions)
    flags = list(typed) if typed is not None else [False] * len(expressions)
    return " || ',' || ".join(
        f"quote({e})"
        if flag
        else f"(CASE WHEN typeof({e}) = 'real' AND {e} = CAST({e} AS INTEGER) THEN quote(CAST({e} AS INTEGER)) "
        f"ELSE quote({e}) END)"
        for e, flag in zip(expressions, flags)
    )


def remap_mask_sql(moves: list[tuple[int, int]]) -> str:
    """SQL for ``mask`` with bit ``a`` moved to bit ``b`` for each ``(a, b)``; other bits drop.

    Slots are numbered per copy, so masks are remapped on their way into a bundle (slot to
    column position) and out of it (position to slot).
    """
    if all(a == b for a, b in moves):
        return f"mask & {sum(1 << b for _, b in moves)}"
    return " | ".join(f"(((mask >> {a}) & 1) << {b})" for a, b in moves)


def make_rowkey(conn: sqlite3.Connection, values: list[Any]) -> str:
    return conn.execute("SELECT " + rowkey_sql(f"?{i + 1}" for i in range(len(values))), values).fetchone()[0]


def json_value(value: Any) -> Any:
    """A JSON-safe rendering of a SQLite value (BLOBs as Datasette renders them)."""
    if isinstance(value, bytes):
        return {"$base64": True, "encoded": base64.b64encode(value).decode()}
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@contextmanager
def log_rewrite(conn: sqlite3.Connection) -> Iterator[None]:
    """Allow changes to the append-only log, for the three sanctioned rewrites: giving a copied
    file a new identity, compaction, and settling the clocks of operations not yet sent.
    Call inside a transaction."""
    guards = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
        "AND name IN ('_sync_ops_append_only_update', '_sync_ops_append_only_delete')"
    ).fetchall()
    for name, _ in guards:
        conn.execute(f"DROP TRIGGER {quote_identifier(name)}")
    try:
        yield
    finally:
        for _, sql in guards:
            conn.execute(sql)


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
            seq = json.loads(text).get(local, 0)
        except (ValueError, AttributeError):
            continue
        if isinstance(seq, int):
            best = max(best, seq)
    return min(best, max_seq(conn, LOCAL))


def new_device(conn: sqlite3.Connection, recover: bool = False) -> str:
    """Give this database a new device id; returns it.

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
    settle_clocks(conn)  # the operations moved keep their clocks, so settle them first
    old_id = local_device_id(conn)
    old_idx = conn.execute("SELECT ifnull(max(idx), 0) + 1 FROM _sync_devices WHERE idx < ?", [LOCAL]).fetchone()[0]
    top = max_seq(conn, LOCAL)
    keep = shared_through(conn) if recover else top
    # Local seq s <= keep goes to the old id's index; s > keep becomes the new id's s - keep + 1
    # (its seq 1 is the knowledge tick that starts it).
    shift = op_id(old_idx, 0) - op_id(LOCAL, 0)
    first, last_kept = op_id(LOCAL, 1), op_id(LOCAL, keep)

    def remap(column: str) -> str:
        return (
            f"CASE WHEN {column} < {first} THEN {column} WHEN {column} <= {last_kept} THEN {column} + {shift} "
            f"ELSE {column} - {keep} + 1 END"
        )

    start = knowledge_at(conn, LOCAL, keep + 1)
    if keep:
        start[old_id] = keep
    moved_hlc = conn.execute("SELECT min(hlc) FROM _sync_ops WHERE op > ?", [last_kept]).fetchone()[0]
    columns = [row[1] for row in conn.execute("PRAGMA table_info(_sync_ops)")]
    remap_rows(conn, "_sync_ops", columns, ["op"], remap, delete_from=op_id(LOCAL, 0))
    for table, op_columns in (("_sync_clashes", ["a", "b"]), ("_sync_resolutions", ["op"]), ("_sync_unapplied", ["op"])):
        remap_rows(conn, table, [row[1] for row in conn.execute(f"PRAGMA table_info({table})")], op_columns, remap)
    conn.execute("DELETE FROM _sync_knowledge WHERE device = ? AND from_seq > ?", [LOCAL, keep + 1])
    conn.execute("UPDATE _sync_knowledge SET device = ? WHERE device = ?", [old_idx, LOCAL])
    conn.execute("UPDATE _sync_devices SET device_id = ? WHERE idx = ?", [f"moving-{old_id}", LOCAL])
    conn.execute("INSERT INTO _sync_devices (idx, device_id) VALUES (?, ?)", [old_idx, old_id])
    conn.execute(SETTLED_SQL)
    conn.execute("DELETE FROM _sync_settled")  # the local range starts again
    if moved_hlc is None:
        return new_local_identity(conn)
    return restart_moved(conn, start, old_id, keep, moved_hlc)


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
    text = json.dumps(start, sort_keys=True, separators=(",", ":"))
    conn.executemany(
        "INSERT INTO _sync_ops (op, hlc, tid, kind, rowkey) VALUES (?, ?, 0, ?, ?)",
        [(op_id(LOCAL, 0), moved_hlc, TICK, None), (op_id(LOCAL, 1), moved_hlc, TICK, text)],
    )
    ticks = conn.execute(
        "SELECT op, rowkey FROM _sync_ops WHERE op > ? AND kind = ?", [op_id(LOCAL, 1), TICK]
    ).fetchall()
    with log_rewrite(conn):
        for op, clock_text in ticks:
            known = json.loads(clock_text)
            if keep:
                known[old_id] = max(known.get(old_id, 0), keep)
            conn.execute(
                "UPDATE _sync_ops SET rowkey = ? WHERE op = ?", [json.dumps(known, sort_keys=True, separators=(",", ":")), op]
            )
    conn.executemany(
        "INSERT OR REPLACE INTO _sync_knowledge (device, from_seq, clock) "
        "SELECT ?, (op & ?) + 1, rowkey FROM _sync_ops WHERE op = ?",
        [(LOCAL, SEQ_MASK, op) for op in [op_id(LOCAL, 1), *(op for op, _ in ticks)]],
    )
    (floor,) = conn.execute("SELECT max(hlc) FROM _sync_ops").fetchone()
    append_tick(conn, {k: v for k, v in clock(conn).items() if k != device_id}, floor=floor)
    return device_id
