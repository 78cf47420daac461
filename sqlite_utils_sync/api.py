"""The public operations behind the CLI: enable, disable, export, status, new identity.

Each takes a ``sqlite_utils.Database`` or a ``sqlite3.Connection``; every one that writes runs
in :func:`~sqlite_utils_sync.writing.writing`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from typing import Any, Callable, Iterator

from .bundle import CHUNK_OPS, MAX_TABLES, ExportResult, has_scratch, operations_after, scratch_schema, write_bundle
from .codec import DEFAULT as DEFAULT_CODEC
from .capture import canonical_name, drifted_tables, drop_triggers, load_tables, muted, remember_captured
from .clocks import clock, unsettled_clocks
from .conflicts import rebuild_conflicts
from .devices import device_names, local_device_id, new_device as give_new_id, resolve_device, retire, set_local_name
from .errors import CONSTRAINT_FAILED, INVALID_ARGUMENT, MISSING_TABLE, NOT_ENABLED, UNKNOWN_DEVICE, SyncError, constraint_hint
from .oplog import LOCAL, op_id, parse_clock
from .schema import check_schema, connection, is_enabled
from .scope import check_scope_change, load_scope, store_scope, withheld_count
from .transaction import holds_write_lock, writers_held_off
from .writing import capture_table, writing


def enable_sync(
    db: Any,
    tables: list[str],
    partial: bool = False,
    name: str | None = None,
    on_kept: Callable[[str, str], None] | None = None,
) -> dict[str, int]:
    """Start capturing writes to ``tables`` (idempotent; re-running repairs the triggers).

    :param partial: this copy holds only the tables synced here: its scope becomes them (see
        :mod:`scope`). A copy that is partial already adds ``tables`` to its scope either way
    :param name: also name this database's device (see :func:`set_device_name`)
    :param on_kept: called as ``on_kept(table, rowkey)`` for each row whose value this copy
        changed while the table was not synced, and a peer changed too, in an operation that
        arrived meanwhile: the local edit is kept and logged, the peer's stays in the log
    :returns: for each table, how many existing or missed rows were logged as operations
    """
    conn = connection(db)
    try:
        with writing(conn, create=True, repair=False, applies_rows=True):
            # One entry per table, however it was spelled.
            names = list(dict.fromkeys(canonical_name(conn, t) for t in tables))
            scope = load_scope(conn)
            if partial or scope is not None:
                wanted = (scope or set()) | set(names)
                if scope is None:
                    wanted |= set(load_tables(conn, enabled_only=True))
                check_scope_change(conn, wanted)
                store_scope(conn, wanted)
            synced = set(load_tables(conn, enabled_only=True)) | set(names)
            if len(synced) > MAX_TABLES:
                raise SyncError(
                    INVALID_ARGUMENT,
                    f"Cannot sync {len(synced)} tables in one database: a bundle names every synced table, and "
                    f"copies take at most {MAX_TABLES}. Nothing was changed",
                )
            logged = {table: capture_table(conn, table, on_kept) for table in names}
            if name is not None:
                set_local_name(conn, name)
            return logged
    except sqlite3.IntegrityError as ex:
        # Taking values peers wrote while this copy was not syncing can meet a UNIQUE value (or
        # a foreign key) a row written here meanwhile holds.
        raise SyncError(
            CONSTRAINT_FAILED,
            f"Cannot bring {', '.join(tables)} up to date with what peers wrote while sync was off: {ex} "
            f"here. Nothing was changed. {constraint_hint(ex)}",
        )


def disable_sync(db: Any, tables: list[str]) -> None:
    """Stop capturing writes to ``tables``; their operations stay in the log."""
    conn = connection(db)
    synced = load_tables(conn, enabled_only=True)
    tables = [canonical_name(conn, table) for table in tables]
    for table in tables:
        if table not in synced:
            raise SyncError(NOT_ENABLED, f"Table '{table}' is not synced")
    # Not repaired first: what the triggers of these tables covered is recorded as it is.
    with writing(conn, repair=False):
        for table in tables:
            remember_captured(conn, synced[table])
            drop_triggers(conn, table)
            conn.execute("UPDATE _sync_tables SET enabled = 0 WHERE name = ?", [table])


def export_bundle(
    db: Any,
    path: str | os.PathLike,
    since: dict[str, int] | str | None = None,
    for_device: str | None = None,
    repair: bool = True,
    progress: Callable[[int], None] | None = None,
    tables: list[str] | set[str] | None = None,
    unknown_tables: bool = False,
    codec: str | None = DEFAULT_CODEC,
    immutable: bool = False,
) -> ExportResult:
    """Write the operations a peer lacks to a bundle file.

    :param since: the peer's vector clock (dict or JSON), or what its ``sync-status --json``
        prints (its ``"clock"`` is used); operations after it are included
    :param for_device: use the clock this database last learned from that device's bundles;
        everything, when no bundle of that device was imported here yet
    :param repair: first settle clocks, re-install stale triggers and log missed changes, where
        the database can be written; without it, nothing is written and the operations are
        read in one read transaction (unless the caller has one open), so a write committed
        by another connection meanwhile is wholly in the bundle or not at all
    :param tables: send the values of these tables only (``--table``); the other operations go
        withheld: the receiver learns they exist, never what they hold. None: every table
    :param unknown_tables: a table of ``tables`` this database holds no operation of is sent
        as it is (none of its operations), instead of refused as a typo: a hub answers a copy
        that syncs a table nobody pushed yet
    :param codec: how the bundle's chunks are compressed (None: not at all, readable by
        versions before compression)
    :param immutable: with ``repair=False``, ``db`` reads a file that nothing writes while it
        is open (opened ``immutable=1``, as Datasette opens ``-i`` files): a large export
        builds on a second connection opened the same way, and takes no lock of any kind
    """
    conn = connection(db)
    if not is_enabled(conn):
        raise SyncError(NOT_ENABLED, "This database has no synced tables: run enable-sync first")
    if tables is not None:
        if not tables:
            raise SyncError(INVALID_ARGUMENT, "No table to export: a bundle of some tables needs at least one")
        tables = known_tables(conn, tables, unknown_tables)
    since_clock = clock_from_since(since) if since is not None else {}
    if for_device is not None:
        since_clock = clock_of_device(conn, for_device)
    with scratch_schema(conn):
        if repair:
            # A transaction of our own begins with the write lock (BEGIN IMMEDIATE): if writing
            # then writes nothing, another connection reads exactly what this one does.
            own, changes = not conn.in_transaction, conn.total_changes
            with writing(conn) as state:
                shared = own and conn.total_changes == changes and holds_write_lock(conn)
                return write_bundle(conn, path, since_clock, progress, lambda: state.unsettled, tables, codec, shared)
        # A large export without a transaction of the caller's may build on a second connection
        # too: writers are held off until both have begun reading (a hub's connection is
        # read-only, and a hub must not block pushes for the whole export).
        large = not conn.in_transaction and has_scratch(conn) and operations_after(conn, since_clock) > CHUNK_OPS
        # An immutable file has no writers to hold off (and a lock would write beside it).
        hold = writers_held_off(conn) if large and not immutable else contextlib.nullcontext()
        with hold as let_writers_in, read_snapshot(conn):
            # Clocks a set-back wall clock left lower go out raised, as settling would write them.
            return write_bundle(
                conn, path, since_clock, progress, lambda: unsettled_clocks(conn), tables, codec,
                shared_snapshot=let_writers_in is not None or (large and immutable), let_writers_in=let_writers_in,
                immutable=immutable,
            )


def known_tables(conn: sqlite3.Connection, tables: list[str] | set[str], unknown: bool = False) -> set[str]:
    """The tables named, as the log names them; a name it does not know is an error (kept as
    it is with ``unknown``)."""
    known = load_tables(conn)
    names = set()
    for table in tables:
        name = canonical_name(conn, table)
        if name not in known and table not in known and not unknown:
            raise SyncError(
                MISSING_TABLE, f"Table '{table}' is not synced here and no operations of it are held, so it cannot be exported"
            )
        names.add(name if name in known else table)
    return names


def set_scope(db: Any, tables: list[str] | None) -> set[str] | None:
    """Make this copy hold only ``tables`` (``sqlite-utils sync --table``): narrowing is always
    safe, widening is refused once it withholds operations (see :mod:`scope`). Returns the
    scope now stored."""
    conn = connection(db)
    with writing(conn, create=True, repair=False):
        if tables is None:
            return load_scope(conn)
        wanted = set(tables)
        outside = sorted(set(load_tables(conn, enabled_only=True)) - wanted)
        if outside:
            # Its edits would go out while nobody else's came in: the copies would drift apart.
            raise SyncError(
                INVALID_ARGUMENT,
                f"This copy syncs {', '.join(outside)} too: add --table for each, or run disable-sync on them first",
            )
        if wanted != load_scope(conn):
            check_scope_change(conn, wanted)
            store_scope(conn, wanted)
        return wanted


def clock_from_since(since: dict | str) -> dict[str, int]:
    """A ``--since`` clock: a vector clock, or a whole ``sync-status --json`` result, so that
    the receiver's status can be pasted (or piped) as it is."""
    value: Any = since
    if isinstance(since, str):
        try:
            value = json.loads(since)
        except (ValueError, RecursionError):
            value = since  # parse_clock says what is wrong with it
    if isinstance(value, dict) and isinstance(value.get("clock"), dict):
        value = value["clock"]
    return parse_clock(value, "--since")


def clock_of_device(conn: sqlite3.Connection, device: str) -> dict[str, int]:
    """The clock this database last learned from ``device``'s bundles (its own: its clock).
    A device nothing was imported from yet gets everything: its first bundle starts it.

    :param device: a device id, or a name (see :func:`~sqlite_utils_sync.devices.resolve_device`)
    """
    if not isinstance(device, str) or not device:
        raise SyncError(UNKNOWN_DEVICE, f"--for takes a device id (32 hex digits) or name, got {device!r}")
    device_id = resolve_device(conn, device)
    row = conn.execute("SELECT clock FROM _sync_peers WHERE device_id = ?", [device_id]).fetchone()
    if row is not None:
        return parse_clock(row[0])
    return clock(conn) if device_id == local_device_id(conn) else {}


@contextlib.contextmanager
def read_snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """Read the database as of one moment: an export reads the devices, their tops, the
    operations and the clock one query at a time, and another connection's write committing
    in between would give a bundle whose ticks name operations it does not hold. A read
    transaction pins what every query sees (WAL), or keeps writers out until it ends (a
    rollback journal: they wait, then fail busy)."""
    if conn.in_transaction:  # the caller's transaction already is one snapshot
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("ROLLBACK")  # nothing was written: ending it only releases the lock


def local_state(db: Any) -> tuple[bool, str | None, dict[str, int]]:
    """(sync enabled, device id, clock): what :func:`sync_status` says first, without its
    per-table counts, which scan the whole log (a sync run asks for it before each step)."""
    conn = connection(db)
    if not check_schema(conn):
        return False, None, {}
    return True, local_device_id(conn), clock(conn)


def sync_status(db: Any) -> dict[str, Any]:
    """``{"device_id", "device_name", "clock", "tables", "operations", "unresolved_conflicts", "warnings"}``."""
    conn = connection(db)
    if not check_schema(conn):
        return {
            "enabled": False,
            "device_id": None,
            "clock": {},
            "tables": {},
            "operations": 0,
            "unresolved_conflicts": 0,
            "warnings": [],
            "scope": None,
            "withheld": 0,
            "device_name": None,
        }
    counts = dict(conn.execute("SELECT tid, count(*) FROM _sync_ops GROUP BY tid"))  # one scan
    drift = drifted_tables(conn)
    scope = load_scope(conn)
    tables = {
        name: {"operations": counts.get(table.tid, 0), "warning": drift.get(name)}
        for name, table in load_tables(conn, enabled_only=True).items()
    }
    local = local_device_id(conn)
    return {
        "enabled": True,
        "device_id": local,
        "device_name": device_names(conn).get(local),
        "clock": clock(conn),
        "tables": tables,
        # every operation but the local sentinel (seq 0, tid 0)
        "operations": sum(counts.values()) - 1,
        "unresolved_conflicts": conn.execute(
            "SELECT count(*) FROM _sync_conflicts WHERE resolved_by IS NULL"
        ).fetchone()[0],
        "warnings": [
            f"{reason}: writes since then are not yet logged; run enable-sync (or the next export/import) to repair"
            for reason in drift.values()
        ],
        # A partial copy: the tables it holds (None: all), and how many operations of the
        # others it knows exist without holding them.
        "scope": None if scope is None else sorted(scope),
        "withheld": withheld_count(conn),
    }


def new_device(db: Any, recover: bool = False) -> str:
    """Give a copied database file its own device id; returns the new id.

    :param recover: after ``device_id_clash``: also move the local operations no peer has
        acknowledged to the new id (see :func:`sqlite_utils_sync.devices.new_device`)
    """
    conn = connection(db)
    if not is_enabled(conn):
        raise SyncError(NOT_ENABLED, "This database has no synced tables")
    with writing(conn), muted(conn):  # the triggers come back with the new clocks' floor
        device_id = give_new_id(conn, recover=recover)
        # Conflict records name their operations: those of moved ones change.
        rows = conn.execute(
            "SELECT tid, rowkey FROM _sync_conflict_pairs WHERE b >= ?1 UNION SELECT tid, rowkey FROM _sync_resolutions "
            "WHERE op >= ?1",
            [op_id(LOCAL, 1)],
        ).fetchall()
        if rows:
            rebuild_conflicts(conn, rows)
        return device_id


def set_device_name(db: Any, name: str) -> None:
    """Name this database's device. The name travels in bundles, so every copy and hub shows
    it (``laptop (19cecc3d)``), and is accepted wherever a device id is; the newest name a
    device gave itself wins everywhere."""
    conn = connection(db)
    if not is_enabled(conn):
        raise SyncError(NOT_ENABLED, "This database has no synced tables: run enable-sync first")
    with writing(conn):
        set_local_name(conn, name)


def retire_device(db: Any, device: str) -> dict[str, Any]:
    """Retire a device that will never sync again (lost, or replaced), by id or name.

    The retirement travels in bundles like an edit: every copy then refuses anything the
    device writes after the last operation held here, and compaction stops waiting for it.
    Returns ``{"device_id", "seq"}``: operations up to ``seq`` stay accepted.
    """
    conn = connection(db)
    if not is_enabled(conn):
        raise SyncError(NOT_ENABLED, "This database has no synced tables: run enable-sync first")
    with writing(conn):
        device_id = resolve_device(conn, device)
        return {"device_id": device_id, "seq": retire(conn, device_id)}
