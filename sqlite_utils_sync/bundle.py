"""Bundles: self-contained SQLite files that carry operations between copies.

A bundle has three tables::

    bundle_meta(key, value)                 format, sha256, bundle_id
    bundle_header(id, data)                 one msgpack map: source device, its clock, devices, tables
    bundle_chunks(id, device, tbl, data)    a run of one device's operations on one table
                                            (at most CHUNK_OPS of them, or CHUNK_BYTES of values)

A chunk's ``data`` is itself a small SQLite database image holding one table::

    ops(seq INTEGER PRIMARY KEY, hlc, kind, mask, moved, v0, v1, ...)

with ``v0…`` the values in the order of the header's column list for that table, ``mask``
the changed columns as bits of that same list, and ``moved`` the old row key of a
primary-key move (or, for a tick, the clock it records). Values keep their exact SQLite types,
and the importer copies them into its log with one ``INSERT … SELECT`` per chunk: no value
passes through Python on the way in.

``sha256`` covers every chunk in order (its device, table and length, then its bytes) and then
the header, so every byte that gets applied is checked before anything is applied, and a
writer can stream chunks to the file before it knows the header; the bundle id is derived from
it. Readers open the file read-only and only ever ``SELECT`` from those three tables, after
checking they are plain tables; a chunk image must hold exactly the ``ops`` table and nothing
else: nothing in a bundle is executed.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pathlib
import sqlite3
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import msgpack

from . import codec as codecs
from .capture import load_tables, table_exists
from .declared import (
    is_strict,
    is_unaliased_integer_key,
    is_without_rowid,
    sender_defaults,
    sender_types,
    types_problem,
)
from .clocks import clock, horizon, max_seq, now_iso
from .scope import load_scope, withheld_count, withheld_ranges
from .devices import device_ids, local_device_id, mark_sent, name_problem, name_records, retired_records
from .errors import (
    CANNOT_WRITE,
    HASH_MISMATCH,
    INVALID_BUNDLE,
    INVALID_METADATA,
    INVALID_OPERATION,
    INVALID_TEXT,
    MISSING_BUNDLE,
    UNSUPPORTED_FORMAT,
    BundleError,
    shorten,
)
from .oplog import (
    LOCAL,
    MAX_COLUMNS,
    SEQ_BITS,
    SEQ_MASK,
    TICK,
    RawText,
    device_range,
    exact_text,
    is_count,
    is_device_id,
    mask_slots,
    load_clock,
    op_device,
    op_id,
    op_seq,
    parse_clock,
    remap_mask_sql,
    seq_sql,
    slot_column,
    text_as,
)

FORMAT = "datasette-sync-bundle/3"
"""Bundles whose chunks are compressed (the header's ``codec``). A new format name, so that a
reader from before compression refuses one as a format it does not know, in one line."""
PLAIN_FORMAT = "datasette-sync-bundle/2"
"""Bundles whose chunks are SQLite images as they are (``codec=None``, and every bundle written
before compression): still written on request, and read."""
FORMATS = (FORMAT, PLAIN_FORMAT)
# The table position of a chunk of withheld ranges: each row one range of a device's seqs that
# exist but whose values the bundle does not carry (``seq`` = first, ``hlc`` = last).
WITHHELD_CHUNK = -2
CHUNK_OPS = 5000
CHUNK_BYTES = 8 * 1024 * 1024
# Runs shorter than this (the common delta) get an image of 512-byte pages, built row by row.
SMALL_RUN = 100
# A large export holds at most this many chunk images being stored (of at most STORING_BYTES
# in all), and this many built ahead on a guess (see PeerBuilder): with the two being built,
# what it holds at once.
STORING = 4
STORING_BYTES = 16 * 1024 * 1024
GUESSES = 4
# The in-memory schema an export builds chunk images in (see sql_image).
SCRATCH = "_sync_out"
# A reader accepts these tables exactly as the exporter writes them (and has since format 2):
# a generated column, or a DEFAULT that fills short records, would make values the file does not
# hold, costing work and memory out of proportion to its size.
BUNDLE_SCHEMA = {
    "bundle_meta": "CREATE TABLE bundle_meta (key TEXT PRIMARY KEY, value)",
    "bundle_header": "CREATE TABLE bundle_header (id INTEGER PRIMARY KEY, data BLOB NOT NULL)",
    "bundle_chunks": "CREATE TABLE bundle_chunks (id INTEGER PRIMARY KEY, device INTEGER NOT NULL, tbl INTEGER NOT NULL, "
    "data BLOB NOT NULL)",
}
BUNDLE_TABLES = tuple(BUNDLE_SCHEMA)


@dataclass
class ExportResult:
    bundle_id: str
    device_id: str
    operations: int
    bytes: int
    clock: dict[str, int]
    tables: list[str] = field(default_factory=list)
    """The tables the bundle tells anything of: those whose operations it carries, values and
    all, and those of the operations its anchors fingerprint."""
    held_back: int = 0
    """This copy's own edits the bundle leaves out: a partial copy cuts what it wrote after it
    heard of operations it holds no values of, when the receiver lacks those too (see
    :func:`cut_points`)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "bundle_id": self.bundle_id, "device_id": self.device_id, "operations": self.operations, "bytes": self.bytes,
            "held_back": self.held_back,
        }


def write_bundle(
    conn: sqlite3.Connection,
    path: str | os.PathLike,
    since: dict[str, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    clock_fixes: Callable[[], Iterable[tuple[int, int]]] = tuple,
    tables: Iterable[str] | None = None,
    codec: str | None = codecs.DEFAULT,
    shared_snapshot: bool = False,
    let_writers_in: Callable[[], None] | None = None,
    immutable: bool = False,
) -> ExportResult:
    """Write every operation the holder of ``since`` lacks to a new bundle file at ``path``.

    Chunks go to the file as they are made, so memory stays at a few chunks whatever the size.
    The file appears at ``path`` only once complete.

    :param progress: called with (operations just written, total) after each chunk
    :param clock_fixes: gives ``(clock, op)`` for local operations whose clocks are not
        settled in the log yet (:func:`~sqlite_utils_sync.clocks.unsettled_clocks`): they are
        sent settled. Called once writers are let in: it may scan many operations
    :param tables: send values of these tables only (None: every table); the other
        operations go as withheld ranges (see :mod:`scope`)
    :param codec: how chunk images are stored (see :mod:`codec`); None: as they are, which
        every version reads
    :param shared_snapshot: ``conn`` holds the write lock since before its first read and has
        written nothing: another connection to the file reads exactly what it reads, so a
        large export may build chunk images on one too (see :class:`PeerBuilder`)
    :param let_writers_in: with ``shared_snapshot``, for a ``conn`` that only reads: the
        caller holds writers off (:func:`~sqlite_utils_sync.transaction.writers_held_off`)
        until this is called, once the second connection, if any, has begun reading
    :param immutable: ``conn``'s file is opened ``immutable=1``: so is the second connection's
    """
    since = since or {}
    # Strict decoding: a TEXT value that is not valid UTF-8 must fail loudly, never be replaced
    # (a Datasette connection decodes with replacement), so write_operations can send it as bytes.
    with text_as(conn, str):
        devices = device_ids(conn)
        tops = {idx: max_seq(conn, idx) for idx in devices}
        total = count_after(since, devices, tops)
        target = pathlib.Path(path)
        check_target(target)
        temp = temporary_file(target)
        try:
            writer = BundleWriter(conn, temp, total, progress, codec)
            try:
                if shared_snapshot and writer.storer is not None and writer.scratch:
                    writer.peer = PeerBuilder.open(conn, immutable)
                if let_writers_in is not None:
                    let_writers_in()
                # The rest reads this connection's snapshot, which no commit changes now.
                plan = export_plan(conn, since, devices, tables)
                fixes = {op: hlc for hlc, op in clock_fixes()}
                if plan is None:
                    count = write_operations(conn, since, devices, tops, writer, fixes)
                else:
                    count = write_filtered(conn, since, devices, tops, writer, fixes, plan)
                if not since:
                    declare_every_table(conn, writer, None if plan is None else plan.wanted_tids)
                header = make_header(conn, writer, since, devices, plan, count)
                sha = writer.finish(header)
            except sqlite3.OperationalError as ex:
                if "disk is full" in str(ex):  # the export itself only reads: the bundle's disk is full
                    raise BundleError(CANNOT_WRITE, f"Cannot write bundle {target}: {ex}") from None
                raise
            finally:
                writer.close()  # before the rename: the file must be complete
            mark_sent(conn, writer.devices)
            os.replace(temp, target)
        finally:
            if os.path.exists(temp):
                os.remove(temp)
        told = {name for name, _, _ in writer.tables} | anchored_tables(conn, header["anchors"], devices)
        size = target.stat().st_size
        held = own_edits_cut(conn, plan)
        return ExportResult(sha[:32], local_device_id(conn), count, size, header["clock"], sorted(told), held)


def own_edits_cut(conn: sqlite3.Connection, plan: ExportPlan | None) -> int:
    """How many of this copy's own data operations ``plan`` cuts (not sent, not withheld)."""
    if plan is None or LOCAL not in plan.cut:
        return 0
    lo, hi = device_range(LOCAL, plan.cut[LOCAL])
    return conn.execute(f"SELECT count(*) FROM _sync_ops WHERE op BETWEEN ? AND ? AND kind != {TICK}", [lo, hi]).fetchone()[0]


def declare_every_table(conn: sqlite3.Connection, writer: BundleWriter, wanted_tids: set[int] | None) -> None:
    """Name every synced table in a full export (of ``wanted_tids`` only, when given), those
    with no operation yet too: a copy made from it, a new device, gets all of them."""
    for table in load_tables(conn).values():
        if table.enabled and (wanted_tids is None or table.tid in wanted_tids) and table_exists(conn, table.name):
            writer.table_entry(table.tid)


def make_header(
    conn: sqlite3.Connection,
    writer: BundleWriter,
    since: dict[str, int],
    devices: dict[int, str],
    plan: ExportPlan | None,
    count: int,
) -> dict[str, Any]:
    """The header of a bundle whose ``count`` operations ``writer`` has written."""
    if len(writer.tables) > MAX_TABLES:  # a relay of more tables than enable-sync lets one copy sync
        raise BundleError(
            INVALID_METADATA,
            f"Cannot export: the bundle would name {len(writer.tables)} tables, more than the {MAX_TABLES} a copy takes",
        )
    header = device_records(conn) | {
        "anchors": anchors_for(conn, since, devices, None if plan is None else plan.wanted_tids),
        "source": local_device_id(conn),
        "created": now_iso(),
        "clock": clock(conn),
        "since": since,
        "horizon": horizon(conn),
        "devices": writer.devices,
        "tables": writer.tables,
        "dropped": writer.dropped,
        "column_types": writer.types,
        "not_null_defaults": writer.defaults,
        "without_rowid": writer.without_rowid,
        "strict": writer.strict,
        "unaliased_keys": writer.unaliased_keys,
        "operations": count,
    }
    if writer.codec is not None:
        header["codec"] = writer.codec
    if plan is not None:
        # A cut device is sent only below its cut: the clock claims no more.
        header["clock"] = plan.cut_clock(header["clock"], devices)
        header["scope"] = None if plan.wanted is None else sorted(plan.wanted)
        header["withheld"] = writer.withheld
    return header


def operations_after(conn: sqlite3.Connection, since: dict[str, int]) -> int:
    """How many operations an export after ``since`` would hold (withheld ones included)."""
    devices = device_ids(conn)
    return count_after(since, devices, {idx: max_seq(conn, idx) for idx in devices})


def count_after(since: dict[str, int], devices: dict[int, str], tops: dict[int, int]) -> int:
    return sum(max(0, tops[idx] - since.get(d, 0)) for idx, d in devices.items())


def device_records(conn: sqlite3.Connection) -> dict[str, Any]:
    """The header keys that carry device names and retirements to every copy (absent when
    there are none; readers before them ignore them)."""
    records = {"device_names": name_records(conn), "retired": retired_records(conn)}
    return {key: value for key, value in records.items() if value}


def temporary_file(target: pathlib.Path) -> str:
    """A new empty file beside ``target``, with the permissions a file the user writes gets."""
    try:
        fd, temp = tempfile.mkstemp(prefix=".bundle-", dir=target.parent or ".")
    except OSError as ex:
        raise BundleError(CANNOT_WRITE, f"Cannot write bundle {target}: {ex.strerror}")
    os.close(fd)
    # mkstemp makes the file private; a bundle is a file like any other the user writes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)
    return temp


class BundleWriter:
    """A bundle being written: chunks as they are made, then the header and the hash.

    It also builds the header's device and table lists as the chunks name them.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        temp: str,
        total: int,
        progress: Callable[[int, int], None] | None,
        codec: str | None = codecs.DEFAULT,
    ) -> None:
        self.conn = conn
        self.codec = codec
        # Chunk images are built by SQL where the connection has the scratch schema attached.
        self.scratch = has_scratch(conn)
        self.by_tid = {t.tid: t for t in load_tables(conn).values()}
        self.devices: list[str] = []
        self.tables: list[list] = []
        self.dropped: dict[str, list[str]] = {}
        self.withheld = 0  # operations sent as withheld ranges
        # How the tables are declared here, so a receiver lacking one creates it the same way.
        self.types: dict[str, dict[str, str]] = {}
        self.defaults: dict[str, dict[str, str]] = {}
        self.without_rowid: list[str] = []
        self.strict: list[str] = []
        self.unaliased_keys: list[str] = []
        self.table_index: dict[int, tuple[int, list[int]]] = {}
        self.total, self.progress = total, progress
        self.format = PLAIN_FORMAT if codec is None else FORMAT
        self.digest = hashlib.sha256(self.format.encode())
        # A large export stores (compresses, hashes, writes) each chunk on a thread of its own
        # while SQLite builds the next: each releases the GIL, so the two share the cores.
        self.storing: list[tuple[Future[None], int]] = []  # and the size of each image
        self.storer = ThreadPoolExecutor(1, "sync-export") if total > CHUNK_OPS else None
        self.peer: PeerBuilder | None = None
        self.out = sqlite3.connect(temp, isolation_level=None, check_same_thread=self.storer is None)
        # Neither a journal nor an fsync: the file is renamed into place only once complete,
        # and one torn by a crash after that fails its hash on import, whole; it is made again
        # from the database by the next export. The fsync was a third of a 1-op export's time.
        self.out.execute("PRAGMA journal_mode = OFF")
        self.out.execute("PRAGMA synchronous = OFF")
        # Small pages keep small bundles (a handful of ops, the common case) small; large ones
        # read faster with the usual size.
        self.out.execute(f"PRAGMA page_size = {1024 if total < 1000 else 4096}")
        self.out.execute("BEGIN")
        for create in BUNDLE_SCHEMA.values():
            self.out.execute(create)

    def table_entry(self, tid: int) -> tuple[int, list[int]]:
        """The header position of a table, and the slots of its columns in header order."""
        if tid not in self.table_index:
            table = self.by_tid[tid]
            every = list(table.slot_names().values())
            current = [c for c in table.current_columns(self.conn) if c in table.slots] if table.enabled else []
            # Operations this copy relays may hold values for columns it dropped: they go too,
            # marked, so a relay never strips an operation and receivers need not have them.
            dropped = [c for c in every if c not in current] if current else []
            columns = current + dropped if current else every
            if dropped:
                self.dropped[table.name] = dropped
            self.table_index[tid] = (len(self.tables), [table.slots[c] for c in columns])
            self.tables.append([table.name, columns, table.pk])
            self.declare(table.name, columns, table.pk)
        return self.table_index[tid]

    def declare(self, name: str, columns: list[str], pk: list[str]) -> None:
        if not table_exists(self.conn, name):
            return
        types = sender_types(self.conn, name, columns)
        if types:
            self.types[name] = types
        defaults = sender_defaults(self.conn, name, columns)
        if defaults:
            self.defaults[name] = defaults
        if is_without_rowid(self.conn, name):
            self.without_rowid.append(name)
        if is_strict(self.conn, name):
            self.strict.append(name)
        if is_unaliased_integer_key(self.conn, name, pk):
            self.unaliased_keys.append(name)

    def write_chunk(
        self, device_position: int, key: int, rows: Iterable[Sequence[Any]], size: int, exact: bool = False
    ) -> None:
        width = len(self.tables[key][1]) if key >= 0 else 0
        self.write_image(device_position, key, chunk_image(rows, width, small=size < SMALL_RUN, exact=exact), size)

    def write_image(self, device_position: int, key: int, image: bytes, size: int) -> None:
        if self.storer is None:
            self.store(device_position, key, image)
        else:
            # A few chunks in flight (one thread stores them in order), so that the builders
            # seldom wait for one to be stored (with two in flight they waited a tenth of a
            # 1M-op export), and memory stays at a few images, however large.
            while self.storing and (
                len(self.storing) >= STORING or sum(size for _, size in self.storing) + len(image) > STORING_BYTES
            ):
                self.storing.pop(0)[0].result()
            self.storing.append((self.storer.submit(self.store, device_position, key, image), len(image)))
        if self.progress:
            self.progress(size, self.total)

    def store(self, device_position: int, key: int, image: bytes) -> None:
        data = codecs.pack(image, self.codec)
        self.digest.update(chunk_prefix(device_position, key, data))
        self.digest.update(data)
        self.out.execute("INSERT INTO bundle_chunks (device, tbl, data) VALUES (?, ?, ?)", [device_position, key, data])

    def wait(self) -> None:
        """Wait for the chunks being stored; an error of theirs is raised here."""
        storing, self.storing = self.storing, []
        for future, _ in storing:
            future.result()

    def finish(self, header: dict[str, Any]) -> str:
        """Write the header and the metadata; returns the sha256."""
        self.wait()
        packed = msgpack.packb(header)
        self.digest.update(packed)
        sha = self.digest.hexdigest()
        self.out.execute("INSERT INTO bundle_header VALUES (1, ?)", [packed])
        self.out.executemany(
            "INSERT INTO bundle_meta VALUES (?, ?)", [("format", self.format), ("sha256", sha), ("bundle_id", sha[:32])]
        )
        self.out.execute("COMMIT")
        return sha

    def close(self) -> None:
        if self.storer is not None:
            self.storer.shutdown()  # an export that failed meanwhile leaves it storing a chunk
        if self.peer is not None:
            self.peer.close()  # before the exporting connection commits: it holds a read lock
        self.out.close()


def check_target(target: pathlib.Path) -> None:
    """Refuse to write a bundle anywhere but a new file or over an old bundle: the file is
    replaced whole, so a database (even this one) or a device there would be lost."""
    if not target.parent.is_dir():
        raise BundleError(CANNOT_WRITE, f"Cannot write bundle {target}: directory {target.parent} does not exist")
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_file():
        raise BundleError(CANNOT_WRITE, f"Cannot write bundle {target}: it exists and is not a regular file")
    if target.stat().st_size and not is_bundle_file(target):
        raise BundleError(
            CANNOT_WRITE, f"Cannot write bundle {target}: it exists and is not a bundle, so it is not replaced"
        )


def is_bundle_file(path: pathlib.Path) -> bool:
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return names == {"bundle_meta", "bundle_header", "bundle_chunks"}


def carries_changes(path: str | os.PathLike) -> bool:
    """Whether a bundle this copy wrote carries operations on rows, not only what chunks of no
    table hold (knowledge ticks, withheld ranges)."""
    conn = sqlite3.connect(f"{pathlib.Path(path).resolve().as_uri()}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT 1 FROM bundle_chunks WHERE tbl >= 0 LIMIT 1").fetchone() is not None
    finally:
        conn.close()


def write_operations(
    conn: sqlite3.Connection,
    since: dict[str, int],
    devices: dict[int, str],
    tops: dict[int, int],
    writer: BundleWriter,
    clock_fixes: dict[int, int],
) -> int:
    """Stream each device's operations after ``since`` as runs of one table, up to CHUNK_OPS."""
    count = 0
    for idx in sorted(devices):
        start = since.get(devices[idx], 0)
        if tops[idx] <= start:
            continue
        device_position = len(writer.devices)
        writer.devices.append(devices[idx])
        fixes = clock_fixes if idx == LOCAL else {}
        count += write_runs(conn, writer, device_position, (op_id(idx, start + 1), op_id(idx, tops[idx])), fixes)
    return count


def run_columns(writer: BundleWriter, tid: int) -> tuple[int, list[str]]:
    """A run's chunk key, and the SQL of its mask, moved-from key and values."""
    if tid == 0:
        return -1, ["NULL", "rowkey"]
    key, slots = writer.table_entry(tid)
    # Masks travel as bits of the header's column list: slot numbers are local to each copy
    # (columns added in a different order get different slots). Row keys are not sent: the
    # receiver derives them from the primary-key values, so they cannot disagree; only a move
    # sends the key it moved from.
    mask = remap_mask_sql([(s, i) for i, s in enumerate(slots)])
    return key, [mask, "CASE WHEN newkey IS NOT NULL THEN rowkey END"] + [slot_column(s) for s in slots]


@dataclass
class ExportPlan:
    """What a bundle for a partial copy, or from one, sends (see :mod:`scope`).

    ``wanted``: the table ids whose values go (None: every table); ``cut``: per device index,
    the first seq not sent at all (this copy withholds it, and the receiver wants it).
    """

    wanted: set[str] | None
    wanted_tids: set[int] | None
    cut: dict[int, int]

    def cut_clock(self, current: dict[str, int], devices: dict[int, str]) -> dict[str, int]:
        clock_ = dict(current)
        for idx, seq in self.cut.items():
            device = devices[idx]
            if seq - 1 < clock_.get(device, 0):
                clock_[device] = seq - 1
            if not clock_.get(device):
                clock_.pop(device, None)
        return clock_


def export_plan(
    conn: sqlite3.Connection, since: dict[str, int], devices: dict[int, str], tables: Iterable[str] | None
) -> ExportPlan | None:
    """None for today's bundle: every table, from a copy that withholds nothing."""
    wanted = None if tables is None else set(tables)
    withholds = withheld_count(conn) > 0
    if wanted is None and not withholds:
        return None
    tids = {t.name: t.tid for t in load_tables(conn).values()}
    wanted_tids = None if wanted is None else {tids[n] for n in wanted if n in tids}
    scope = load_scope(conn)
    # A receiver wanting only tables this copy holds whole gets the withheld ranges passed on;
    # any other gets each device only up to the first seq this copy withholds.
    covered = wanted is not None and scope is not None and wanted <= scope
    cut = {} if covered or not withholds else cut_points(conn, since, devices)
    return ExportPlan(wanted, wanted_tids, cut)


def cut_points(conn: sqlite3.Connection, since: dict[str, int], devices: dict[int, str]) -> dict[int, int]:
    """Per device, the first seq after ``since`` this copy withholds; then lowered to each tick
    whose knowledge reaches a cut (the receiver could not check what it depends on)."""
    cut = {}
    for idx, device in devices.items():
        first = next(withheld_ranges(conn, idx, since.get(device, 0)), None)
        if first:
            cut[idx] = first[0]
    changed = bool(cut)
    while changed:
        changed = False
        for idx, device in devices.items():
            start, limit = since.get(device, 0), cut.get(idx, SEQ_MASK + 1)
            for from_seq, text in conn.execute(
                "SELECT from_seq, clock FROM _sync_knowledge WHERE device = ? AND from_seq > ? AND from_seq <= ? "
                "ORDER BY from_seq",
                [idx, start + 1, limit],
            ).fetchall():
                known = load_clock(text)
                if any(known.get(devices[other], 0) >= seq for other, seq in cut.items()):
                    cut[idx] = from_seq - 1  # the tick's own seq
                    changed = True
                    break
    return cut


class WithheldSink:
    """Withheld ranges of one device on their way into chunks: adjacent ones merged."""

    def __init__(self, writer: BundleWriter, device_position: int):
        self.writer, self.position = writer, device_position
        self.ranges: list[tuple[int, int, int, None, None]] = []

    def add(self, lo: int, hi: int) -> None:
        last = self.ranges[-1] if self.ranges else None
        if last and last[1] + 1 == lo:
            self.ranges[-1] = (last[0], hi, 0, None, None)
        else:
            if len(self.ranges) >= CHUNK_OPS:
                self.flush()
            self.ranges.append((lo, hi, 0, None, None))
        self.writer.withheld += hi - lo + 1

    def flush(self) -> None:
        if self.ranges:
            self.writer.write_chunk(self.position, WITHHELD_CHUNK, self.ranges, 0)
            self.ranges = []


def write_filtered(
    conn: sqlite3.Connection,
    since: dict[str, int],
    devices: dict[int, str],
    tops: dict[int, int],
    writer: BundleWriter,
    clock_fixes: dict[int, int],
    plan: ExportPlan,
) -> int:
    """:func:`write_operations` for a partial copy: values of the wanted tables and ticks,
    withheld ranges for the rest, each device only below its cut."""
    count = 0
    for idx in sorted(devices):
        start, end = since.get(devices[idx], 0), min(tops[idx], plan.cut.get(idx, SEQ_MASK + 1) - 1)
        if end <= start:
            continue
        device_position = len(writer.devices)
        writer.devices.append(devices[idx])
        sink = WithheldSink(writer, device_position)
        own = list(withheld_ranges(conn, idx, start, end)) if not plan.cut else []
        fixes = clock_fixes if idx == LOCAL else {}
        for piece in filtered_runs(conn, op_id(idx, start + 1), op_id(idx, end), plan.wanted_tids, own):
            if piece[0] is None:
                sink.add(piece[1], piece[2])
            else:
                # Other tables' operations come between this stretch's: its runs skip them.
                keep = wanted_sql(plan.wanted_tids) if piece[3] else ""
                count += write_runs(conn, writer, device_position, piece[1:3], fixes, keep)
        sink.flush()
    return count


def wanted_sql(wanted: set[int] | None, column: str = "tid") -> str:
    """SQL true for the operations of the wanted tables and ticks (None: every table). A list,
    not a chain of ORs: SQLite refuses an expression more than 1,000 deep (tables)."""
    if wanted is None:
        return "1"
    return f"({column} IN ({', '.join(str(tid) for tid in [0, *sorted(wanted)])}))"


# How many op ids stretches() looks at per query: a bound on what it holds at once.
STRETCH_WINDOW = 100_000
# A stretch of other tables' operations this long ends a stretch of the wanted ones; a shorter
# one (tables written in turn) is skipped by the runs around it, so that they fill chunks as in
# a full export rather than make a chunk per operation (reading it costs less than a chunk).
SKIPPED_OPS = CHUNK_OPS


def filtered_runs(
    conn: sqlite3.Connection, lo: int, hi: int, wanted: set[int] | None, own: list[tuple[int, int]]
) -> Iterator[tuple]:
    """Stretches of one device's operations ``lo..hi``: ``(True, first op, last op, skips)`` for
    those of the wanted tables and ticks, and ``(None, first seq, last seq)`` for each stretch of
    other held seqs (operations of other tables, and ``own`` withheld ranges), in seq order but
    that a wanted stretch comes after the withheld ranges it spans. A wanted stretch goes on over
    holes in the op ids (compaction's, and ``own`` withheld ranges), so its chunks stay full, and
    over stretches of other tables' operations shorter than SKIPPED_OPS (``skips`` is then
    true: its runs must skip them); a withheld range is exact. No value is read."""
    withheld = WithheldRanges(own)
    run: list | None = None  # wanted op ids not yet yielded, and whether they skip others'
    skipped = False  # a stretch of other tables' operations came after the run's last op
    for values, first, last in stretches(conn, lo, hi, wanted):
        yield from withheld.own_before(op_seq(first))
        if values:
            yield from withheld.flush()
            run = [run[0], last, run[2] or skipped] if run else [first, last, False]
            skipped = False
            continue
        if run and last - first + 1 >= SKIPPED_OPS:
            yield True, *run
            run, skipped = None, False
        yield from withheld.add(op_seq(first), op_seq(last))
        skipped = run is not None
    if run:
        yield True, *run
    yield from withheld.own_before(SEQ_MASK + 1)
    yield from withheld.flush()


class WithheldRanges:
    """The withheld seq ranges :func:`filtered_runs` yields: stretches of other tables'
    operations and the copy's ``own`` withheld ranges, merged where their seqs are contiguous."""

    def __init__(self, own: list[tuple[int, int]]):
        self.own = iter(own)
        self.next_own = next(self.own, None)
        self.gap: list[int] | None = None  # not yet yielded: it may go on

    def owns_before(self, seq: int) -> bool:
        return self.next_own is not None and self.next_own[0] < seq

    def own_before(self, seq: int) -> list[tuple]:
        """Take in the own ranges before ``seq``; returns the ranges now complete."""
        done = []
        while self.owns_before(seq):
            done += self.add(*self.next_own)
            self.next_own = next(self.own, None)
        return done

    def add(self, first: int, last: int) -> list[tuple]:
        if self.gap and self.gap[1] + 1 == first:
            self.gap[1] = last
            return []
        done = self.flush()
        self.gap = [first, last]
        return done

    def flush(self) -> list[tuple]:
        done = [(None, *self.gap)] if self.gap else []
        self.gap = None
        return done


def stretches(conn: sqlite3.Connection, lo: int, hi: int, wanted: set[int] | None) -> Iterator[tuple[bool, int, int]]:
    """The ops ``lo..hi`` of one device as stretches of consecutive op ids, each all of wanted
    tables and ticks (True) or all of other tables (False): ``(wanted, first op, last op)``.

    SQLite returns only the ops that begin a stretch (each op is compared with the one before it
    by rowid), with the end of the stretch before, STRETCH_WINDOW op ids at a time: memory stays
    bounded however the tables interleave, and no statement stays open while the caller builds
    chunk images. After a window with no op the next window starts at the next op, so the
    queries made follow the ops held, not the ids between ``lo`` and ``hi``.
    """
    keep = {a: wanted_sql(wanted, f"{a}.tid") for a in ("o", "p")}
    sql = (
        f"SELECT o.op, {keep['o']}, (SELECT max(x.op) FROM _sync_ops x WHERE x.op BETWEEN :lo AND o.op - 1) "
        "FROM _sync_ops o LEFT JOIN _sync_ops p ON p.op = o.op - 1 "
        f"WHERE o.op BETWEEN :lo AND :hi AND (p.op IS NULL OR p.op < :lo OR {keep['p']} IS NOT {keep['o']}) ORDER BY o.op"
    )
    current: list | None = None  # [wanted, first op, last op]
    while lo <= hi:
        top = min(hi, lo + STRETCH_WINDOW - 1)
        begins = conn.execute(sql, {"lo": lo, "hi": top}).fetchall()
        last = conn.execute("SELECT max(op) FROM _sync_ops WHERE op BETWEEN ? AND ?", [lo, top]).fetchone()[0]
        for op, values, before in begins:
            if current and before is not None:
                current[2] = before
            # A stretch cut only by the window's edge goes on in this one.
            if not (current and current[0] == bool(values) and current[2] + 1 == op):
                if current:
                    yield tuple(current)
                current = [bool(values), op, op]
        if current and last is not None:
            current[2] = last
        lo = top + 1
        if last is None and lo <= hi:
            # An empty window: on to the next op there is (holes may span most of the id
            # space: a withheld range a bundle declared), so the work follows the ops held.
            lo = conn.execute("SELECT min(op) FROM _sync_ops WHERE op BETWEEN ? AND ?", [lo, hi]).fetchone()[0]
            if lo is None:
                break
    if current:
        yield tuple(current)


def write_run(
    conn: sqlite3.Connection,
    writer: BundleWriter,
    position: tuple[int, int],
    run: tuple[int, int, int],
    columns: list[str],
    clock_fixes: dict[int, int],
    tid: int | None = None,
) -> None:
    """Write one run, the ``size`` operations ``lo..hi`` of one device on one table, as a chunk.

    :param position: the header positions of the run's device and table
    :param columns: SQL for the mask, then the moved-from key, then the values
    :param tid: the run's table, where other tables' operations come between its own
    """
    (lo, hi, size), values = run, columns[1:]
    only = "" if tid is None else f" AND tid = {int(tid)}"

    def fetch(extra: str = "") -> Iterable[Sequence[Any]]:
        cursor = conn.execute(
            f"SELECT {seq_sql('op')}, hlc, kind, {', '.join(columns)}{extra} FROM _sync_ops "
            f"WHERE op BETWEEN ? AND ?{only} ORDER BY op",
            [lo, hi],
        )
        if clock_fixes:
            idx = op_device(lo)
            return ((seq, clock_fixes.get(op_id(idx, seq), hlc), *rest) for seq, hlc, *rest in cursor)
        return cursor

    try:
        writer.write_chunk(*position, fetch(), size)
    except sqlite3.OperationalError as ex:
        if "decode" not in str(ex):
            raise
        # SQLite stores whatever bytes a client hands it as TEXT. Such a run travels as
        # bytes, with a bit per value saying which were TEXT, and is TEXT again in the image.
        texts = " | ".join(f"((typeof({v}) = 'text') << {n})" for n, v in enumerate(values))
        with text_as(conn, bytes):
            writer.write_chunk(*position, fetch(f", {texts}"), size, exact=True)


def sql_image(
    conn: sqlite3.Connection,
    columns: list[str],
    run: tuple[int, int, int],
    clock_fixes: dict[int, int],
    interleaved: bool = False,
) -> tuple[bytes, int, int] | None:
    """The chunk image of the ops of table ``tid`` from ``lo`` on (at most CHUNK_OPS, none
    after ``hi``), how many it holds and the last one's id, copied by one ``INSERT … SELECT``
    into the scratch schema: no value passes through Python, so TEXT that is not UTF-8 stays
    as it is. None when there is none, when an op of another table comes between them
    (unless ``interleaved``), or when the image would pass the scratch schema's page limit.

    A savepoint, rolled back once the image is read, leaves the scratch schema empty again
    (and every write of the caller's transaction as it was). It rolls back a table's
    creation, which stops any statement of ``conn`` still open: none may be.
    """
    lo, hi, tid = run
    conn.execute("SAVEPOINT _sync_chunk_image")
    try:
        conn.execute(ops_table_sql(len(columns) - 2).replace("CREATE TABLE ops", f"CREATE TABLE {SCRATCH}.ops", 1))
        try:
            size = conn.execute(
                f"INSERT INTO {SCRATCH}.ops SELECT {seq_sql('op')}, hlc, kind, {', '.join(columns)} FROM _sync_ops "
                "WHERE op BETWEEN ? AND ? AND tid = ? ORDER BY op LIMIT ?",
                [lo, hi, tid, CHUNK_OPS],
            ).rowcount
        except sqlite3.OperationalError as ex:
            if "full" not in str(ex):
                raise
            return None
        if not size:  # a guess in a stretch of other tables' ops
            return None
        last = op_id(op_device(lo), conn.execute(f"SELECT max(seq) FROM {SCRATCH}.ops").fetchone()[0])
        # No other table's op comes between when the run's seqs have no gap (the common case:
        # nothing to read); else when the ops in the range are as many as the run holds.
        if not interleaved and last - lo + 1 != size and conn.execute(
            "SELECT count(*) FROM _sync_ops WHERE op BETWEEN ? AND ?", [lo, last]
        ).fetchone()[0] != size:
            return None
        fixes = [(hlc, op_seq(op)) for op, hlc in clock_fixes.items() if lo <= op <= last]
        conn.executemany(f"UPDATE {SCRATCH}.ops SET hlc = ? WHERE seq = ?", fixes)
        return conn.serialize(name=SCRATCH), size, last
    finally:
        conn.execute("ROLLBACK TO _sync_chunk_image")
        conn.execute("RELEASE _sync_chunk_image")


def write_runs(
    conn: sqlite3.Connection,
    writer: BundleWriter,
    device_position: int,
    ops: tuple[int, int],
    clock_fixes: dict[int, int],
    keep: str = "",
) -> int:
    """:func:`write_operations` of one device; returns the count. Chunk images are built by SQL
    where the writer has its scratch schema, else row by row: the chunks hold the same.

    Each run is first tried as CHUNK_OPS operations of the table its first one is of, under
    the scratch schema's page limit (CHUNK_BYTES). Where another table's operation
    comes first, the values pass the limit, or holes in the op ids keep the image short of a
    run that goes on, the run's end is worked out exactly (RUN_END_SQL). Runs of fewer
    than SMALL_RUN operations (a delta) are made row by row, and tables written in turn go
    one chunk per table for CHUNK_OPS operations (:func:`write_interleaved`).

    ``keep``: SQL true for the operations to send, where others come between them (a bundle
    of some tables of tables written in turn, see :func:`filtered_runs`): the others are
    skipped like holes, and runs and stretches are counted in the operations sent
    (:func:`write_skipping`).
    """
    if keep:
        return write_skipping(conn, writer, device_position, ops, clock_fixes, keep)
    lo, hi = ops
    count = 0
    mixed = False  # the last run ended at another table's operation
    while True:
        first = conn.execute("SELECT op, tid FROM _sync_ops WHERE op BETWEEN ? AND ? ORDER BY op LIMIT 1", [lo, hi]).fetchone()
        if first is None:
            return count
        op, tid = first
        key, columns = run_columns(writer, tid)
        # Seqs are consecutive but for compaction's holes: the run is first looked for in the
        # next CHUNK_OPS op ids (however long another table's stretch after it), and an image
        # that holes kept short is dropped below if the run goes on after them.
        end = min(hi, op + CHUNK_OPS - 1)
        other = next_other_table(conn, op, end, tid, mixed)
        if other is not None and other[0] - op < SMALL_RUN:
            # A list and its items, say: one chunk per table for the next CHUNK_OPS operations
            # rather than one per run, which was one per operation (230 B/op, 150x slower).
            size, last = write_interleaved(conn, writer, device_position, (op, hi), clock_fixes)
            count += size
            lo, mixed = last + 1, True
            continue
        if other is not None:
            end = other[0] - 1
        made = guessed_image(conn, writer, columns, (op, end, hi, tid), clock_fixes)
        if made is None:
            last, size = conn.execute(RUN_END_SQL.format(size=value_bytes_sql(conn), keep=""), {
                "lo": op, "hi": hi, "tid": tid, "ops": end - op + 1, "bytes": CHUNK_BYTES
            }).fetchone()
            write_exact_run(conn, writer, (device_position, key), (op, last, size, tid), columns, clock_fixes)
        else:
            last, size = made[2], made[1]
            if size >= SMALL_RUN:
                writer.write_image(device_position, key, made[0], size)
            else:
                write_run(conn, writer, (device_position, key), (op, last, size), columns, clock_fixes)
        count += size
        lo, mixed = last + 1, other is not None or last < end


def next_other_table(conn: sqlite3.Connection, op: int, end: int, tid: int, mixed: bool) -> tuple[int] | None:
    """The first operation after ``op`` of another table than ``tid``, looked for within
    SMALL_RUN op ids (tables written in turn), or, right after a run that ended at one
    (``mixed``), up to ``end``: runs are short there, and the lookup reads no further than the
    run (on a long run it would read as much as the image, and trying an image or RUN_END_SQL
    on a short run would read CHUNK_OPS operations)."""
    return conn.execute(
        "SELECT op FROM _sync_ops WHERE op > ? AND op <= ? AND tid != ? ORDER BY op LIMIT 1",
        [op, end if mixed else min(end, op + SMALL_RUN - 1), tid],
    ).fetchone()


def guessed_image(
    conn: sqlite3.Connection, writer: BundleWriter, columns: list[str], run: tuple[int, int, int, int], clock_fixes: dict[int, int]
) -> tuple[bytes, int, int] | None:
    """The image of a run of table ``tid`` from ``op``, guessed to end at ``end`` (the second
    connection's, when it built it ahead), or None where it must be worked out exactly: a run
    of fewer op ids than SMALL_RUN (a delta, made row by row), no scratch schema, or an image
    that holes (compaction's) kept short of a run that goes on after them before ``hi``."""
    op, end, hi, tid = run
    if not writer.scratch or end - op + 1 < SMALL_RUN:
        return None
    made = None
    if writer.peer:
        writer.peer.plan(columns, (op, hi, tid), clock_fixes)
        made = writer.peer.take(op, tid)
    if made is None:
        made = sql_image(conn, columns, (op, end, tid), clock_fixes)
    if made is not None and made[1] < CHUNK_OPS and run_goes_on(conn, made[2], hi, tid):
        return None
    return made


def write_exact_run(
    conn: sqlite3.Connection,
    writer: BundleWriter,
    position: tuple[int, int],
    run: tuple[int, int, int, int],
    columns: list[str],
    clock_fixes: dict[int, int],
    interleaved: bool = False,
) -> None:
    """Write the ``size`` operations of table ``tid`` in op ids ``lo..last`` (their end worked
    out already) as one chunk: an image built by SQL where the writer can and the run is not
    short, else row by row. ``interleaved``: other tables' operations come between them."""
    lo, last, size, tid = run
    made = None
    if writer.scratch and size >= SMALL_RUN:
        with scratch_limit(conn, None):  # the run's values are within CHUNK_BYTES
            made = sql_image(conn, columns, (lo, last, tid), clock_fixes, interleaved=interleaved)
    if made is not None:
        writer.write_image(position[0], position[1], made[0], size)
    else:
        write_run(conn, writer, position, (lo, last, size), columns, clock_fixes, tid if interleaved else None)


def write_skipping(
    conn: sqlite3.Connection,
    writer: BundleWriter,
    device_position: int,
    ops: tuple[int, int],
    clock_fixes: dict[int, int],
    keep: str,
) -> int:
    """:func:`write_runs` of the operations ``keep`` holds true of, the others between them
    skipped: the same chunks as :func:`write_runs` would make of a log without the others
    (but that another table's operation is looked for among the next SMALL_RUN operations
    sent, not op ids). No image is tried on a guess: the next operation of another table is
    looked for (reading no further than it), then the run's end is worked out (RUN_END_SQL),
    so that each operation is read a few times, whatever the length of its run."""
    lo, hi = ops
    count = 0
    only = f" AND {keep}"
    next_other = (
        f"SELECT op FROM (SELECT op, tid FROM _sync_ops WHERE op > :op AND op <= :hi{only} ORDER BY op LIMIT :n) "
        "WHERE tid != :tid LIMIT 1"
    )
    while True:
        first = conn.execute(
            f"SELECT op, tid FROM _sync_ops WHERE op BETWEEN ? AND ?{only} ORDER BY op LIMIT 1", [lo, hi]
        ).fetchone()
        if first is None:
            return count
        op, tid = first
        key, columns = run_columns(writer, tid)
        near = {"op": op, "hi": hi, "tid": tid, "n": SMALL_RUN - 1}
        if conn.execute(next_other, near).fetchone() is not None:
            size, last = write_interleaved(conn, writer, device_position, (op, hi), clock_fixes, only)
            count += size
            lo = last + 1
            continue
        other = conn.execute(next_other, near | {"n": CHUNK_OPS - 1}).fetchone()
        last, size = conn.execute(RUN_END_SQL.format(size=value_bytes_sql(conn), keep=only), {
            "lo": op, "hi": hi if other is None else other[0] - 1, "tid": tid, "ops": CHUNK_OPS, "bytes": CHUNK_BYTES
        }).fetchone()
        write_exact_run(conn, writer, (device_position, key), (op, last, size, tid), columns, clock_fixes, interleaved=True)
        count += size
        lo = last + 1


def write_interleaved(
    conn: sqlite3.Connection,
    writer: BundleWriter,
    device_position: int,
    ops: tuple[int, int],
    clock_fixes: dict[int, int],
    only: str = "",
) -> tuple[int, int]:
    """Write the operations of one device from ``ops[0]`` on where tables are written in turn
    (up to CHUNK_OPS of them, CHUNK_BYTES of values all tables together, and the next run of
    SMALL_RUN operations of one table) as one chunk per table, each holding that table's
    operations in order. A receiver takes chunks of one device that interleave. Returns how
    many operations went, and the last one's id. ``only``: SQL restricting the operations sent
    (see :func:`write_skipping`)."""
    last, per_table = interleaved_end(conn, *ops, only)
    for tid, count in per_table.items():
        key, columns = run_columns(writer, tid)
        write_exact_run(conn, writer, (device_position, key), (ops[0], last, count, tid), columns, clock_fixes, interleaved=True)
    return sum(per_table.values()), last


def interleaved_end(conn: sqlite3.Connection, lo: int, hi: int, only: str = "") -> tuple[int, dict[int, int]]:
    """The last op id of the stretch from ``lo`` where tables are written in turn, and how many
    operations of each table it holds (in the order the tables first come): up to CHUNK_OPS
    operations whose values come to at most CHUNK_BYTES (the first goes whatever its size),
    ending before the first run of SMALL_RUN operations of one table, which goes as a run of
    its own. (In Python: SQL's window functions took 3x as long.)"""
    sql = f"SELECT op, tid, {value_bytes_sql(conn)} FROM _sync_ops WHERE op BETWEEN ? AND ?{only} ORDER BY op LIMIT ?"
    ops: list[tuple] = []
    total, run_start, run_tid = 0, 0, None
    # Read a page at a time: a stretch often ends within a few operations (a list, then a run
    # of its items), and reading CHUNK_OPS operations for it made such logs 10x slower.
    while len(ops) < CHUNK_OPS:
        read = len(ops)
        ops += conn.execute(sql, [ops[-1][0] + 1 if ops else lo, hi, min(4 * SMALL_RUN, CHUNK_OPS - read)]).fetchall()
        if len(ops) == read:
            break
        for i in range(read, len(ops)):
            _, tid, size = ops[i]
            if tid != run_tid:
                run_start, run_tid = i, tid
            if run_start and i - run_start + 1 >= SMALL_RUN:
                return stretch(ops[:run_start])
            total += size
            if i and total > CHUNK_BYTES:
                return stretch(ops[:i])
    return stretch(ops)


def stretch(ops: list[tuple]) -> tuple[int, dict[int, int]]:
    """The last op id of ``(op, tid, ...)`` rows, and how many there are of each table."""
    per_table: dict[int, int] = {}
    for _, tid, *_ in ops:
        per_table[tid] = per_table.get(tid, 0) + 1
    return ops[-1][0], per_table


def run_goes_on(conn: sqlite3.Connection, last: int, hi: int, tid: int) -> bool:
    """Whether the op after ``last`` (up to ``hi``) is of table ``tid`` too."""
    after = conn.execute("SELECT tid FROM _sync_ops WHERE op > ? AND op <= ? ORDER BY op LIMIT 1", [last, hi]).fetchone()
    return after is not None and after[0] == tid


# The end of the run from :lo: the longest stretch of table :tid, up to CHUNK_OPS operations,
# whose values come to at most CHUNK_BYTES (the first op goes whatever its size).
RUN_END_SQL = (
    "SELECT max(op), count(*) FROM (SELECT op, sum(sz) OVER w AS upto, sum(tid != :tid) OVER w AS other FROM "
    "(SELECT op, tid, {size} AS sz FROM _sync_ops WHERE op BETWEEN :lo AND :hi{keep} ORDER BY op LIMIT :ops) "
    "WINDOW w AS (ORDER BY op ROWS UNBOUNDED PRECEDING)) WHERE other = 0 AND (upto <= :bytes OR op = :lo)"
)


class PeerBuilder:
    """A second connection to the exported file, building chunk images on a thread of its own
    while the exporting connection builds others: SQLite releases the GIL, so a large export
    uses both cores.

    Its images are the ones :func:`sql_image` would make on the exporting connection, from the
    same snapshot (see ``shared_snapshot`` in :func:`write_bundle`), so the bundle is the same
    chunk for chunk. Chunks are guessed to hold CHUNK_OPS operations of the table of the run
    being written; the peer builds the next unclaimed guesses, and the exporting connection,
    rather than wait for one of them, builds the next unclaimed guess itself. A guess is used
    only if the export reaches exactly that start and table, and any error in building one only
    means the exporting connection builds that chunk again when it gets there.
    """

    def __init__(self, conn: sqlite3.Connection, exporting: sqlite3.Connection):
        self.conn, self.exporting = conn, exporting
        self.thread = ThreadPoolExecutor(1, "sync-export-peer")
        # (first op id, table, image being built, built by the peer), in the order the export
        # will reach them: starts CHUNK_OPS apart, from the chunk after the one being written.
        self.pending: list[tuple[int, int, Future, bool]] = []
        self.next_start = 0  # the first guess nobody builds yet
        self.run: tuple[list[str], tuple[int, int, int], dict[int, int]] | None = None

    @classmethod
    def open(cls, exporting: sqlite3.Connection, immutable: bool = False) -> PeerBuilder | None:
        """A peer reading the same snapshot as ``exporting``, or None (an in-memory or
        temporary database, or a file that cannot be opened again). ``immutable``: opened
        ``immutable=1``, as ``exporting`` is (it must read what that reads: a WAL file beside
        the database is not looked at)."""
        path = exporting.execute("PRAGMA database_list").fetchone()[2]
        if not path:
            return None
        # The exporting connection's SQLite library (pysqlite3 under a Datasette that uses it):
        # closing a connection of another library to the same file would drop its locks.
        library = importlib.import_module(type(exporting).__module__)
        try:
            # No waiting: a lock in the way (an exclusive locking mode, say) means one builder.
            mode = "immutable=1" if immutable else "mode=ro"
            conn = library.connect(f"{pathlib.Path(path).as_uri()}?{mode}", uri=True, isolation_level=None,
                                   check_same_thread=False, timeout=0)
        except library.Error:
            return None
        try:
            same = attach_scratch(conn)
            conn.execute("BEGIN")
            # The snapshot is taken here; it must be the exporting connection's, schema and all.
            same = same and snapshot_marks(conn) == snapshot_marks(exporting)
        except sqlite3.Error:
            same = False
        if not same:
            conn.close()
            return None
        return cls(conn, exporting)

    def plan(self, columns: list[str], run: tuple[int, int, int], clock_fixes: dict[int, int]) -> None:
        """The export is at op id ``op`` of table ``tid``, its device's ops ending at ``hi``
        (``run``): drop the guesses it passed by or got wrong, and give the peer the next
        unclaimed ones, two at a time."""
        op, hi, tid = run
        self.run = columns, run, clock_fixes
        while self.pending and (self.pending[0][0] < op or (self.pending[0][0] == op and self.pending[0][1] != tid)):
            self.pending.pop(0)[2].cancel()
        if self.pending and self.pending[0][0] != op:  # a run ended short: every guess after it is wrong
            for _, _, future, _ in self.pending:
                future.cancel()
            self.pending.clear()
        if not self.pending:
            self.next_start = op + CHUNK_OPS
        while sum(by_peer for *_, by_peer in self.pending) < 2 and self.claim(hi):
            lo = self.next_start - CHUNK_OPS
            future = self.thread.submit(sql_image, self.conn, columns, (lo, min(hi, lo + CHUNK_OPS - 1), tid), clock_fixes)
            self.pending.append((lo, tid, future, True))

    def claim(self, hi: int) -> bool:
        """Claim the next guess, if it is a chunk of SMALL_RUN ops or more; its start is then
        ``next_start - CHUNK_OPS``. Four guesses at most are held, images and all."""
        if len(self.pending) >= GUESSES or hi - self.next_start + 1 < SMALL_RUN:
            return False
        self.next_start += CHUNK_OPS
        return True

    def take(self, op: int, tid: int) -> tuple[bytes, int, int] | None:
        """The image of the chunk starting at ``op`` for table ``tid``, if a guess built it
        (after :meth:`plan`); while the peer is still building it, the exporting connection
        builds the next unclaimed guess."""
        if not self.pending or self.pending[0][0] != op:
            return None
        future = self.pending.pop(0)[2]
        while not future.done() and self.run is not None:
            columns, (_, hi, run_tid), clock_fixes = self.run
            if not self.claim(hi):
                break
            lo = self.next_start - CHUNK_OPS
            # An error here is the export's: some (an interrupt) end its transaction, and with it
            # the snapshot every later read relies on.
            ahead: Future = Future()
            ahead.set_result(sql_image(self.exporting, columns, (lo, min(hi, lo + CHUNK_OPS - 1), run_tid), clock_fixes))
            self.pending.append((lo, run_tid, ahead, False))
        try:
            return future.result()
        except Exception:  # the exporting connection builds it, and meets the error if it is real
            return None

    def close(self) -> None:
        self.thread.shutdown(cancel_futures=True)
        self.conn.close()


def snapshot_marks(conn: sqlite3.Connection) -> tuple:
    """What two snapshots of one file that differ would differ in: its schema (every rewrite of
    the log drops and re-creates its guards), and the last op id of each device."""
    tops = conn.execute(
        f"SELECT idx, (SELECT max(op) FROM _sync_ops WHERE op BETWEEN idx << {SEQ_BITS} AND (idx << {SEQ_BITS}) | {SEQ_MASK}) "
        f"FROM (SELECT idx FROM _sync_devices UNION SELECT {LOCAL}) ORDER BY idx"
    )
    # As tuples: Datasette's connections give sqlite3.Row, which never equals a tuple.
    return conn.execute("PRAGMA schema_version").fetchone()[0], [tuple(top) for top in tops]


# An image built by SQL may grow to this many pages (of 4096 bytes): CHUNK_BYTES, values and all.
SCRATCH_PAGES = CHUNK_BYTES // 4096


@contextmanager
def scratch_limit(conn: sqlite3.Connection, pages: int | None) -> Iterator[None]:
    """The scratch schema's page limit for the time of the ``with`` (None: SQLite's own)."""
    conn.execute(f"PRAGMA {SCRATCH}.max_page_count = {pages or 0xFFFFFFFE}")
    try:
        yield
    finally:
        conn.execute(f"PRAGMA {SCRATCH}.max_page_count = {SCRATCH_PAGES}")


def has_scratch(conn: sqlite3.Connection) -> bool:
    return SERIALIZE and SCRATCH in {row[1] for row in conn.execute("PRAGMA database_list")}


@contextmanager
def scratch_schema(conn: sqlite3.Connection) -> Iterator[None]:
    """Attach the in-memory schema where an export builds chunk images by SQL, for the time
    of the ``with``. ATTACH cannot happen inside a transaction: an export in the caller's
    transaction builds images row by row (and so does Python 3.10, which cannot serialize)."""
    attached = SERIALIZE and not conn.in_transaction and not has_scratch(conn) and attach_scratch(conn)
    try:
        yield
    finally:
        if attached and not conn.in_transaction:
            conn.execute(f"DETACH {SCRATCH}")


def attach_scratch(conn: sqlite3.Connection) -> bool:
    """Attach the scratch schema to ``conn``, outside any transaction; False if it cannot be."""
    try:
        conn.execute(f"ATTACH ':memory:' AS {SCRATCH}")
    except sqlite3.OperationalError:  # e.g. the connection already has as many as it may
        return False
    conn.execute(f"PRAGMA {SCRATCH}.page_size = 4096")
    conn.execute(f"PRAGMA {SCRATCH}.max_page_count = {SCRATCH_PAGES}")
    return True


def value_bytes_sql(conn: sqlite3.Connection) -> str:
    """SQL for the bytes of an operation's values (what a chunk's size limit counts)."""
    slots = [row[1] for row in conn.execute("PRAGMA table_info(_sync_ops)") if row[1].startswith("c")]
    # length() of a BLOB reads its header only; text and numbers cast to BLOB count their bytes.
    return " + ".join(f"ifnull(length(CAST({c} AS BLOB)), 0)" for c in slots) or "0"


def ops_table_sql(width: int) -> str:
    """The one statement a chunk image's schema may hold, for a table of ``width`` columns."""
    return "CREATE TABLE ops (seq INTEGER PRIMARY KEY, hlc, kind, mask, moved" + "".join(
        f", v{i}" for i in range(width)
    ) + ")"


def chunk_prefix(device_position: int, table_position: int, data: bytes) -> bytes:
    """What the hash covers before a chunk's bytes: where the chunk belongs, and its length."""
    return msgpack.packb([device_position, table_position, len(data)])


def chunk_image(rows: Iterable[Sequence[Any]], width: int, small: bool = False, exact: bool = False) -> bytes:
    """A SQLite database image holding ``rows`` in an ``ops`` table.

    :param exact: TEXT values come as bytes, and each row ends with a bit mask of which of
        ``moved, v0, v1, ...`` were TEXT: they are made TEXT again, byte for byte
    """
    with image_connection() as (image, read_back):
        # The smallest pages keep a chunk of a few ops (the common delta) small.
        image.execute(f"PRAGMA page_size = {512 if small else 4096}")
        image.execute(ops_table_sql(width))
        if not exact:
            image.executemany(f"INSERT INTO ops VALUES ({', '.join('?' * (5 + width))})", rows)
        else:
            image.execute(ops_table_sql(width).replace("CREATE TABLE ops", "CREATE TEMP TABLE stage")[:-1] + ", texts)")
            image.executemany(f"INSERT INTO temp.stage VALUES ({', '.join('?' * (6 + width))})", rows)
            columns = ["moved"] + [f"v{i}" for i in range(width)]
            image.execute(
                "INSERT INTO ops SELECT seq, hlc, kind, mask, "
                + ", ".join(f"CASE WHEN texts >> {n} & 1 THEN CAST({c} AS TEXT) ELSE {c} END" for n, c in enumerate(columns))
                + " FROM temp.stage"
            )
        image.commit()
        return read_back()


@contextmanager
def image_connection() -> Iterator[tuple[sqlite3.Connection, Callable[[], bytes]]]:
    """A scratch database and a function returning its image: in memory where Python can
    serialize one (3.11+), else in a temporary file."""
    if SERIALIZE:
        image = sqlite3.connect(":memory:")
        try:
            yield image, image.serialize
        finally:
            image.close()
        return
    fd, path = tempfile.mkstemp(prefix=".chunk-")
    os.close(fd)
    image = sqlite3.connect(path)
    try:
        image.execute("PRAGMA journal_mode = OFF")
        yield image, lambda: pathlib.Path(path).read_bytes()
    finally:
        image.close()
        os.remove(path)


def anchors_for(
    conn: sqlite3.Connection, since: dict[str, int], devices: dict[int, str], wanted: set[int] | None = None
) -> dict[str, list]:
    """The last op the receiver already has from each device, as we have it: if the receiver's
    copy differs, two databases are writing under one device id (a copied file).

    :param wanted: the tables a partial receiver may see: an op of another table gets no
        anchor, since even a digest of it says something about its values
    """
    anchors = {}
    for idx, device in devices.items():
        seq = since.get(device, 0)
        if seq and wanted is not None:
            table = op_table(conn, op_id(idx, seq))
            if table and table[0] not in wanted:
                continue
        fingerprint = seq and op_fingerprint(conn, op_id(idx, seq))
        if fingerprint:
            anchors[device] = [seq, fingerprint]
    return anchors


def anchored_tables(conn: sqlite3.Connection, anchors: dict[str, list], devices: dict[int, str]) -> set[str]:
    """The tables of the operations ``anchors`` fingerprint."""
    index = {device: idx for idx, device in devices.items()}
    tables = (op_table(conn, op_id(index[device], seq)) for device, (seq, _) in anchors.items())
    return {table[1] for table in tables if table}


def op_table(conn: sqlite3.Connection, op: int) -> tuple[int, str] | None:
    """The table id and name of a data operation (``None`` for a tick or an op not held)."""
    return conn.execute(
        "SELECT t.tid, t.name FROM _sync_ops o JOIN _sync_tables t ON t.tid = o.tid WHERE o.op = ?", [op]
    ).fetchone()


def op_fingerprint(conn: sqlite3.Connection, op: int) -> str | None:
    """A digest of what an operation says, independent of local slot numbering."""
    # Bytes, not what the connection's text_factory makes of them: a replaced character would
    # give an invalid value the fingerprint of another.
    with text_as(conn, exact_text):
        cursor = conn.execute(
            "SELECT o.*, t.name AS _table, t.columns AS _slots FROM _sync_ops o LEFT JOIN _sync_tables t "
            "ON t.tid = o.tid WHERE o.op = ?",
            [op],
        )
        row = cursor.fetchone()
    if row is None:
        return None
    # TEXT that is not UTF-8 digests apart from a BLOB of the same bytes.
    row = [msgpack.ExtType(1, bytes(v)) if isinstance(v, RawText) else v for v in row]
    record = dict(zip([d[0] for d in cursor.description], row))
    slots = json.loads(record["_slots"] or "{}")  # column -> slot
    written = set(mask_slots(record["mask"] or 0))
    values = sorted((c, record[slot_column(s)]) for c, s in slots.items() if s in written)
    content = [record["hlc"], record["kind"], record["_table"], record["rowkey"], record["newkey"], values]
    return hashlib.sha256(msgpack.packb(content)).hexdigest()[:32]


class BundleReader:
    """Open a bundle read-only and check its integrity before anything is applied.

    Whatever the file holds, the work and memory this costs stay within a small multiple of
    its size: its tables must be exactly what the exporter writes (nothing computes a value),
    their b-trees pass ``PRAGMA quick_check`` (no page is read twice), no value may be longer
    than the file, and the chunks together may not hold more bytes than it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        name = self.path.name
        try:
            if not self.path.exists():
                raise BundleError(MISSING_BUNDLE, f"Bundle {name}: file not found")
            if not self.path.is_file():
                raise BundleError(INVALID_BUNDLE, f"Bundle {name} is not a regular file")
            self.size = self.path.stat().st_size
        except OSError as ex:  # e.g. a directory on the way that may not be searched
            raise BundleError(MISSING_BUNDLE, f"Bundle {name} cannot be read: {ex.strerror or ex}")
        if self.size == 0:
            raise BundleError(INVALID_BUNDLE, f"Bundle {name} is empty (0 bytes): was the transfer cut short?")
        try:
            self.conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
        except sqlite3.Error as ex:
            raise BundleError(INVALID_BUNDLE, f"Bundle {name} is not a SQLite file ({ex})")
        try:
            self._open()
        except BaseException:
            self.conn.close()
            raise

    def _open(self) -> None:
        name = self.path.name
        # Bytes: nothing in the file is decoded unless it is checked (schema text may be any bytes).
        self.conn.text_factory = bytes
        limit_values(self.conn, self.size)
        try:
            kinds = {
                row[0]: (row[1], row[2] or b"")
                for row in self.conn.execute("SELECT name, type, sql FROM sqlite_master")
            }
        except sqlite3.Error as ex:
            raise BundleError(INVALID_BUNDLE, f"Bundle {name} is not a SQLite file ({ex})")
        except UnicodeDecodeError:  # SQLite's message quoted schema text Python could not decode
            raise BundleError(INVALID_BUNDLE, f"Bundle {name} cannot be read (malformed schema that is not valid UTF-8)")
        # The format first, from a checked bundle_meta (laid out alike in every format), so an
        # older or newer bundle is refused as such, not as a file whose tables look wrong.
        self.check_layout(kinds, ["bundle_meta"])
        try:
            check_btrees(self.conn, ["bundle_meta"], f"Bundle {name}")
            meta = self._read_meta()
        except (sqlite3.Error, UnicodeDecodeError) as ex:
            raise BundleError(INVALID_BUNDLE, f"Bundle {name} cannot be read ({shorten(str(ex), 200)})")
        if meta.get("format") not in FORMATS:
            raise BundleError(
                UNSUPPORTED_FORMAT,
                f"Bundle {name} has format {shorten(meta.get('format'))}, expected {FORMAT} or {PLAIN_FORMAT}",
            )
        self.check_layout(kinds, BUNDLE_TABLES)
        try:
            check_btrees(self.conn, [t for t in BUNDLE_TABLES if t != "bundle_meta"], f"Bundle {name}")
            self.format: str = meta["format"]
            headers = self.conn.execute("SELECT data, typeof(data) FROM bundle_header ORDER BY id LIMIT 2").fetchall()
            if len(headers) != 1 or headers[0][1] != b"blob":
                raise BundleError(INVALID_METADATA, f"Bundle {name} must have exactly one header")
            self.header_bytes = headers[0][0]
            digest = hashlib.sha256(self.format.encode())
            # The header's devices a chunk carries something of: the others get no index here.
            self.chunk_devices: set[int] = set()
            for device, _, _ in self._read_chunks(digest):
                self.chunk_devices.add(device)
            digest.update(self.header_bytes)
        except (sqlite3.Error, UnicodeDecodeError) as ex:
            raise BundleError(INVALID_BUNDLE, f"Bundle {name} cannot be read ({shorten(str(ex), 200)})")
        if digest.hexdigest() != meta.get("sha256") or meta.get("bundle_id") != digest.hexdigest()[:32]:
            raise self._hash_mismatch()
        self.sha256: str = meta["sha256"]
        self.bundle_id: str = meta["bundle_id"]
        self.header = self._decode_header()

    def check_layout(self, kinds: dict[bytes, tuple[bytes, bytes]], tables: Sequence[str]) -> None:
        """Refuse a file whose ``tables`` are missing or not as the exporter writes them."""
        name = self.path.name
        for table in tables:
            kind, sql = kinds.get(table.encode(), (None, b""))
            if kind != b"table":
                raise BundleError(INVALID_BUNDLE, f"Bundle {name} is not a sync bundle: no {table} table")
            if sql != BUNDLE_SCHEMA[table].encode():
                raise BundleError(
                    INVALID_BUNDLE, f"Bundle {name} is not a sync bundle: its {table} table is not as the exporter writes it"
                )

    def _read_meta(self) -> dict[str, Any]:
        meta = {}
        for key, value in self.conn.execute("SELECT key, value FROM bundle_meta LIMIT 16"):
            if isinstance(key, bytes):
                meta[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        return meta

    def _hash_mismatch(self) -> BundleError:
        return BundleError(
            HASH_MISMATCH, f"Bundle {self.path.name} failed its integrity check: content does not match its sha256"
        )

    def _read_chunks(self, digest: Any) -> Iterator[tuple[int, int, bytes]]:
        held = 0
        for device, table, data in self.conn.execute(
            "SELECT device, tbl, data FROM bundle_chunks WHERE typeof(data) = 'blob' ORDER BY id"
        ):
            if not (type(device) is int and type(table) is int and isinstance(data, bytes)):
                raise BundleError(INVALID_OPERATION, f"Bundle {self.path.name} has a malformed chunk")
            held += len(data)
            if held > self.size:
                # Only a damaged file can show the same bytes twice: stop before that costs more.
                raise BundleError(INVALID_BUNDLE, f"Bundle {self.path.name} is damaged: its chunks hold more than the file")
            digest.update(chunk_prefix(device, table, data))
            digest.update(data)
            yield device, table, data

    def _decode_header(self) -> dict[str, Any]:
        name = self.path.name
        try:
            header = msgpack.unpackb(self.header_bytes)
        except Exception as ex:  # msgpack raises several kinds for malformed input
            raise BundleError(INVALID_METADATA, f"Bundle {name} header cannot be decoded ({shorten(str(ex))})")
        problem = header_problem(header)
        if problem:
            raise BundleError(INVALID_METADATA, f"Bundle {name}: {problem}")
        codecs.check_codec(header.get("codec"), name)
        if (header.get("codec") is None) != (self.format == PLAIN_FORMAT):
            raise BundleError(INVALID_METADATA, f"Bundle {name}: format {self.format} and codec {header.get('codec')!r} disagree")
        parse_clock(header["clock"], f"Bundle {name} clock")
        parse_clock(header.get("since", {}), f"Bundle {name} since-clock")
        parse_clock(header.get("horizon", {}), f"Bundle {name} horizon")
        return header

    def chunks(self) -> Iterator[tuple[int, int, bytes]]:
        """Yield ``(device position, table position, chunk image)``, each image decompressed
        (within the bounds of :mod:`codec`).

        The hash is taken again on the way: a file changed since it was checked fails the
        import, whose transaction then rolls back.
        """
        name = self.path.name
        digest = hashlib.sha256(self.format.encode())
        codec = self.header.get("codec")
        try:
            for device, table, data in self._read_chunks(digest):
                if not (0 <= device < len(self.header["devices"]) and WITHHELD_CHUNK <= table < len(self.header["tables"])):
                    raise BundleError(INVALID_OPERATION, f"Bundle {name} has a malformed chunk")
                yield device, table, codecs.unpack(data, codec, name)
        except (sqlite3.Error, UnicodeDecodeError) as ex:
            raise BundleError(INVALID_BUNDLE, f"Bundle {name} cannot be read ({shorten(str(ex), 200)})")
        digest.update(self.header_bytes)
        if digest.hexdigest() != self.sha256:
            raise self._hash_mismatch()

    def width(self, table_position: int) -> int:
        """How many value columns the chunks of a table carry (0 for ticks)."""
        return len(self.header["tables"][table_position][1]) if table_position >= 0 else 0

    def close(self) -> None:
        self.conn.close()


REQUIRED_KEYS = ("source", "clock", "devices", "tables", "operations")


def is_name(value: Any) -> bool:
    """A table or column name the importer can put in SQL (no NUL, of a sane length)."""
    return isinstance(value, str) and 0 < len(value) <= 1000 and "\0" not in value


def is_table_entry(entry: Any) -> bool:
    """``[name, columns, primary key columns]`` as the exporter writes it."""
    if not (isinstance(entry, list) and len(entry) == 3 and is_name(entry[0])):
        return False
    _, columns, pk = entry
    return (
        isinstance(columns, list)
        and 0 < len(columns) <= MAX_COLUMNS
        and all(is_name(c) for c in columns)
        and len(set(columns)) == len(columns)
        and isinstance(pk, list)
        and all(isinstance(c, str) and c in columns for c in pk)
        and 0 < len(pk) == len(set(pk))
    )


def header_problem(header: Any) -> str | None:
    """What is wrong with a decoded header (every key the importer reads), or None."""
    if not isinstance(header, dict):
        return "header is not a map"
    missing = [key for key in REQUIRED_KEYS if key not in header]
    if missing:
        return f"header lacks {', '.join(missing)}"
    tables = header["tables"]
    if not is_device_id(header["source"]):
        return "source device id is invalid"
    if not isinstance(header["devices"], list) or not all(is_device_id(d) for d in header["devices"]):
        return "device list is invalid"
    if len(set(header["devices"])) != len(header["devices"]):
        return "device list repeats a device"
    if not isinstance(tables, list) or not all(is_table_entry(t) for t in tables):
        return "table list is invalid"
    if len(tables) > MAX_TABLES:
        return f"it names {len(tables)} tables, more than the {MAX_TABLES} a bundle may name"
    entries = {t[0]: t for t in tables}
    if len(entries) != len(tables):
        return "table list repeats a table"
    if not dropped_columns_valid(header.get("dropped", {}), entries):
        return "dropped-column list is invalid"
    if not is_count(header["operations"], 1 << 62):
        return "operation count is invalid"
    problem = types_problem(header)
    if problem:
        return problem
    anchors = header.get("anchors", {})
    if not isinstance(anchors, dict) or not all(
        is_device_id(k) and isinstance(v, list) and len(v) == 2 and is_count(v[0], SEQ_MASK)
        and isinstance(v[1], str) and len(v[1]) <= 64
        for k, v in anchors.items()
    ):
        return "anchors are invalid"
    for key in ("clock", "since", "horizon"):
        if not isinstance(header.get(key, {}), dict):
            return f"{key} is not a map"
    scope = header.get("scope")
    if scope is not None and not (
        isinstance(scope, list) and scope and all(is_name(n) for n in scope) and len(set(scope)) == len(scope)
    ):
        return "scope is invalid"
    if scope is not None and not {t[0] for t in tables} <= set(scope):
        return "it carries operations of a table outside its scope"
    if not is_count(header.get("withheld", 0), 1 << 62):
        return "withheld count is invalid"
    return device_records_problem(header)


MAX_DEVICE_RECORDS = 1 << 16
MAX_TABLES = 1000
"""The most tables a bundle may name: each one a new copy creates costs a few milliseconds,
whatever the few bytes that name it."""


def dropped_columns_valid(dropped: Any, entries: dict[str, list]) -> bool:
    """``{table: [column, ...]}``: columns the sender dropped, each a column (not a key) of a
    table the bundle names, none twice."""
    if not isinstance(dropped, dict):
        return False
    for table, columns in dropped.items():
        entry = entries.get(table)
        if entry is None or not isinstance(columns, list) or not all(is_name(c) for c in columns):
            return False
        if len(set(columns)) != len(columns) or not set(columns) <= set(entry[1]) - set(entry[2]):
            return False
    return True


def device_records_problem(header: dict) -> str | None:
    """What is wrong with the header's device names and retirements, or None."""
    names, retired = header.get("device_names", {}), header.get("retired", {})
    if not (isinstance(names, dict) and len(names) <= MAX_DEVICE_RECORDS) or not all(
        is_device_id(k) and isinstance(v, list) and len(v) == 2 and name_problem(v[0]) is None
        and is_count(v[1], 1 << 62)
        for k, v in names.items()
    ):
        return "device names are invalid"
    if not (isinstance(retired, dict) and len(retired) <= MAX_DEVICE_RECORDS) or not all(
        is_device_id(k) and isinstance(v, list) and len(v) == 3 and is_count(v[0], SEQ_MASK)
        and is_device_id(v[1]) and is_count(v[2], 1 << 62)
        for k, v in retired.items()
    ):
        return "retired-device records are invalid"
    return None


def limit_values(conn: sqlite3.Connection, most: int) -> None:
    """No string or BLOB read on ``conn`` may be longer than ``most`` bytes (Python 3.11+).
    SQLite's own ceiling is under 2**31: a bundle file larger than that keeps it."""
    if hasattr(conn, "setlimit"):
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, min(max(most, 1024), 2**31 - 1))


def check_btrees(conn: sqlite3.Connection, tables: Sequence[str], what: str, reason: str = INVALID_BUNDLE) -> None:
    """``PRAGMA quick_check`` of ``tables``: O(their size), and afterwards no page of them is
    reached twice, so reading them costs no more than their size.

    Only for tables whose schema was checked: quick_check also evaluates CHECK constraints.
    """
    for table in tables:
        problem = conn.execute(f"PRAGMA quick_check({table})").fetchone()
        if problem is None or problem[0] not in (b"ok", "ok"):
            detail = problem[0] if problem else b"?"
            detail = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
            raise BundleError(reason, f"{what} is damaged ({shorten(detail)})")


# The importer reads chunk images with SQL. Python 3.11+ can hand an image straight to SQLite;
# 3.10 cannot, and copies the rows into a temporary table instead.
SERIALIZE = hasattr(sqlite3.Connection, "serialize")
CHUNK_SCHEMA = "_sync_chunk"


BAD_OP_SQL = (
    "typeof(hlc) != 'integer' OR typeof(kind) != 'integer' OR typeof(mask) NOT IN ('integer', 'null') "
    "OR typeof(moved) NOT IN ('text', 'null')"
)


# The text encoding a database file's header names (a 4-byte big-endian number at offset 56).
TEXT_ENCODINGS = {1: "UTF-8", 2: "UTF-16le", 3: "UTF-16be"}


def check_image(data: bytes, width: int, name: str) -> None:
    """Check a chunk image on a connection of its own, before the importer attaches it.

    After this, every column the importer reads into Python is an integer or valid UTF-8, so
    no statement on the importing connection can stop half-way over the attached image (which
    the next image would then be loaded under: a crash), and reading it costs O(its size).
    """
    def fail(message: str) -> BundleError:
        return BundleError(INVALID_OPERATION, f"Bundle {name}{message}")

    try:
        with open_image(data) as image:
            image.text_factory = bytes
            limit_values(image, len(data))
            schema = image.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
            if schema != [(b"table", b"ops", b"ops", ops_table_sql(width).encode())]:
                raise fail(" has a chunk that is not a table of operations")
            # Attached to the importing connection, a database of another text encoding makes
            # every statement there fail (SQLite converts text of the main database's only).
            encoding = int.from_bytes(data[56:60], "big")
            if encoding != 1:
                raise fail(f" has a chunk whose text is {TEXT_ENCODINGS.get(encoding, 'of no encoding')}, not UTF-8")
            check_btrees(image, ["ops"], f"Bundle {name} has a chunk that", INVALID_OPERATION)
            # One pass that stops at the first bad row; which check failed is only worked out
            # for a bad chunk (an aggregate per check costs more than the rest of the import).
            (bad,) = image.execute(f"SELECT EXISTS (SELECT 1 FROM ops WHERE {BAD_OP_SQL})").fetchone()
            clocks = kinds = moves = 0
            if bad:
                clocks, kinds, moves = image.execute(
                    "SELECT ifnull(max(typeof(hlc) != 'integer'), 0), "
                    "ifnull(max(typeof(kind) != 'integer' OR typeof(mask) NOT IN ('integer', 'null')), 0), "
                    "ifnull(max(typeof(moved) NOT IN ('text', 'null')), 0) FROM ops"
                ).fetchone()
            (moved,) = image.execute("SELECT EXISTS (SELECT 1 FROM ops WHERE moved IS NOT NULL)").fetchone()
            if clocks:
                raise fail(": an operation has a clock that is not an integer")
            if kinds:
                raise fail(": an operation has an invalid kind or mask")
            if moves:
                raise fail(": an operation has an invalid moved-from key or clock")
            for (text,) in image.execute("SELECT moved FROM ops WHERE moved IS NOT NULL") if moved else ():
                if not is_utf8(text):
                    raise fail(": an operation has a moved-from key or clock that is not valid UTF-8")
    except sqlite3.Error as ex:
        raise fail(f" has a chunk that cannot be read ({shorten(str(ex), 300)})")  # its schema's text may hold line breaks
    except UnicodeDecodeError:
        # SQLite's message quotes the schema, and Python could not decode it.
        raise fail(" has a chunk that cannot be read (malformed schema that is not valid UTF-8)")


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class ChunkStage:
    """Where the importing connection reads the chunk images from, one at a time."""

    def __init__(self, conn: sqlite3.Connection, bundle_name: str):
        self.conn = conn
        self.name = bundle_name
        self.direct = SERIALIZE
        if self.direct and CHUNK_SCHEMA not in {row[1] for row in conn.execute("PRAGMA database_list")}:
            conn.execute(f"ATTACH ':memory:' AS {CHUNK_SCHEMA}")

    def load(self, data: bytes, width: int, checked: bool = False) -> str:
        """Load one chunk image after checking it holds nothing but the ``ops`` table; return the
        name to ``SELECT`` its operations from.

        :param checked: the caller ran :func:`check_image` on it already (on another thread)
        """
        if not checked:
            check_image(data, width, self.name)
        try:
            if self.direct:
                self.conn.deserialize(data, name=CHUNK_SCHEMA)
                return f"{CHUNK_SCHEMA}.ops"
            with open_image(data) as image:
                self.conn.execute("DROP TABLE IF EXISTS temp._sync_chunk_ops")
                self.conn.execute(ops_table_sql(width).replace("CREATE TABLE ops", "CREATE TEMP TABLE _sync_chunk_ops"))
                self.conn.executemany(
                    f"INSERT INTO temp._sync_chunk_ops VALUES ({', '.join('?' * (5 + width))})",
                    image.execute("SELECT * FROM ops"),
                )
                return "temp._sync_chunk_ops"
        except sqlite3.DatabaseError as ex:
            self.empty()
            if "decode" in str(ex):  # only here, where values pass through Python (3.10)
                raise BundleError(INVALID_TEXT, f"Bundle {self.name} has a TEXT value that is not valid UTF-8, "
                                  "which this Python (3.10) cannot carry")
            raise BundleError(INVALID_OPERATION, f"Bundle {self.name} has a chunk that cannot be read ({shorten(str(ex), 300)})")

    def close(self) -> None:
        if not self.direct:
            self.conn.execute("DROP TABLE IF EXISTS temp._sync_chunk_ops")
            return
        try:
            self.conn.execute(f"DETACH {CHUNK_SCHEMA}")
        except sqlite3.OperationalError:
            # Still inside the caller's transaction: leave it attached, emptied, for the next import.
            self.empty()

    def empty(self) -> None:
        if self.direct:
            with image_connection() as (image, read_back):
                # An image needs a page: SQLite cannot load zero bytes.
                image.execute("CREATE TABLE empty (x)")
                image.execute("DROP TABLE empty")
                image.commit()
                self.conn.deserialize(read_back(), name=CHUNK_SCHEMA)


@contextmanager
def open_image(data: bytes) -> Iterator[sqlite3.Connection]:
    """A read-only connection to a database image."""
    if SERIALIZE:
        image = sqlite3.connect(":memory:")
        try:
            image.deserialize(data)
            yield image
        finally:
            image.close()
        return
    fd, path = tempfile.mkstemp(prefix=".chunk-")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        image = sqlite3.connect(pathlib.Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        try:
            yield image
        finally:
            image.close()
    finally:
        os.remove(path)

