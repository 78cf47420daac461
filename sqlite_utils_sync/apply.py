"""Importing bundles: validate, append to the log, bring the tables up to date.

The state of a row is a function of the set of operations on it, so every copy that holds
the same operations holds the same row, whatever order they arrived in:

* the row exists when its latest operation (by hybrid logical clock, then device id, then
  seq) is not a delete;
* each column holds the value of its latest writer (inserts write every column, updates the
  columns they changed).

Because the clock of an operation is higher than the clock of everything its author had seen,
"latest" never reverts an edit its author had seen; it only picks between concurrent ones,
and those are recorded as conflicts (see :mod:`conflicts`).

Applying is set-based where it can be: a row touched by exactly one new operation and by no
operation its author had not seen is written with one ``INSERT … SELECT`` / ``UPDATE … FROM``
/ ``DELETE`` per table straight from ``_sync_ops``. Only rows with concurrent or several new
operations go through Python.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

from .bundle import BundleReader, ChunkStage, op_fingerprint
from .capture import (
    SyncedTable,
    canonical_name,
    is_rowid_alias,
    load_tables,
    muted,
    register_table,
    secondary_unique_columns,
    table_info,
)
from .clocks import (
    DEFAULT_MAX_CLOCK_SKEW,
    HLC_NOW_SQL,
    HLC_PER_SECOND,
    MAX_HLC,
    append_local,
    append_tick,
    clock,
    horizon,
    knowledge_at,
    max_seq,
    next_local_hlc,
    now_iso,
    parse_duration,
    raise_horizon,
    settle_clocks,
)
from .devices import device_ids, device_index, ensure_log as ensure_schema, local_device_id
from .errors import BundleError, SyncError
from .oplog import (
    DELETE,
    INSERT,
    LOCAL,
    RESOLUTION,
    SEQ_MASK,
    TICK,
    UPDATE,
    RawText,
    exact_text,
    marker,
    op_id,
    parse_clock,
    parse_rowkey,
    remap_mask_sql,
    rowkey_sql,
    text_as,
)
from .schema import connection, quote_identifier
from .writing import capture_table as enable_table, repair_capture as repair_drift


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
        }


class Effect(NamedTuple):
    """What one operation does to one row."""

    op: int
    key: tuple[int, str, int]  # (hlc, device id, seq): the deterministic "latest" order
    write: bool  # False for a delete (or the old key of a primary-key move)
    mask: int
    values: dict[int, Any]
    new: bool
    resolution: bool
    kind: int  # the operation's kind (INSERT, UPDATE, DELETE), without the resolution flag


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One atomic write: a transaction, or a savepoint inside the caller's transaction."""
    if conn.in_transaction:
        conn.execute("SAVEPOINT datasette_sync")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK TO datasette_sync")
            conn.execute("RELEASE datasette_sync")
            raise
        conn.execute("RELEASE datasette_sync")
    else:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            # Inside: a deferred foreign key can still fail the COMMIT, which leaves it open.
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


VALID_KINDS = {INSERT, UPDATE, DELETE, INSERT | RESOLUTION, UPDATE | RESOLUTION, DELETE | RESOLUTION}


def attempt(conn: sqlite3.Connection, write: Callable[[], Any]) -> sqlite3.IntegrityError | None:
    """Run ``write`` in a savepoint; if it breaks a constraint, undo only it and return why."""
    conn.execute("SAVEPOINT _sync_attempt")
    try:
        write()
    except sqlite3.IntegrityError as ex:
        conn.execute("ROLLBACK TO _sync_attempt")
        return ex
    finally:
        conn.execute("RELEASE _sync_attempt")
    return None


def bits(mask: int) -> Iterator[int]:
    slot = 0
    while mask:
        if mask & 1:
            yield slot
        mask >>= 1
        slot += 1


def import_bundle(
    db: Any,
    path: str,
    alter: bool = False,
    actor: str | None = None,
    progress: Callable[[int], None] | None = None,
    max_clock_skew: float | str = DEFAULT_MAX_CLOCK_SKEW,
    may_relay: bool = True,
) -> ImportResult:
    """Apply the bundle at ``path`` in one transaction.

    :param alter: add columns (and tables) the bundle has and this database lacks
    :param actor: who imported it, for the import log
    :param progress: called with (operations just read, total) after each chunk
    :param max_clock_skew: refuse operations whose clock is further ahead of this machine's
        wall clock than this (seconds, or a duration like ``"7d"``)
    :param may_relay: False for a hub that limits who pushes each device's new operations
        (see :meth:`Importer.check_owners`): ``actor`` may then only add operations of devices
        it owns, and comes to own the devices nobody owns yet
    :raises BundleError: the bundle is invalid or cannot be applied; nothing was changed
    """
    conn = connection(db)
    skew = parse_duration(max_clock_skew)
    reader = BundleReader(path)
    try:
        stage = ChunkStage(conn, reader.path.name)
        try:
            try:
                # Where values pass through Python (rows with several or concurrent operations),
                # TEXT that is not valid UTF-8 is read as its bytes and written back as TEXT, never
                # replaced (as a Datasette connection's text_factory would) and written back changed.
                with text_as(conn, exact_text), transaction(conn):
                    conn.execute("PRAGMA defer_foreign_keys = ON")
                    importer = Importer(conn, reader, stage, alter, actor, progress)
                    importer.max_clock_skew, importer.may_relay = skew, may_relay
                    return importer.run()
            except NothingNew as own:
                return own.result
            except BundleError as ex:
                if ex.message.startswith("Bundle "):
                    raise
                raise BundleError(ex.reason, f"Bundle {reader.path.name}: {ex.message}")
            except sqlite3.IntegrityError as ex:
                # Another row here holds a UNIQUE value (or a foreign key) the bundle's rows need.
                raise BundleError(
                    "constraint_failed",
                    f"Bundle {reader.path.name} cannot be applied: {ex} here. Nothing was imported. If a row "
                    "here holds that value, change it (the change syncs too) and import again; see Limits "
                    "in the README",
                )
        finally:
            stage.close()
    finally:
        reader.close()


# Which actor may push new operations of each device to a hub (see Importer.check_owners).
DEVICE_ACTORS_SQL = (
    "CREATE TABLE IF NOT EXISTS _sync_device_actors (device_id TEXT PRIMARY KEY, actor TEXT NOT NULL, since TEXT NOT NULL)"
)


RECOVER_HINT = (
    "run 'sqlite-utils sync-new-device --recover' on the database whose edits under that id are not "
    "synced yet (either one, if unsure): it keeps every edit"
)


class NothingNew(Exception):
    """A bundle already held came back (this database's own, or one imported before): roll back
    even the trigger rebuilds, leave no trace."""

    def __init__(self, result: ImportResult):
        self.result = result


class Importer:
    def __init__(self, conn, reader: BundleReader, stage: ChunkStage, alter: bool, actor: str | None, progress):
        self.conn = conn
        self.reader = reader
        self.stage = stage
        self.name = reader.path.name
        self.alter = alter
        self.actor = actor
        self.progress = progress
        self.max_clock_skew = DEFAULT_MAX_CLOCK_SKEW
        self.may_relay = True

    def fail(self, reason: str, message: str) -> BundleError:
        return BundleError(reason, f"Bundle {self.name}: {message}")

    def run(self) -> ImportResult:
        conn, header = self.conn, self.reader.header
        ensure_schema(conn)
        settle_clocks(conn)  # local clocks decide against the bundle's
        repair_drift(conn)
        result = ImportResult(self.reader.bundle_id, header["source"], header["operations"])
        if conn.execute("SELECT 1 FROM _sync_imports WHERE bundle_id = ?", [result.bundle_id]).fetchone():
            if self.alter:
                # Imported before without --alter: create what was missing, which adopts the
                # operations that import kept for those tables.
                self.map_tables(result)
            result.skipped = True
            result.duplicates = result.total_operations
            result.clock = clock(conn)
            if not self.alter:
                raise NothingNew(result)  # not even the clock settling or a trigger rebuild stays
            return result
        self.map_tables(result)
        self.devices = [device_index(conn, d) for d in header["devices"]]
        local_id = local_device_id(conn)
        self.old = {idx: max_seq(conn, idx) for idx in self.devices}
        self.fresh = not conn.execute(f"SELECT 1 FROM _sync_ops WHERE kind != {TICK} LIMIT 1").fetchone()
        # As it was before this import: a snapshot adopted now was checked by its sender.
        self.compacted = horizon(conn)
        self.kinds: dict[int, set[tuple[int, int]]] = {}
        self.moved: set[tuple[int, str]] = set()  # (tid, row key) of both ends of every move
        # Gathered while streaming, so the new operations need no further scans.
        self.data_inserted = 0
        self.max_hlc = 0
        self.has_resolutions = False
        self.ticks: list[tuple[int, int, str]] = []
        # How far the source was checked to hold this database's own operations as they are here.
        self.verified = 0
        (now,) = conn.execute(f"SELECT {HLC_NOW_SQL}").fetchone()  # the clock the triggers read
        # Every later local clock is at least one above an accepted one: keep that valid too.
        self.clock_limit = min(MAX_HLC - 1, now + int(self.max_clock_skew * HLC_PER_SECOND))
        self.now = now
        self.check_anchors()
        with muted(conn):
            inserted = self.append_ops(result, local_id)
            self.ranges = self.check_sequences(inserted)
            self.check_owners(inserted)
            self.record_knowledge()
            self.check_horizon()
            result.applied = sum(inserted.values())
            if self.data_inserted:
                result.conflicts = self.apply_to_tables()
                append_tick(conn, {k: v for k, v in clock(conn).items() if k != local_id}, floor=self.max_hlc)
        result.clock = clock(conn)
        if header["source"] == local_id and not result.applied:
            result.skipped = True
            raise NothingNew(result)
        self.record_peer(header, result.clock)
        conn.execute(
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
        return result

    # -- validation and mapping --------------------------------------------------------------

    def map_tables(self, result: ImportResult) -> None:
        """Map each bundle table to a local table id and slots, or refuse the bundle."""
        conn = self.conn
        # (table id, slot of each bundle column, applied here?, positions of the pk columns)
        self.tables: list[tuple[int, list[int], bool, list[int]]] = []
        self.applied_tids: dict[int, SyncedTable] = {}
        self.table_names: dict[int, str] = {}
        self.integer_keys: set[int] = set()  # tables keyed by their rowid here
        for name, columns, pk in self.reader.header["tables"]:
            if name.lower().startswith(("_sync_", "sqlite_")):  # SQL names ignore case
                raise self.fail("internal_table", f"operations on internal table '{name}' are never accepted")
            local = load_tables(conn).get(name)
            exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [name]).fetchone()
            # Columns the sender dropped: it relays their values, nobody needs to have them.
            dropped = set(self.reader.header.get("dropped", {}).get(name, []))
            here = canonical_name(conn, name)
            if here != name:
                raise self.fail(
                    "table_name_case",
                    f"table '{name}' is called '{here}' here; sync matches table names exactly, so rename "
                    "one of them to match (ALTER TABLE ... RENAME TO ...)",
                )
            if local is None or not local.enabled:
                if self.alter and not exists:
                    conn.execute(
                        f"CREATE TABLE {quote_identifier(name)} ("
                        + ", ".join(quote_identifier(c) for c in columns if c not in dropped)
                        + f", PRIMARY KEY ({', '.join(quote_identifier(c) for c in pk)}))"
                    )
                    enable_table(conn, name)
                    local = load_tables(conn)[name]
                    exists = True
                else:
                    # Not synced here: store and relay its operations, never apply them.
                    kept = register_table(conn, name, columns, pk, enabled=False)
                    self.tables.append((kept.tid, [kept.slots[c] for c in columns], False, [columns.index(c) for c in pk]))
                    self.table_names[kept.tid] = name
                    continue
            if not exists:
                # Dropped or renamed while synced: there is nothing to apply its operations to.
                raise SyncError(
                    "table_missing",
                    f"table '{name}' is synced but no longer exists in this database (dropped or renamed): "
                    f"rename it back, or run 'sqlite-utils disable-sync DB {name}' to stop syncing it "
                    "(its operations are then kept, unapplied)",
                )
            current = [row[1] for row in table_info(conn, name)]
            missing = [c for c in columns if c not in current]
            # A column this table had and dropped is no surprise: its values stay in the log and
            # never reach the table. One it never had is refused (or, with --alter, added).
            unknown = [c for c in missing if c not in local.slots and c not in dropped]
            if unknown and not self.alter:
                raise self.fail(
                    "unknown_column",
                    f"table '{name}' has column{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                    "that this database lacks (import with --alter to add)",
                )
            missing = [c for c in missing if c not in dropped] if self.alter else []
            for column in missing:
                conn.execute(f"ALTER TABLE {quote_identifier(name)} ADD COLUMN {quote_identifier(column)}")
            if missing:
                enable_table(conn, name)
                local = load_tables(conn)[name]
            if pk != local.pk:
                raise self.fail("pk_mismatch", f"table '{name}' has primary key {pk} here it is {local.pk}")
            if any(c not in local.slots for c in columns):
                # Only dropped ones are left: a slot keeps their values for relaying.
                local = register_table(conn, name, [c for c in columns if c not in local.slots], local.pk)
            self.tables.append((local.tid, [local.slots[c] for c in columns], True, [columns.index(c) for c in pk]))
            self.applied_tids[local.tid] = local
            self.table_names[local.tid] = name
            if is_rowid_alias(conn, name, pk):
                self.integer_keys.add(local.tid)

    def check_anchors(self) -> None:
        """Refuse a bundle whose sender has a different op under an id we hold: two databases
        share a device id, and one side's edits would be silently lost."""
        for device, (seq, fingerprint) in self.reader.header.get("anchors", {}).items():
            idx = device_index(self.conn, device, create=False)
            if idx is None:
                continue
            ours = op_fingerprint(self.conn, op_id(idx, seq))
            if ours and ours != fingerprint:
                raise self.clash(f"{device}:{seq}")
            if ours and idx == LOCAL:
                self.verified = max(self.verified, seq)

    def clash(self, label: str) -> BundleError:
        return self.fail(
            "device_id_clash",
            f"operation {label} differs from the copy here: two databases share that device id (a copied file, "
            f"or operations pushed under its id by someone else); {RECOVER_HINT}",
        )

    def append_ops(self, result: ImportResult, local_id: str) -> dict[int, int]:
        """Copy each chunk's operations into the log with one ``INSERT … SELECT``, after
        checking them with a couple of set-based queries: no value passes through Python."""
        conn = self.conn
        inserted: dict[int, int] = {}
        carried = 0
        for position, table_position, data in self.reader.chunks():
            idx = self.devices[position]
            width = self.reader.width(table_position)
            if table_position == -1:
                tid, slots, applied, pk_positions = 0, [], True, []
            else:
                tid, slots, applied, pk_positions = self.tables[table_position]
            source = self.stage.load(data, width)
            try:
                appended = self.append_chunk(source, idx, tid, slots, pk_positions, local_id, position)
            except sqlite3.DatabaseError as ex:
                raise self.fail("invalid_operation", f"a chunk cannot be read ({ex})")
            if appended is None:
                continue
            first, last, count, stored = appended
            carried += count
            inserted[idx] = inserted.get(idx, 0) + stored
            if tid:
                self.data_inserted += stored
            result.duplicates += count - stored
            if stored and not applied:
                table_name = self.reader.header["tables"][table_position][0]
                result.not_applied[table_name] = result.not_applied.get(table_name, 0) + stored
                # Remember exactly which ones, so enabling the table later adopts these and no others.
                conn.execute(
                    f"INSERT OR IGNORE INTO _sync_unapplied SELECT {tid}, op FROM _sync_ops WHERE op BETWEEN ? AND ?",
                    [op_id(idx, max(first, self.old[idx] + 1)), op_id(idx, last)],
                )
            if self.progress:
                self.progress(count, self.reader.header["operations"])
        if carried != self.reader.header["operations"]:
            raise self.fail(
                "invalid_metadata", f"its header counts {self.reader.header['operations']} operations but it carries {carried}"
            )
        return inserted

    def append_chunk(
        self, source: str, idx: int, tid: int, slots: list[int], pk_positions: list[int], local_id: str, position: int
    ) -> tuple[int, int, int, int] | None:
        """Check one loaded chunk and append it to the log: ``(first seq, last seq, ops, stored)``."""
        conn = self.conn
        width = len(slots)
        pk = [f"v{i}" for i in pk_positions]
        # Each check is an O(1) lookup or one pass that keeps only distinct shapes.
        count, first, last, low, high = conn.execute(
            f"SELECT count(*), min(seq), max(seq), min(hlc), max(hlc) FROM {source}"
        ).fetchone()
        if not count:
            return None
        if not (0 < first and last <= SEQ_MASK):
            raise self.fail("invalid_operation", f"operation sequence numbers must be 1 to {SEQ_MASK}")
        # Holes are checked per device once everything is in (a compacted sender may leave some).
        if tid:
            key_types = " || ' ' || ".join(f"typeof({v})" for v in pk)
            shapes = conn.execute(
                f"SELECT DISTINCT typeof(hlc), kind, mask, moved IS NOT NULL, {key_types} FROM {source}"
            ).fetchall()
        else:
            shapes = conn.execute(f"SELECT DISTINCT typeof(hlc), kind, typeof(moved) FROM {source}").fetchall()
        if any(shape[0] != "integer" for shape in shapes):
            raise self.fail("invalid_operation", "an operation has a clock that is not an integer")
        if low < 0:
            raise self.fail("invalid_operation", f"an operation has a clock out of range ({low})")
        if high > self.clock_limit:
            raise self.clock_ahead(source, position, high)
        if idx == LOCAL and last > self.old[LOCAL]:
            raise self.fail(
                "device_id_clash",
                f"it carries operations of this database's own device {local_id} that this database never "
                f"wrote (a copied file, or operations pushed under its id); {RECOVER_HINT}",
            )
        base = op_id(idx, 0)
        if first <= self.old[idx]:
            self.check_overlap(source, idx, tid, slots, pk, position)
            if idx == LOCAL:
                self.verified = max(self.verified, min(last, self.old[idx]))
        if not tid:
            if any(kind != TICK or moved != "text" for _, kind, moved in shapes):
                raise self.fail("invalid_operation", "a knowledge operation is malformed")
            stored = conn.execute(
                f"INSERT INTO _sync_ops (op, hlc, tid, kind, rowkey) SELECT seq + {base}, hlc, 0, kind, moved "
                f"FROM {source} WHERE seq > ?",
                [self.old[idx]],
            ).rowcount
            # As bytes, fetched whole: no statement may stay open on the chunk (see check_image).
            self.ticks.extend(
                (idx, seq, text.decode("utf-8", "replace"))
                for seq, text in conn.execute(
                    f"SELECT seq, CAST(moved AS BLOB) FROM {source} WHERE seq > ?", [self.old[idx]]
                ).fetchall()
            )
            return first, last, count, stored
        key_types = {t for shape in shapes for t in shape[4].split(" ")}
        if "null" in key_types:
            raise self.fail("null_key", f"an operation for table '{self.table_names[tid]}' has a NULL primary key")
        fractional = " OR ".join(f"(typeof({v}) = 'real' AND {v} != CAST({v} AS INTEGER))" for v in pk)
        if tid in self.integer_keys and (
            key_types - {"integer", "real"}
            # 2.0 is the key 2 (an untyped key column elsewhere may send it so); 2.5 is no rowid.
            or "real" in key_types and conn.execute(f"SELECT 1 FROM {source} WHERE {fractional} LIMIT 1").fetchone()
        ):
            wrong = ", ".join(sorted(key_types - {"integer"}))
            raise self.fail(
                "key_type",
                f"table '{self.table_names[tid]}' is keyed by an INTEGER PRIMARY KEY here, "
                f"but operations carry {wrong} keys",
            )
        nul_keys = " OR ".join(f"(typeof({v}) = 'text' AND instr({v}, char(0)) > 0)" for v in pk)
        if any("text" in shape[4] for shape in shapes) and conn.execute(
            f"SELECT 1 FROM {source} WHERE {nul_keys} LIMIT 1"
        ).fetchone():
            # quote() stops at NUL, so such keys could not be told apart: refuse, never merge rows.
            raise self.fail(
                "unsupported_key", "a primary key value contains a NUL character, which sync does not support"
            )
        kinds = {(kind, mask) for _, kind, mask, _, _ in shapes}
        if not all(kind in VALID_KINDS and type(mask) is int and 0 <= mask < 1 << width for kind, mask in kinds):
            raise self.fail("invalid_operation", "an operation has an invalid kind or mask")
        # Masks arrive as bits of the header's column list; the log keeps them as local slots.
        local_mask = remap_mask_sql(list(enumerate(slots)))
        self.kinds.setdefault(tid, set()).update(
            (kind & 3, sum(1 << s for i, s in enumerate(slots) if mask >> i & 1)) for kind, mask in kinds
        )
        self.has_resolutions |= any(kind & RESOLUTION for kind, _ in kinds)
        key = rowkey_sql(pk)
        keys = f"{key}, NULL"
        if any(shape[3] for shape in shapes):
            self.check_moves(source, tid, pk)
            keys = f"coalesce(moved, {key}), CASE WHEN moved IS NOT NULL THEN {key} END"
        # What is at or below our clock is here already (or was compacted away): only the rest.
        stored = conn.execute(
            "INSERT INTO _sync_ops (op, hlc, tid, kind, mask, rowkey, newkey"
            + "".join(f", c{s}" for s in slots)
            + f") SELECT seq + {base}, hlc, {tid}, kind, {local_mask}, {keys}"
            + "".join(f", v{i}" for i in range(width))
            + f" FROM {source} WHERE seq > ?",
            [self.old[idx]],
        ).rowcount
        # A device's clocks only grow, so its last op carries the chunk's highest.
        self.max_hlc = max(self.max_hlc, high)
        return first, last, count, stored

    def clock_ahead(self, source: str, position: int, high: int) -> BundleError:
        """Refuse a clock that would become the floor of every later clock here: one past the
        valid range, or further ahead of this machine's wall clock than ``max_clock_skew``."""
        # Fetched whole: a statement left open on the chunk would outlive the chunk.
        seq = self.conn.execute(f"SELECT seq FROM {source} WHERE hlc = ? LIMIT 1", [high]).fetchall()[0][0]
        label = f"{self.reader.header['devices'][position]}:{seq}"
        if high > MAX_HLC - 1:
            return self.fail(
                "invalid_operation",
                f"operation {label} has a clock out of range ({high}): this database's own next operation "
                "would have no valid clock after it",
            )
        days = (high - self.now) / HLC_PER_SECOND / 86400
        return self.fail(
            "clock_ahead",
            f"operation {label} has a clock {days:.1f} days ahead of this machine's clock, more than "
            f"max_clock_skew allows ({self.max_clock_skew / 86400:g} days). If this machine's clock is right, "
            "the sending device's clock is wrong: fix it there",
        )

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
        conn.execute(DEVICE_ACTORS_SQL)
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
                    "device_owned",
                    f"it adds new operations of device {device}, which another actor pushes to this hub (relaying "
                    "them needs the sync-relay permission). If it is your device, run 'sqlite-utils sync-new-device "
                    "--recover' on its database to give its edits an id of its own, then sync again",
                )

    def check_overlap(self, source: str, idx: int, tid: int, slots: list[int], pk: list[str], position: int) -> None:
        """Operations we hold already must be the same operations: if one differs, two databases
        share a device id (a copied file) and counting it as a duplicate would lose an edit."""
        same = "o.hlc = s.hlc AND o.kind = s.kind"
        if tid:
            key = rowkey_sql(f"s.{v}" for v in pk)
            same += f" AND o.rowkey IS coalesce(s.moved, {key})" + "".join(
                f" AND o.c{slot} IS s.v{i}" for i, slot in enumerate(slots)
            )
        else:
            same += " AND o.rowkey IS s.moved"
        differs = self.conn.execute(
            f"SELECT s.seq FROM {source} s JOIN _sync_ops o ON o.op = s.seq + {op_id(idx, 0)} "
            f"WHERE s.seq <= ? AND NOT ({same}) LIMIT 1",
            [self.old[idx]],
        ).fetchone()
        if differs:
            raise self.clash(f"{self.reader.header['devices'][position]}:{differs[0]}")

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
            if kind & 3 != UPDATE or old_values is None or len(old_values) != len(pk) or None in old_values:
                raise self.fail("invalid_operation", "an operation has an invalid moved-from key")
            # The keys as the log stores them (rowkey and newkey), which is what the slow set matches.
            self.moved.update({(tid, moved), (tid, new_key)})

    def check_sequences(self, inserted: dict[int, int]) -> list[tuple[int, int, int]]:
        """Refuse a bundle that leaves a gap in a device's sequence; return the new op ranges."""
        conn = self.conn
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS _sync_new (device INTEGER, lo INTEGER, hi INTEGER)")
        conn.execute("DELETE FROM temp._sync_new")
        names = device_ids(conn)
        ranges = []
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
                    raise self.fail(
                        "compacted_history",
                        f"it comes from a compacted log (device {names[idx]} up to seq {floor}) that this database "
                        "has only partly: only a database with no synced data yet can start from it (import it "
                        "into a new database)",
                    )
                # A snapshot: this database holds no data yet, so nothing here depends on them.
                adopted[names[idx]] = floor
            ranges.append((idx, op_id(idx, old + 1), op_id(idx, new)))
        conn.executemany("INSERT INTO temp._sync_new VALUES (?, ?, ?)", ranges)
        if adopted:
            raise_horizon(conn, adopted)
        return ranges

    def missing(self, idx: int, device: str, old: int) -> BundleError:
        """Say which operations of a device the bundle lacks."""
        conn = self.conn
        first = conn.execute(
            "SELECT min(op) FROM _sync_ops WHERE op > ? AND op <= ?", [op_id(idx, old), op_id(idx, SEQ_MASK)]
        ).fetchone()[0] & SEQ_MASK
        if first > old + 1:
            return self.fail(
                "missing_operations",
                f"it starts device {device} at seq {first} but this database has only up to seq {old} "
                f"(operations {old + 1}-{first - 1} are missing: import the bundles before it first)",
            )
        before_hole, after_hole = conn.execute(
            "SELECT o.op, (SELECT min(n.op) FROM _sync_ops n WHERE n.op > o.op) FROM _sync_ops o "
            "WHERE o.op BETWEEN ? AND ? AND NOT EXISTS (SELECT 1 FROM _sync_ops n WHERE n.op = o.op + 1) "
            "ORDER BY o.op LIMIT 1",
            [op_id(idx, old + 1), op_id(idx, SEQ_MASK)],
        ).fetchone()
        lo, hi = (before_hole & SEQ_MASK) + 1, (after_hole & SEQ_MASK) - 1
        return self.fail(
            "missing_operations",
            f"it lacks operation{f' {lo}' if lo == hi else f's {lo}-{hi}'} of device {device}, which the operations "
            "after it depend on",
        )

    def held(self, idx: int, after: int, upto: int) -> int:
        return self.conn.execute(
            "SELECT count(*) FROM _sync_ops WHERE op BETWEEN ? AND ?", [op_id(idx, after + 1), op_id(idx, upto)]
        ).fetchone()[0]

    def check_horizon(self) -> None:
        """Refuse data operations written without having seen what this database compacted away:
        they would be compared with operations that are gone, unlike on copies that kept them."""
        compacted = self.compacted
        if not compacted:
            return
        names = device_ids(self.conn)
        for idx, lo, hi in self.ranges:
            (first,) = self.conn.execute(
                f"SELECT min(op) FROM _sync_ops WHERE op BETWEEN ? AND ? AND kind != {TICK}", [lo, hi]
            ).fetchone()
            if first is None:
                continue
            seen = knowledge_at(self.conn, idx, first & SEQ_MASK)
            for device, seq in compacted.items():
                if device != names[idx] and seen.get(device, 0) < seq:
                    raise self.fail(
                        "compacted_history",
                        f"device {names[idx]} wrote operations without having seen device {device} up to seq {seq}, "
                        "which this database has compacted away. Send this database's changes to a peer that kept "
                        "its whole log, then start this copy again from that peer's export (into a new database)",
                    )

    def new_ops(self, columns: str = "o.*", where: str = "1") -> str:
        # NOT INDEXED: without it SQLite may build an automatic index over the whole log for the
        # other conditions, making every import cost O(log) instead of O(new operations).
        return (
            f"SELECT {columns} FROM temp._sync_new r JOIN _sync_ops o NOT INDEXED ON o.op BETWEEN r.lo AND r.hi "
            f"WHERE {where}"
        )

    def record_knowledge(self) -> None:
        """Index new tick operations and check that the bundle carries what they depend on."""
        conn = self.conn
        have = clock(conn)
        for idx, seq, text in self.ticks:
            if not text:  # parse_clock reads "" as no clock, but later readers need the JSON
                raise self.fail("invalid_operation", "a knowledge operation is malformed")
            known = parse_clock(text, f"Bundle {self.name} knowledge clock")
            for device, needed in known.items():
                if have.get(device, 0) < needed:
                    raise self.fail(
                        "missing_dependencies",
                        f"its operations depend on device {device} up to seq {needed}, but neither this database nor "
                        f"the bundle has more than seq {have.get(device, 0)}",
                    )
            conn.execute("INSERT OR REPLACE INTO _sync_knowledge VALUES (?, ?, ?)", [idx, seq + 1, text])

    def record_peer(self, header: dict, have: dict[str, int]) -> None:
        """Remember what the source had, as far as it can be checked: deltas for it start there."""
        conn = self.conn
        source = header["source"]
        claimed = parse_clock(header["clock"])
        row = conn.execute("SELECT clock FROM _sync_peers WHERE device_id = ?", [source]).fetchone()
        known = json.loads(row[0]) if row else {}
        local_id = local_device_id(conn)
        for device, seq in claimed.items():
            # Our own operations only as far as this import compared them: a source holding
            # another database's operations under our id must never count as having ours.
            checked = self.verified if device == local_id else seq
            known[device] = max(known.get(device, 0), min(seq, have.get(device, 0), checked))
        conn.execute(
            "INSERT OR REPLACE INTO _sync_peers VALUES (?, ?, ?)",
            [source, json.dumps(known, sort_keys=True), now_iso()],
        )

    # -- bringing the tables up to date -----------------------------------------------------

    def window_ranges(self) -> list[tuple[int, int]]:
        """Old operations that some new operation's author had not seen: the only candidates for
        concurrency with the new ones."""
        conn = self.conn
        names = device_ids(conn)
        floor: dict[int, int] = {}
        for idx, lo, hi in self.ranges:
            epochs = [knowledge_at(conn, idx, lo & SEQ_MASK)] + [
                json.loads(text)
                for (text,) in conn.execute(
                    "SELECT clock FROM _sync_knowledge WHERE device = ? AND from_seq > ? AND from_seq <= ?",
                    [idx, lo & SEQ_MASK, hi & SEQ_MASK],
                )
            ]
            for other, name in names.items():
                seen = self.old.get(other, 0) if other == idx else min(e.get(name, 0) for e in epochs)
                floor[other] = min(floor.get(other, seen), seen)
        result = []
        for other, seen in floor.items():
            top = self.old[other] if other in self.old else max_seq(conn, other)
            if top > seen:
                result.append((op_id(other, seen + 1), op_id(other, top)))
        return result

    def apply_to_tables(self) -> int:
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
        window_ops = "SELECT o.* FROM temp._sync_window w JOIN _sync_ops o NOT INDEXED ON o.op BETWEEN w.lo AND w.hi WHERE o.kind != 3"
        window_keys = (
            f"SELECT tid, rowkey FROM ({window_ops}) UNION SELECT tid, newkey FROM ({window_ops}) WHERE newkey IS NOT NULL"
        )
        pending = dict(self.applied_tids)
        if not window and not self.moved:
            for tid, table in list(pending.items()):
                if self.bulk_insert(table):
                    del pending[tid]
        conn.executemany("INSERT OR IGNORE INTO temp._sync_slow VALUES (?, ?)", sorted(self.moved))
        # Rows the bundle touches twice, or that a concurrent old operation touched too. Grouped
        # by key values rather than row-key text (the same groups: quote() is exact), which sorts
        # faster; moves are in already (see check_moves).
        for table in pending.values():
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
            conn.execute(f"INSERT OR IGNORE INTO temp._sync_wkeys {window_keys}")
            conn.execute(
                "INSERT OR IGNORE INTO temp._sync_slow "
                + self.new_ops(
                    "o.tid, o.rowkey",
                    "o.kind != 3 AND EXISTS (SELECT 1 FROM temp._sync_wkeys w WHERE w.tid = o.tid AND w.rowkey = o.rowkey)",
                )
            )
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
        from .conflicts import rebuild_conflicts

        touched = set(self.clashed_rows) | {(tid, key) for tid, key, _ in resolutions}
        return rebuild_conflicts(conn, touched)

    def replay(self, tables: dict[int, SyncedTable]) -> dict[tuple[int, str], dict[str, Any] | None]:
        """Write each new operation's own effect in clock order (each author's order), whether
        it wins or not, and mark every row it touches for settling. Returns those rows as they
        were before: settling decides against them, as the set-based path would have."""
        conn = self.conn
        devices = device_ids(conn)
        columns = {tid: set(table.current_columns(conn)) for tid, table in tables.items()}
        cursor = conn.execute(self.new_ops("o.*", f"o.kind != {TICK} AND o.tid IN ({', '.join(map(str, tables))})"))
        names = [d[0] for d in cursor.description]
        records = [dict(zip(names, row)) for row in cursor.fetchall()]
        records.sort(key=lambda r: (r["hlc"], devices[r["op"] >> 40], r["op"] & SEQ_MASK))
        before: dict[tuple[int, str], dict[str, Any] | None] = {}
        for record in records:
            table = tables[record["tid"]]
            slot_names = {slot: name for name, slot in table.slots.items() if name in columns[table.tid]}
            for position, (rowkey, effect) in enumerate(effects_of(record, table, devices, True)):
                row = fetch_row(conn, table, rowkey)
                before.setdefault((table.tid, rowkey), row)
                moved_in = position == 1  # the new key of a move: the whole row arrives
                if effect.write and row is None and effect.kind == UPDATE and not moved_in:
                    continue  # not here to update: settling the row decides
                values = {slot_names[s]: effect.values[s] for s in bits(effect.mask) if s in slot_names}
                # A step that meets a value another copy holds concurrently is passed by:
                # settling writes the row's final state in any case.
                attempt(conn, lambda: write_row(conn, table, rowkey, effect.write, values, row is not None))
        conn.executemany("INSERT OR IGNORE INTO temp._sync_slow VALUES (?, ?)", list(before))
        return before

    def bulk_insert(self, table: SyncedTable) -> bool:
        """The common bulk case, optimistically: nothing concurrent and only whole-row inserts.
        Plain INSERTs then fail only where a key repeats or exists already, and that is the one
        thing the general path would have to look for; on failure it takes over. Returns True
        when the table is done."""
        conn = self.conn
        columns = table.current_columns(conn)
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
        columns = table.current_columns(self.conn)
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
        if any(kind == INSERT and mask & full != full for kind, mask in kinds):
            # Inserts written before a column existed go per-row: the row's history decides the
            # columns they lack (NULL where nothing wrote them).
            partial = f"o.tid = {table.tid} AND o.kind & 3 = {INSERT} AND o.mask & {full} != {full}"
            self.conn.execute("INSERT OR IGNORE INTO temp._sync_slow " + self.new_ops("o.tid, o.rowkey", partial))
        self.conn.execute(
            f"INSERT INTO {t} ({', '.join(quoted)}) SELECT {', '.join(f'o.c{table.slots[c]}' for c in columns)} FROM ("
            + self.new_ops("o.*", f"o.tid = {table.tid} AND o.kind & 3 = {INSERT} AND o.mask & {full} = {full}")
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
            + self.new_ops("o.*", f"o.tid = {table.tid} AND o.kind & 3 = {UPDATE} AND o.newkey IS NULL")
            + f") o WHERE {not_slow} AND {pk_match}"
        )

    def fast_deletes(self, table: SyncedTable, not_slow: str) -> None:
        pk_cols = ", ".join(quote_identifier(c) for c in table.pk)
        pk_slots = ", ".join(f"o.c{table.slots[c]}" for c in table.pk)
        self.conn.execute(
            f"DELETE FROM {quote_identifier(table.name)} WHERE ({pk_cols}) IN (SELECT {pk_slots} FROM ("
            + self.new_ops("o.*", f"o.tid = {table.tid} AND o.kind & 3 = {DELETE}")
            + f") o WHERE {not_slow})"
        )

    def slow_path(self, before: dict[tuple[int, str], dict[str, Any] | None] | None = None) -> None:
        """Rows with several new operations or concurrent ones: resolve each row in Python.

        :param before: after a replay, the rows as they were before it (see :meth:`replay`)
        """
        conn = self.conn
        self.clashed_rows: set[tuple[int, str]] = set()
        # Unpacked: a Datasette connection returns sqlite3.Row objects, which never equal tuples.
        slow = {(tid, rowkey) for tid, rowkey in conn.execute("SELECT tid, rowkey FROM temp._sync_slow")}
        if not slow:
            return
        devices = device_ids(conn)
        on_slow = (
            "(EXISTS (SELECT 1 FROM temp._sync_slow s WHERE s.tid = o.tid AND s.rowkey = o.rowkey) "
            "OR EXISTS (SELECT 1 FROM temp._sync_slow s WHERE s.tid = o.tid AND s.rowkey = o.newkey))"
        )
        rows: dict[tuple[int, str], list[Effect]] = {}
        tables = {t.tid: t for t in load_tables(conn).values()}
        for new, sql in (
            (True, self.new_ops("o.*", f"o.kind != 3 AND {on_slow}")),
            (
                False,
                "SELECT o.* FROM temp._sync_window w JOIN _sync_ops o NOT INDEXED ON o.op BETWEEN w.lo AND w.hi "
                f"WHERE o.kind != 3 AND {on_slow}",
            ),
        ):
            for tid, rowkey, effect in cursor_effects(conn.execute(sql), tables, devices, new):
                rows.setdefault((tid, rowkey), []).append(effect)
        knowledge = KnowledgeCache(conn)
        todo = []
        for (tid, rowkey), effects in rows.items():
            table = self.applied_tids.get(tid)
            if table is None or (tid, rowkey) not in slow or not any(e.new for e in effects):
                continue
            effects.sort(key=lambda e: e.key)
            if before is None:
                apply_row(conn, table, rowkey, effects)
            else:
                todo.append((table, rowkey, effects, before.get((tid, rowkey))))
            if record_clashes(conn, table, rowkey, effects, knowledge):
                self.clashed_rows.add((tid, rowkey))
        # After a replay a row's final value may still sit in a row not settled yet, or rows may
        # hand values round in a cycle. Each row is then written whole, so any column may be set aside.
        settle(
            conn,
            [(row[0], row[1], set(row[0].current_columns(conn)), lambda row=row: apply_row(conn, *row)) for row in todo],
        )


def effects_of(record: dict[str, Any], table: SyncedTable, devices: dict[int, str], new: bool) -> list[tuple[str, Effect]]:
    """The row effects of one operation: a primary-key move deletes the old key, writes the new."""
    op = record["op"]
    idx, seq = op >> 40, op & SEQ_MASK
    key = (record["hlc"], devices[idx], seq)
    kind = record["kind"] & 3
    resolution = bool(record["kind"] & RESOLUTION)
    values = {slot: record.get(f"c{slot}") for slot in table.slots.values()}
    all_slots = table.mask_for(list(table.slots))
    if kind == DELETE:
        return [(record["rowkey"], Effect(op, key, False, 0, {}, new, resolution, kind))]
    if kind == UPDATE and record["newkey"] is not None:
        return [
            (record["rowkey"], Effect(op, key, False, 0, {}, new, resolution, kind)),
            (record["newkey"], Effect(op, key, True, all_slots, values, new, resolution, kind)),
        ]
    return [(record["rowkey"], Effect(op, key, True, record["mask"] & all_slots, values, new, resolution, kind))]


def cursor_effects(
    cursor: sqlite3.Cursor, tables: dict[int, SyncedTable], devices: dict[int, str], new: bool
) -> Iterator[tuple[int, str, Effect]]:
    """``(tid, row key, effect)`` for every row effect of the operations a cursor returns."""
    names = [d[0] for d in cursor.description]
    for row in cursor:
        record = dict(zip(names, row))
        for rowkey, effect in effects_of(record, tables[record["tid"]], devices, new):
            yield record["tid"], rowkey, effect


def latest_writers(effects: list[Effect]) -> dict[int, Effect]:
    """For each column slot, the latest operation (effects sorted by key) that wrote it."""
    writers: dict[int, Effect] = {}
    for effect in effects:
        if effect.write:
            for slot in bits(effect.mask):
                writers[slot] = effect
    return writers


def row_state(effects: list[Effect]) -> tuple[bool, dict[int, Any]]:
    """The row implied by all its operations (sorted by key): does it exist, and its values."""
    values = {slot: effect.values[slot] for slot, effect in latest_writers(effects).items()}
    return bool(effects) and effects[-1].write, values


def all_effects(conn: sqlite3.Connection, table: SyncedTable, rowkey: str) -> list[Effect]:
    """Every operation ever recorded on one row (a log scan: only for restoring deleted rows)."""
    cursor = conn.execute(
        "SELECT * FROM _sync_ops WHERE tid = ? AND (rowkey = ? OR newkey = ?)", [table.tid, rowkey, rowkey]
    )
    effects = [e for _, key, e in cursor_effects(cursor, {table.tid: table}, device_ids(conn), False) if key == rowkey]
    return sorted(effects, key=lambda e: e.key)


def key_slots(table: SyncedTable, rowkey: str) -> dict[int, Any]:
    """A row's primary-key values by slot: what a delete operation carries."""
    return {table.slots[c]: v for c, v in zip(table.pk, key_values(rowkey))}


def pk_where(table: SyncedTable) -> str:
    return " AND ".join(f"{quote_identifier(c)} IS ?" for c in table.pk)


def key_values(rowkey: str) -> list[Any]:
    if isinstance(rowkey, RawText):
        raise BundleError("invalid_text", "a primary key holds TEXT that is not valid UTF-8, which sync cannot match")
    return parse_rowkey(rowkey)


def fetch_row(conn: sqlite3.Connection, table: SyncedTable, rowkey: str) -> dict[str, Any] | None:
    cursor = conn.execute(f"SELECT * FROM {quote_identifier(table.name)} WHERE {pk_where(table)}", key_values(rowkey))
    row = cursor.fetchone()
    return None if row is None else dict(zip([d[0] for d in cursor.description], row))


def write_row(
    conn: sqlite3.Connection, table: SyncedTable, rowkey: str, exists: bool, values: dict[str, Any], present: bool
) -> None:
    """Make the table's row match: delete it, insert it, or update the given columns."""
    t = quote_identifier(table.name)
    pk_values = key_values(rowkey)
    where = pk_where(table)
    if not exists:
        if present:
            conn.execute(f"DELETE FROM {t} WHERE {where}", pk_values)
        return
    if present:
        # Primary-key columns are written too: 1 and 1.0 are one key, but the type must follow
        # the latest writer.
        if values:
            conn.execute(
                f"UPDATE {t} SET {', '.join(f'{quote_identifier(c)} = {marker(v)}' for c, v in values.items())} "
                f"WHERE {where}",
                [*values.values(), *pk_values],
            )
        return
    # Columns no operation wrote are NULL, never the DEFAULT: a copy that got the column later
    # (ALTER, import --alter) has NULL there, and so does what the log implies. A NOT NULL
    # column can't be, and takes its DEFAULT (copies must declare it alike).
    row = {
        info[1]: None
        for info in table_info(conn, table.name)
        if not (info[3] and info[4] is not None)
    }
    row.update(values)
    for column, value in zip(table.pk, pk_values):
        if row.get(column) is None:
            row[column] = value
    conn.execute(
        f"INSERT INTO {t} ({', '.join(quote_identifier(c) for c in row)}) "
        f"VALUES ({', '.join(marker(v) for v in row.values())})",
        list(row.values()),
    )


UNCHANGED: Any = object()


def apply_row(
    conn: sqlite3.Connection, table: SyncedTable, rowkey: str, effects: list[Effect], before: Any = UNCHANGED
) -> None:
    """Bring one row up to date given the new operations on it and the concurrent old ones.

    :param before: the row as it was before this import, when the table no longer shows it
        (after a replay, which may have written any new operation's value, the winner's or
        not); the row is then written whole
    """
    current = fetch_row(conn, table, rowkey)
    replayed = before is not UNCHANGED
    if not replayed:
        before = current
    columns = table.current_columns(conn)
    names = {slot: name for name, slot in table.slots.items() if name in columns}
    latest = effects[-1]
    exists = latest.write if latest.new else before is not None
    if not exists:
        write_row(conn, table, rowkey, False, {}, current is not None)
        return
    if before is None:
        # Coming (back) into existence: the row's history decides every column. A new effect
        # sorts after all the history left out of ``effects`` (its author had seen it); an old
        # concurrent one need not. So new effects decide alone where they are the latest writers.
        writers = latest_writers(effects)
        if any(slot not in writers or not writers[slot].new for slot in names):
            writers = latest_writers(all_effects(conn, table, rowkey))
        final = {names[s]: e.values[s] for s, e in writers.items() if s in names}
    else:
        final = dict(before) if replayed else {}
        final.update({names[s]: e.values[s] for s, e in latest_writers(effects).items() if e.new and s in names})
    if replayed and current is not None:
        final = {column: final.get(column) for column in columns}
    write_row(conn, table, rowkey, True, final, current is not None)


PendingWrite = tuple[SyncedTable, str, set[str], Callable[[], Any]]  # table, row key, columns it writes, the write


def settle(conn: sqlite3.Connection, writes: list[PendingWrite]) -> None:
    """Bring rows to their final state when their UNIQUE values may move from row to row.

    Unless they all go in at once, each write runs in its own savepoint, in rounds: one that
    meets a value another pending row still holds waits for the next round. When a round moves
    nothing, the pending rows hand values to each other in a cycle (a swap, a rotation, however
    it was logged): their UNIQUE values are set aside and the rounds go on. Fails with the first
    constraint error only when nothing is left to set aside, that is when the final state itself
    breaks a constraint. Call with capture muted: the values set aside are never operations.
    """
    if not attempt(conn, lambda: [write[3]() for write in writes]):
        return  # the common case: no value had to wait, and one savepoint did
    set_aside_rows: set[tuple[int, str]] = set()
    referring: list[tuple] = []  # rows a foreign key updated along with a value set aside
    pending = writes
    while pending:
        failures = [(write, attempt(conn, write[3])) for write in pending]
        blocked = [write for write, failure in failures if failure]
        if blocked and len(blocked) == len(pending):
            stuck = [w for w in blocked if (w[0].tid, w[1]) not in set_aside_rows]
            if not stuck:
                raise next(failure for _, failure in failures if failure)
            for table, rowkey, columns, _ in stuck:
                referring.extend(set_aside(conn, table, rowkey, columns))
                set_aside_rows.add((table.tid, rowkey))
        pending = blocked
    if referring:
        # ON UPDATE CASCADE passed the values set aside on to rows that refer to them. Those
        # rows' own operations decide them: put back what they held, then write every row of
        # this settling once more (each write is its row's final state; one that inserted a
        # row fails the second time, harmlessly).
        for child, rowid, columns, values in referring:
            assignments = ", ".join(f"{quote_identifier(c)} = ?" for c in columns)
            conn.execute(f"UPDATE {quote_identifier(child)} SET {assignments} WHERE rowid = ?", [*values, rowid])
        for write in writes:
            attempt(conn, write[3])


def referring_rows(conn: sqlite3.Connection, table: SyncedTable, rowkey: str, columns: set[str]) -> list[tuple]:
    """Rows of rowid tables whose foreign key cascades updates of ``columns`` of this row:
    ``(table, rowid, their key columns, the values they hold)``."""
    found = []
    # A WITHOUT ROWID table has no rowid to put its values back by: its rows are left out.
    tables = "SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'table' AND NOT wr"
    for (child,) in conn.execute(tables).fetchall():
        keys: dict[int, list[tuple[str, str]]] = {}
        for fk in conn.execute(f"PRAGMA foreign_key_list({quote_identifier(child)})").fetchall():
            if fk[2].lower() == table.name.lower() and fk[5].upper() == "CASCADE" and fk[4] is not None:
                keys.setdefault(fk[0], []).append((fk[3], fk[4]))
        for pairs in keys.values():
            if not columns & {to for _, to in pairs}:
                continue
            mine = fetch_row(conn, table, rowkey) or {}
            where = " AND ".join(f"{quote_identifier(f)} = ?" for f, _ in pairs)
            select = ", ".join(quote_identifier(f) for f, _ in pairs)
            for rowid, *values in conn.execute(
                f"SELECT rowid, {select} FROM {quote_identifier(child)} WHERE {where}", [mine.get(to) for _, to in pairs]
            ).fetchall():
                found.append((child, rowid, [f for f, _ in pairs], values))
    return found


def set_aside(conn: sqlite3.Connection, table: SyncedTable, rowkey: str, columns: set[str]) -> list[tuple]:
    """Give a row's UNIQUE values among ``columns`` (its next write sets them again) values no
    other row can hold: NULL (NULLs never collide under UNIQUE), or in a NOT NULL column a value
    made from the row's own key. A composite constraint is freed by one of its columns."""
    aside = set()
    for index in secondary_unique_columns(conn, table.name):
        # An expression in the index (lower(code)) hides its columns: set aside every one written.
        aside |= columns if None in index else columns & set(index)
    aside -= set(table.pk)
    if not aside:
        return []
    info = {row[1]: row for row in table_info(conn, table.name)}
    strict = conn.execute(
        "SELECT strict FROM pragma_table_list WHERE schema = 'main' AND name = ?", [table.name]
    ).fetchone()
    t = quote_identifier(table.name)
    assignments, params = [], []
    for column in sorted(aside):
        q = quote_identifier(column)
        affinity = (info[column][2] or "").upper() if strict and strict[0] else "BLOB"
        if not info[column][3]:
            assignments.append(f"{q} = NULL")
        elif affinity in ("INT", "INTEGER", "REAL"):
            assignments.append(f"{q} = (SELECT coalesce(min({q}), 0) - 1 FROM {t})")  # a STRICT number
        else:
            # A BLOB is stored as it is under any affinity and never equals a TEXT value.
            marker = f"datasette-sync: set aside {rowkey}"
            assignments.append(f"{q} = ?")
            params.append(marker if affinity == "TEXT" else marker.encode())
    referring = referring_rows(conn, table, rowkey, aside)
    # A CHECK constraint may refuse the placeholder: the write then fails as it did before.
    failed = attempt(
        conn,
        lambda: conn.execute(
            f"UPDATE {t} SET {', '.join(assignments)} WHERE {pk_where(table)}", [*params, *parse_rowkey(rowkey)]
        ),
    )
    return [] if failed else referring


class KnowledgeCache:
    """Who had seen what: ``seen(a, b)`` is true when b's author had seen a when writing b."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.cache: dict[int, dict[str, int]] = {}

    def clock_of(self, op: int) -> dict[str, int]:
        if op not in self.cache:
            self.cache[op] = knowledge_at(self.conn, op >> 40, op & SEQ_MASK)
        return self.cache[op]

    def seen(self, a: Effect, b: Effect) -> bool:
        if a.op >> 40 == b.op >> 40:
            return a.op < b.op
        return self.clock_of(b.op).get(a.key[1], 0) >= a.key[2]

    def concurrent(self, a: Effect, b: Effect, twins: dict[int, list[Effect]] | None = None) -> bool:
        """Neither author had seen the other's operation, nor a twin of it (see :func:`twins_of`)."""
        if a.op == b.op or self.seen(a, b) or self.seen(b, a):
            return False
        if twins:
            return not any(self.seen(t, b) for t in twins.get(a.op, ())) and not any(
                self.seen(t, a) for t in twins.get(b.op, ())
            )
        return True


def twins_of(effects: list[Effect]) -> dict[int, list[Effect]]:
    """Effects of other devices with the same clock and the same change, by op.

    ``sync-new-device --recover`` moves operations to a new id with their clocks and values:
    a copy that held the original gets the move too. An author who had seen either had seen
    that edit, so neither is concurrent with its later edits (no conflict is made up).
    """
    groups: dict[tuple, list[Effect]] = {}
    for effect in effects:
        if effect.write:
            change = tuple(sorted((slot, type(v).__name__, v) for slot, v in effect.values.items() if effect.mask >> slot & 1))
        else:
            change = ()
        groups.setdefault((effect.key[0], effect.write, effect.kind, effect.mask, change), []).append(effect)
    twins: dict[int, list[Effect]] = {}
    for group in groups.values():
        for effect in group:
            others = [e for e in group if e.key[1] != effect.key[1]]
            if others:
                twins[effect.op] = others
    return twins


def same_value(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def clash_columns(table: SyncedTable, a: Effect, b: Effect) -> list[str] | None:
    """The columns two concurrent effects disagree on; [] for a write against a delete; None
    when they agree."""
    if not a.write and not b.write:
        return None
    if a.write != b.write:
        return []
    names = {slot: name for name, slot in table.slots.items()}
    differing = [names[s] for s in bits(a.mask & b.mask) if not same_value(a.values[s], b.values[s])]
    return sorted(differing) or None


def record_clashes(
    conn: sqlite3.Connection, table: SyncedTable, rowkey: str, effects: list[Effect], knowledge: KnowledgeCache
) -> bool:
    found = False
    twins = twins_of(effects)
    for i, a in enumerate(effects):
        for b in effects[i + 1 :]:
            if not (a.new or b.new) or not knowledge.concurrent(a, b, twins):
                continue
            columns = clash_columns(table, a, b)
            if columns is None:
                continue
            first, second = sorted((a.op, b.op))
            conn.execute(
                "INSERT OR IGNORE INTO _sync_clashes VALUES (?, ?, ?, ?, ?)",
                [table.tid, rowkey, first, second, json.dumps(columns)],
            )
            found = True
    return found


def record_kept_clashes(
    conn: sqlite3.Connection, table: SyncedTable, history: dict[str, list[Effect]], kept: set[int]
) -> None:
    """Operations kept while the table was not synced here were never checked against each
    other: record their clashes now, as the copies that applied them did on arrival."""
    from .conflicts import rebuild_conflicts

    knowledge = KnowledgeCache(conn)
    clashed = set()
    for rowkey, effects in history.items():
        if any(e.op in kept for e in effects):
            marked = [e._replace(new=e.op in kept) for e in effects]
            if record_clashes(conn, table, rowkey, marked, knowledge):
                clashed.add((table.tid, rowkey))
    if clashed:
        rebuild_conflicts(conn, clashed)


def reconcile_table(conn: sqlite3.Connection, table: SyncedTable, captured: set[int] | None = None) -> int:
    """Log the changes the triggers missed: compare the table with the state its log implies.

    Used when sync is first enabled (every existing row becomes an insert) and when triggers
    were missing or stale (after ``transform`` or ``ALTER TABLE``): the table is the truth and
    its differences become new local operations.

    Operations that arrived while the table was not synced were kept but never applied
    (``_sync_unapplied``). Where one of those wrote last, the table takes the log's value
    instead of overwriting it: enabling sync never deletes or reverts what a peer wrote.
    Everywhere else the table wins, including edits made here while sync was disabled.

    :param captured: slots the capture triggers wrote until now. A column outside them was
        added since (again, or for the first time by ``--alter``): where the log holds values
        for it, peers wrote them and the table takes them, rather than its empty new column
        overwriting them everywhere.

    :returns: how many operations were logged
    """
    t = quote_identifier(table.name)
    columns = table.current_columns(conn)
    full = table.mask_for(columns)
    key = rowkey_sql(quote_identifier(c) for c in table.pk)
    has_ops = conn.execute("SELECT 1 FROM _sync_ops WHERE tid = ? LIMIT 1", [table.tid]).fetchone()
    if not has_ops:
        start = conn.execute("SELECT max(hlc) FROM _sync_ops").fetchone()[0]
        base = next_local_hlc(conn, start)
        cursor = conn.execute(
            f"INSERT INTO _sync_ops (hlc, tid, kind, mask, rowkey, {', '.join(f'c{table.slots[c]}' for c in columns)}) "
            f"SELECT {base} + row_number() OVER () - 1, {table.tid}, {INSERT}, {full}, {key}, "
            f"{', '.join(quote_identifier(c) for c in columns)} FROM {t}"
        )
        return cursor.rowcount
    devices = device_ids(conn)
    unapplied = {op for (op,) in conn.execute("SELECT op FROM _sync_unapplied WHERE tid = ?", [table.tid])}
    conn.execute("DELETE FROM _sync_unapplied WHERE tid = ?", [table.tid])
    cursor = conn.execute("SELECT * FROM _sync_ops WHERE tid = ? AND kind != 3", [table.tid])
    history: dict[str, list[Effect]] = {}
    for _, rowkey, effect in cursor_effects(cursor, {table.tid: table}, devices, False):
        history.setdefault(rowkey, []).append(effect)
    for effects in history.values():
        effects.sort(key=lambda e: e.key)
    slot_names = {slot: name for name, slot in table.slots.items() if name in columns}
    # New columns (outside ``captured``), with what ALTER TABLE gave every row: (default, NOT NULL)
    fresh = {
        info[1]: (conn.execute(f"SELECT {info[4]}").fetchone()[0] if info[4] is not None else None, bool(info[3]))
        for info in table_info(conn, table.name)
        if captured is not None and info[1] in table.slots and table.slots[info[1]] not in captured
    }

    def by_peer(effect: Effect | None) -> bool:
        return effect is not None and effect.op in unapplied

    def adopts(column: str, value: Any, implied: dict[int, Any]) -> bool:
        """A new column still holding what ALTER gave it takes what peers wrote there. A value
        written here since is a local edit, and the log's NULL can't go into a NOT NULL column."""
        if column not in fresh or table.slots[column] not in implied:
            return False
        default, not_null = fresh[column]
        return same_value(value, default) and not (not_null and implied[table.slots[column]] is None)

    logged = 0
    seen = set()
    adopted: list[tuple[str, bool, dict[str, Any], bool]] = []  # write_row arguments
    for row in conn.execute(f"SELECT {key} AS _rowkey, * FROM {t}").fetchall():
        rowkey, values = row[0], dict(zip(columns, row[1:]))
        seen.add(rowkey)
        effects = history.get(rowkey, [])
        exists, implied = row_state(effects)
        if not exists:
            if by_peer(effects[-1] if effects else None):
                adopted.append((rowkey, False, {}, True))
            else:
                append_local(conn, table.tid, INSERT, full, rowkey, slots={table.slots[c]: v for c, v in values.items()})
                logged += 1
            continue
        writers = latest_writers(effects)
        mask, taken = 0, {}
        for column, value in values.items():
            slot = table.slots[column]
            # A value no operation wrote (a column added since, with its DEFAULT) is a change:
            # a peer that adds the column gets NULL there unless it is logged.
            if same_value(implied.get(slot), value):
                continue
            if by_peer(writers.get(slot)) or adopts(column, value, implied):
                taken[column] = implied[slot]
            else:
                mask |= 1 << slot
        if taken:
            adopted.append((rowkey, True, taken, True))
            values.update(taken)
        if mask:
            append_local(conn, table.tid, UPDATE, mask, rowkey, slots={table.slots[c]: v for c, v in values.items()})
            logged += 1
    for rowkey, effects in history.items():
        if rowkey in seen:
            continue
        exists, implied = row_state(effects)
        if not exists:
            continue
        if by_peer(effects[-1]):
            adopted.append((rowkey, True, {slot_names[s]: v for s, v in implied.items() if s in slot_names}, False))
        else:
            append_local(conn, table.tid, DELETE, 0, rowkey, slots=key_slots(table, rowkey))
            logged += 1
    if adopted:
        # Taking a peer's value is not a local edit: write it with capture muted, once. Peers
        # may have handed UNIQUE values from row to row (a swap): settle them as an import does.
        with muted(conn):
            settle(
                conn,
                [(table, a[0], set(a[2]), lambda a=a: write_row(conn, table, *a)) for a in adopted],
            )
    if unapplied:
        record_kept_clashes(conn, table, history, unapplied)
    return logged
