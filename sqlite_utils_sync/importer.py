"""Importing bundles: validate, append to the log, bring the tables up to date.

The path of a bundle through :func:`import_bundle`, in one transaction:

1. map the bundle's tables to local tables and slots (:meth:`Importer.map_tables`);
2. stream its chunks into the log, each checked by a few set-based queries and appended with
   one ``INSERT … SELECT`` (:meth:`Importer.append_ops`);
3. check the whole: no gap in a device's sequence, who may push which device, retired devices
   (and take the header's device names and retirements), what the operations depend on, the
   compaction horizon;
4. bring the tables up to date (:class:`TableUpdate`) by the merge rules of
   :mod:`merge`, and rebuild the conflict records of the rows with clashes (:mod:`conflicts`).

Applying is set-based where it can be: a row touched by exactly one new operation and by no
operation its author had not seen is written with one ``INSERT … SELECT`` / ``UPDATE … FROM``
/ ``DELETE`` per table straight from ``_sync_ops``. Only rows with concurrent or several new
operations go through Python (:mod:`rows`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import string
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

from . import errors
from .bundle import WITHHELD_CHUNK, BundleReader, ChunkStage, check_image, op_fingerprint, op_table, open_image
from .capture import (
    SyncedTable,
    affinity,
    canonical_name,
    declared_types,
    load_table,
    load_tables,
    muted,
    register_table,
    table_exists,
    table_info,
)
from .conflicts import rebuild_conflicts
from .declared import add_column, create_table as create_declared, is_rowid_alias
from .errors import BundleError, SyncError, shorten
from .clocks import DEFAULT_MAX_CLOCK_SKEW, HLC_NOW_SQL, HLC_PER_SECOND, MAX_HLC, append_tick, clock, horizon, knowledge_at, max_seq, now_iso, parse_duration, raise_horizon, record_knowledge
from .devices import (
    describe_device,
    device_ids,
    device_index,
    local_device_id,
    merge_names,
    announcement_seq,
    merge_retired,
    retired_records,
)
from .oplog import DELETE, INSERT, KIND_MASK, LOCAL, RESOLUTION, SEQ_BITS, SEQ_MASK, TICK, UPDATE, encode_clock, load_clock, mask_of, mask_slots, op_id, op_seq, parse_clock, parse_rowkey, remap_mask_sql, row_actions, rowkey_sql
from .schema import connection, quote_identifier
from .scope import add_withheld_ranges, load_scope, store_scope, withheld_between, withheld_count, withheld_ranges
from .merge import Effect, KnowledgeCache, effects_of, latest_key, record_clashes
from .rows import apply_row, fetch_row, settle, write_row
from .transaction import attempt
from .writing import capture_table, writing

VALID_KINDS = {INSERT, UPDATE, DELETE, INSERT | RESOLUTION, UPDATE | RESOLUTION, DELETE | RESOLUTION}


RECOVER_HINT = (
    "run 'sqlite-utils sync-new-device --recover' on the database whose edits under that id are not "
    "synced yet (either one, if unsure): it keeps every edit"
)


@dataclass
class ImportResult:
    bundle_id: str
    source_device_id: str
    total_operations: int
    applied: int = 0
    conflicts: int = 0
    duplicates: int = 0
    skipped: bool = False
    not_applied: dict[str, int] = field(default_factory=dict)
    clock: dict[str, int] = field(default_factory=dict)
    withheld: int = 0  # new operations known to exist whose values this copy does not hold
    tables_created: list[str] = field(default_factory=list)
    columns_added: dict[str, list[str]] = field(default_factory=dict)
    # Per table synced here: the operations that reached it (new ones, and those kept earlier
    # that a table created now took up).
    applied_by_table: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle_id,
            "source_device_id": self.source_device_id,
            "total_operations": self.total_operations,
            "applied": self.applied,
            "conflicts": self.conflicts,
            "duplicates": self.duplicates,
            "skipped": self.skipped,
            "not_applied": self.not_applied,
            "withheld": self.withheld,
            "applied_by_table": self.applied_by_table,
            "tables_created": self.tables_created,
            "columns_added": self.columns_added,
        }


def import_bundle(
    db: Any,
    path: str,
    alter: bool = False,
    actor: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    max_clock_skew: float | str = DEFAULT_MAX_CLOCK_SKEW,
    may_relay: bool = True,
    adopt_scope: bool = False,
    authorize: Callable[[dict[str, set[str]]], None] | None = None,
    visible: set[str] | None = None,
    nameable: set[str] | None = None,
    create_tables: bool = False,
    before_commit: Callable[[ImportResult], None] | None = None,
) -> ImportResult:
    """Apply the bundle at ``path`` in one transaction.

    :param alter: add columns (and tables) the bundle has and this database lacks
    :param create_tables: create the tables the bundle has and this database lacks (as the
        sender declared them, synced), but add no columns to existing ones: for a new database
    :param actor: who imported it, for the import log
    :param progress: called with (operations just read, total) after each chunk
    :param max_clock_skew: refuse operations whose clock is further ahead of this machine's
        wall clock than this (seconds, or a duration like ``"7d"``)
    :param may_relay: False for a hub that limits who pushes each device's new operations
        (see :meth:`Importer.check_owners`): ``actor`` may then only add operations of devices
        it owns, and comes to own the devices nobody owns yet
    :param adopt_scope: a database holding no operations yet takes the scope of a bundle
        exported for only some tables (``--table``) as its own; otherwise such a bundle is
        refused by a copy holding a table it lacks (see :mod:`scope`)
    :param authorize: called once the new operations are appended and checked, before the
        tables are written, with the actions they need per table: ``{table: {"insert-row",
        "update-row", "delete-row"}}`` (a resolution needs ``update-row`` besides what it does
        to the row); operations held here already need none. It raises to refuse the bundle:
        nothing is then written
    :param visible: the tables the sender may view (a hub's pusher). Operations held here
        already are compared with the bundle's: a bundle repeating one of another table is
        refused (:data:`~sqlite_utils_sync.errors.TABLE_FORBIDDEN`), and its anchors on such
        operations are not checked, so the answer tells nothing of those tables
    :param nameable: the tables the sender may name at all (view or write one): a bundle
        naming another is refused (:data:`~sqlite_utils_sync.errors.TABLE_FORBIDDEN`) before
        its schema is compared with the one here, so the answer tells nothing of that table
    :param before_commit: called with the result once the import succeeded, before its
        transaction commits (not when it leaves nothing to commit: a bundle held already, or
        this database's own); raising rolls the whole import back. A cluster hub stores the pushed bundle in its replicated log there,
        so a push is never acknowledged, nor applied here, without being stored
    :raises BundleError: the bundle is invalid or cannot be applied; nothing was changed
    """
    conn = connection(db)
    skew = parse_duration(max_clock_skew)
    if is_database_file(conn, path):
        raise BundleError(errors.INVALID_ARGUMENT, f"Bundle {os.path.basename(path)} is the database it would be imported into")
    with contextlib.closing(BundleReader(path)) as reader, contextlib.closing(ChunkStage(conn, reader.path.name)) as stage:
        with one_line_errors(reader.path.name):
            try:
                # writing() reads TEXT exactly where values pass through Python, creates or
                # migrates the log, settles local clocks and repairs capture before anything else.
                with writing(conn, create=True, applies_rows=True):
                    create = alter or create_tables
                    importer = Importer(conn, reader, stage, alter, actor, progress, skew, may_relay, create)
                    importer.adopt_scope, importer.authorize, importer.visible = adopt_scope, authorize, visible
                    importer.nameable = nameable
                    result = importer.run()
                    if before_commit is not None:
                        before_commit(result)
                    return result
            except NothingNew as own:
                return own.result


@contextlib.contextmanager
def one_line_errors(name: str) -> Iterator[None]:
    """An import's errors as one line that names the bundle."""
    try:
        yield
    except BundleError as ex:
        if ex.message.startswith("Bundle "):
            raise
        raise BundleError(ex.reason, f"Bundle {name}: {ex.message}")
    except sqlite3.IntegrityError as ex:
        # Foreign keys are not enforced while sync writes (writing.foreign_keys_off).
        raise BundleError(
            errors.CONSTRAINT_FAILED,
            f"Bundle {name} cannot be applied: {ex} here. Nothing was imported. {errors.constraint_hint(ex)}",
        )


def ascii_lower(name: str) -> str:
    """A name as SQLite compares identifiers: ASCII letters without case, every other one as is."""
    return name.translate(ASCII_LOWER)


ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)


def is_database_file(conn: sqlite3.Connection, path: str | os.PathLike) -> bool:
    """Whether ``path`` is the file ``conn`` writes (an import would turn the bundle into a
    synced database)."""
    main = conn.execute("PRAGMA database_list").fetchone()[2]
    try:
        return bool(main) and os.path.samefile(main, path)
    except OSError:  # either is missing: the reader says so
        return False


class NothingNew(Exception):
    """A bundle already held came back (this database's own, or one imported before): roll back
    even the trigger rebuilds, leave no trace."""

    def __init__(self, result: ImportResult):
        self.result = result


class MappedTable(NamedTuple):
    """A bundle table as this database holds it."""

    tid: int
    slots: list[int]  # the local slot of each of the bundle's columns
    applied: bool  # synced here (else its operations are only kept and relayed)
    pk_positions: list[int]  # where the primary-key columns are among the bundle's columns
    withheld: bool = False  # outside this partial copy's scope: only its seqs are kept


WITHHELD_TABLE = MappedTable(-1, [], False, [], True)


NO_TABLE = MappedTable(0, [], True, [])  # the table of knowledge (tick) operations

RowKey = tuple[int, str]  # (tid, row key)


def merged(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Overlapping ``(lo, hi)`` spans merged, in order."""
    result: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if result and lo <= result[-1][1]:
            result[-1] = (result[-1][0], max(result[-1][1], hi))
        else:
            result.append((lo, hi))
    return result


# Key types a column of each affinity may store as another value (see check_key_affinity).
CONVERTED_KEY_TYPES = {"TEXT": {"integer", "real"}, "INTEGER": {"text"}, "NUMERIC": {"text"}, "REAL": {"text"}}


class Importer:
    """One bundle's import. Every piece of its state is declared here, in the order the steps
    of :meth:`run` fill it in."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        reader: BundleReader,
        stage: ChunkStage,
        alter: bool,
        actor: str | None,
        progress: Callable[[int, int], None] | None,
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
        may_relay: bool = True,
        create_tables: bool = False,
    ):
        self.conn = conn
        self.reader = reader
        self.stage = stage
        self.name = reader.path.name
        self.alter = alter
        self.create_tables = create_tables  # create missing tables (only --alter adds columns)
        self.actor = actor
        self.progress = progress
        self.max_clock_skew = max_clock_skew
        self.may_relay = may_relay
        self.adopt_scope = False
        self.authorize: Callable[[dict[str, set[str]]], None] | None = None
        self.visible: set[str] | None = None
        self.nameable: set[str] | None = None  # the tables the sender may name (view or write)
        # decide_scope: the tables this copy holds (None: all), the bundle's (None: all).
        self.scope: set[str] | None = None
        self.bundle_scope: set[str] | None = None
        # map_tables: the bundle's tables, by their position in its header.
        self.tables: list[MappedTable] = []
        self.applied_tids: dict[int, SyncedTable] = {}  # the tables its operations are applied to
        self.table_names: dict[int, str] = {}
        self.integer_keys: set[int] = set()  # tables keyed by their rowid here
        self.key_affinities: dict[int, list[str | None]] = {}  # the others': see converting_keys
        # What the mapping changed in the schema, for the result.
        self.created: list[str] = []
        self.added: dict[str, list[str]] = {}
        self.adopted: dict[str, int] = {}  # kept operations a table created now took up
        # take_snapshot: this database as it was before the import.
        self.devices: list[int | None] = []  # the local index of each of the bundle's devices (None: of no chunk)
        self.new_devices: set[int] = set()  # those this import gave an index
        self.new_tables: set[int] = set()  # tables not synced here this import recorded, to keep their operations
        self.old: dict[int, int] = {}  # each of those devices' highest seq here
        self.fresh = False  # no data operations yet: may start from a compacted sender's snapshot
        self.compacted: dict[str, int] = {}  # the horizon (a snapshot adopted now was checked by its sender)
        self.now = 0  # the clock the triggers read
        self.clock_limit = 0  # the highest clock accepted
        # How far the source was checked to hold this database's own operations as they are here.
        self.verified = 0
        # append_ops: gathered while streaming, so the new operations need no further scans.
        self.kinds: dict[int, set[tuple[int, int]]] = {}  # per table: (kind, mask in local slots)
        self.moved: set[RowKey] = set()  # both ends of every primary-key move
        self.data_inserted = 0
        self.max_hlc = 0
        self.has_resolutions = False
        self.ticks: list[tuple[int, int, str]] = []  # (device index, seq, knowledge clock)
        self.chunk_spans: list[tuple[int, int, int, int, int, bool]] = []  # device, seqs, clocks, contiguous
        self.withheld: dict[int, int] = {}  # per device index: how many new seqs are withheld
        self.heard_retirement = False  # take_device_records: the bundle retired a device for this copy
        # check_sequences: the new operations, as (device index, first op id, last op id).
        self.ranges: list[tuple[int, int, int]] = []

    def fail(self, reason: str, message: str) -> BundleError:
        return BundleError(reason, f"Bundle {self.name}: {message}")

    def run(self) -> ImportResult:
        conn, header = self.conn, self.reader.header
        result = ImportResult(self.reader.bundle_id, header["source"], header["operations"])
        if conn.execute("SELECT 1 FROM _sync_imports WHERE bundle_id = ?", [result.bundle_id]).fetchone():
            return self.repeat(result)
        self.decide_scope()
        self.map_tables()
        self.take_snapshot()
        local_id = local_device_id(conn)
        self.refuse_if_retired_here(local_id)
        self.check_anchors()
        with muted(conn):
            inserted = self.append_ops(result)
            held = {idx: inserted.get(idx, 0) + self.withheld.get(idx, 0) for idx in {*inserted, *self.withheld}}
            self.forget_devices(held)
            self.check_sequences(held)
            self.forget_tables()
            self.check_owners(held)
            self.check_clock_order()
            # Withheld operations of a retired device are new operations of it too.
            self.take_device_records(held)
            self.record_knowledge()
            self.check_horizon()
            result.applied = sum(inserted.values())
            result.withheld = sum(self.withheld.values())
            if self.authorize is not None and self.data_inserted:
                self.authorize(self.actions_needed())
            self.report_schema(result)
            if self.data_inserted:
                result.conflicts = TableUpdate(self).run()
            if self.data_inserted or result.withheld or self.heard_retirement:
                # Withheld operations are known too: this copy's next edits come after them, so
                # peers that compacted them away still take those edits. So is a retirement:
                # copies wait for every other to have heard of it before compacting.
                append_tick(conn, {k: v for k, v in clock(conn).items() if k != local_id}, floor=self.max_hlc)
        result.clock = clock(conn)
        if header["source"] == local_id and not result.applied and not self.created and not self.added:
            result.skipped = True
            raise NothingNew(result)
        self.record_peer(header, result.clock)
        self.record_import(result)
        return result

    def repeat(self, result: ImportResult) -> ImportResult:
        """A bundle imported before: nothing to do, unless ``--alter`` creates what was missing
        then, which adopts the operations that import kept for those tables."""
        if self.create_tables:
            self.map_tables()
        result.duplicates = result.total_operations
        result.clock = clock(self.conn)
        self.report_schema(result)
        result.skipped = not (self.created or self.added)
        if result.skipped:
            raise NothingNew(result)  # not even the clock settling or a trigger rebuild stays
        return result

    def decide_scope(self) -> None:
        """Which tables this copy holds, and whether it may take a bundle that withholds some
        (see :mod:`scope`): only if it holds no table the bundle lacks, or holds no operations
        yet and may adopt the bundle's scope."""
        conn = self.conn
        self.scope = load_scope(conn)
        scope = self.reader.header.get("scope")
        self.bundle_scope = None if scope is None else set(scope)
        if self.bundle_scope is None or (self.scope is not None and self.scope <= self.bundle_scope):
            return
        fresh = not conn.execute("SELECT 1 FROM _sync_ops WHERE kind != ? LIMIT 1", [TICK]).fetchone()
        if fresh and self.adopt_scope and not withheld_count(conn):
            store_scope(conn, self.bundle_scope)
            self.scope = self.bundle_scope
            return
        if not self.reader.header.get("withheld"):
            # It withholds nothing: every operation up to its clock is in it, as in a full bundle.
            self.bundle_scope = None
            return
        holds = "all tables" if self.scope is None else f"tables {', '.join(sorted(self.scope))}"
        raise self.fail(
            errors.PARTIAL_BUNDLE,
            f"it holds only tables {', '.join(sorted(self.bundle_scope)) or '(none)'} (the others' operations are "
            f"withheld); this database holds {holds}, so it would miss operations: import a bundle exported "
            "without --table" + ("" if self.scope is None else " or with --table for each of its tables"),
        )

    def report_schema(self, result: ImportResult) -> None:
        """Put in the result the tables created, columns added and kept operations taken up."""
        result.tables_created = list(self.created)
        result.columns_added = {t: list(c) for t, c in self.added.items()}
        result.applied += sum(self.adopted.values())
        for name, count in self.adopted.items():
            if count:
                result.applied_by_table[name] = result.applied_by_table.get(name, 0) + count

    def take_snapshot(self) -> None:
        conn = self.conn
        # A device only the header names (no chunk of it) would be stored for nothing, and a
        # few bytes a device would fill the device indexes: it gets none (None here).
        for position, device in enumerate(self.reader.header["devices"]):
            idx = device_index(conn, device, create=False)
            if idx is None and position in self.reader.chunk_devices:
                idx = device_index(conn, device)
                self.new_devices.add(idx)
            self.devices.append(idx)
        self.old = {idx: max_seq(conn, idx) for idx in self.devices if idx is not None}
        self.fresh = not conn.execute(f"SELECT 1 FROM _sync_ops WHERE kind != {TICK} LIMIT 1").fetchone()
        self.compacted = horizon(conn)
        (self.now,) = conn.execute(f"SELECT {HLC_NOW_SQL}").fetchone()
        # Every later local clock is at least one above an accepted one: keep that valid too.
        self.clock_limit = min(MAX_HLC - 1, self.now + int(self.max_clock_skew * HLC_PER_SECOND))

    def forget_devices(self, held: dict[int, int]) -> None:
        """Drop the devices this import gave an index whose chunks held nothing (empty ones):
        nothing refers to them."""
        unused = [(idx,) for idx in sorted(self.new_devices) if not held.get(idx)]
        self.conn.executemany("DELETE FROM _sync_devices WHERE idx = ?", unused)

    def forget_tables(self) -> None:
        """Forget the tables recorded to keep operations of that none arrived for (chunks that
        hold no operation): a table a bundle carries no operation of is never stored, or a few
        bytes per name would grow every later import's and hub request's work for good."""
        if not self.new_tables:
            return
        carried = {
            tid for (tid,) in self.conn.execute(
                "SELECT DISTINCT o.tid FROM temp._sync_new r JOIN _sync_ops o NOT INDEXED ON o.op BETWEEN r.lo AND r.hi"
            )
        }
        unused = [(tid,) for tid in sorted(self.new_tables - carried)]
        self.conn.executemany("DELETE FROM _sync_tables WHERE tid = ?", unused)
        for (tid,) in unused:
            self.table_names.pop(tid, None)

    def actions_needed(self) -> dict[str, set[str]]:
        """What the new data operations do, per table: for the ``authorize`` hook."""
        needed: dict[str, set[str]] = {}
        for tid, kind in self.conn.execute(
            "SELECT DISTINCT o.tid, o.kind FROM temp._sync_new r JOIN _sync_ops o NOT INDEXED "
            "ON o.op BETWEEN r.lo AND r.hi WHERE o.kind != ?",
            [TICK],
        ).fetchall():
            needed.setdefault(self.table_names[tid], set()).update(row_actions(kind))
        return needed

    def record_import(self, result: ImportResult) -> None:
        self.conn.execute(
            "INSERT INTO _sync_imports VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                result.bundle_id,
                result.source_device_id,
                now_iso(),
                result.total_operations,
                result.applied,
                result.conflicts,
                result.duplicates,
                self.actor,
            ],
        )

    # -- validation and mapping --------------------------------------------------------------

    def map_tables(self) -> None:
        """Map each bundle table to a local table id and slots, or refuse the bundle. A table
        no chunk carries is only named (a full export names every synced table): it matters
        only where this import creates it, and is never recorded otherwise (a header of
        thousands of made-up names would be stored, and pulled, for good)."""
        carried = {tbl for (tbl,) in self.reader.conn.execute("SELECT DISTINCT tbl FROM bundle_chunks")}
        for position, (name, columns, pk) in enumerate(self.reader.header["tables"]):
            if position in carried or (self.create_tables and not table_exists(self.conn, name)):
                self.map_table(name, columns, pk)
            else:
                self.tables.append(WITHHELD_TABLE)  # no chunk refers to it

    def check_nameable(self, name: str) -> None:
        """Refuse a table the sender may neither view nor write (a hub's pusher) before its
        schema is compared with the one here: a mismatch, a match or another case of its
        name would each tell the sender something of it."""
        if self.nameable is not None and not {name, canonical_name(self.conn, name)} <= self.nameable:
            raise SyncError(
                errors.TABLE_FORBIDDEN,
                f"Permission denied: the bundle names table {name}, which these credentials may neither view nor "
                "write. Nothing was imported",
            )

    def map_table(self, name: str, columns: list[str], pk: list[str]) -> None:
        conn = self.conn
        if name.lower().startswith(("_sync_", "sqlite_")):  # SQL names ignore case
            raise self.fail(errors.INTERNAL_TABLE, f"operations on internal table '{name}' are never accepted")
        self.check_nameable(name)
        if self.scope is not None and name not in self.scope:
            held = [table for table in self.scope if table.lower() == name.lower()]
            if held:
                raise self.name_case(name, held[0])
            # Outside this partial copy: only the seqs of its operations are kept, never a value.
            self.tables.append(WITHHELD_TABLE)
            return
        local = load_table(conn, name)
        exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone()
        # Columns the sender dropped: it relays their values, nobody needs to have them.
        dropped = set(self.reader.header.get("dropped", {}).get(name, []))
        here = canonical_name(conn, name)
        if here != name:
            raise self.name_case(name, here)
        if local is None or not local.enabled:
            if not self.create_tables or exists:
                # Not synced here: store and relay its operations, never apply them.
                kept = register_table(conn, name, columns, pk, enabled=False)
                if local is None:
                    self.new_tables.add(kept.tid)
                self.tables.append(MappedTable(kept.tid, [kept.slots[c] for c in columns], False, [columns.index(c) for c in pk]))
                self.table_names[kept.tid] = name
                return
            local = self.create_table(name, columns, pk, dropped)
        elif not exists:
            # Dropped or renamed while synced: there is nothing to apply its operations to.
            raise SyncError(
                errors.TABLE_MISSING,
                f"table '{name}' is synced but no longer exists in this database (dropped or renamed): "
                f"rename it back, or run 'sqlite-utils disable-sync DB {name}' to stop syncing it "
                "(its operations are then kept, unapplied)",
            )
        local = self.match_columns(local, columns, pk, dropped)
        self.tables.append(MappedTable(local.tid, [local.slots[c] for c in columns], True, [columns.index(c) for c in pk]))
        self.applied_tids[local.tid] = local
        self.table_names[local.tid] = name
        if is_rowid_alias(conn, name, pk):
            self.integer_keys.add(local.tid)
        else:
            self.key_affinities[local.tid] = self.converting_keys(name, local.pk)

    def converting_keys(self, name: str, pk: list[str]) -> list[str | None]:
        """For each key column, its affinity here where the sender declared it with another
        one (None elsewhere, and for a sender older than declared types): only there can a key
        be stored as another value than the sender's. A table the header gives no types is
        untyped on the sender (or unknown to it, a relay: its keys are then checked too)."""
        declared = self.reader.header.get("column_types")
        if declared is None:
            return [None] * len(pk)
        sent, here = declared.get(name, {}), declared_types(self.conn, name)
        return [
            affinity(here.get(c, "")) if affinity(here.get(c, "")) != affinity(sent.get(c, "")) else None for c in pk
        ]

    def name_case(self, name: str, here: str) -> BundleError:
        return self.fail(
            errors.TABLE_NAME_CASE,
            f"table '{name}' is called '{here}' here; sync matches table names exactly, so rename "
            "one of them to match (ALTER TABLE ... RENAME TO ...)",
        )

    def create_table(self, name: str, columns: list[str], pk: list[str], dropped: set[str]) -> SyncedTable:
        """``--alter`` (or a new database) and a table this database lacks: create it as the
        sender declared it and sync it. Operations kept earlier for it are taken up."""
        conn, header = self.conn, self.reader.header
        kept = load_table(conn, name)
        if kept is not None:
            (count,) = conn.execute("SELECT count(*) FROM _sync_unapplied WHERE tid = ?", [kept.tid]).fetchone()
            self.adopted[name] = count
        types = header.get("column_types", {}).get(name, {})
        defaults = header.get("not_null_defaults", {}).get(name, {})
        create_declared(
            conn, name, [c for c in columns if c not in dropped], pk, types, name in header.get("without_rowid", []), defaults,
            strict=name in header.get("strict", []),
            unaliased_key=name in header.get("unaliased_keys", []),
        )
        capture_table(conn, name)
        self.created.append(name)
        return load_table(conn, name)

    def match_columns(self, local: SyncedTable, columns: list[str], pk: list[str], dropped: set[str]) -> SyncedTable:
        """Check a synced table has the bundle's columns and primary key (``--alter`` adds the
        missing columns); returns the table with a slot for every column of the bundle."""
        conn, name = self.conn, local.name
        current = [row[1] for row in table_info(conn, name)]
        missing = [c for c in columns if c not in current]
        # A column this table had and dropped is no surprise: its values stay in the log and
        # never reach the table. One it never had is refused (or, with --alter, added).
        unknown = [c for c in missing if c not in local.slots and c not in dropped]
        folded = {ascii_lower(c): c for c in current}
        for column in unknown:
            if ascii_lower(column) in folded:
                raise self.fail(
                    errors.UNKNOWN_COLUMN,
                    f"table '{name}' has column '{column}', called '{folded[ascii_lower(column)]}' here; sync matches column "
                    "names exactly, so rename one of them to match (ALTER TABLE ... RENAME COLUMN ...)",
                )
        if unknown and not self.alter:
            raise self.fail(
                errors.UNKNOWN_COLUMN,
                f"table '{name}' has column{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                f"that this database lacks (import or sync with --alter to add {'them' if len(unknown) > 1 else 'it'})",
            )
        missing = [c for c in missing if c not in dropped] if self.alter else []
        types = self.reader.header.get("column_types", {}).get(name, {})
        defaults = self.reader.header.get("not_null_defaults", {}).get(name, {})
        for column in missing:
            add_column(conn, name, column, types.get(column, ""), defaults.get(column))
        if missing and name not in self.created:
            self.added[name] = missing
        if missing:
            capture_table(conn, name)
            local = load_table(conn, name)
        if pk != local.pk:
            raise self.fail(errors.PK_MISMATCH, f"table '{name}' has primary key {pk} here it is {local.pk}")
        if any(c not in local.slots for c in columns):
            # Only dropped ones are left: a slot keeps their values for relaying.
            local = register_table(conn, name, [c for c in columns if c not in local.slots], local.pk)
        return local

    def check_anchors(self) -> None:
        """Refuse a bundle whose sender has a different op under an id we hold: two databases
        share a device id, and one side's edits would be silently lost."""
        for device, (seq, fingerprint) in self.reader.header.get("anchors", {}).items():
            idx = device_index(self.conn, device, create=False)
            if idx is None or not self.may_compare(op_id(idx, seq)):
                continue
            ours = op_fingerprint(self.conn, op_id(idx, seq))
            if ours and ours != fingerprint:
                raise self.clash(f"{device}:{seq}")
            if ours and idx == LOCAL:
                self.verified = max(self.verified, seq)

    def check_visible(self, tid: int) -> None:
        """Refuse to compare operations held here with those of a table the sender may not
        view (see :meth:`check_overlap`): whether they matched would tell it their values."""
        name = self.table_names.get(tid)
        if self.visible is not None and tid and name not in self.visible:
            raise SyncError(
                errors.TABLE_FORBIDDEN,
                f"Permission denied: the bundle repeats operations of table {name} held here already, which needs "
                "view-table on it (they are compared with the copy here). Nothing was imported",
            )

    def may_compare(self, op: int) -> bool:
        """Whether what the bundle says of ``op`` may be checked against the copy here: whether
        match or clash would tell the sender nothing of a table it may not view."""
        if self.visible is None:
            return True
        table = op_table(self.conn, op)
        return table is None or table[1] in self.visible

    def ahead_of_this_database(self, seq: int) -> BundleError:
        """The error for operations of this database's own device past the last one it holds,
        carried or withheld: written by a copy of this file (an older copy restored from a
        backup is behind the edits it made), or pushed under its id by someone else."""
        # Named by its file: on a hub, the pusher reads this and must not run it on their own copy.
        path = self.conn.execute("PRAGMA database_list").fetchone()[2]
        this = f"database {os.path.basename(path)}" if path else "this database"
        return self.fail(
            errors.DEVICE_ID_CLASH,
            f"it tells of operations of {this}'s own device {local_device_id(self.conn)} up to seq {seq}, "
            f"past the last one {this} holds ({self.old[LOCAL]}): another copy of that file wrote them ({this} "
            "restored from an older backup, or a copied file), or someone pushed under its id; run "
            f"'sqlite-utils sync-new-device --recover' on {this} (stop a hub serving it first): its own edits move to "
            "a new id, the other copy's come in as they are, and nothing is lost",
        )

    def clash(self, label: str) -> BundleError:
        return self.fail(
            errors.DEVICE_ID_CLASH,
            f"operation {label} differs from the copy here: two databases share that device id (a copied file, "
            f"or operations pushed under its id by someone else); {RECOVER_HINT}",
        )

    # -- appending to the log ----------------------------------------------------------------

    def append_ops(self, result: ImportResult) -> dict[int, int]:
        """Copy each chunk's operations into the log with one ``INSERT … SELECT``, after
        checking them with a couple of set-based queries: no value passes through Python."""
        inserted: dict[int, int] = {}
        carried = 0
        self.conn.execute("CREATE TEMP TABLE IF NOT EXISTS _sync_new_withheld (device INTEGER, lo INTEGER, hi INTEGER)")
        self.conn.execute("DELETE FROM temp._sync_new_withheld")
        announced = 0  # withheld operations the bundle's own ranges say exist
        chunks = self.checked_chunks()
        with contextlib.closing(chunks):  # an error ends the look-ahead thread now, not when collected
            for (position, table_position, data), facts in chunks:
                idx = self.devices[position]
                table = self.chunk_table(table_position)
                source = self.stage.load(data, self.reader.width(table_position), checked=True)
                try:
                    if table_position == WITHHELD_CHUNK:
                        announced += self.stage_withheld(source, idx, position)
                        continue
                    appended = self.append_chunk(source, idx, table, position, facts)
                except sqlite3.DatabaseError as ex:
                    if errors.is_local_trouble(ex):  # a full disk here is not the bundle's fault
                        raise
                    raise self.fail(errors.INVALID_OPERATION, f"a chunk cannot be read ({shorten(str(ex), 300)})")
                if appended is None:
                    continue
                first, last, count, stored = appended
                carried += count
                result.duplicates += count - stored  # of a withheld table, the rest is counted in keep_withheld
                if not table.withheld:
                    inserted[idx] = inserted.get(idx, 0) + stored
                    if table.tid:
                        self.data_inserted += stored
                    if stored and not table.applied:
                        self.keep_unapplied(result, table, table_position, idx, first, last, stored)
                    elif stored and table.tid:
                        name = self.reader.header["tables"][table_position][0]
                        result.applied_by_table[name] = result.applied_by_table.get(name, 0) + stored
                if self.progress:
                    self.progress(count, self.reader.header["operations"])
        if carried != self.reader.header["operations"]:
            raise self.fail(
                errors.INVALID_METADATA,
                f"its header counts {self.reader.header['operations']} operations but it carries {carried}",
            )
        if announced != self.reader.header.get("withheld", 0):
            raise self.fail(
                errors.INVALID_METADATA,
                f"its header counts {self.reader.header.get('withheld', 0)} withheld operations but it carries {announced}",
            )
        self.keep_withheld()
        return inserted

    def chunk_table(self, table_position: int) -> MappedTable:
        return NO_TABLE if table_position < 0 else self.tables[table_position]

    def checked_chunks(self) -> Iterator[tuple[tuple[int, int, bytes], tuple | None]]:
        """The bundle's chunks, each with its facts (see :meth:`inspect_chunk`), found on a
        worker thread while the chunk before it is appended (SQLite releases the GIL: these
        passes over the image are about a quarter of an import). Problems are raised in the
        order of the chunks, reading ones included, as a plain loop over them would."""
        chunks = self.reader.chunks()
        with ThreadPoolExecutor(1) as pool:
            ahead = self.check_next(chunks, pool)
            while ahead is not None:
                chunk, check = ahead
                ahead = self.check_next(chunks, pool) if chunk is not None else None
                yield chunk, check.result()

    def check_next(self, chunks: Iterator[tuple[int, int, bytes]], pool: ThreadPoolExecutor) -> tuple | None:
        """The next chunk and its check (running); None after the last one."""
        try:
            chunk = next(chunks)
        except StopIteration:
            return None
        except Exception as ex:  # raised when its turn comes, after the chunks before it
            failed: Future = Future()
            failed.set_exception(ex)
            return None, failed
        return chunk, pool.submit(self.inspect_chunk, chunk[2], chunk[1])

    def inspect_chunk(self, data: bytes, table_position: int) -> tuple | None:
        """On the worker thread: :func:`check_image`, then, from a copy of the image of its
        own, the chunk's ``(count, first seq, last seq, lowest clock, highest clock)`` and
        shapes (see :meth:`chunk_shapes`); None for chunks read otherwise (withheld ones)."""
        check_image(data, self.reader.width(table_position), self.name)
        table = self.chunk_table(table_position)
        if table_position == WITHHELD_CHUNK or table.withheld:
            return None
        try:
            with open_image(data) as image:
                bounds = image.execute("SELECT count(*), min(seq), max(seq), min(hlc), max(hlc) FROM ops").fetchone()
                bounds = (*bounds, self.clock_fall(image, *bounds[:3]))
                return bounds, self.chunk_shapes(image, "ops", table.tid, [f"v{i}" for i in table.pk_positions])
        except sqlite3.DatabaseError as ex:
            if errors.is_local_trouble(ex):
                raise
            raise self.fail(errors.INVALID_OPERATION, f"a chunk cannot be read ({shorten(str(ex), 300)})")

    def stage_withheld(self, source: str, idx: int, position: int) -> int:
        """Check a chunk of the bundle's withheld ranges (``seq`` = first, ``hlc`` = last) and
        stage the part this database lacks; returns how many operations they span."""
        header, device = self.reader.header, self.reader.header["devices"][position]
        if self.bundle_scope is None:
            raise self.fail(errors.INVALID_BUNDLE, "it withholds operations but says it holds every table")
        count, lo, hi, span, bad = self.conn.execute(
            f"SELECT count(*), min(seq), max(hlc), sum(hlc - seq + 1), max(kind != 0 OR mask IS NOT NULL OR "
            f"moved IS NOT NULL OR seq < 1 OR hlc < seq OR hlc > {SEQ_MASK}) FROM {source}"
        ).fetchone()
        if not count:
            return 0
        (overlap,) = self.conn.execute(
            f"SELECT EXISTS (SELECT 1 FROM (SELECT seq, lag(hlc) OVER (ORDER BY seq) AS p FROM {source}) WHERE p >= seq)"
        ).fetchone()
        if bad or overlap:
            raise self.fail(errors.INVALID_OPERATION, f"its withheld operations of device {device} are malformed or overlap")
        since, claimed = header.get("since", {}).get(device, 0), header["clock"].get(device, 0)
        if lo <= since or hi > claimed:
            raise self.fail(
                errors.INVALID_OPERATION,
                f"it withholds operations {lo}-{hi} of device {device}, outside what it sends (after seq {since} "
                f"up to its clock, seq {claimed})",
            )
        if idx == LOCAL and hi > self.old[LOCAL]:
            raise self.ahead_of_this_database(hi)
        self.conn.execute(
            f"INSERT INTO temp._sync_new_withheld SELECT ?, max(seq, ?), hlc FROM {source} WHERE hlc > ?",
            [idx, self.old[idx] + 1, self.old[idx]],
        )
        return span

    def withhold_chunk(self, source: str, idx: int) -> tuple[int, int, int, int] | None:
        """A chunk of a table outside this partial copy: stage the seqs it lacks as withheld
        ranges (runs of consecutive seqs), keep no value."""
        count, first, last = self.conn.execute(f"SELECT count(*), min(seq), max(seq) FROM {source}").fetchone()
        if not count:
            return None
        if not (0 < first and last <= SEQ_MASK):
            raise self.fail(errors.INVALID_OPERATION, f"operation sequence numbers must be 1 to {SEQ_MASK}")
        if idx == LOCAL and last > self.old[LOCAL]:
            raise self.ahead_of_this_database(last)
        stored = self.conn.execute(
            "INSERT INTO temp._sync_new_withheld SELECT ?, min(seq), max(seq) FROM "
            f"(SELECT seq, seq - row_number() OVER (ORDER BY seq) AS run FROM {source} WHERE seq > ?) GROUP BY run",
            [idx, self.old[idx]],
        ).rowcount
        if stored:
            (stored,) = self.conn.execute(f"SELECT count(*) FROM {source} WHERE seq > ?", [self.old[idx]]).fetchone()
        return first, last, count, stored

    def keep_withheld(self) -> None:
        """Check the staged withheld ranges overlap neither each other nor the operations the
        bundle carries, and record them."""
        conn = self.conn
        overlap = conn.execute(
            "SELECT device FROM (SELECT device, lo, lag(hi) OVER (PARTITION BY device ORDER BY lo) AS p "
            "FROM temp._sync_new_withheld) WHERE p >= lo "
            "UNION ALL SELECT w.device FROM temp._sync_new_withheld w WHERE EXISTS (SELECT 1 FROM _sync_ops o "
            f"WHERE o.op BETWEEN (w.device << {SEQ_BITS}) + w.lo AND (w.device << {SEQ_BITS}) + w.hi) LIMIT 1"
        ).fetchone()
        if overlap:
            raise self.fail(
                errors.INVALID_OPERATION,
                f"it both withholds and sends operations of device {device_ids(conn)[overlap[0]]} (or withholds them twice)",
            )
        staged = conn.execute("SELECT device, lo, hi FROM temp._sync_new_withheld ORDER BY device, lo").fetchall()
        add_withheld_ranges(conn, staged)
        for idx, lo, hi in staged:
            self.withheld[idx] = self.withheld.get(idx, 0) + hi - lo + 1

    def keep_unapplied(
        self, result: ImportResult, table: MappedTable, table_position: int, idx: int, first: int, last: int, stored: int
    ) -> None:
        """Remember exactly which operations of a table not synced here were stored, so enabling
        the table later adopts these and no others."""
        table_name = self.reader.header["tables"][table_position][0]
        result.not_applied[table_name] = result.not_applied.get(table_name, 0) + stored
        self.conn.execute(
            # A device's chunks of tables written in turn interleave: only this chunk's table.
            f"INSERT OR IGNORE INTO _sync_unapplied SELECT {table.tid}, op FROM _sync_ops WHERE op BETWEEN ? AND ? "
            f"AND tid = {table.tid}",
            [op_id(idx, max(first, self.old[idx] + 1)), op_id(idx, last)],
        )

    def append_chunk(
        self, source: str, idx: int, table: MappedTable, position: int, facts: tuple
    ) -> tuple[int, int, int, int] | None:
        """Check one loaded chunk and append it to the log: ``(first seq, last seq, ops, stored)``.

        :param facts: its bounds and shapes (see :meth:`inspect_chunk`)
        """
        if table.withheld:
            return self.withhold_chunk(source, idx)
        pk = [f"v{i}" for i in table.pk_positions]
        # Each check is an O(1) lookup or one pass that keeps only distinct shapes.
        (count, first, last, low, high, fall), shapes = facts
        if not count:
            return None
        if not (0 < first and last <= SEQ_MASK):
            raise self.fail(errors.INVALID_OPERATION, f"operation sequence numbers must be 1 to {SEQ_MASK}")
        # Holes are checked per device once everything is in (a compacted sender may leave some).
        self.check_clocks(source, position, shapes, low, high)
        if fall is not None:
            raise self.clocks_fall(f"{self.reader.header['devices'][position]}:{fall}")
        # Where its seqs are contiguous, only its edges meet other operations of its device.
        self.chunk_spans.append((idx, first, last, low, high, count == last - first + 1))
        if idx == LOCAL and last > self.old[LOCAL]:
            raise self.ahead_of_this_database(last)
        if first <= self.old[idx]:
            self.check_visible(table.tid)
            self.check_overlap(source, idx, table.tid, table.slots, pk, position)
            self.check_not_withheld(source, idx, first, min(last, self.old[idx]), position)
            if idx == LOCAL:
                self.verified = max(self.verified, min(last, self.old[idx]))
        if not table.tid:
            return first, last, count, self.append_ticks(source, idx, shapes)
        stored = self.append_data(source, idx, table, pk, shapes)
        # A device's clocks only grow, so its last op carries the chunk's highest.
        self.max_hlc = max(self.max_hlc, high)
        return first, last, count, stored

    @staticmethod
    def chunk_shapes(conn: sqlite3.Connection, source: str, tid: int, pk: list[str]) -> list[tuple]:
        """The distinct shapes of a chunk's operations: clock type, kind, mask, whether a move,
        key types (for ticks: clock type, kind, type of the knowledge clock)."""
        if not tid:
            return conn.execute(f"SELECT DISTINCT typeof(hlc), kind, typeof(moved) FROM {source}").fetchall()
        key_types = " || ' ' || ".join(f"typeof({v})" for v in pk)
        return conn.execute(
            f"SELECT DISTINCT typeof(hlc), kind, mask, moved IS NOT NULL, {key_types} FROM {source}"
        ).fetchall()

    @staticmethod
    def clock_fall(image: sqlite3.Connection, count: int, first: int, last: int) -> int | None:
        """On the worker thread: the first seq of a chunk whose clock is below the one before it."""
        if not count:
            return None
        row = image.execute(
            # By neighbour where its seqs are contiguous: a tenth of a window's cost.
            "SELECT b.seq FROM ops a JOIN ops b ON b.seq = a.seq + 1 WHERE b.hlc < a.hlc LIMIT 1"
            if count == last - first + 1
            else "SELECT seq FROM (SELECT seq, hlc, lag(hlc) OVER (ORDER BY seq) AS p FROM ops) WHERE hlc < p LIMIT 1"
        ).fetchone()
        return row[0] if row else None

    def check_clock_order(self) -> None:
        """A device's clocks never fall from one of its operations to the next (its triggers
        and settling write them so). Copies would otherwise merge such operations differently
        (and find twins differently: see :class:`~sqlite_utils_sync.merge.KnowledgeCache`).
        The worker checked each chunk on its own; once every chunk is in, each contiguous
        chunk's edges are checked against the operations before and after it, and where a
        device's chunks interleave (one per table) the stretch they span, op by op. After the
        owners are checked, so a hub's answer tells nobody the clock of another's operation."""
        conn, interleaved = self.conn, {}
        for idx, first, last, low, high, contiguous in self.chunk_spans:
            before, after = self.held_around(idx, first, last)
            if contiguous:
                if (before and before[1] > low) or (after and after[1] < high):
                    raise self.clocks_fall(f"{device_ids(conn)[idx]}:{first if before and before[1] > low else last}")
            else:
                interleaved.setdefault(idx, []).append((before[0] if before else op_id(idx, first), after[0] if after else op_id(idx, last)))
        for idx, spans in interleaved.items():
            for lo, hi in merged(spans):
                fall = conn.execute(
                    "SELECT op FROM (SELECT op, hlc, lag(hlc) OVER (ORDER BY op) AS p FROM _sync_ops WHERE op BETWEEN ? AND ?) "
                    "WHERE hlc < p LIMIT 1",
                    [lo, hi],
                ).fetchone()
                if fall:
                    raise self.clocks_fall(f"{device_ids(conn)[idx]}:{op_seq(fall[0])}")

    def held_around(self, idx: int, first: int, last: int) -> tuple[tuple | None, tuple | None]:
        """(op, clock) of the operations of device ``idx`` held just before seq ``first`` and
        just after seq ``last``, or None."""
        around = "SELECT op, hlc FROM _sync_ops WHERE op BETWEEN ? AND ? ORDER BY op {} LIMIT 1"
        before = self.conn.execute(around.format("DESC"), [op_id(idx, 1), op_id(idx, first) - 1]).fetchone()
        after = self.conn.execute(around.format("ASC"), [op_id(idx, last) + 1, op_id(idx, SEQ_MASK)]).fetchone()
        return before, after

    def clocks_fall(self, label: str) -> BundleError:
        return self.fail(
            errors.INVALID_OPERATION,
            f"operation {label} has a clock below the one before it from the same device (a device's clocks never fall)",
        )

    def check_clocks(self, source: str, position: int, shapes: list[tuple], low: int, high: int) -> None:
        if any(shape[0] != "integer" for shape in shapes):
            raise self.fail(errors.INVALID_OPERATION, "an operation has a clock that is not an integer")
        if low < 0:
            raise self.fail(errors.INVALID_OPERATION, f"an operation has a clock out of range ({low})")
        if high > self.clock_limit:
            raise self.clock_ahead(source, position, high)

    def append_ticks(self, source: str, idx: int, shapes: list[tuple]) -> int:
        """Append a chunk of knowledge operations; their clocks are checked once all are in
        (see :meth:`record_knowledge`)."""
        if any(kind != TICK or moved != "text" for _, kind, moved in shapes):
            raise self.fail(errors.INVALID_OPERATION, "a knowledge operation is malformed")
        stored = self.conn.execute(
            f"INSERT INTO _sync_ops (op, hlc, tid, kind, rowkey) SELECT seq + {op_id(idx, 0)}, hlc, 0, kind, moved "
            f"FROM {source} WHERE seq > ?",
            [self.old[idx]],
        ).rowcount
        # As bytes, fetched whole: no statement may stay open on the chunk (see check_image).
        self.ticks.extend(
            (idx, seq, text.decode("utf-8", "replace"))
            for seq, text in self.conn.execute(
                f"SELECT seq, CAST(moved AS BLOB) FROM {source} WHERE seq > ?", [self.old[idx]]
            ).fetchall()
        )
        return stored

    def append_data(self, source: str, idx: int, table: MappedTable, pk: list[str], shapes: list[tuple]) -> int:
        """Append a chunk of data operations, after checking their keys, kinds and masks."""
        self.check_keys(source, table.tid, pk, shapes)
        self.check_key_affinity(source, table.tid, pk, shapes, self.old[idx])
        kinds = {(kind, mask) for _, kind, mask, _, _ in shapes}
        width = len(table.slots)
        if not all(kind in VALID_KINDS and type(mask) is int and 0 <= mask < 1 << width for kind, mask in kinds):
            raise self.fail(errors.INVALID_OPERATION, "an operation has an invalid kind or mask")
        # Masks arrive as bits of the header's column list; the log keeps them as local slots.
        local_mask = remap_mask_sql(list(enumerate(table.slots)))
        self.kinds.setdefault(table.tid, set()).update(
            (kind & KIND_MASK, sum(1 << s for i, s in enumerate(table.slots) if mask >> i & 1)) for kind, mask in kinds
        )
        self.has_resolutions |= any(kind & RESOLUTION for kind, _ in kinds)
        # A key position holding no REAL needs none of rowkey_sql's per-row REAL handling, and
        # one holding only integers not even quote().
        key_types = [{shape[4].split(" ")[i] for shape in shapes} for i in range(len(pk))]
        key = rowkey_sql(pk, ["real" not in types for types in key_types], [types == {"integer"} for types in key_types])
        keys = f"{key}, NULL"
        if any(shape[3] for shape in shapes):
            self.check_moves(source, table.tid, pk)
            keys = f"coalesce(moved, {key}), CASE WHEN moved IS NOT NULL THEN {key} END"
        # What is at or below our clock is here already (or was compacted away): only the rest.
        return self.conn.execute(
            "INSERT INTO _sync_ops (op, hlc, tid, kind, mask, rowkey, newkey"
            + "".join(f", c{s}" for s in table.slots)
            + f") SELECT seq + {op_id(idx, 0)}, hlc, {table.tid}, kind, {local_mask}, {keys}"
            + "".join(f", v{i}" for i in range(width))
            + f" FROM {source} WHERE seq > ?",
            [self.old[idx]],
        ).rowcount

    def check_keys(self, source: str, tid: int, pk: list[str], shapes: list[tuple]) -> None:
        """Refuse primary-key values that cannot be keys here: NULL, a non-integer for a rowid
        key, text with a NUL character."""
        key_types = {t for shape in shapes for t in shape[4].split(" ")}
        if "null" in key_types:
            raise self.fail(errors.NULL_KEY, f"an operation for table '{self.table_names[tid]}' has a NULL primary key")
        fractional = " OR ".join(f"(typeof({v}) = 'real' AND {v} != CAST({v} AS INTEGER))" for v in pk)
        if tid in self.integer_keys and (
            key_types - {"integer", "real"}
            # 2.0 is the key 2 (an untyped key column elsewhere may send it so); 2.5 is no rowid.
            or "real" in key_types and self.conn.execute(f"SELECT 1 FROM {source} WHERE {fractional} LIMIT 1").fetchone()
        ):
            wrong = ", ".join(sorted(key_types - {"integer"}))
            raise self.fail(
                errors.KEY_TYPE,
                f"table '{self.table_names[tid]}' is keyed by an INTEGER PRIMARY KEY here, "
                f"but operations carry {wrong} keys",
            )
        nul_keys = " OR ".join(f"(typeof({v}) = 'text' AND instr({v}, char(0)) > 0)" for v in pk)
        if any("text" in shape[4] for shape in shapes) and self.conn.execute(
            f"SELECT 1 FROM {source} WHERE {nul_keys} LIMIT 1"
        ).fetchone():
            # quote() stops at NUL, so such keys could not be told apart: refuse, never merge rows.
            raise self.fail(
                errors.UNSUPPORTED_KEY, "a primary key value contains a NUL character, which sync does not support"
            )

    def check_key_affinity(self, source: str, tid: int, pk: list[str], shapes: list[tuple], after: int) -> None:
        """Refuse new keys (seqs above ``after``) that this table's key columns, declared with
        another type than the sender's, would store as another value (1 as '1' in a TEXT
        column, '1' as 1 in an INTEGER one): the row would have another key here than on its
        sender, so copies would mix up rows and diverge."""
        for position, (v, kind) in enumerate(zip(pk, self.key_affinities.get(tid, []))):
            types = {shape[4].split(" ")[position] for shape in shapes} & CONVERTED_KEY_TYPES.get(kind, set())
            if not types:
                continue
            if kind == "TEXT":
                found = self.conn.execute(
                    f"SELECT {v} FROM {source} WHERE seq > ? AND typeof({v}) IN ('integer', 'real') LIMIT 1", [after]
                ).fetchone()
            else:
                # Whether text converts depends on its value: SQLite decides, in a column of that affinity.
                self.conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS _sync_key_{kind} (k {kind}, v)")
                self.conn.execute(f"DELETE FROM temp._sync_key_{kind}")
                self.conn.execute(
                    f"INSERT INTO temp._sync_key_{kind} SELECT {v}, {v} FROM {source} WHERE seq > ? AND typeof({v}) = 'text'",
                    [after],
                )
                found = self.conn.execute(f"SELECT v FROM temp._sync_key_{kind} WHERE typeof(k) != 'text' LIMIT 1").fetchone()
            if found:
                table = self.applied_tids[tid]
                raise self.fail(
                    errors.KEY_TYPE,
                    f"table '{table.name}' has key column {table.pk[position]} of {kind} affinity here, which would "
                    f"store the key {shorten(found[0])} as another value, so as another row than on its sender: "
                    "declare the key columns with the same type on every copy",
                )

    def clock_ahead(self, source: str, position: int, high: int) -> BundleError:
        """Refuse a clock that would become the floor of every later clock here: one past the
        valid range, or further ahead of this machine's wall clock than ``max_clock_skew``."""
        # Fetched whole: a statement left open on the chunk would outlive the chunk.
        seq = self.conn.execute(f"SELECT seq FROM {source} WHERE hlc = ? LIMIT 1", [high]).fetchall()[0][0]
        label = f"{self.reader.header['devices'][position]}:{seq}"
        if high > MAX_HLC - 1:
            return self.fail(
                errors.INVALID_OPERATION,
                f"operation {label} has a clock out of range ({high}): this database's own next operation "
                "would have no valid clock after it",
            )
        days = (high - self.now) / HLC_PER_SECOND / 86400
        return self.fail(
            errors.CLOCK_AHEAD,
            f"operation {label} has a clock {days:.1f} days ahead of this machine's clock, more than "
            f"max_clock_skew allows ({self.max_clock_skew / 86400:g} days). If this machine's clock is right, "
            "the sending device's clock is wrong: fix it there",
        )

    def check_overlap(self, source: str, idx: int, tid: int, slots: list[int], pk: list[str], position: int) -> None:
        """Operations we hold already must be the same operations: if one differs, two databases
        share a device id (a copied file) and counting it as a duplicate would lose an edit.
        The table is compared first: on a hub, an operation of a table the pusher may not view
        must never be compared value by value with what the pusher claims (a guessing oracle)."""
        same = f"o.tid = {tid} AND o.hlc = s.hlc AND o.kind = s.kind"
        if tid:
            key = rowkey_sql(f"s.{v}" for v in pk)
            # IS alone takes 1 for 1.0; the mask is compared on the columns the chunk has.
            same += f" AND o.rowkey IS coalesce(s.moved, {key})" + "".join(
                f" AND o.c{slot} IS s.v{i} AND typeof(o.c{slot}) = typeof(s.v{i})" for i, slot in enumerate(slots)
            )
            same += f" AND o.mask & {mask_of(slots)} IS ({remap_mask_sql(list(enumerate(slots)), 's.mask')})"
        else:
            same += " AND o.rowkey IS s.moved"
        differs = self.conn.execute(
            f"SELECT s.seq FROM {source} s JOIN _sync_ops o ON o.op = s.seq + {op_id(idx, 0)} "
            f"WHERE s.seq <= ? AND NOT ({same}) LIMIT 1",
            [self.old[idx]],
        ).fetchone()
        if differs:
            raise self.clash(f"{self.reader.header['devices'][position]}:{differs[0]}")

    def check_not_withheld(self, source: str, idx: int, first: int, last: int, position: int) -> None:
        """An operation this partial copy recorded as withheld is one of a table outside its
        scope (see :mod:`scope`): one of a table it holds, or a tick, at such a seq shows that
        a bundle lied about it. Counting it as a duplicate would lose it silently."""
        for lo, hi in withheld_ranges(self.conn, idx, first - 1, last):
            row = self.conn.execute(f"SELECT seq FROM {source} WHERE seq BETWEEN ? AND ? LIMIT 1", [lo, hi]).fetchone()
            if row:
                raise self.fail(
                    errors.INVALID_OPERATION,
                    f"it carries operation {self.reader.header['devices'][position]}:{row[0]}, which this partial copy "
                    "was told by an earlier bundle is an operation of a table it does not hold: one of them is wrong, "
                    "and this copy cannot tell which. Make this copy again from a hub or a full copy",
                )

    def check_moves(self, source: str, tid: int, pk: list[str]) -> None:
        """A primary-key move names the key it left: check it, and send both rows per-row."""
        # Fetched whole: a statement left open on the chunk would outlive the chunk when this raises.
        # As bytes: a key that is not valid UTF-8 must not stop a statement half-way.
        moves = self.conn.execute(
            f"SELECT CAST(moved AS BLOB), kind, CAST({rowkey_sql(pk)} AS BLOB) FROM {source} WHERE moved IS NOT NULL"
        ).fetchall()
        for moved, kind, new_key in moves:
            try:
                moved, new_key = moved.decode("utf-8"), new_key.decode("utf-8")
                old_values = parse_rowkey(moved)
            except (ValueError, AttributeError):  # UnicodeDecodeError is a ValueError
                old_values = None
            if kind & KIND_MASK != UPDATE or old_values is None or len(old_values) != len(pk) or None in old_values:
                raise self.fail(errors.INVALID_OPERATION, "an operation has an invalid moved-from key")
            # The keys as the log stores them (rowkey and newkey), which is what the slow set matches.
            self.moved.update({(tid, moved), (tid, new_key)})

    # -- checking the whole ------------------------------------------------------------------

    def check_owners(self, inserted: dict[int, int]) -> None:
        """On a hub (``may_relay`` False): who may add new operations of a device.

        The first actor to push new operations of a device owns it (``_sync_device_actors``,
        written in this transaction, so no push can slip in between the check and the write);
        afterwards only that actor may add new ones. Operations the hub holds already are
        duplicates and relay freely. An anonymous push (actor None) owns nothing: it may add
        operations only of devices nobody owns. Actors that may relay are not checked and claim
        nothing, so relaying never takes a device from the actor whose device it is.
        """
        if self.may_relay:
            return
        conn = self.conn
        names = device_ids(conn)
        for idx, count in inserted.items():
            if not count:
                continue
            device = names[idx]
            row = conn.execute("SELECT actor FROM _sync_device_actors WHERE device_id = ?", [device]).fetchone()
            if row is None and self.actor is not None:
                conn.execute("INSERT INTO _sync_device_actors VALUES (?, ?, ?)", [device, self.actor, now_iso()])
            elif row is not None and row[0] != self.actor:
                raise self.fail(
                    errors.DEVICE_OWNED,
                    f"it adds new operations of device {device}, which another actor pushes to this hub (relaying "
                    "them needs the sync-relay permission). If it is your device, run 'sqlite-utils sync-new-device "
                    "--recover' on its database to give its edits an id of its own, then sync again",
                )

    def take_device_records(self, inserted: dict[int, int]) -> None:
        """Take the bundle's retirements, refuse what retired devices wrote after retiring, and
        take its device names (on a hub, only the pushing device's own, from its actor)."""
        conn, header = self.conn, self.reader.header
        # Records of devices this database holds nothing of are never needed here, and would
        # pile up from bundle to bundle until no export of this copy fits a header.
        known = set(device_ids(conn).values())
        retired = {d: r for d, r in header.get("retired", {}).items() if r[2] <= self.clock_limit and d in known}
        if retired:
            held = retired_records(conn)
            # What this copy held of a device before hearing of its retirement stays accepted.
            retired = {d: [max(r[0], self.held_before(d)), *r[1:]] for d, r in retired.items()}
            changes = {d: r for d, r in retired.items() if d not in held or r[0] > held[d][0]}
            for device in changes if not self.may_relay else ():
                if not self.owns(device):
                    raise self.fail(
                        errors.DEVICE_OWNED,
                        f"it retires device {describe_device(conn, device)}, which this actor does not push to this "
                        "hub (retiring it needs the sync-relay permission)",
                    )
            merge_retired(conn, changes)
            # A retirement announced by a tick held here that this copy had not heard of: not a
            # record's seq raised alone, which a pusher may do at will.
            self.heard_retirement = any(
                (d not in held or held[d][1:] != r[1:]) and announcement_seq(conn, r[1], r[2]) is not None
                for d, r in changes.items()
            )
        self.check_retired(inserted)
        names = {d: r for d, r in header.get("device_names", {}).items() if r[1] <= self.clock_limit and d in known}
        source = header["source"]
        only = None if self.may_relay else ({source} if self.owns(source) else set())
        merge_names(conn, names, only)

    def held_before(self, device: str) -> int:
        """The highest seq of ``device`` this database held before this import."""
        idx = device_index(self.conn, device, create=False)
        if idx is None:
            return 0
        return self.old[idx] if idx in self.old else max_seq(self.conn, idx)

    def owns(self, device: str) -> bool:
        """On a hub: whether the pushing actor owns ``device`` (see :meth:`check_owners`), so
        may name or retire it. A device nobody owns (one only relayed, or pushed by the hub's
        operator or anonymously) is an anonymous push's, never an actor's; the hub's own
        device is no pusher's."""
        return device != local_device_id(self.conn) and self.owner(device) == self.actor

    def owner(self, device: str) -> str | None:
        row = self.conn.execute("SELECT actor FROM _sync_device_actors WHERE device_id = ?", [device]).fetchone()
        return row[0] if row else None

    def retired_here(self, local: str, retired_by: str) -> BundleError:
        conn = self.conn
        return self.fail(
            errors.DEVICE_RETIRED,
            f"this database's device {describe_device(conn, local)} was retired by "
            f"{describe_device(conn, retired_by)}: a retired device never syncs again. To go on with "
            "this database, run 'sqlite-utils sync-new-device --recover' on it (its edits move to a new id), "
            "then sync again",
        )

    def refuse_if_retired_here(self, local: str) -> None:
        """Say first that the bundle retires this database's own device: a compacted sender's
        holes would otherwise be refused as compacted history, whose way on (a new database)
        loses this copy's unsent edits, which ``--recover`` keeps."""
        record = self.reader.header.get("retired", {}).get(local)
        if record is not None and record[2] <= self.clock_limit:
            raise self.retired_here(local, record[1])

    def check_retired(self, inserted: dict[int, int]) -> None:
        """Refuse operations of a retired device beyond those accepted when it was retired, from
        the device itself or from a copy that knows of the retirement; and a bundle saying this
        database's own device is retired."""
        conn = self.conn
        records = retired_records(conn)
        if not records:
            return
        local = local_device_id(conn)
        if local in records:
            raise self.retired_here(local, records[local][1])
        names = device_ids(conn)
        source, carried = self.reader.header["source"], self.reader.header.get("retired", {})
        for idx, count in inserted.items():
            device = names[idx]
            top = max_seq(conn, idx)
            if not count or device not in records or top <= records[device][0]:
                continue
            if device != source and device not in carried:
                # Relayed by a copy that has not heard of the retirement: operations it took
                # before hearing. Every copy takes them, as this record now says.
                conn.execute("UPDATE _sync_retired SET seq = ? WHERE device_id = ?", [top, device])
                continue
            raise self.fail(
                errors.DEVICE_RETIRED,
                f"it carries operations of device {describe_device(conn, device)} written after it was retired "
                f"(it was retired after seq {records[device][0]} by {describe_device(conn, records[device][1])}): "
                "a retired device never syncs again. If it is in use after all, run 'sqlite-utils "
                "sync-new-device --recover' on its database to give its edits a new id, then sync again",
            )

    def check_sequences(self, inserted: dict[int, int]) -> None:
        """Refuse a bundle that leaves a gap in a device's sequence; record the new op ranges."""
        conn = self.conn
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS _sync_new (device INTEGER, lo INTEGER, hi INTEGER)")
        conn.execute("DELETE FROM temp._sync_new")
        names = device_ids(conn)
        snapshot = self.reader.header.get("horizon", {})
        adopted = {}
        for idx, count in inserted.items():
            if not count:
                continue
            old, new = self.old[idx], max_seq(conn, idx)
            if new - old != count:
                # Holes are fine only at or below the sender's horizon (it compacted them away).
                floor = max(old, snapshot.get(names[idx], 0))
                if floor == old or self.held(idx, floor, new) != new - floor:
                    raise self.missing(idx, names[idx], old)
                if not self.fresh:
                    # Not even where every operation held here is one the sender holds too: an
                    # operation whose twin (moved by --recover) the sender compacted away would
                    # be found concurrent here with edits that had seen that twin.
                    raise self.fail(
                        errors.COMPACTED_HISTORY,
                        f"it comes from a compacted log (device {names[idx]} up to seq {floor}) that this database "
                        "has only partly: only a database with no synced data yet can start from it (import it "
                        "into a new database)",
                    )
                # A snapshot: this database holds no data yet, so nothing here depends on them.
                adopted[names[idx]] = floor
            self.ranges.append((idx, op_id(idx, old + 1), op_id(idx, new)))
        conn.executemany("INSERT INTO temp._sync_new VALUES (?, ?, ?)", self.ranges)
        if adopted:
            raise_horizon(conn, adopted)

    def unseen(self, idx: int, device: str, seq: int, compacted: dict[str, int]) -> tuple[str, int] | None:
        """A ``(device, seq)`` of ``compacted`` that the author of op ``(idx, seq)`` had not seen
        (None: it had seen all of it)."""
        seen = knowledge_at(self.conn, idx, seq)
        for other, top in compacted.items():
            if other != device and seen.get(other, 0) < top:
                return other, top
        return None

    def missing(self, idx: int, device: str, old: int) -> BundleError:
        """Say which operations of a device the bundle lacks."""
        conn = self.conn
        first_op = conn.execute(
            "SELECT min(op) FROM _sync_ops WHERE op > ? AND op <= ?", [op_id(idx, old), op_id(idx, SEQ_MASK)]
        ).fetchone()[0]
        withheld = [lo for lo, _ in withheld_ranges(conn, idx, old)]
        first = min(([op_seq(first_op)] if first_op is not None else []) + withheld[:1])
        if withheld and first <= old + 1:
            return self.fail(
                errors.MISSING_OPERATIONS,
                f"it lacks operations of device {device} after seq {old}, which the operations after them depend on",
            )
        if first > old + 1:
            return self.fail(
                errors.MISSING_OPERATIONS,
                f"it starts device {device} at seq {first} but this database has only up to seq {old} "
                f"(operations {old + 1}-{first - 1} are missing: import the bundles before it first)",
            )
        before_hole, after_hole = conn.execute(
            "SELECT o.op, (SELECT min(n.op) FROM _sync_ops n WHERE n.op > o.op) FROM _sync_ops o "
            "WHERE o.op BETWEEN ? AND ? AND NOT EXISTS (SELECT 1 FROM _sync_ops n WHERE n.op = o.op + 1) "
            "ORDER BY o.op LIMIT 1",
            [op_id(idx, old + 1), op_id(idx, SEQ_MASK)],
        ).fetchone()
        lo, hi = op_seq(before_hole) + 1, op_seq(after_hole) - 1
        return self.fail(
            errors.MISSING_OPERATIONS,
            f"it lacks operation{f' {lo}' if lo == hi else f's {lo}-{hi}'} of device {device}, which the operations "
            "after it depend on",
        )

    def held(self, idx: int, after: int, upto: int) -> int:
        """How many seqs of a device in ``after + 1 .. upto`` are held here, withheld ones too."""
        return self.conn.execute(
            "SELECT count(*) FROM _sync_ops WHERE op BETWEEN ? AND ?", [op_id(idx, after + 1), op_id(idx, upto)]
        ).fetchone()[0] + withheld_between(self.conn, idx, after, upto)

    def check_horizon(self) -> None:
        """Refuse data operations written without having seen what this database compacted away,
        on rows it holds history of: they would be compared with operations that are gone,
        unlike on copies that kept them.

        The latest operation on every row is never compacted away, so a row no operation held
        here touches had none removed either: a blind operation (its author had not seen the
        horizon) on such a row merges here exactly as on a copy with its whole log, and is
        taken. This lets a copy that kept its whole log relay a new device's first edits of new
        rows to a compacted hub."""
        compacted = self.compacted
        if not compacted:
            return
        conn = self.conn
        names = device_ids(conn)
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS _sync_blind (tid INTEGER, key TEXT, device INTEGER, PRIMARY KEY (tid, key)) WITHOUT ROWID")
        conn.execute("DELETE FROM temp._sync_blind")
        blind: dict[int, tuple[str, int]] = {}
        for idx, lo, hi in self.ranges:
            (first,) = conn.execute(
                f"SELECT min(op) FROM _sync_ops WHERE op BETWEEN ? AND ? AND kind != {TICK}", [lo, hi]
            ).fetchone()
            if first is None:
                continue
            unseen = self.unseen(idx, names[idx], op_seq(first), compacted)
            if unseen is None:
                continue
            blind[idx] = unseen
            # Its operations up to the first knowledge epoch that had seen the horizon.
            upto = hi
            for from_seq, text in conn.execute(
                "SELECT from_seq, clock FROM _sync_knowledge WHERE device = ? AND from_seq > ? AND from_seq <= ? "
                "ORDER BY from_seq",
                [idx, op_seq(first), op_seq(hi)],
            ).fetchall():
                seen = load_clock(text)
                if all(seen.get(d, 0) >= s for d, s in compacted.items() if d != names[idx]):
                    upto = op_id(idx, from_seq - 1)
                    break
            conn.execute(
                f"""INSERT OR IGNORE INTO temp._sync_blind SELECT tid, rowkey, {idx} FROM _sync_ops
                WHERE op BETWEEN ? AND ? AND kind != {TICK}
                UNION SELECT tid, newkey, {idx} FROM _sync_ops WHERE op BETWEEN ? AND ? AND kind != {TICK}
                AND newkey IS NOT NULL""",
                [first, upto, first, upto],
            )
        if not blind:
            return
        # One scan of the operations held before this import, looking up each one's rows.
        lookup = "SELECT device FROM temp._sync_blind b WHERE b.tid = o.tid AND b.key = o.{}"
        row = conn.execute(
            f"""SELECT o.tid, ifnull(({lookup.format("rowkey")}), ({lookup.format("newkey")})) AS device, o.rowkey
            FROM _sync_ops o WHERE o.kind != {TICK} AND device IS NOT NULL
            AND NOT EXISTS (SELECT 1 FROM temp._sync_new n WHERE o.op BETWEEN n.lo AND n.hi) LIMIT 1"""
        ).fetchone()
        conn.execute("DELETE FROM temp._sync_blind")
        if row is not None:
            tid, idx, key = row
            device, seq = blind[idx]
            raise self.fail(
                errors.COMPACTED_HISTORY,
                f"device {names[idx]} wrote operations without having seen device {device} up to seq {seq}, "
                f"which this database has compacted away (table '{self.table_names.get(tid, tid)}', row {key} has "
                "history here). Send this database's changes to a peer that kept "
                "its whole log, then start this copy again from that peer's export (into a new database)",
            )

    def record_knowledge(self) -> None:
        """Index new tick operations and check that the bundle carries what they depend on."""
        conn = self.conn
        have = clock(conn)
        for idx, seq, text in self.ticks:
            if not text:  # parse_clock reads "" as no clock, but later readers need the JSON
                raise self.fail(errors.INVALID_OPERATION, "a knowledge operation is malformed")
            known = parse_clock(text, f"Bundle {self.name} knowledge clock")
            for device, needed in known.items():
                if have.get(device, 0) < needed:
                    raise self.fail(
                        errors.MISSING_DEPENDENCIES,
                        f"its operations depend on device {device} up to seq {needed}, but neither this database nor "
                        f"the bundle has more than seq {have.get(device, 0)}",
                    )
            record_knowledge(conn, idx, seq + 1, text)

    def record_peer(self, header: dict, have: dict[str, int]) -> None:
        """Remember what the source had, as far as it can be checked: deltas for it start there."""
        conn = self.conn
        source = header["source"]
        claimed = parse_clock(header["clock"])
        row = conn.execute("SELECT clock FROM _sync_peers WHERE device_id = ?", [source]).fetchone()
        known = load_clock(row[0] if row else None)
        local_id = local_device_id(conn)
        for device, seq in claimed.items():
            # Our own operations only as far as this import compared them: a source holding
            # another database's operations under our id must never count as having ours.
            checked = self.verified if device == local_id else seq
            known[device] = max(known.get(device, 0), min(seq, have.get(device, 0), checked))
        conn.execute(
            "INSERT OR REPLACE INTO _sync_peers VALUES (?, ?, ?)",
            [source, encode_clock(known), now_iso()],
        )


class TableUpdate:
    """Brings the tables up to date with the operations an import appended to the log."""

    def __init__(self, importer: Importer):
        self.conn = importer.conn
        self.tables = importer.applied_tids  # the tables the operations are applied to
        self.ranges = importer.ranges  # the new operations: (device index, first op id, last op id)
        self.old = importer.old  # each bundle device's highest seq before the import
        self.kinds = importer.kinds  # per table: the (kind, mask) of its new operations
        self.moved = importer.moved  # (tid, row key) of both ends of every primary-key move
        self.has_resolutions = importer.has_resolutions
        # Rows with clashes, whose conflict records are rebuilt (filled in by slow_path).
        self.clashed_rows: set[RowKey] = set()
        # Each table's columns (PRAGMA table_xinfo), read once: the import changed the schema
        # before this point (map_tables) and changes nothing while the tables are written.
        self.info = {tid: table_info(self.conn, table.name) for tid, table in self.tables.items()}

    def columns(self, table: SyncedTable) -> list[str]:
        return [column[1] for column in self.info[table.tid]]

    def new_ops(self, columns: str = "o.*", where: str = "1") -> str:
        """The new operations (``temp._sync_new``)."""
        # NOT INDEXED: without it SQLite may build an automatic index over the whole log for the
        # other conditions, making every import cost O(log) instead of O(new operations).
        return (
            f"SELECT {columns} FROM temp._sync_new r JOIN _sync_ops o NOT INDEXED ON o.op BETWEEN r.lo AND r.hi "
            f"WHERE {where}"
        )

    def window_ops(self, where: str) -> str:
        """The old operations some new one's author had not seen (``temp._sync_window``)."""
        return (
            "SELECT o.* FROM temp._sync_window w JOIN _sync_ops o NOT INDEXED ON o.op BETWEEN w.lo AND w.hi "
            f"WHERE o.kind != {TICK} AND {where}"
        )

    def window_ranges(self) -> list[tuple[int, int]]:
        """Old operations that some new operation's author had not seen: the only candidates for
        concurrency with the new ones."""
        conn = self.conn
        if not self.ranges:
            return []
        names = device_ids(conn)
        index = {name: idx for idx, name in names.items()}
        # What every new range's author had seen of each device. A device missing from one of
        # its clocks was not seen at all, so only devices in all of them are looked at: the
        # work grows with the clocks read, not with the ranges times the devices known here.
        floor: dict[int, int] | None = None
        for idx, lo, hi in self.ranges:
            epochs = [knowledge_at(conn, idx, op_seq(lo))] + [
                load_clock(text)
                for (text,) in conn.execute(
                    "SELECT clock FROM _sync_knowledge WHERE device = ? AND from_seq > ? AND from_seq <= ?",
                    [idx, op_seq(lo), op_seq(hi)],
                )
            ]
            common = set(epochs[0]).intersection(*epochs[1:])
            seen = {index[name]: min(e[name] for e in epochs) for name in common if name in index}
            seen[idx] = self.old.get(idx, 0)
            floor = seen if floor is None else {other: min(s, seen[other]) for other, s in floor.items() if other in seen}
        result = []
        for other in names:
            seen = floor.get(other, 0)
            top = self.old[other] if other in self.old else max_seq(conn, other)
            if top > seen:
                result.append((op_id(other, seen + 1), op_id(other, top)))
        return result

    def run(self) -> int:
        """Bring the tables up to date with the new operations; returns how many conflicts the
        rows they touched have unresolved."""
        conn = self.conn
        for sql in (
            "CREATE TEMP TABLE IF NOT EXISTS _sync_window (lo INTEGER, hi INTEGER)",
            "CREATE TEMP TABLE IF NOT EXISTS _sync_slow (tid INTEGER, rowkey TEXT, PRIMARY KEY (tid, rowkey)) WITHOUT ROWID",
            "CREATE TEMP TABLE IF NOT EXISTS _sync_wkeys (tid INTEGER, rowkey TEXT, PRIMARY KEY (tid, rowkey)) WITHOUT ROWID",
            "DELETE FROM temp._sync_window",
            "DELETE FROM temp._sync_slow",
            "DELETE FROM temp._sync_wkeys",
        ):
            conn.execute(sql)
        window = self.window_ranges()
        conn.executemany("INSERT INTO temp._sync_window VALUES (?, ?)", window)
        pending = dict(self.tables)
        if not window and not self.moved:
            for tid, table in list(pending.items()):
                if self.bulk_insert(table):
                    del pending[tid]
        self.mark_slow_rows(pending, bool(window))

        def set_based() -> None:
            for table in pending.values():
                self.fast_path(table)
            self.slow_path()

        if attempt(conn, set_based):
            # Set-based writes can pass through states the author never had: a UNIQUE value
            # handed from row to row (a swap through a temporary value, a reordering) trips
            # here. Write the operations one by one in their authors' order instead, then
            # settle every row they touched.
            self.slow_path(before=self.replay(pending))
        resolutions = []
        if self.has_resolutions:
            resolutions = conn.execute(
                self.new_ops("DISTINCT o.tid, coalesce(o.newkey, o.rowkey), o.op", f"o.kind & {RESOLUTION}")
            ).fetchall()
        conn.executemany("INSERT OR IGNORE INTO _sync_resolutions VALUES (?, ?, ?)", resolutions)
        touched = set(self.clashed_rows) | {(tid, key) for tid, key, _ in resolutions}
        return rebuild_conflicts(conn, touched)

    def mark_slow_rows(self, tables: dict[int, SyncedTable], window: bool) -> None:
        """Put in ``temp._sync_slow`` the rows that need the per-row path: both ends of every
        move, rows the bundle touches twice, and rows a concurrent old operation touched too."""
        conn = self.conn
        conn.executemany("INSERT OR IGNORE INTO temp._sync_slow VALUES (?, ?)", sorted(self.moved))
        # Grouped by key values rather than row-key text (the same groups: quote() is exact),
        # which sorts faster; moves are in already (see check_moves).
        for table in tables.values():
            keys = ", ".join(f"c{table.slots[c]} AS k{i}" for i, c in enumerate(table.pk))
            new_keys = " UNION ALL ".join(
                f"SELECT rowkey, {keys} FROM _sync_ops WHERE op BETWEEN {lo} AND {hi} AND tid = {table.tid} "
                "AND newkey IS NULL"
                for _, lo, hi in self.ranges
            )
            conn.execute(
                f"INSERT OR IGNORE INTO temp._sync_slow SELECT {table.tid}, rowkey FROM ({new_keys}) "
                f"GROUP BY {', '.join(f'k{i}' for i in range(len(table.pk)))} HAVING count(*) > 1"
            )
        if window:
            window_ops = self.window_ops("1")
            conn.execute(
                f"INSERT OR IGNORE INTO temp._sync_wkeys SELECT tid, rowkey FROM ({window_ops}) "
                f"UNION SELECT tid, newkey FROM ({window_ops}) WHERE newkey IS NOT NULL"
            )
            conn.execute(
                "INSERT OR IGNORE INTO temp._sync_slow "
                + self.new_ops(
                    "o.tid, o.rowkey",
                    f"o.kind != {TICK} AND EXISTS (SELECT 1 FROM temp._sync_wkeys w WHERE w.tid = o.tid AND w.rowkey = o.rowkey)",
                )
            )

    def replay(self, tables: dict[int, SyncedTable]) -> dict[RowKey, dict[str, Any] | None]:
        """Write each new operation's own effect in "latest" order (each author's order), whether
        it wins or not, and mark every row it touches for settling. Returns those rows as they
        were before: settling decides against them, as the set-based path would have."""
        conn = self.conn
        devices = device_ids(conn)
        names = {tid: table.slot_names(self.columns(table)) for tid, table in tables.items()}
        cursor = conn.execute(self.new_ops("o.*", f"o.kind != {TICK} AND o.tid IN ({', '.join(map(str, tables))})"))
        fields = [d[0] for d in cursor.description]
        records = [dict(zip(fields, row)) for row in cursor.fetchall()]
        records.sort(key=lambda r: latest_key(r["hlc"], r["op"], devices))
        before: dict[RowKey, dict[str, Any] | None] = {}
        for record in records:
            table = tables[record["tid"]]
            slot_names = names[table.tid]
            for position, (rowkey, effect) in enumerate(effects_of(record, table, devices, True)):
                row = fetch_row(conn, table, rowkey)
                before.setdefault((table.tid, rowkey), row)
                moved_in = position == 1  # the new key of a move: the whole row arrives
                if effect.write and row is None and effect.kind == UPDATE and not moved_in:
                    continue  # not here to update: settling the row decides
                values = {slot_names[s]: effect.values[s] for s in mask_slots(effect.mask) if s in slot_names}
                # A step that meets a value another copy holds concurrently is passed by:
                # settling writes the row's final state in any case.
                info = self.info[table.tid]
                attempt(conn, lambda: write_row(conn, table, rowkey, effect.write, values, row is not None, info))
        conn.executemany("INSERT OR IGNORE INTO temp._sync_slow VALUES (?, ?)", list(before))
        return before

    def bulk_insert(self, table: SyncedTable) -> bool:
        """The common bulk case, optimistically: nothing concurrent and only whole-row inserts.
        Plain INSERTs then fail only where a key repeats or exists already, and that is the one
        thing the general path would have to look for; on failure it takes over. Returns True
        when the table is done."""
        conn = self.conn
        columns = self.columns(table)
        full = table.mask_for(columns)
        kinds = self.kinds.get(table.tid, set())
        if not kinds or any(kind != INSERT or mask & full != full for kind, mask in kinds):
            return False
        failed = attempt(
            conn,
            lambda: conn.execute(
                f"INSERT INTO {quote_identifier(table.name)} ({', '.join(quote_identifier(c) for c in columns)}) "
                f"SELECT {', '.join(f'o.c{table.slots[c]}' for c in columns)} FROM ("
                + self.new_ops("o.*", f"o.tid = {table.tid}")
                + ") o"
            ),
        )
        return failed is None

    def fast_path(self, table: SyncedTable) -> None:
        """Rows touched by one new operation and nothing concurrent: set-based writes."""
        columns = self.columns(table)
        full = table.mask_for(columns)
        kinds = self.kinds.get(table.tid, set())
        present = {kind for kind, _ in kinds}
        not_slow = "NOT EXISTS (SELECT 1 FROM temp._sync_slow s WHERE s.tid = o.tid AND s.rowkey = o.rowkey)"
        if not self.conn.execute("SELECT 1 FROM temp._sync_slow WHERE tid = ? LIMIT 1", [table.tid]).fetchone():
            not_slow = "1"  # the common bulk case: no row needs the per-row path
        # Deletes, then updates, then inserts: as a replacement did on the sender, so that a
        # value freed under a UNIQUE constraint is free before it is used again.
        if DELETE in present:
            self.fast_deletes(table, not_slow)
        if UPDATE in present:
            self.fast_updates(table, columns, not_slow)
        if INSERT in present:
            self.fast_inserts(table, columns, full, not_slow, kinds)

    def fast_inserts(self, table: SyncedTable, columns: list[str], full: int, not_slow: str, kinds) -> None:
        t = quote_identifier(table.name)
        quoted = [quote_identifier(c) for c in columns]
        inserts = f"o.tid = {table.tid} AND o.kind & {KIND_MASK} = {INSERT}"
        if any(kind == INSERT and mask & full != full for kind, mask in kinds):
            # Inserts written before a column existed go per-row: the row's history decides the
            # columns they lack (NULL where nothing wrote them).
            partial = f"{inserts} AND o.mask & {full} != {full}"
            self.conn.execute("INSERT OR IGNORE INTO temp._sync_slow " + self.new_ops("o.tid, o.rowkey", partial))
        self.conn.execute(
            f"INSERT INTO {t} ({', '.join(quoted)}) SELECT {', '.join(f'o.c{table.slots[c]}' for c in columns)} FROM ("
            + self.new_ops("o.*", f"{inserts} AND o.mask & {full} = {full}")
            + f") o WHERE {not_slow} ON CONFLICT ({', '.join(quote_identifier(c) for c in table.pk)}) DO UPDATE SET "
            + ", ".join(f"{q} = excluded.{q}" for q in quoted)
        )

    def fast_updates(self, table: SyncedTable, columns: list[str], not_slow: str) -> None:
        t = quote_identifier(table.name)
        pk_match = " AND ".join(f"{t}.{quote_identifier(c)} = o.c{table.slots[c]}" for c in table.pk)
        assignments = ", ".join(
            f"{quote_identifier(c)} = CASE WHEN o.mask & {1 << table.slots[c]} THEN o.c{table.slots[c]} "
            f"ELSE {t}.{quote_identifier(c)} END"
            for c in columns
        )
        self.conn.execute(
            f"UPDATE {t} SET {assignments} FROM ("
            + self.new_ops("o.*", f"o.tid = {table.tid} AND o.kind & {KIND_MASK} = {UPDATE} AND o.newkey IS NULL")
            + f") o WHERE {not_slow} AND {pk_match}"
        )

    def fast_deletes(self, table: SyncedTable, not_slow: str) -> None:
        pk_cols = ", ".join(quote_identifier(c) for c in table.pk)
        pk_slots = ", ".join(f"o.c{table.slots[c]}" for c in table.pk)
        self.conn.execute(
            f"DELETE FROM {quote_identifier(table.name)} WHERE ({pk_cols}) IN (SELECT {pk_slots} FROM ("
            + self.new_ops("o.*", f"o.tid = {table.tid} AND o.kind & {KIND_MASK} = {DELETE}")
            + f") o WHERE {not_slow})"
        )

    def slow_path(self, before: dict[RowKey, dict[str, Any] | None] | None = None) -> None:
        """Rows with several new operations or concurrent ones: resolve each row in Python.

        :param before: after a replay, the rows as they were before it (see :meth:`replay`)
        """
        conn = self.conn
        self.clashed_rows.clear()  # a replay runs this again after the first run was undone
        if not conn.execute("SELECT 1 FROM temp._sync_slow LIMIT 1").fetchone():
            return  # the common bulk case; in_author_order alone would read every new operation
        if before is None and self.in_author_order():
            for table in self.tables.values():
                self.single_author_rows(table)
        todo = []
        for page in self.slow_pages():
            knowledge = KnowledgeCache(conn)  # per page, so that memory holds one page's clocks
            for (tid, rowkey), effects in page.items():
                table = self.tables.get(tid)
                if table is None or not any(e.new for e in effects):
                    continue
                effects.sort(key=lambda e: e.key)
                if before is None:
                    apply_row(conn, table, rowkey, effects, info=self.info[tid])
                else:
                    todo.append((table, rowkey, effects, before.get((tid, rowkey))))
                if record_clashes(conn, table, rowkey, effects, knowledge):
                    self.clashed_rows.add((tid, rowkey))
        # After a replay a row's final value may still sit in a row not settled yet, or rows may
        # hand values round in a cycle. Each row is then written whole, so any column may be set aside.
        settle(
            conn,
            [
                (row[0], row[1], set(self.columns(row[0])), lambda row=row: apply_row(conn, *row, info=self.info[row[0].tid]))
                for row in todo
            ],
        )

    def in_author_order(self) -> bool:
        """Whether each device's new operations have clocks in the order of their seqs, as the
        triggers write them: among one device's operations the latest is then the highest op
        id. A bundle where they are not takes the per-row path."""
        conn = self.conn
        inverted = (
            "SELECT 1 FROM _sync_ops a JOIN _sync_ops b ON b.op = a.op + 1 "
            "WHERE a.op BETWEEN ? AND ? AND b.hlc < a.hlc LIMIT 1"
        )
        for _, lo, hi in self.ranges:
            (count,) = conn.execute("SELECT count(*) FROM _sync_ops WHERE op BETWEEN ? AND ?", [lo, hi]).fetchone()
            # Neighbours are compared: a range with holes (a compacted sender's) is not checked.
            if count != hi - lo + 1 or conn.execute(inverted, [lo, hi - 1]).fetchone():
                return False
        return True

    def single_author_rows(self, table: SyncedTable) -> None:
        """Write set-based the rows of ``temp._sync_slow`` whose new operations all come from
        one device, with no primary-key move and no concurrent old operation, and take them
        out of it. Such operations never clash, and the latest one (the highest op id, see
        :meth:`in_author_order`) decides whether the row exists, the latest writer of each
        column its value, as in :func:`~sqlite_utils_sync.rows.apply_row`. A row that comes
        into existence with a column none of them wrote is left to the per-row path (its
        history decides that column)."""
        conn, tid = self.conn, table.tid
        if not conn.execute("SELECT 1 FROM temp._sync_slow WHERE tid = ? LIMIT 1", [tid]).fetchone():
            return
        columns = self.columns(table)
        slots = [table.slots[c] for c in columns]
        conn.execute("DROP TABLE IF EXISTS temp._sync_net")
        conn.execute(f"CREATE TEMP TABLE _sync_net (rowkey TEXT PRIMARY KEY, last INTEGER{''.join(f', w{s}' for s in slots)})")
        writers = "".join(f", max(CASE WHEN o.kind & {KIND_MASK} != {DELETE} AND o.mask & {1 << s} THEN o.op END)" for s in slots)
        on_slow = f"EXISTS (SELECT 1 FROM temp._sync_slow s WHERE s.tid = {tid} AND s.rowkey = o.rowkey)"
        conn.execute(
            "INSERT INTO temp._sync_net "
            + self.new_ops(f"o.rowkey, max(o.op){writers}", f"o.tid = {tid} AND {on_slow}")
            + f" GROUP BY o.rowkey HAVING min(o.op >> {SEQ_BITS}) = max(o.op >> {SEQ_BITS}) AND count(o.newkey) = 0"
        )
        conn.execute("DELETE FROM temp._sync_net WHERE rowkey IN (SELECT rowkey FROM temp._sync_wkeys WHERE tid = ?)", [tid])
        conn.executemany("DELETE FROM temp._sync_net WHERE rowkey = ?", [(key,) for t, key in self.moved if t == tid])
        self.write_net_rows(table, columns, slots)

    def write_net_rows(self, table: SyncedTable, columns: list[str], slots: list[int]) -> None:
        """Write the rows of ``temp._sync_net`` (see :meth:`single_author_rows`): deletes,
        updates, then inserts, as :meth:`fast_path` does."""
        conn, t = self.conn, quote_identifier(table.name)
        last = "temp._sync_net n JOIN _sync_ops l ON l.op = n.last"
        deleted = f"l.kind & {KIND_MASK} = {DELETE}"
        keys = [(quote_identifier(c), f"l.c{table.slots[c]}") for c in table.pk]
        match = " AND ".join(f"{t}.{q} = {v}" for q, v in keys)
        conn.execute(
            f"DELETE FROM {t} WHERE ({', '.join(q for q, _ in keys)}) IN "
            f"(SELECT {', '.join(v for _, v in keys)} FROM {last} WHERE {deleted})"
        )

        def value(slot: int) -> str:
            return f"(SELECT v.c{slot} FROM _sync_ops v WHERE v.op = n.w{slot})"

        quoted = [quote_identifier(c) for c in columns]
        assignments = ", ".join(f"{q} = CASE WHEN n.w{s} IS NULL THEN {t}.{q} ELSE {value(s)} END" for q, s in zip(quoted, slots))
        conn.execute(f"UPDATE {t} SET {assignments} FROM {last} WHERE NOT ({deleted}) AND {match}")
        written = " AND ".join(f"n.w{s} IS NOT NULL" for s in slots)
        conn.execute(
            f"INSERT INTO {t} ({', '.join(quoted)}) SELECT {', '.join(value(s) for s in slots)} FROM {last} "
            f"WHERE NOT ({deleted}) AND {written} AND NOT EXISTS (SELECT 1 FROM {t} WHERE {match})"
        )
        conn.execute(
            f"DELETE FROM temp._sync_slow WHERE tid = {table.tid} AND rowkey IN (SELECT n.rowkey FROM {last} "
            f"WHERE {deleted} OR EXISTS (SELECT 1 FROM {t} WHERE {match}))"
        )

    def slow_pages(self, size: int = 2000) -> Iterator[dict[RowKey, list[Effect]]]:
        """The effects on the rows of ``temp._sync_slow`` (of the new operations, and of the old
        ones some new operation's author had not seen), ``size`` rows at a time: a bundle of
        millions of concurrent operations is merged in the memory of one page."""
        conn = self.conn
        if not conn.execute("SELECT 1 FROM temp._sync_slow LIMIT 1").fetchone():
            return
        self.stage_slow_ops()
        devices = device_ids(conn)
        tables = {t.tid: t for t in load_tables(conn).values()}
        after = 0
        while True:
            # Unpacked: a Datasette connection returns sqlite3.Row objects, which never equal tuples.
            keys = {n: (tid, rowkey) for n, tid, rowkey in conn.execute(
                "SELECT n, tid, rowkey FROM temp._sync_slow_rows WHERE n > ? ORDER BY n LIMIT ?", [after, size]
            ).fetchall()}
            if not keys:
                return
            bounds = [min(keys), max(keys)]
            after = bounds[1]
            page: dict[RowKey, list[Effect]] = {key: [] for key in keys.values()}
            for new in (1, 0):
                cursor = conn.execute(
                    "SELECT s.n AS _n, o.* FROM temp._sync_slow_ops s JOIN _sync_ops o ON o.op = s.op "
                    "WHERE s.n BETWEEN ? AND ? AND s.new = ?",
                    [*bounds, new],
                )
                fields = [d[0] for d in cursor.description]
                for row in cursor.fetchall():
                    record = dict(zip(fields, row))
                    key = keys[record["_n"]]
                    # A move has an effect on each of its keys: this row's is the one kept.
                    page[key].extend(e for k, e in effects_of(record, tables[key[0]], devices, bool(new)) if k == key[1])
            yield page

    def stage_slow_ops(self) -> None:
        """Number the rows of ``temp._sync_slow`` in order, and list the operations on each:
        the new ones, and the old ones some new operation's author had not seen."""
        conn = self.conn
        for sql in (
            "CREATE TEMP TABLE IF NOT EXISTS _sync_slow_rows (n INTEGER PRIMARY KEY, tid INTEGER, rowkey TEXT, UNIQUE (tid, rowkey))",
            "CREATE TEMP TABLE IF NOT EXISTS _sync_slow_ops (n INTEGER, op INTEGER, new INTEGER, PRIMARY KEY (n, new, op)) WITHOUT ROWID",
            "DELETE FROM temp._sync_slow_rows",
            "DELETE FROM temp._sync_slow_ops",
            "INSERT INTO temp._sync_slow_rows (tid, rowkey) SELECT tid, rowkey FROM temp._sync_slow ORDER BY tid, rowkey",
        ):
            conn.execute(sql)
        ops = (
            (1, self.new_ops("o.op, o.tid, o.rowkey, o.newkey", f"o.kind != {TICK}")),
            (0, f"SELECT op, tid, rowkey, newkey FROM ({self.window_ops('1')})"),
        )
        for new, sql in ops:
            for key in ("rowkey", "newkey"):
                conn.execute(
                    f"INSERT OR IGNORE INTO temp._sync_slow_ops SELECT k.n, o.op, {new} FROM ({sql}) o "
                    f"JOIN temp._sync_slow_rows k ON k.tid = o.tid AND k.rowkey = o.{key}"
                )
