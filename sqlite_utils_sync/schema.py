"""The ``_sync_*`` tables: their DDL, version and migrations.

``_sync_state.schema_version`` says which layout a database has. :func:`migrate` brings it up
to :data:`SCHEMA_VERSION` by running the migrations it lacks, in order, inside the caller's
transaction; every write runs it first (see :func:`sqlite_utils_sync.writing.writing`).
Read-only paths (status, the Datasette pages, an export that may not write) call
:func:`check_schema` instead: they read a database of any version up to this code's, and
refuse a newer one with :data:`~sqlite_utils_sync.errors.SCHEMA_TOO_NEW`.

Versions:

1. the log, devices, tables, knowledge, peers, imports, conflicts; the tables of version 2
   were created on first use, so a version-1 database may or may not have them
2. ``_sync_horizon``, ``_sync_settled``, ``_sync_captured`` and ``_sync_device_actors`` always
   exist; ``_sync_clashes`` is named ``_sync_conflict_pairs``
3. ``_sync_scope`` (the tables a partial copy holds) and ``_sync_withheld`` (operations it
   knows exist but holds no values of), see :mod:`scope`
4. ``_sync_device_names``, ``_sync_retired`` and ``_sync_fresh_ids``, see :mod:`devices`
"""

from __future__ import annotations

import sqlite3
from contextlib import contextmanager
from typing import Any, Iterator

from .errors import SCHEMA_TOO_NEW, SyncError

SCHEMA_VERSION = 4

CREATE_LOG = """
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

VERSION_2 = """
-- The highest seq of each device whose operations may be missing here (compacted).
CREATE TABLE IF NOT EXISTS _sync_horizon (device_id TEXT PRIMARY KEY, seq INTEGER NOT NULL);
-- Local operations up to `op` have settled clocks.
CREATE TABLE IF NOT EXISTS _sync_settled (id INTEGER PRIMARY KEY CHECK (id = 1), op INTEGER NOT NULL);
-- The columns capture last covered, per table: kept apart from the triggers, which
-- disable-sync and transform remove.
CREATE TABLE IF NOT EXISTS _sync_captured (tid INTEGER PRIMARY KEY, columns TEXT NOT NULL);
-- Which actor may push new operations of each device to a hub.
CREATE TABLE IF NOT EXISTS _sync_device_actors (device_id TEXT PRIMARY KEY, actor TEXT NOT NULL, since TEXT NOT NULL);
-- Pairs of concurrent operations that disagree on a row (see conflicts.py). Copied, not
-- renamed: ALTER TABLE ... RENAME checks every view and trigger of the user's schema too.
CREATE TABLE _sync_conflict_pairs (
    tid INTEGER NOT NULL,
    rowkey TEXT NOT NULL,
    a INTEGER NOT NULL,
    b INTEGER NOT NULL,
    columns TEXT NOT NULL,
    PRIMARY KEY (tid, rowkey, a, b)
) WITHOUT ROWID;
INSERT INTO _sync_conflict_pairs (tid, rowkey, a, b, columns) SELECT tid, rowkey, a, b, columns FROM _sync_clashes;
DROP TABLE _sync_clashes;
"""

VERSION_3 = """
-- The tables a partial copy holds values for; no rows: every table (a full copy).
CREATE TABLE IF NOT EXISTS _sync_scope (name TEXT PRIMARY KEY);
-- Operations a partial copy knows exist (device index, seqs lo..hi) but holds no values of.
CREATE TABLE IF NOT EXISTS _sync_withheld (
    device INTEGER NOT NULL,
    lo INTEGER NOT NULL,
    hi INTEGER NOT NULL,
    PRIMARY KEY (device, lo)
) WITHOUT ROWID;
"""

VERSION_DEVICES = """
-- Each device's name, as the device itself last set it (``hlc``: its clock then; the
-- highest wins).
CREATE TABLE IF NOT EXISTS _sync_device_names (device_id TEXT PRIMARY KEY, name TEXT NOT NULL, hlc INTEGER NOT NULL);
-- Devices that will never sync again: operations of `device_id` after `seq` are refused.
-- `retired_by` is the device that retired it, at its clock `hlc`.
CREATE TABLE IF NOT EXISTS _sync_retired (
    device_id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    retired_by TEXT NOT NULL,
    hlc INTEGER NOT NULL
);
-- Local ids sync-new-device made here that no bundle has carried yet: a further
-- sync-new-device replaces such an id instead of leaving it behind in every peer's clock.
CREATE TABLE IF NOT EXISTS _sync_fresh_ids (device_id TEXT PRIMARY KEY);
"""

# (version, script): what takes a database from the version before to this one.
MIGRATIONS = [(1, CREATE_LOG), (2, VERSION_2), (3, VERSION_3), (4, VERSION_DEVICES)]

# Tables a version-1 database made only when first needed: there, whether one exists is a
# question for sqlite_master; from version 2 on, it always does.
FIRST_USE_TABLES = {"_sync_horizon", "_sync_settled", "_sync_captured", "_sync_device_actors"}
# Tables of later versions, and the version that made them: a read-only path reads an older
# database as it is, without them.
LATER_TABLES = {
    "_sync_scope": 3,
    "_sync_withheld": 3,
    "_sync_device_names": 4,
    "_sync_retired": 4,
    "_sync_fresh_ids": 4,
}


def connection(db: Any) -> sqlite3.Connection:
    """Accept a ``sqlite_utils.Database`` or a ``sqlite3.Connection``."""
    return getattr(db, "conn", db)


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def schema_version(conn: sqlite3.Connection) -> int:
    """The version of the sync tables (0: sync was never enabled here)."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_sync_state'").fetchone():
        return 0
    row = conn.execute("SELECT schema_version FROM _sync_state").fetchone()
    return row[0] if row else 0


def check_schema(conn: sqlite3.Connection) -> int:
    """:func:`schema_version`, refusing a version this code does not know."""
    version = schema_version(conn)
    if version > SCHEMA_VERSION:
        raise SyncError(
            SCHEMA_TOO_NEW,
            f"This database's sync tables have schema version {version}, newer than this version of "
            f"datasette-sync knows ({SCHEMA_VERSION}): upgrade datasette-sync to use it",
        )
    return version


def is_enabled(conn: sqlite3.Connection) -> bool:
    """True when sync was ever enabled here (the sync tables exist, at a version this code reads)."""
    return check_schema(conn) > 0


def has_table(conn: sqlite3.Connection, name: str) -> bool:
    """Whether one of the sync tables exists, for paths that read a database as it is."""
    version = check_schema(conn)
    if version == 0 or version < LATER_TABLES.get(name, 0):
        return False
    if version >= 2 or name not in FIRST_USE_TABLES:
        return True
    return bool(conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone())


def migrate(conn: sqlite3.Connection, create: bool = False) -> int:
    """Bring the sync tables up to :data:`SCHEMA_VERSION` (creating them if ``create``); returns
    the version found (0: they were created, or are still missing). Call inside a transaction.

    A database that cannot be written (opened read-only) stays at its version: every read
    works there, and a write fails as it would anyway.
    """
    found = check_schema(conn)
    if found == SCHEMA_VERSION or (found == 0 and not create):
        return found
    conn.execute("SAVEPOINT _sync_migrate")
    try:
        for version, script in MIGRATIONS:
            if version > found:
                exec_script(conn, script)
        conn.execute("INSERT OR REPLACE INTO _sync_state (id, schema_version) VALUES (1, ?)", [SCHEMA_VERSION])
    except sqlite3.OperationalError as ex:
        conn.execute("ROLLBACK TO _sync_migrate")
        conn.execute("RELEASE _sync_migrate")
        if found and "readonly" in str(ex):
            return found
        raise
    conn.execute("RELEASE _sync_migrate")
    return found


def exec_script(conn: sqlite3.Connection, script: str) -> None:
    """Run a script statement by statement (``executescript`` would commit the transaction)."""
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


def ensure_slots(conn: sqlite3.Connection, count: int) -> None:
    """Give ``_sync_ops`` the value columns ``c0 … c<count - 1>``."""
    existing = {row[1] for row in conn.execute("PRAGMA table_info(_sync_ops)")}
    for slot in range(count):
        if f"c{slot}" not in existing:
            conn.execute(f"ALTER TABLE _sync_ops ADD COLUMN c{slot}")


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
        # An error that made SQLite roll the transaction back (a full disk) brought the guards
        # back with it: creating them again would fail and hide that error.
        if conn.in_transaction:
            for _, sql in guards:
                conn.execute(sql)
