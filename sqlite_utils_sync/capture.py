"""Change capture: the pure-SQL triggers that write ``_sync_ops``, and their upkeep.

The triggers use only built-in SQL functions, so every client that writes the database (the
``sqlite3`` shell, Python's ``sqlite3``, sqlite-utils, Datasette) is captured. While remote
operations are applied they are dropped inside the importing transaction and re-created
before it commits (see :func:`muted`), so applied operations stay echo-free at no cost to
ordinary writes; a crash rolls the drop back with everything else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sqlite3
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Iterable, Iterator

from .clocks import HLC_NOW_SQL, last_hlc
from .declared import column_types, is_rowid_alias
from .errors import (
    GENERATED_COLUMNS,
    INTERNAL_TABLE,
    INVALID_NAME,
    MISSING_TABLE,
    NO_PRIMARY_KEY,
    NULL_PRIMARY_KEY,
    PK_CHANGED,
    TOO_MANY_COLUMNS,
    UNSUPPORTED_KEY,
    VIRTUAL_TABLE,
    SyncError,
)
from .oplog import DELETE, INSERT, MAX_COLUMNS, UPDATE, mask_of, rowkey_sql, slot_column, slot_names
from .schema import ensure_slots, has_table, is_enabled, quote_identifier

TRIGGER_KINDS = ("insert", "update", "delete")


@dataclass
class SyncedTable:
    tid: int
    name: str
    slots: dict[str, int]  # every column ever seen -> its slot in _sync_ops
    pk: list[str]
    enabled: bool

    def current_columns(self, conn: sqlite3.Connection) -> list[str]:
        return [row[1] for row in table_info(conn, self.name)]

    def mask_for(self, columns: list[str]) -> int:
        return mask_of(self.slots[column] for column in columns)

    def slot_names(self, columns: Iterable[str] | None = None) -> dict[int, str]:
        """slot -> column name, in slot order (only for ``columns``, if given)."""
        return slot_names(self.slots, columns)


def table_info(conn: sqlite3.Connection, table: str) -> list[tuple]:
    return conn.execute(f"PRAGMA table_xinfo({quote_identifier(table)})").fetchall()


def trigger_name(kind: str, table: str) -> str:
    return f"_sync_{kind}_{table}"


def load_table(conn: sqlite3.Connection, name: str) -> SyncedTable | None:
    """The one table of :func:`load_tables` called ``name``, read alone: an import maps its
    tables one by one, and reading them all each time grows with their square."""
    if not is_enabled(conn):
        return None
    row = conn.execute("SELECT tid, name, columns, pk, enabled FROM _sync_tables WHERE name = ?", [name]).fetchone()
    if row is None:
        return None
    tid, name, slots, pk, enabled = row
    return SyncedTable(tid, name, json.loads(slots), json.loads(pk), bool(enabled))


def load_tables(conn: sqlite3.Connection, enabled_only: bool = False) -> dict[str, SyncedTable]:
    if not is_enabled(conn):
        return {}
    tables = {}
    for tid, name, slots, pk, enabled in conn.execute(
        "SELECT tid, name, columns, pk, enabled FROM _sync_tables ORDER BY name"
    ):
        if enabled_only and not enabled:
            continue
        tables[name] = SyncedTable(tid, name, json.loads(slots), json.loads(pk), bool(enabled))
    return tables


def canonical_name(conn: sqlite3.Connection, table: str) -> str:
    """The table's name as created: SQL names are case-insensitive, so ``TODOS`` finds ``todos``."""
    row = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name = ? COLLATE NOCASE", [table]).fetchone()
    return row[0] if row else table


def check_can_sync(conn: sqlite3.Connection, table: str, synced: bool = False) -> tuple[list[str], list[str]]:
    """Return (columns, pk columns) or raise a SyncError saying why ``table`` cannot be synced.

    :param synced: the table is synced already (its capture is being repaired): a key with a
        collation, refused since, is let be, rather than stop every sync of its database
    """
    if table.lower().startswith(("_sync_", "sqlite_")):
        raise SyncError(INTERNAL_TABLE, f"Table '{table}' is internal and cannot be synced")
    row = conn.execute("SELECT type, sql FROM sqlite_master WHERE name = ?", [table]).fetchone()
    if row is not None and row[0] == "view":
        raise SyncError(MISSING_TABLE, f"'{table}' is a view: only tables can be synced")
    if row is None or row[0] != "table":
        raise SyncError(MISSING_TABLE, f"Table '{table}' does not exist")
    if not table:
        raise SyncError(INVALID_NAME, "A table with an empty name cannot be synced: bundles name every table. Rename it")
    if (row[1] or "").lstrip().upper().startswith("CREATE VIRTUAL"):
        raise SyncError(VIRTUAL_TABLE, f"Table '{table}' is a virtual (e.g. FTS) table and cannot be synced")
    kind = conn.execute("SELECT type FROM pragma_table_list(?) WHERE schema = 'main' AND name = ?", [table, table]).fetchone()
    if kind and kind[0] == "shadow":
        raise SyncError(
            VIRTUAL_TABLE, f"Table '{table}' holds the data of a virtual (e.g. FTS) table and cannot be synced"
        )
    info = table_info(conn, table)
    generated = [r[1] for r in info if r[6] != 0]
    if generated:
        raise SyncError(
            GENERATED_COLUMNS, f"Table '{table}' has generated columns ({', '.join(generated)}), not supported"
        )
    pk = [r[1] for r in sorted((r for r in info if r[5]), key=lambda r: r[5])]
    if not pk:
        path = conn.execute("SELECT file FROM pragma_database_list WHERE name = 'main'").fetchone()[0]
        example = shlex.join(["sqlite-utils", "transform", os.path.basename(path) or "data.db", table, "--pk", "id"])
        raise SyncError(
            NO_PRIMARY_KEY,
            f"Table '{table}' has no explicit PRIMARY KEY: rowid-only tables cannot be synced safely "
            f"(add one, e.g. {example})",
        )
    collated = [] if synced else key_collations(conn, table)
    if collated:
        column, collation = collated[0]
        raise SyncError(
            UNSUPPORTED_KEY,
            f"Table '{table}' has primary key column '{column}' with COLLATE {collation}: sync tells rows apart by "
            "their exact key values, so keys this collation takes as one row here would be two rows on other "
            "copies. Use a key without a collation",
        )
    if not is_rowid_alias(conn, table, pk):
        for column in [r[1] for r in info if r[5] and not r[3]]:  # key columns without NOT NULL
            (nulls,) = conn.execute(
                f"SELECT count(*) FROM {quote_identifier(table)} WHERE {quote_identifier(column)} IS NULL"
            ).fetchone()
            if nulls:
                raise SyncError(
                    NULL_PRIMARY_KEY,
                    f"Table '{table}' has {nulls} row(s) whose primary key column '{column}' is NULL: "
                    "give them keys first (peers could not tell NULL keys apart)",
                )
    columns = [r[1] for r in info]
    if "" in columns:
        raise SyncError(
            INVALID_NAME, f"Table '{table}' has a column with an empty name: bundles name every column. Rename it"
        )
    if len(columns) > MAX_COLUMNS:
        raise SyncError(TOO_MANY_COLUMNS, f"Table '{table}' has {len(columns)} columns; at most {MAX_COLUMNS} can be synced")
    return columns, pk


def key_collations(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    """The primary key columns that compare with a collation other than BINARY, and it."""
    t = quote_identifier(table)
    for index in conn.execute(f"PRAGMA index_list({t})").fetchall():
        if index[3] == "pk":
            rows = conn.execute(f"PRAGMA index_xinfo({quote_identifier(index[1])})").fetchall()
            return [(row[2], row[4]) for row in rows if row[5] and row[2] is not None and row[4].upper() != "BINARY"]
    return []


def register_table(
    conn: sqlite3.Connection, table: str, columns: list[str], pk: list[str], enabled: bool = True
) -> SyncedTable:
    """Record ``table`` in ``_sync_tables``, giving new columns the next free slots.

    ``enabled=False`` registers a table this database does not sync, so that operations for
    it can be stored and relayed.
    """
    row = conn.execute("SELECT tid, columns FROM _sync_tables WHERE name = ?", [table]).fetchone()
    slots: dict[str, int] = json.loads(row[1]) if row else {}
    for column in columns:
        if column not in slots:
            slots[column] = max(slots.values(), default=-1) + 1
    if max(slots.values(), default=0) >= MAX_COLUMNS:
        raise SyncError(TOO_MANY_COLUMNS, f"Table '{table}' has used more than {MAX_COLUMNS} column slots")
    if row:
        conn.execute(
            "UPDATE _sync_tables SET columns = ?, pk = ?, enabled = ? WHERE tid = ?",
            [json.dumps(slots), json.dumps(pk), enabled, row[0]],
        )
        tid = row[0]
    else:
        tid = conn.execute(
            "INSERT INTO _sync_tables (name, columns, pk, enabled) VALUES (?, ?, ?, ?)",
            [table, json.dumps(slots), json.dumps(pk), enabled],
        ).lastrowid
    ensure_slots(conn, max(slots.values()) + 1)
    return SyncedTable(tid, table, slots, pk, enabled)


def trigger_sql(
    table: SyncedTable,
    columns: list[str],
    declared: dict[str, str] | None = None,
    rowid_key: bool = False,
    nullable: set[str] | None = None,
    floor: int = 0,
    clock_sql: str | None = None,
) -> dict[str, str]:
    """The CREATE TRIGGER statements that capture writes to ``table``.

    :param declared: column name -> declared type, to skip type checks where affinity makes them moot
    :param rowid_key: the primary key is the rowid (``INTEGER PRIMARY KEY``), always an integer
    :param nullable: primary key columns SQLite lets hold NULL (rowid tables allow it unless
        declared NOT NULL); writes that would leave NULL in them are refused
    :param floor: the lowest clock the triggers may give (see :func:`capture_hlc_sql`)
    :param clock_sql: another clock expression (:data:`LOOKUP_HLC_SQL`, to recognise triggers
        that use it)
    """
    typed = {c for c, t in (declared or {}).items() if has_affinity(t)}
    t = quote_identifier(table.name)
    slot_list = ", ".join(slot_column(table.slots[c]) for c in columns)
    hlc = clock_sql or capture_hlc_sql(floor)

    def values(prefix: str) -> str:
        return ", ".join(f"{prefix}.{quote_identifier(c)}" for c in columns)

    def changed(c: str) -> str:
        q = quote_identifier(c)
        if c in typed:
            return f"(NEW.{q} IS NOT OLD.{q})"
        # Only a column without type affinity can hold 1 and 1.0, which compare equal.
        return f"(NEW.{q} IS NOT OLD.{q} OR typeof(NEW.{q}) != typeof(OLD.{q}))"

    # WHEN asks whether any column changed (OR stops at the first that did); VALUES then builds
    # the mask. Measured cheaper than testing the mask in WHEN, or a subquery computing it once.
    any_changed = " OR ".join(changed(c) for c in columns)
    mask = " | ".join(f"({changed(c)} << {table.slots[c]})" for c in columns)
    pk_changed = " OR ".join(changed(c) for c in table.pk)
    new_key, old_key = key_sql(table, declared or {}, rowid_key, nullable or set())
    pk_slots = ", ".join(slot_column(table.slots[c]) for c in table.pk)
    old_pk = ", ".join(f"OLD.{quote_identifier(c)}" for c in table.pk)
    return {
        "insert": (
            f"CREATE TRIGGER {quote_identifier(trigger_name('insert', table.name))} AFTER INSERT ON {t}\n"
            "BEGIN\n"
            f"  INSERT INTO _sync_ops (hlc, tid, kind, mask, rowkey, {slot_list})\n"
            f"  VALUES ({hlc}, {table.tid}, {INSERT}, {table.mask_for(columns)}, {new_key}, {values('NEW')});\nEND"
        ),
        "update": (
            f"CREATE TRIGGER {quote_identifier(trigger_name('update', table.name))} AFTER UPDATE ON {t}\n"
            f"WHEN {any_changed}\nBEGIN\n"
            f"  INSERT INTO _sync_ops (hlc, tid, kind, mask, rowkey, newkey, {slot_list})\n"
            f"  VALUES ({hlc}, {table.tid}, {UPDATE}, {mask}, {old_key},\n"
            f"    CASE WHEN {pk_changed} THEN {new_key} END, {values('NEW')});\nEND"
        ),
        "delete": (
            f"CREATE TRIGGER {quote_identifier(trigger_name('delete', table.name))} AFTER DELETE ON {t}\n"
            "BEGIN\n"
            f"  INSERT INTO _sync_ops (hlc, tid, kind, mask, rowkey, {pk_slots})\n"
            f"  VALUES ({hlc}, {table.tid}, {DELETE}, 0, {old_key}, {old_pk});\nEND"
        ),
    }


def key_sql(table: SyncedTable, declared: dict[str, str], rowid_key: bool, nullable: set[str]) -> tuple[str, str]:
    """The row key expressions of a capture trigger: ``(NEW row's, OLD row's)``."""
    pk_typed = [key_is_canonical(declared.get(c, "")) for c in table.pk]
    new_key = rowkey_sql((f"NEW.{quote_identifier(c)}" for c in table.pk), pk_typed)
    old_key = rowkey_sql((f"OLD.{quote_identifier(c)}" for c in table.pk), pk_typed)
    if rowid_key:
        # An integer stored in the TEXT rowkey column becomes exactly what quote() would make.
        new_key, old_key = f"NEW.{quote_identifier(table.pk[0])}", f"OLD.{quote_identifier(table.pk[0])}"
    null_pk = [c for c in table.pk if c in nullable and not rowid_key]
    if null_pk:
        # Every NULL key would be the same row to a peer, so rows would merge: refuse the write.
        message = (
            f"datasette-sync: table '{table.name}' is synced, so its primary key "
            f"({', '.join(table.pk)}) cannot be NULL"
        ).replace("'", "''")
        is_null = " OR ".join(f"NEW.{quote_identifier(c)} IS NULL" for c in null_pk)
        new_key = f"CASE WHEN {is_null} THEN RAISE(ABORT, '{message}') ELSE {new_key} END"
    return new_key, old_key


def capture_hlc_sql(floor: int) -> str:
    """The clock a capture trigger gives an operation: the wall clock, but not below ``floor``
    (the local clock when the trigger was made, which is above everything imported by then).

    Reading the last operation's clock instead would cost a lookup per captured row; a wall
    clock set back is caught by :func:`~sqlite_utils_sync.clocks.settle_clocks` before any
    operation leaves.
    """
    return f"max({floor}, {HLC_NOW_SQL})"


# Where the floor sits in a trigger. Quoted names and strings are passed over whole, so a
# column named like the clock is not taken for it.
CAPTURE_FLOOR = re.compile(r""""(?:[^"]|"")*"|'(?:[^']|'')*'|(VALUES \(max\()(?:\d+|\?), """)


def with_floor(trigger_sql: str, floor: int | None) -> str:
    """``trigger_sql`` with its clock floor replaced (None: a placeholder, for comparisons)."""

    def replace(match: re.Match) -> str:
        if match.group(1) is None:
            return match.group(0)
        return f"{match.group(1)}{'?' if floor is None else floor}, "

    return CAPTURE_FLOOR.sub(replace, trigger_sql)


def affinity(declared_type: str) -> str:
    """A column's type affinity, by SQLite's rules (section 3.1 of its datatype docs)."""
    upper = (declared_type or "").upper()
    if "INT" in upper:
        return "INTEGER"
    if any(t in upper for t in ("CHAR", "CLOB", "TEXT")):
        return "TEXT"
    if not upper or "BLOB" in upper:
        return "BLOB"
    if any(t in upper for t in ("REAL", "FLOA", "DOUB")):
        return "REAL"
    return "NUMERIC"


def has_affinity(declared_type: str) -> bool:
    """True unless the column has BLOB ("none") affinity: typed columns convert 1 and 1.0 to
    one storage class, so a change between them cannot happen unseen."""
    return affinity(declared_type) != "BLOB"


def key_is_canonical(declared_type: str) -> bool:
    """True when the column can never store an integral REAL (INTEGER and NUMERIC turn 2.0
    into 2, TEXT turns numbers into text), so its row key needs no normalising."""
    return affinity(declared_type) in ("INTEGER", "NUMERIC", "TEXT")


def declared_types(conn: sqlite3.Connection, table: str) -> dict[str, str]:
    """Each column's declared type, as it decides the column's affinity (see
    :func:`~sqlite_utils_sync.declared.column_types`)."""
    return column_types(conn, table)


def nullable_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """Columns without a NOT NULL constraint."""
    return {row[1] for row in table_info(conn, table) if not row[3]}


# A clock that looks up the last operation's for every captured row, instead of a floor written
# into the trigger. Triggers using it capture the same writes, only slower: they are not drift,
# and a repair replaces them with the floor form.
LOOKUP_HLC_SQL = f"(SELECT max(hlc + 1, {HLC_NOW_SQL}) FROM _sync_ops ORDER BY op DESC LIMIT 1)"


def capture_sql(
    conn: sqlite3.Connection, table: SyncedTable, columns: list[str], clock_sql: str | None = None
) -> dict[str, str]:
    """The capture triggers ``table`` should have, given its schema now."""
    return trigger_sql(
        table,
        columns,
        declared_types(conn, table.name),
        is_rowid_alias(conn, table.name, table.pk),
        nullable_columns(conn, table.name),
        last_hlc(conn),
        clock_sql,
    )


def same_capture(installed: dict[str, str], wanted: dict[str, str]) -> bool:
    """True when the installed triggers are the wanted ones, whatever clock floor each has."""
    return {k: with_floor(v, None) for k, v in installed.items()} == {k: with_floor(v, None) for k, v in wanted.items()}


def installed_triggers(conn: sqlite3.Connection, table: str) -> dict[str, str]:
    found = {}
    for kind in TRIGGER_KINDS:
        row = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND name = ? AND tbl_name = ?",
            [trigger_name(kind, table), table],
        ).fetchone()
        if row:
            found[kind] = row[0]
    return found


def table_exists(conn: sqlite3.Connection, name: str) -> bool:
    return bool(conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone())


def table_drift(conn: sqlite3.Connection, table: SyncedTable) -> str | None:
    """Why ``table``'s capture is out of step with its schema, or None when it is current."""
    if not table_exists(conn, table.name):
        return f"table '{table.name}' no longer exists"
    installed = installed_triggers(conn, table.name)
    if not installed:
        return f"table '{table.name}' has no capture triggers (rebuilt by a transform?)"
    columns = table.current_columns(conn)
    new = [c for c in columns if c not in table.slots]
    if new:
        return f"table '{table.name}' has columns not captured: {', '.join(new)}"
    if not same_capture(installed, capture_sql(conn, table, columns)):
        if installed == capture_sql(conn, table, columns, LOOKUP_HLC_SQL):
            return None  # they miss nothing
        return f"table '{table.name}' has stale capture triggers"
    return None


def install_triggers(conn: sqlite3.Connection, table: SyncedTable, columns: list[str]) -> None:
    drop_triggers(conn, table.name)
    for sql in capture_sql(conn, table, columns).values():
        conn.execute(sql)
    conn.execute("INSERT OR REPLACE INTO _sync_captured VALUES (?, ?)", [table.tid, json.dumps(columns)])


def remember_captured(conn: sqlite3.Connection, table: SyncedTable) -> None:
    """Record what the installed triggers cover, if nothing is recorded yet (``_sync_captured``
    is empty in a database upgraded from schema version 1), before something removes them."""
    if not has_table(conn, "_sync_captured"):
        return  # a version-1 database opened read-only: nothing can be recorded
    if conn.execute("SELECT 1 FROM _sync_captured WHERE tid = ?", [table.tid]).fetchone():
        return
    trigger = installed_triggers(conn, table.name).get("insert")
    slots = captured_before(conn, table, trigger) if trigger else None
    if slots is not None:
        names = table.slot_names()
        conn.execute(
            "INSERT INTO _sync_captured VALUES (?, ?)",
            [table.tid, json.dumps([names[s] for s in sorted(slots) if s in names])],
        )


def captured_before(conn: sqlite3.Connection, table: SyncedTable, insert_trigger: str | None) -> set[int] | None:
    """The slots capture covered until now (None when unknown): columns outside them were
    added since, so the table holds nothing of its own in them yet."""
    if insert_trigger:
        match = re.search(r"INSERT INTO _sync_ops \(([^)]*)\)", insert_trigger)
        if match:
            return {int(slot) for slot in re.findall(r"\bc(\d+)\b", match.group(1))}
    row = has_table(conn, "_sync_captured") and conn.execute(
        "SELECT columns FROM _sync_captured WHERE tid = ?", [table.tid]
    ).fetchone()
    if row:
        return {table.slots[c] for c in json.loads(row[0]) if c in table.slots}
    return None


def refresh_capture(conn: sqlite3.Connection, table: SyncedTable) -> None:
    """Upkeep of a table whose capture is current: record what it covers, and replace triggers
    that use :data:`LOOKUP_HLC_SQL` with the faster form."""
    remember_captured(conn, table)
    if any(LOOKUP_HLC_SQL in sql for sql in installed_triggers(conn, table.name).values()):
        install_triggers(conn, table, table.current_columns(conn))


def drop_triggers(conn: sqlite3.Connection, table: str) -> None:
    for kind in TRIGGER_KINDS:
        conn.execute(f"DROP TRIGGER IF EXISTS {quote_identifier(trigger_name(kind, table))}")


def secondary_unique_columns(conn: sqlite3.Connection, table: str) -> list[list[str]]:
    """Column lists of UNIQUE constraints other than the primary key."""
    found = []
    for _, name, unique, origin, _ in conn.execute(f"PRAGMA index_list({quote_identifier(table)})").fetchall():
        if unique and origin != "pk":
            found.append([row[2] for row in conn.execute(f"PRAGMA index_info({quote_identifier(name)})")])
    return found


@contextmanager
def muted(conn: sqlite3.Connection) -> Iterator[None]:
    """Writes made inside are not captured (they are not local edits). Call inside a transaction."""
    saved = []
    for name in load_tables(conn, enabled_only=True):
        saved.extend(installed_triggers(conn, name).values())
        drop_triggers(conn, name)

    def restore() -> None:
        # Raise the clock floor past whatever was written meanwhile (an import's tick is above
        # every clock it imported), so local edits made next order after it.
        floor = last_hlc(conn)
        for sql in saved:
            conn.execute(with_floor(sql, floor))

    try:
        yield
    except BaseException:
        # What went wrong is the error to report, not a failure to restore the triggers after
        # it (a bundle's chunk left attached may fail every statement): the caller rolls back.
        with suppress(sqlite3.Error):
            restore()
        raise
    restore()


def drifted_tables(conn: sqlite3.Connection) -> dict[str, str]:
    """Synced tables whose capture is missing or stale, with the reason."""
    return {
        name: reason
        for name, table in load_tables(conn, enabled_only=True).items()
        if (reason := table_drift(conn, table))
    }


def install_capture(conn: sqlite3.Connection, name: str) -> tuple[SyncedTable, set[int] | None] | None:
    """Install (or repair) the capture triggers of one table.

    :returns: None when they were current already, else the table and the slots the previous
        triggers covered (see :func:`captured_before`): the caller then logs the changes they
        missed (:func:`sqlite_utils_sync.writing.capture_table`)
    """
    name = canonical_name(conn, name)
    previous = load_table(conn, name)
    columns, pk = check_can_sync(conn, name, synced=bool(previous and previous.enabled))
    if previous and previous.pk and previous.pk != pk and previous.enabled:
        raise SyncError(
            PK_CHANGED, f"Table '{name}' primary key changed from {previous.pk} to {pk}; peers cannot follow that"
        )
    table = register_table(conn, name, columns, pk)
    current = installed_triggers(conn, name)
    if same_capture(current, capture_sql(conn, table, columns)) and previous and previous.enabled:
        return None
    captured = captured_before(conn, table, current.get("insert"))
    install_triggers(conn, table, columns)
    return table, captured
