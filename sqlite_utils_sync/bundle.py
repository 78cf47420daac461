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
import json
import os
import pathlib
import sqlite3
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import msgpack

from .capture import load_tables
from .errors import BundleError
from .log import (
    LOCAL,
    SEQ_MASK,
    clock,
    device_ids,
    horizon,
    local_device_id,
    max_seq,
    now_iso,
    op_id,
    remap_mask_sql,
)

FORMAT = "datasette-sync-bundle/2"
CHUNK_OPS = 5000
CHUNK_BYTES = 8 * 1024 * 1024
BUNDLE_TABLES = ("bundle_meta", "bundle_header", "bundle_chunks")


@dataclass
class ExportResult:
    bundle_id: str
    device_id: str
    operations: int
    bytes: int
    clock: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"bundle_id": self.bundle_id, "device_id": self.device_id, "operations": self.operations, "bytes": self.bytes}


def parse_clock(text: str | dict | None, what: str = "clock") -> dict[str, int]:
    """Parse and check a vector clock: ``{"<32 hex device id>": <seq>, ...}``."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        raise BundleError("invalid_clock", f"{what} is not valid JSON: {text!r}")
    if not isinstance(value, dict) or not all(
        is_device_id(k) and is_count(v, SEQ_MASK)
        for k, v in value.items()
    ):
        raise BundleError(
            "invalid_clock", f'{what} must look like {{"<32 hex digit device id>": <seq>, ...}}, got {text!r}'
        )
    return value


def is_count(value: Any, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


def is_device_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def export_bundle(
    conn: sqlite3.Connection,
    path: str | os.PathLike,
    since: dict[str, int] | None = None,
    progress: Callable[[int], None] | None = None,
    clock_fixes: list[tuple[int, int]] = (),
) -> ExportResult:
    """Write every operation the holder of ``since`` lacks to a new bundle file at ``path``.

    Chunks go to the file as they are made, so memory stays at one chunk whatever the size.

    :param clock_fixes: ``(clock, op)`` for local operations whose clocks are not settled in
        the log yet (:func:`~sqlite_utils_sync.log.unsettled_clocks`): they are sent settled
    """
    since = since or {}
    devices = device_ids(conn)
    tables = load_tables(conn)
    by_tid = {t.tid: t for t in tables.values()}
    header_devices: list[str] = []
    header_tables: list[list] = []
    header_dropped: dict[str, list[str]] = {}
    table_index: dict[int, tuple[int, list[int]]] = {}

    def table_entry(tid: int) -> tuple[int, list[int]]:
        if tid not in table_index:
            table = by_tid[tid]
            every = sorted(table.slots, key=table.slots.get)
            current = [c for c in table.current_columns(conn) if c in table.slots] if table.enabled else []
            # Operations this copy relays may hold values for columns it dropped: they go too,
            # marked, so a relay never strips an operation and receivers need not have them.
            dropped = [c for c in every if c not in current] if current else []
            columns = current + dropped if current else every
            if dropped:
                header_dropped[table.name] = dropped
            table_index[tid] = (len(header_tables), [table.slots[c] for c in columns])
            header_tables.append([table.name, columns, table.pk])
        return table_index[tid]

    tops = {idx: max_seq(conn, idx) for idx in devices}
    total = sum(max(0, tops[idx] - since.get(d, 0)) for idx, d in devices.items())
    target = pathlib.Path(path)
    check_target(target)
    try:
        fd, temp = tempfile.mkstemp(prefix=".bundle-", dir=target.parent or ".")
    except OSError as ex:
        raise BundleError("cannot_write", f"Cannot write bundle {target}: {ex.strerror}")
    os.close(fd)
    # mkstemp makes the file private; a bundle is a file like any other the user writes.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)
    out = sqlite3.connect(temp, isolation_level=None)
    digest = hashlib.sha256(FORMAT.encode())

    def write_chunk(device_position: int, key: int, rows: Iterable[Sequence[Any]], size: int) -> None:
        width = len(header_tables[key][1]) if key >= 0 else 0
        data = chunk_image(rows, width, small=size < 100)
        digest.update(chunk_prefix(device_position, key, data))
        digest.update(data)
        out.execute("INSERT INTO bundle_chunks (device, tbl, data) VALUES (?, ?, ?)", [device_position, key, data])
        if progress:
            progress(size, total)

    try:
        out.execute("PRAGMA journal_mode = OFF")
        # Small pages keep small bundles (a handful of ops, the common case) small; large ones
        # read faster with the usual size.
        out.execute(f"PRAGMA page_size = {1024 if total < 1000 else 4096}")
        out.execute("BEGIN")
        out.execute("CREATE TABLE bundle_meta (key TEXT PRIMARY KEY, value)")
        out.execute("CREATE TABLE bundle_header (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
        out.execute(
            "CREATE TABLE bundle_chunks (id INTEGER PRIMARY KEY, device INTEGER NOT NULL, tbl INTEGER NOT NULL, "
            "data BLOB NOT NULL)"
        )
        count = write_operations(
            conn, since, devices, tops, table_entry, write_chunk, header_devices, dict((op, hlc) for hlc, op in clock_fixes)
        )
        current = clock(conn)
        header = msgpack.packb(
            {
                "anchors": anchors_for(conn, since, devices),
                "source": local_device_id(conn),
                "created": now_iso(),
                "clock": current,
                "since": since,
                "horizon": horizon(conn),
                "devices": header_devices,
                "tables": header_tables,
                "dropped": header_dropped,
                "operations": count,
            }
        )
        digest.update(header)
        sha = digest.hexdigest()
        out.execute("INSERT INTO bundle_header VALUES (1, ?)", [header])
        out.executemany(
            "INSERT INTO bundle_meta VALUES (?, ?)", [("format", FORMAT), ("sha256", sha), ("bundle_id", sha[:32])]
        )
        out.execute("COMMIT")
        out.close()  # before the rename: the file must be complete
        os.replace(temp, target)
    finally:
        out.close()
        if os.path.exists(temp):
            os.remove(temp)
    return ExportResult(sha[:32], local_device_id(conn), count, target.stat().st_size, current)


def check_target(target: pathlib.Path) -> None:
    """Refuse to write a bundle anywhere but a new file or over an old bundle: the file is
    replaced whole, so a database (even this one) or a device there would be lost."""
    if not target.parent.is_dir():
        raise BundleError("cannot_write", f"Cannot write bundle {target}: directory {target.parent} does not exist")
    if not os.path.lexists(target):
        return
    if target.is_symlink() or not target.is_file():
        raise BundleError("cannot_write", f"Cannot write bundle {target}: it exists and is not a regular file")
    if target.stat().st_size and not is_bundle_file(target):
        raise BundleError(
            "cannot_write", f"Cannot write bundle {target}: it exists and is not a bundle, so it is not replaced"
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


def write_operations(
    conn: sqlite3.Connection,
    since: dict[str, int],
    devices: dict[int, str],
    tops: dict[int, int],
    table_entry: Callable[[int], tuple[int, list[int]]],
    write_chunk: Callable[[int, int, Iterable[Sequence[Any]], int], None],
    header_devices: list[str],
    clock_fixes: dict[int, int],
) -> int:
    """Stream each device's operations after ``since`` as runs of one table, up to CHUNK_OPS."""
    count = 0
    for idx in sorted(devices):
        start = since.get(devices[idx], 0)
        if tops[idx] <= start:
            continue
        device_position = len(header_devices)
        header_devices.append(devices[idx])
        for tid, lo, hi, size in runs(conn, op_id(idx, start + 1), op_id(idx, SEQ_MASK)):
            if tid == 0:
                key, columns = -1, "NULL, rowkey"
            else:
                key, slots = table_entry(tid)
                # Masks travel as bits of the header's column list: slot numbers are local to
                # each copy (columns added in a different order get different slots). Row keys
                # are not sent: the receiver derives them from the primary-key values, so they
                # cannot disagree; only a move sends the key it moved from.
                mask = remap_mask_sql([(s, i) for i, s in enumerate(slots)])
                columns = f"{mask}, CASE WHEN newkey IS NOT NULL THEN rowkey END" + "".join(f", c{s}" for s in slots)
            cursor = conn.execute(
                f"SELECT op & {SEQ_MASK}, hlc, kind, {columns} FROM _sync_ops WHERE op BETWEEN ? AND ? ORDER BY op",
                [lo, hi],
            )
            rows: Iterable[Sequence[Any]] = cursor
            if clock_fixes and idx == LOCAL:
                rows = ((seq, clock_fixes.get(op_id(idx, seq), hlc), *rest) for seq, hlc, *rest in cursor)
            try:
                write_chunk(device_position, key, rows, size)
            except sqlite3.OperationalError as ex:
                if "decode" not in str(ex):
                    raise
                # SQLite stores whatever bytes a client hands it as TEXT; Python cannot read them.
                (name,) = conn.execute("SELECT name FROM _sync_tables WHERE tid = ?", [tid]).fetchone() or ("?",)
                raise BundleError(
                    "invalid_text",
                    f"Table '{name}' has a TEXT value that is not valid UTF-8 in operations "
                    f"{lo & SEQ_MASK}-{hi & SEQ_MASK} of device {devices[idx]}, which sync cannot carry "
                    "(see Limits in the README)",
                )
            count += size
    return count


def runs(conn: sqlite3.Connection, lo: int, hi: int) -> Iterator[tuple[int, int, int, int]]:
    """Split the ops in ``lo..hi`` into runs of one table: ``(tid, first op, last op, count)``.

    A run ends at CHUNK_OPS operations or CHUNK_BYTES of values, whichever comes first, so a
    table of large BLOBs makes small chunks: a chunk is held whole in memory on both sides.
    """
    slots = [row[1] for row in conn.execute("PRAGMA table_info(_sync_ops)") if row[1].startswith("c")]
    # length() of a BLOB reads its header only; text and numbers cast to BLOB count their bytes.
    size = " + ".join(f"ifnull(length(CAST({c} AS BLOB)), 0)" for c in slots) or "0"
    run: list[int] | None = None
    # Streamed, not fetched: memory stays flat however long the log.
    cursor = conn.execute(f"SELECT op, tid, {size} FROM _sync_ops WHERE op BETWEEN ? AND ? ORDER BY op", [lo, hi])
    for op, tid, nbytes in cursor:
        if run and run[0] == tid and run[3] < CHUNK_OPS and run[4] + nbytes <= CHUNK_BYTES:
            run[2], run[3], run[4] = op, run[3] + 1, run[4] + nbytes
            continue
        if run:
            yield run[0], run[1], run[2], run[3]
        run = [tid, op, op, 1, nbytes]
    if run:
        yield run[0], run[1], run[2], run[3]


def ops_table_sql(width: int) -> str:
    """The one statement a chunk image's schema may hold, for a table of ``width`` columns."""
    return "CREATE TABLE ops (seq INTEGER PRIMARY KEY, hlc, kind, mask, moved" + "".join(
        f", v{i}" for i in range(width)
    ) + ")"


def chunk_prefix(device_position: int, table_position: int, data: bytes) -> bytes:
    """What the hash covers before a chunk's bytes: where the chunk belongs, and its length."""
    return msgpack.packb([device_position, table_position, len(data)])


def chunk_image(rows: Iterable[Sequence[Any]], width: int, small: bool = False) -> bytes:
    """A SQLite database image holding ``rows`` in an ``ops`` table."""
    with image_connection() as (image, read_back):
        # The smallest pages keep a chunk of a few ops (the common delta) small.
        image.execute(f"PRAGMA page_size = {512 if small else 4096}")
        image.execute(ops_table_sql(width))
        image.executemany(f"INSERT INTO ops VALUES ({', '.join('?' * (5 + width))})", rows)
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


def anchors_for(conn: sqlite3.Connection, since: dict[str, int], devices: dict[int, str]) -> dict[str, list]:
    """The last op the receiver already has from each device, as we have it: if the receiver's
    copy differs, two databases are writing under one device id (a copied file)."""
    anchors = {}
    for idx, device in devices.items():
        seq = since.get(device, 0)
        fingerprint = seq and op_fingerprint(conn, op_id(idx, seq))
        if fingerprint:
            anchors[device] = [seq, fingerprint]
    return anchors


def op_fingerprint(conn: sqlite3.Connection, op: int) -> str | None:
    """A digest of what an operation says, independent of local slot numbering."""
    cursor = conn.execute(
        "SELECT o.*, t.name AS _table, t.columns AS _slots FROM _sync_ops o LEFT JOIN _sync_tables t ON t.tid = o.tid "
        "WHERE o.op = ?",
        [op],
    )
    row = cursor.fetchone()
    if row is None:
        return None
    record = dict(zip([d[0] for d in cursor.description], row))
    slots = json.loads(record["_slots"] or "{}")
    values = sorted((c, record[f"c{s}"]) for c, s in slots.items() if (record["mask"] or 0) >> s & 1)
    content = [record["hlc"], record["kind"], record["_table"], record["rowkey"], record["newkey"], values]
    return hashlib.sha256(msgpack.packb(content)).hexdigest()[:32]


class BundleReader:
    """Open a bundle read-only and check its integrity before anything is applied."""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        name = self.path.name
        if not self.path.is_file():
            raise BundleError("missing_bundle", f"Bundle {name}: file not found")
        if self.path.stat().st_size == 0:
            raise BundleError("invalid_bundle", f"Bundle {name} is empty (0 bytes): was the transfer cut short?")
        try:
            self.conn = sqlite3.connect(self.path.resolve().as_uri() + "?mode=ro", uri=True)
            kinds = {
                row[0]: (row[1], row[2] or "")
                for row in self.conn.execute("SELECT name, type, sql FROM sqlite_master")
            }
        except sqlite3.Error as ex:
            raise BundleError("invalid_bundle", f"Bundle {name} is not a SQLite file ({ex})")
        for table in BUNDLE_TABLES:
            kind, sql = kinds.get(table, (None, ""))
            if kind != "table" or sql.lstrip().upper().startswith("CREATE VIRTUAL"):
                raise BundleError("invalid_bundle", f"Bundle {name} is not a sync bundle: no {table} table")
        try:
            meta = dict(self.conn.execute("SELECT key, value FROM bundle_meta"))
            if meta.get("format") != FORMAT:
                raise BundleError("unsupported_format", f"Bundle {name} has format {meta.get('format')!r}, expected {FORMAT}")
            headers = self.conn.execute("SELECT data FROM bundle_header ORDER BY id").fetchall()
            if len(headers) != 1 or not isinstance(headers[0][0], bytes):
                raise BundleError("invalid_metadata", f"Bundle {name} must have exactly one header")
            self.header_bytes = headers[0][0]
            digest = hashlib.sha256(FORMAT.encode())
            for _ in self._read_chunks(digest):
                pass
            digest.update(self.header_bytes)
        except sqlite3.Error as ex:
            raise BundleError("invalid_bundle", f"Bundle {name} cannot be read ({ex})")
        if digest.hexdigest() != meta.get("sha256") or meta.get("bundle_id") != digest.hexdigest()[:32]:
            raise self._hash_mismatch()
        self.sha256: str = meta["sha256"]
        self.bundle_id: str = meta["bundle_id"]
        self.header = self._decode_header()

    def _hash_mismatch(self) -> BundleError:
        return BundleError(
            "hash_mismatch", f"Bundle {self.path.name} failed its integrity check: content does not match its sha256"
        )

    def _read_chunks(self, digest: Any) -> Iterator[tuple[int, int, bytes]]:
        for device, table, data in self.conn.execute("SELECT device, tbl, data FROM bundle_chunks ORDER BY id"):
            if not (type(device) is int and type(table) is int and isinstance(data, bytes)):
                raise BundleError("invalid_operation", f"Bundle {self.path.name} has a malformed chunk")
            digest.update(chunk_prefix(device, table, data))
            digest.update(data)
            yield device, table, data

    def _decode_header(self) -> dict[str, Any]:
        name = self.path.name
        try:
            header = msgpack.unpackb(self.header_bytes)
        except Exception as ex:
            raise BundleError("invalid_metadata", f"Bundle {name} header cannot be decoded ({ex})")
        problem = None
        if not isinstance(header, dict):
            problem = "header is not a map"
        elif not is_device_id(header.get("source")):
            problem = "source device id is invalid"
        elif not isinstance(header.get("devices"), list) or not all(is_device_id(d) for d in header["devices"]):
            problem = "device list is invalid"
        elif len(set(header["devices"])) != len(header["devices"]):
            problem = "device list repeats a device"
        elif not isinstance(header.get("tables"), list) or not all(
            isinstance(t, list)
            and len(t) == 3
            and isinstance(t[0], str)
            and isinstance(t[1], list)
            and isinstance(t[2], list)
            and all(isinstance(c, str) for c in t[1])
            and len(set(t[1])) == len(t[1])
            and t[2]
            and all(c in t[1] for c in t[2])
            for t in header["tables"]
        ):
            problem = "table list is invalid"
        elif not isinstance(header.get("dropped", {}), dict) or not all(
            isinstance(v, list) and any(t[0] == k and all(c in t[1] and c not in t[2] for c in v) for t in header["tables"])
            for k, v in header.get("dropped", {}).items()
        ):
            problem = "dropped-column list is invalid"
        elif not is_count(header.get("operations"), 1 << 62):
            problem = "operation count is invalid"
        elif not isinstance(header.get("anchors", {}), dict) or not all(
            is_device_id(k) and isinstance(v, list) and len(v) == 2 and is_count(v[0], SEQ_MASK) and isinstance(v[1], str)
            for k, v in header.get("anchors", {}).items()
        ):
            problem = "anchors are invalid"
        if problem:
            raise BundleError("invalid_metadata", f"Bundle {name}: {problem}")
        parse_clock(header.get("clock"), f"Bundle {name} clock")
        parse_clock(header.get("since"), f"Bundle {name} since-clock")
        parse_clock(header.get("horizon"), f"Bundle {name} horizon")
        return header

    def chunks(self) -> Iterator[tuple[int, int, bytes]]:
        """Yield ``(device position, table position, chunk image)``.

        The hash is taken again on the way: a file changed since it was checked fails the
        import, whose transaction then rolls back.
        """
        name = self.path.name
        digest = hashlib.sha256(FORMAT.encode())
        try:
            for device, table, data in self._read_chunks(digest):
                if not (0 <= device < len(self.header["devices"]) and -1 <= table < len(self.header["tables"])):
                    raise BundleError("invalid_operation", f"Bundle {name} has a malformed chunk")
                yield device, table, data
        except sqlite3.Error as ex:
            raise BundleError("invalid_bundle", f"Bundle {name} cannot be read ({ex})")
        digest.update(self.header_bytes)
        if digest.hexdigest() != self.sha256:
            raise self._hash_mismatch()

    def width(self, table_position: int) -> int:
        """How many value columns the chunks of a table carry (0 for ticks)."""
        return len(self.header["tables"][table_position][1]) if table_position >= 0 else 0

    def close(self) -> None:
        self.conn.close()


# The importer reads chunk images with SQL. Python 3.11+ can hand an image straight to SQLite;
# 3.10 cannot, and copies the rows into a temporary table instead.
SERIALIZE = hasattr(sqlite3.Connection, "serialize")
CHUNK_SCHEMA = "_sync_chunk"


class ChunkStage:
    """Where the importing connection reads the chunk images from, one at a time."""

    def __init__(self, conn: sqlite3.Connection, bundle_name: str):
        self.conn = conn
        self.name = bundle_name
        self.direct = SERIALIZE
        if self.direct and CHUNK_SCHEMA not in {row[1] for row in conn.execute("PRAGMA database_list")}:
            conn.execute(f"ATTACH ':memory:' AS {CHUNK_SCHEMA}")

    def load(self, data: bytes, width: int) -> str:
        """Load one chunk image after checking it holds nothing but the ``ops`` table; return the
        name to ``SELECT`` its operations from."""
        try:
            if self.direct:
                self.conn.deserialize(data, name=CHUNK_SCHEMA)
                schema = self.conn.execute(f"SELECT type, name, tbl_name, sql FROM {CHUNK_SCHEMA}.sqlite_master")
                self.check(schema, width)
                return f"{CHUNK_SCHEMA}.ops"
            with open_image(data) as image:
                self.check(image.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"), width)
                self.conn.execute("DROP TABLE IF EXISTS temp._sync_chunk_ops")
                self.conn.execute(ops_table_sql(width).replace("CREATE TABLE ops", "CREATE TEMP TABLE _sync_chunk_ops"))
                self.conn.executemany(
                    f"INSERT INTO temp._sync_chunk_ops VALUES ({', '.join('?' * (5 + width))})",
                    image.execute("SELECT * FROM ops"),
                )
                return "temp._sync_chunk_ops"
        except sqlite3.DatabaseError as ex:
            self.empty()  # a broken image would break every later statement that reads the schema
            raise BundleError("invalid_operation", f"Bundle {self.name} has a chunk that cannot be read ({ex})")
        except BundleError:
            self.empty()
            raise

    def check(self, schema: Iterator, width: int) -> None:
        if [tuple(row) for row in schema] != [("table", "ops", "ops", ops_table_sql(width))]:
            raise BundleError("invalid_operation", f"Bundle {self.name} has a chunk that is not a table of operations")

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

