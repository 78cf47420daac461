"""Bundles made to hurt: each is refused with one line (exit 1 from the real CLI, a
BundleError from the library), the database byte-identical, the process alive, and the work
it costs bounded by its size: crafted chunk images, headers and bundle tables, tampered or
forged contents re-signed with a valid hash, garbage and truncated files. Thousands of
random ones: test_fuzz_bundles.py.
"""

from __future__ import annotations

import http.server
import json
import pathlib
import shutil
import sqlite3
import subprocess
import sys
import threading
from unittest import mock

import pytest


from sqlite_utils_sync import BundleError, export_bundle, import_bundle, importer, sync_status
from sqlite_utils_sync.bundle import chunk_image
from sqlite_utils_sync.oplog import LOCAL, parse_clock


@pytest.fixture
def synced_pair(tmp_path, make_db, sync):
    """A and B in sync; then B edits, so B's bundles carry a knowledge tick and its edits."""
    a = make_db(tmp_path / "a.db")
    b = make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(i, f"t{i}") for i in range(1, 6)])
    sync(a, b, tmp_path)
    b.execute("UPDATE todos SET title = 'b' WHERE id = 2")
    return a, b


@pytest.fixture(scope="session")
def refused_by_cli(run, file_bytes):
    """Import with the real CLI: exit 1, one line, no traceback, database byte-identical."""

    def refused_by_cli(db: pathlib.Path, bundle: pathlib.Path, starts: str = "Error: Bundle ") -> str:
        before = file_bytes(db)
        result = run(["sqlite-utils", "import-bundle", db, bundle], check=False)
        assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
        assert result.stderr.startswith(starts), result.stderr
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert file_bytes(db) == before
        return result.stderr

    return refused_by_cli


@pytest.fixture(scope="session")
def refused_by_library(file_bytes):
    """``refused_by_library(conn, db, bundle)``: ``import_bundle`` raises a one-line BundleError
    naming the bundle, ``db`` unchanged; returns the error."""

    def refused_by_library(conn, db: pathlib.Path, bundle: pathlib.Path) -> BundleError:
        before = file_bytes(db)
        with pytest.raises(BundleError) as error:
            import_bundle(conn, bundle)
        assert str(error.value).startswith(f"Bundle {bundle.name}") and "\n" not in str(error.value)
        assert file_bytes(db) == before
        return error.value

    return refused_by_library


def tick_chunk(conn, sql: str, craft) -> None:
    """Run ``sql`` in the knowledge-tick chunk image (table position -1) and re-sign."""
    for chunk_id, data in conn.execute("SELECT id, data FROM bundle_chunks WHERE tbl = -1").fetchall():
        image = sqlite3.connect(":memory:")
        image.deserialize(craft.image(data))
        image.execute("PRAGMA writable_schema = ON")
        image.execute(sql)
        image.commit()
        conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [craft.stored(image.serialize(), data), chunk_id])
        image.close()
    craft.reseal(conn)


# Crafted chunk images must not crash the process ---------------------------------------------


CRASHERS = {
    "tick clock that is not UTF-8": "UPDATE ops SET moved = CAST(x'7b22ff22' AS TEXT)",
    "chunk schema text that is not UTF-8": (
        "UPDATE sqlite_master SET sql = substr(sql, 1, length(sql) - 1) || CAST(x'2c20ff' AS TEXT) || ')'"
    ),
    "chunk schema that does not parse, not UTF-8": "UPDATE sqlite_master SET sql = CAST(x'435245415445ff' AS TEXT)",
}


@pytest.mark.parametrize("name", list(CRASHERS))
def test_crafted_chunk_images_are_one_line_not_a_crash(tmp_path, synced_pair, name, craft, refused_by_cli, refused_by_library):
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    craft.rewrite(path, lambda c: tick_chunk(c, CRASHERS[name], craft))
    refused_by_library(a, tmp_path / "a.db", path)
    refused_by_cli(tmp_path / "a.db", path)


@pytest.fixture
def hostile_hub():
    """A 'hub' on 127.0.0.1 that answers every export with the bytes it is given."""
    served: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.sqlite3")
            self.send_header("Content-Length", str(len(served["body"])))
            self.end_headers()
            self.wfile.write(served["body"])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def serve(body: bytes) -> str:
        served["body"] = body
        return f"http://127.0.0.1:{server.server_address[1]}/hub"

    yield serve
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("name", list(CRASHERS))
def test_a_hub_serving_a_crafted_bundle_does_not_crash_the_client(tmp_path, synced_pair, hostile_hub, name, craft, file_bytes, run):
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    craft.rewrite(path, lambda c: tick_chunk(c, CRASHERS[name], craft))
    url = hostile_hub(path.read_bytes())
    before = file_bytes(tmp_path / "a.db")
    result = run(["sqlite-utils", "sync", tmp_path / "a.db", url], check=False)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert file_bytes(tmp_path / "a.db") == before


# Work and memory bounded by the bundle's size -------------------------------------------------


@pytest.fixture(scope="session")
def peak_rss_mb(executable):
    """Run ``args`` under a small wrapper whose only child it is: its peak memory, in MB."""

    def peak_rss_mb(args: list) -> tuple[subprocess.CompletedProcess, float]:
        wrapper = (
            "import resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "sys.stderr.write(r.stderr)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "sys.exit(r.returncode)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", wrapper, executable(args[0]), *map(str, args[1:])], capture_output=True, text=True
        )
        return result, int(result.stdout.split()[-1]) / 1024

    return peak_rss_mb


EXPANDERS = {
    # The bundle's own tables: values computed on read, far larger than the file.
    "generated chunk data": (
        "PRAGMA writable_schema = ON",
        "UPDATE sqlite_master SET sql = replace(sql, 'data BLOB NOT NULL', 'data BLOB AS (zeroblob(400000000))') "
        "WHERE name = 'bundle_chunks'",
    ),
    "DEFAULT for chunk records that lack their data": (
        "CREATE TABLE short (id INTEGER PRIMARY KEY, device INTEGER NOT NULL, tbl INTEGER NOT NULL)",
        "INSERT INTO short SELECT id, device, tbl FROM bundle_chunks",
        "DROP TABLE bundle_chunks",
        "PRAGMA writable_schema = ON",
        "UPDATE sqlite_master SET name = 'bundle_chunks', tbl_name = 'bundle_chunks', sql = 'CREATE TABLE "
        "bundle_chunks (id INTEGER PRIMARY KEY, device INTEGER NOT NULL, tbl INTEGER NOT NULL, "
        "data BLOB NOT NULL DEFAULT (zeroblob(400000000)))' WHERE name = 'short'",
    ),
    "generated header": (
        "PRAGMA writable_schema = ON",
        "UPDATE sqlite_master SET sql = replace(sql, 'data BLOB NOT NULL', 'data BLOB AS (zeroblob(400000000))') "
        "WHERE name = 'bundle_header'",
    ),
}


@pytest.mark.parametrize("name", list(EXPANDERS))
def test_a_small_bundle_cannot_cost_memory_beyond_its_size(tmp_path, synced_pair, name, file_bytes, peak_rss_mb, refused_by_library):
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    conn = sqlite3.connect(path)
    for statement in EXPANDERS[name]:
        conn.execute(statement)
    conn.commit()
    conn.close()
    assert path.stat().st_size < 50_000
    refused_by_library(a, tmp_path / "a.db", path)
    before = file_bytes(tmp_path / "a.db")
    result, peak = peak_rss_mb(["sqlite-utils", "import-bundle", tmp_path / "a.db", path])
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr[-2000:]
    assert "is not a sync bundle" in result.stderr
    # Without the schema check each row read computes a 400 MB value.
    assert peak < 150, f"peak memory {peak:.0f} MB for a {path.stat().st_size} byte bundle"
    assert file_bytes(tmp_path / "a.db") == before


CHUNK_EXPANDERS = [
    "UPDATE sqlite_master SET sql = replace(sql, 'hlc,', 'hlc AS (zeroblob(400000000)),')",
    "UPDATE sqlite_master SET sql = substr(sql, 1, length(sql) - 1) || ', pad DEFAULT (zeroblob(400000000)))'",
    "UPDATE sqlite_master SET sql = replace(sql, 'kind,', 'kind CHECK (length(zeroblob(400000000))),')",
]


@pytest.mark.parametrize("statement", CHUNK_EXPANDERS)
def test_a_chunk_image_that_computes_values_is_refused_before_they_are_read(tmp_path, synced_pair, statement, craft, peak_rss_mb, refused_by_library):
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)

    def tamper(conn):
        chunks = conn.execute("SELECT id, data FROM bundle_chunks").fetchall()
        for chunk_id, data in chunks:
            image = sqlite3.connect(":memory:")
            image.deserialize(craft.image(data))
            image.execute("PRAGMA writable_schema = ON")
            image.execute(statement)
            image.commit()
            conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [craft.stored(image.serialize(), data), chunk_id])
            image.close()
        craft.reseal(conn)

    craft.rewrite(path, tamper)
    error = refused_by_library(a, tmp_path / "a.db", path)
    assert "not a table of operations" in str(error)
    result, peak = peak_rss_mb(["sqlite-utils", "import-bundle", tmp_path / "a.db", path])
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr[-2000:]
    assert peak < 150, f"peak memory {peak:.0f} MB"


def test_a_bundle_file_with_a_damaged_btree_is_refused_before_it_is_read(tmp_path, synced_pair, refused_by_cli, refused_by_library):
    # A damaged b-tree can reach pages twice (a loop, shared overflow pages): reading it could
    # cost far more than the file. quick_check walks each page once and refuses it first.
    a, b = synced_pair
    b.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(i, "x" * 2000) for i in range(100, 140)])
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    root = sqlite3.connect(path).execute("SELECT rootpage FROM sqlite_master WHERE name = 'bundle_chunks'").fetchone()[0]
    data = bytearray(path.read_bytes())
    offset = (root - 1) * int.from_bytes(data[16:18], "big")
    data[offset + 3 : offset + 5] = (0xFFFF).to_bytes(2, "big")  # the root claims 65535 cells
    path.write_bytes(bytes(data))
    error = refused_by_library(a, tmp_path / "a.db", path)
    assert error.reason == "invalid_bundle"
    refused_by_cli(tmp_path / "a.db", path)


# Damaged headers and files: a BundleError, never another exception ---------------------------


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda h: h.pop("clock"), "header lacks clock"),
        (lambda h: h.pop("source"), "header lacks source"),
        (lambda h: h.pop("tables"), "header lacks tables"),
        (lambda h: h.__setitem__("clock", "{}"), "clock is not a map"),
        (lambda h: h.__setitem__("since", [1]), "since is not a map"),
        (lambda h: h.__setitem__("horizon", {"x": 1}), "horizon must look like"),
        (lambda h: h["tables"][0][1].__setitem__(1, "ti\0tle"), "table list is invalid"),
        (lambda h: h["tables"][0].__setitem__(1, h["tables"][0][1] + [f"c{i}" for i in range(80)]), "table list is invalid"),
        (lambda h: h["tables"][0].__setitem__(0, 7), "table list is invalid"),
        (lambda h: h["tables"][0].__setitem__(2, [["id"]]), "table list is invalid"),
        (lambda h: h["tables"][0].__setitem__(2, [{"id": 1}]), "table list is invalid"),
        (lambda h: h.__setitem__("anchors", {"e" * 32: [1, "x" * 5000]}), "anchors are invalid"),
        (lambda h: h.__setitem__("devices", "e" * 32), "device list is invalid"),
        # A name repeated, or thousands of names in a few bytes each, would cost work per name.
        (lambda h: h["tables"].append(h["tables"][0]), "table list repeats a table"),
        (lambda h: h["tables"].extend([[f"t{i}", ["id"], ["id"]] for i in range(1000)]), "more than the 1000 a bundle may name"),
        (lambda h: h.__setitem__("dropped", {"todos": ["title"] * 2}), "dropped-column list is invalid"),
        (lambda h: h.__setitem__("dropped", {"todos": [["title"]]}), "dropped-column list is invalid"),
        (lambda h: h.__setitem__("dropped", {"todos": ["id"]}), "dropped-column list is invalid"),
        (lambda h: h.__setitem__("dropped", {"nothing": ["title"]}), "dropped-column list is invalid"),
    ],
)
def test_header_with_missing_keys_or_wrong_types_is_one_line(tmp_path, synced_pair, change, message, craft, refused_by_cli, refused_by_library):
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    craft.rewrite(path, lambda c: (craft.edit_header(c, change), craft.reseal(c)))
    error = refused_by_library(a, tmp_path / "a.db", path)
    assert error.reason in ("invalid_metadata", "invalid_clock") and message in str(error), str(error)
    refused_by_cli(tmp_path / "a.db", path)


def test_deeply_nested_header_and_clock_are_one_line(tmp_path, synced_pair, craft, run, refused_by_cli, refused_by_library):
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    craft.rewrite(path, lambda c: (c.execute("UPDATE bundle_header SET data = ?", [b"\x91" * 100_000 + b"\xc0"]), craft.reseal(c)))
    assert refused_by_library(a, tmp_path / "a.db", path).reason == "invalid_metadata"
    refused_by_cli(tmp_path / "a.db", path)
    deep = "[" * 15_000
    with pytest.raises(BundleError) as error:
        parse_clock(deep, "since query parameter")
    assert error.value.reason == "invalid_clock" and len(str(error.value)) < 200
    result = run(["sqlite-utils", "export-bundle", tmp_path / "b.db", tmp_path / "y.bundle", "--since", deep], check=False)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_schema_text_that_is_not_utf8_in_the_bundle_file_is_one_line(tmp_path, synced_pair, refused_by_cli, refused_by_library):
    # A raw bit flip in the schema text of the bundle file itself.
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    data = bytearray(path.read_bytes())
    at = data.index(b"CREATE TABLE bundle_header (id INTEGER PRIMARY KEY, data BLOB")
    data[at + 2] = 0xFF  # CR\xffATE: SQLite's error message quotes it, and Python cannot decode that
    path.write_bytes(bytes(data))
    assert refused_by_library(a, tmp_path / "a.db", path).reason == "invalid_bundle"
    refused_by_cli(tmp_path / "a.db", path)


def test_damaged_chunk_image_is_a_bundle_error_not_a_database_error(tmp_path, synced_pair, craft, refused_by_cli, refused_by_library):
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)

    def damage(conn):
        chunk_id, stored = conn.execute("SELECT id, data FROM bundle_chunks WHERE tbl >= 0").fetchone()
        data = bytearray(craft.image(stored))
        page_size = int.from_bytes(data[16:18], "big")
        data[page_size : page_size + 8] = b"\x0d\xff\xff\xff\xff\xff\xff\xff"  # the ops table's page header
        conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [craft.stored(bytes(data), stored), chunk_id])
        craft.reseal(conn)

    craft.rewrite(path, damage)
    error = refused_by_library(a, tmp_path / "a.db", path)
    assert error.reason == "invalid_operation" and "chunk" in str(error)
    refused_by_cli(tmp_path / "a.db", path)


def utf16_chunk(conn, craft) -> None:
    """Make the first data chunk a UTF-16 database holding the same ``ops`` table and rows
    (a valid SQLite file: only its text encoding differs), and re-sign."""
    chunk_id, stored = conn.execute("SELECT id, data FROM bundle_chunks WHERE tbl >= 0 ORDER BY id").fetchone()
    source = sqlite3.connect(":memory:")
    source.deserialize(craft.image(stored))
    utf16 = sqlite3.connect(":memory:")
    utf16.execute("PRAGMA encoding = 'UTF-16le'")
    utf16.execute(source.execute("SELECT sql FROM sqlite_master").fetchone()[0])
    for row in source.execute("SELECT * FROM ops"):
        utf16.execute(f"INSERT INTO ops VALUES ({', '.join('?' * len(row))})", row)
    utf16.commit()
    conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [craft.stored(utf16.serialize(), stored), chunk_id])
    craft.reseal(conn)


def test_a_chunk_image_in_utf16_is_refused_as_an_invalid_chunk(tmp_path, synced_pair, craft, refused_by_cli, refused_by_library):
    # Attached to the importing connection, it made every statement there fail: a raw
    # "attached databases must use the same text encoding" SQLite error, naming no bundle.
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    craft.rewrite(path, lambda conn: utf16_chunk(conn, craft))
    error = refused_by_library(a, tmp_path / "a.db", path)
    assert error.reason == "invalid_operation"
    assert str(error) == "Bundle x.bundle has a chunk whose text is UTF-16le, not UTF-8"
    assert refused_by_cli(tmp_path / "a.db", path).strip() == "Error: Bundle x.bundle has a chunk whose text is UTF-16le, not UTF-8"


def test_an_error_while_a_chunk_is_attached_is_the_bundles_not_one_from_unwinding(tmp_path, synced_pair, craft, refused_by_library):
    # Should a chunk that breaks the importing connection get past the checks, the import
    # unwinds with it still attached: putting the capture triggers back failed the same way
    # and replaced the bundle's error with a raw SQLite one.
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    craft.rewrite(path, lambda conn: utf16_chunk(conn, craft))
    with mock.patch.object(importer, "check_image", lambda *args: None):
        error = refused_by_library(a, tmp_path / "a.db", path)
    assert error.reason == "invalid_operation"
    assert "x.bundle: a chunk cannot be read (attached databases must use the same text encoding" in str(error)
    logged = sync_status(a)["operations"]
    a.execute("UPDATE todos SET title = 'after' WHERE id = 1")  # the connection works, and still captures
    assert sync_status(a)["operations"] == logged + 1


# Tampered, forged, garbage and truncated bundles ----------------------------------------------


def sealed(sql, *params):
    return lambda c, craft: (craft.edit_chunks(c, sql, *params), craft.reseal(c))


FIRST = "WHERE seq = (SELECT min(seq) FROM ops)"


HOSTILE = {
    "tampered value": (
        lambda c, craft: craft.edit_chunks(c, f"UPDATE ops SET v1 = 'tampered' {FIRST}"),
        "hash_mismatch",
        "failed its integrity check",
    ),
    "internal table": (
        lambda c, craft: (craft.edit_header(c, lambda h: h["tables"][0].__setitem__(0, "_sync_devices")), craft.reseal(c)),
        "internal_table",
        "operations on internal table '_sync_devices' are never accepted",
    ),
    "internal table under another case": (
        lambda c, craft: (craft.edit_header(c, lambda h: h["tables"][0].__setitem__(0, "_SYNC_Devices")), craft.reseal(c)),
        "internal_table",
        "operations on internal table '_SYNC_Devices' are never accepted",
    ),
    "unknown column": (
        lambda c, craft: (
            craft.edit_header(c, lambda h: h["tables"][0][1].__setitem__(3, "secret")),
            craft.reseal(c),
        ),
        "unknown_column",
        "table 'todos' has column secret that this database lacks",
    ),
    "forged clock": (
        sealed(f"UPDATE ops SET kind = 3, moved = ? {FIRST}", json.dumps({"f" * 32: 10**6})),
        "invalid_operation",
        "invalid kind or mask",
    ),
    "moved-from key on an insert": (
        sealed(f"UPDATE ops SET moved = '999' {FIRST}"),
        "invalid_operation",
        "invalid moved-from key",
    ),
    "NULL primary key": (
        sealed(f"UPDATE ops SET v0 = NULL {FIRST}"),
        "null_key",
        "an operation for table 'todos' has a NULL primary key",
    ),
    "text key for an INTEGER PRIMARY KEY": (
        sealed(f"UPDATE ops SET v0 = 'one' {FIRST}"),
        "key_type",
        "table 'todos' is keyed by an INTEGER PRIMARY KEY here, but operations carry text keys",
    ),
    "fractional key for an INTEGER PRIMARY KEY": (
        sealed(f"UPDATE ops SET v0 = 1.5 {FIRST}"),
        "key_type",
        "table 'todos' is keyed by an INTEGER PRIMARY KEY here, but operations carry real keys",
    ),
    "negative clock": (
        sealed(f"UPDATE ops SET hlc = -1 {FIRST}"),
        "invalid_operation",
        "clock out of range (-1)",
    ),
    "clock at the top of the integer range": (
        sealed("UPDATE ops SET hlc = 9223372036854775807 WHERE seq = (SELECT max(seq) FROM ops)"),
        "invalid_operation",
        "clock out of range (9223372036854775807)",
    ),
    "operation count that is not what it carries": (
        lambda c, craft: (craft.edit_header(c, lambda h: h.__setitem__("operations", 5)), craft.reseal(c)),
        "invalid_metadata",
        "its header counts 5 operations but it carries 7",
    ),
    "primary key marked as a dropped column": (
        lambda c, craft: (craft.edit_header(c, lambda h: h.__setitem__("dropped", {"todos": ["id"]})), craft.reseal(c)),
        "invalid_metadata",
        "dropped-column list is invalid",
    ),
    "operation count out of range": (
        lambda c, craft: (craft.edit_header(c, lambda h: h.__setitem__("operations", 2**63)), craft.reseal(c)),
        "invalid_metadata",
        "operation count is invalid",
    ),
    "clock not an integer": (
        sealed(f"UPDATE ops SET hlc = 'soon' {FIRST}"),
        "invalid_operation",
        "clock that is not an integer",
    ),
    "mask naming a column the bundle lacks": (
        sealed(f"UPDATE ops SET mask = 1 << 20 {FIRST}"),
        "invalid_operation",
        "invalid kind or mask",
    ),
    "hole in a sequence": (
        sealed("UPDATE ops SET seq = seq + 70 WHERE seq > (SELECT min(seq) FROM ops)"),
        "missing_operations",
        "it lacks operations 2-71 of device",
    ),
    "sequence out of range": (
        sealed(f"UPDATE ops SET seq = -5 {FIRST}"),
        "invalid_operation",
        "sequence numbers must be 1 to",
    ),
    "chunk image with a trigger": (
        sealed("CREATE TRIGGER trap AFTER INSERT ON ops BEGIN DELETE FROM ops; END"),
        "invalid_operation",
        "has a chunk that is not a table of operations",
    ),
    "chunk image with another column": (
        sealed("ALTER TABLE ops ADD COLUMN secret"),
        "invalid_operation",
        "has a chunk that is not a table of operations",
    ),
    "clock falling from one operation of a device to its next": (
        sealed("UPDATE ops SET hlc = hlc - 1000000 WHERE seq = (SELECT max(seq) FROM ops)"),
        "invalid_operation",
        "has a clock below the one before it from the same device",
    ),
    "chunk that is not a database": (
        lambda c, craft: (c.execute("UPDATE bundle_chunks SET data = zeroblob(4096) WHERE id = 1"), craft.reseal(c)),
        "invalid_operation",
        "has a chunk that",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_or_tampered_bundles_are_refused_and_change_nothing(tmp_path, pair, name, craft, file_bytes, run):
    tamper, reason, message = HOSTILE[name]
    a, b = pair
    path = tmp_path / "x.bundle"
    export_bundle(a, path)
    craft.rewrite(path, lambda c: tamper(c, craft))
    before = file_bytes(tmp_path / "b.db")
    with pytest.raises(BundleError) as error:
        import_bundle(b, path)
    assert error.value.reason == reason
    assert message in str(error.value)
    assert str(error.value).startswith("Bundle x.bundle")
    assert file_bytes(tmp_path / "b.db") == before
    # A real process: a crash at exit (a statement left open on a chunk) must not hide here.
    result = run(["sqlite-utils", "import-bundle", tmp_path / "b.db", path], check=False)
    assert result.returncode == 1 and result.stderr.startswith("Error: Bundle x.bundle")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert file_bytes(tmp_path / "b.db") == before
    # A good bundle still works afterwards.
    export_bundle(a, tmp_path / "good.bundle")
    assert import_bundle(b, tmp_path / "good.bundle").applied == 7


@pytest.mark.parametrize(
    "change",
    [
        "UPDATE ops SET v2 = 0.0 WHERE seq = 1",  # done: the integer 0 as a REAL (SQL's IS takes them as equal)
        "UPDATE ops SET mask = 0 WHERE seq = 1",  # the same values, said to write no column
        "UPDATE ops SET v1 = 'todo 1' || char(32) WHERE seq = 1",
    ],
)
def test_an_operation_held_here_that_comes_back_changed_is_a_device_id_clash(tmp_path, pair, craft, change, refused_by_library, refused_by_cli):
    a, b = pair
    path = tmp_path / "a.bundle"
    export_bundle(a, path)
    assert import_bundle(b, path).applied == 7
    craft.rewrite(path, lambda c: (craft.edit_chunks(c, change), craft.reseal(c)))
    # Counted as a duplicate, it was silently dropped here while a copy that got it first kept it.
    assert refused_by_library(b, tmp_path / "b.db", path).reason == "device_id_clash"
    assert "differs from the copy here" in refused_by_cli(tmp_path / "b.db", path)


def test_an_operation_whose_clock_falls_below_one_held_here_is_refused(tmp_path, pair, craft, sync, refused_by_library, refused_by_cli):
    a, b = pair
    sync(a, b, tmp_path)
    a.execute("UPDATE todos SET title = 'later' WHERE id = 1")
    path = tmp_path / "next.bundle"
    export_bundle(a, path, since=sync_status(b)["clock"])
    # Its clock below the operation before it: taken on its own (here) it won, taken in one
    # bundle with that operation (a new copy) it lost, and copies diverged.
    craft.rewrite(path, lambda c: (craft.edit_chunks(c, "UPDATE ops SET hlc = hlc - 10000000000", first_only=False), craft.reseal(c)))
    error = refused_by_library(b, tmp_path / "b.db", path)
    assert error.reason == "invalid_operation" and "a clock below the one before it from the same device" in str(error)
    refused_by_cli(tmp_path / "b.db", path)


def test_a_clock_falling_between_interleaved_chunks_of_one_device_is_refused(tmp_path, make_db, craft, refused_by_library):
    a = make_db(tmp_path / "a.db", "CREATE TABLE t1 (id INTEGER PRIMARY KEY, v); CREATE TABLE t2 (id INTEGER PRIMARY KEY, v)", ("t1", "t2"))
    for i in range(2):
        a.execute("INSERT INTO t1 VALUES (?, 'x')", [i])
        a.execute("INSERT INTO t2 VALUES (?, 'y')", [i])
    path = tmp_path / "a.bundle"
    export_bundle(a, path)

    def merge_per_table(conn):
        # One chunk per table, each in order on its own (seqs 1 and 3; 2 and 4), and t1's
        # last clock above t2's last: the fall is only seen with both chunks in.
        kept = {}
        for chunk_id, table, data in conn.execute("SELECT id, tbl, data FROM bundle_chunks ORDER BY id").fetchall():
            image = sqlite3.connect(":memory:")
            image.deserialize(craft.image(data))
            if table in kept:
                rows = image.execute("SELECT * FROM ops").fetchall()
                kept[table][1].executemany(f"INSERT INTO ops VALUES ({', '.join('?' * len(rows[0]))})", rows)
                conn.execute("DELETE FROM bundle_chunks WHERE id = ?", [chunk_id])
            elif table >= 0:
                kept[table] = (chunk_id, image, data)
        for table, (chunk_id, image, data) in kept.items():
            if table == 0:
                image.execute("UPDATE ops SET hlc = hlc + 10000000 WHERE seq = (SELECT max(seq) FROM ops)")
            image.commit()
            conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [craft.stored(image.serialize(), data), chunk_id])
        craft.reseal(conn)

    craft.rewrite(path, merge_per_table)
    b = make_db(tmp_path / "b.db", "CREATE TABLE t1 (id INTEGER PRIMARY KEY, v); CREATE TABLE t2 (id INTEGER PRIMARY KEY, v)", ("t1", "t2"))
    error = refused_by_library(b, tmp_path / "b.db", path)
    assert error.reason == "invalid_operation" and ":4 has a clock below the one before it" in str(error)


def test_a_copied_file_edited_on_both_sides_is_a_device_id_clash_whichever_edited_last(tmp_path, make_db):
    a = make_db(tmp_path / "a.db")
    a.execute("INSERT INTO todos VALUES (1, 'x', 0, 0)")
    a.close()
    shutil.copyfile(tmp_path / "a.db", tmp_path / "b.db")
    a, b = (sqlite3.connect(tmp_path / f"{name}.db", isolation_level=None) for name in "ab")
    a.executemany("INSERT INTO todos VALUES (?, 'a', 0, 0)", [(10 + i,) for i in range(5)])
    b.execute("INSERT INTO todos VALUES (20, 'b', 0, 0)")  # later, so above a's clocks under the shared id
    export_bundle(a, tmp_path / "a.bundle")
    export_bundle(b, tmp_path / "b.bundle")
    third = make_db(tmp_path / "third.db")
    import_bundle(third, tmp_path / "a.bundle")
    for copy in (third, a):
        with pytest.raises(BundleError) as error:
            import_bundle(copy, tmp_path / "b.bundle")
        assert error.value.reason == "device_id_clash" and "sync-new-device --recover" in str(error.value)


def test_forged_dependency_clock_is_refused(tmp_path, pair, craft, file_bytes, sync):
    a, b = pair
    sync(a, b, tmp_path)
    b.execute("INSERT INTO todos VALUES (70, 'b', 0, 0)")
    path = tmp_path / "dep.bundle"
    export_bundle(b, path, since=sync_status(a)["clock"])

    def forge(conn):
        craft.edit_chunks(conn, "UPDATE ops SET moved = ? WHERE kind = 3", json.dumps({"e" * 32: 5}), first_only=False)
        craft.reseal(conn)

    craft.rewrite(path, forge)
    before = file_bytes(tmp_path / "a.db")
    with pytest.raises(BundleError, match="depend on device e{32} up to seq 5") as error:
        import_bundle(a, path)
    assert error.value.reason == "missing_dependencies"
    assert file_bytes(tmp_path / "a.db") == before


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "Error: Bundle junk.bundle is empty (0 bytes)"),
        (b"this is not a database at all" * 100, "Error: Bundle junk.bundle is not a SQLite file"),
    ],
)
def test_garbage_files_are_refused(tmp_path, pair, content, message, file_bytes, run_cli):
    a, b = pair
    path = tmp_path / "junk.bundle"
    path.write_bytes(content)
    before = file_bytes(tmp_path / "b.db")
    with pytest.raises(BundleError) as error:
        import_bundle(b, path)
    assert error.value.reason == "invalid_bundle"
    result = run_cli("import-bundle", tmp_path / "b.db", path)
    assert result.exit_code == 1
    assert result.output.startswith(message)
    assert result.output.count("\n") == 1
    assert file_bytes(tmp_path / "b.db") == before


def test_truncated_bundle_is_refused(tmp_path, pair, file_bytes):
    a, b = pair
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(i, "x" * 200) for i in range(100, 3000)])
    export_bundle(a, tmp_path / "full.bundle")
    data = file_bytes(tmp_path / "full.bundle")
    (tmp_path / "cut.bundle").write_bytes(data[: len(data) // 2])
    before = file_bytes(tmp_path / "b.db")
    with pytest.raises(BundleError) as error:
        import_bundle(b, tmp_path / "cut.bundle")
    assert error.value.reason in {"invalid_bundle", "hash_mismatch"}
    assert file_bytes(tmp_path / "b.db") == before


def test_bundle_is_opened_read_only_and_its_triggers_never_run(tmp_path, pair, craft, file_bytes):
    a, b = pair
    path = tmp_path / "trap.bundle"
    export_bundle(a, path)
    craft.rewrite(
        path,
        lambda c: c.executescript(
            """
            CREATE TABLE log (x);
            CREATE TRIGGER trap AFTER INSERT ON bundle_chunks BEGIN INSERT INTO log VALUES (1); END;
            CREATE VIEW sneaky AS SELECT * FROM bundle_chunks;
            """
        ),
    )
    before = file_bytes(path)
    assert import_bundle(b, path).applied == 7
    assert file_bytes(path) == before  # read-only: the bundle file is untouched


def test_problems_are_reported_in_chunk_order_while_the_next_chunk_is_checked_ahead(tmp_path, pair, craft, refused_by_library):
    """The importer checks chunk N+1's image on a worker thread while it appends chunk N: a
    problem of chunk N must still be the one reported, and nothing is kept."""
    a, b = pair
    a.executemany("INSERT INTO todos VALUES (?, 'more', 0, 0)", [(i,) for i in range(8, 6010)])
    path = tmp_path / "two-chunks.bundle"
    export_bundle(a, path)

    def tamper(conn):
        (first, first_data), (second, second_data) = conn.execute(
            "SELECT id, data FROM bundle_chunks WHERE tbl >= 0 ORDER BY id LIMIT 2"
        ).fetchall()
        image = sqlite3.connect(":memory:")
        image.deserialize(craft.image(first_data))
        image.execute("UPDATE ops SET v0 = NULL WHERE seq = (SELECT min(seq) FROM ops)")
        image.commit()
        conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [craft.stored(image.serialize(), first_data), first])
        image.close()
        damaged = bytearray(craft.image(second_data))
        page_size = int.from_bytes(damaged[16:18], "big")
        damaged[page_size : page_size + 8] = b"\x0d\xff\xff\xff\xff\xff\xff\xff"  # the ops table's page header
        conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [craft.stored(bytes(damaged), second_data), second])
        craft.reseal(conn)

    craft.rewrite(path, tamper)
    error = refused_by_library(b, tmp_path / "b.db", path)
    assert error.reason == "null_key", str(error)
    assert b.execute("SELECT count(*) FROM todos").fetchone() == (0,)


def test_a_full_disk_while_importing_is_this_machines_trouble_not_the_bundles(tmp_path, pair, file_bytes):
    """A disk that fills up during an import is not reported as a bad bundle (a cluster hub
    would record a good bundle as refused, and retries only its own trouble): the SQLite
    error comes through as it is, and nothing is kept."""
    a, b = pair
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(i, "x" * 2000) for i in range(8, 300)])
    path = tmp_path / "big.bundle"
    export_bundle(a, path)
    before = file_bytes(tmp_path / "b.db")
    pages = b.execute("PRAGMA page_count").fetchone()[0]
    b.execute(f"PRAGMA max_page_count = {pages + 20}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        import_bundle(b, path)
    b.execute("PRAGMA max_page_count = 1073741823")
    assert file_bytes(tmp_path / "b.db") == before
    assert import_bundle(b, path).applied > 0


# What a bundle leaves behind ------------------------------------------------------------------


def test_devices_a_bundle_carries_nothing_of_are_not_kept(tmp_path, synced_pair, craft, rows):
    # A device id costs a bundle 34 bytes in its header's list. Each one was kept for good (a
    # 687 KB bundle left 20,000), and enough bundles took every device index: a genuine new
    # device was then refused with "UNIQUE constraint failed: _sync_devices.idx".
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    ghosts = [f"{i:032x}" for i in range(1, 1001)]
    empty = "e" * 32  # a device with one chunk, of no operation
    real = []

    def tamper(conn):
        conn.execute("UPDATE bundle_chunks SET device = device + ?", [len(ghosts)])
        craft.edit_header(conn, lambda h: (real.extend(h["devices"]), h.update(devices=ghosts + h["devices"] + [empty])))
        conn.execute("INSERT INTO bundle_chunks (device, tbl, data) VALUES (?, -1, ?)", [len(ghosts) + len(real), chunk_image([], 0)])
        craft.reseal(conn)

    craft.rewrite(path, tamper)
    phone = sqlite3.connect(tmp_path / "phone.db", isolation_level=None)
    import_bundle(phone, path, create_tables=True)
    assert rows(phone) == rows(b)
    devices = dict(phone.execute("SELECT device_id, idx FROM _sync_devices WHERE idx < ?", [LOCAL]))
    assert devices == {device: idx for idx, device in enumerate(real, 1)}  # and no index went to the others
    export_bundle(phone, tmp_path / "from-phone.bundle")
    assert import_bundle(a, tmp_path / "from-phone.bundle").applied_by_table == {"todos": 1}  # b's edit


def test_tables_a_bundle_carries_nothing_of_are_not_kept(tmp_path, synced_pair, craft, rows):
    # Chunks of no operation pointing at made-up tables cost ~220 bytes each; every table a copy
    # keeps to relay operations of costs every later import (and, on a hub, every request) work.
    a, b = synced_pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)

    def tamper(conn):
        def ghosts(header):
            todos = header["tables"][0]
            first = len(header["tables"])
            header["tables"].extend([[f"ghost{i}", todos[1], todos[2]] for i in range(50)])
            return first, len(todos[1])

        found = []
        craft.edit_header(conn, lambda h: found.append(ghosts(h)))
        first, width = found[0]
        for i in range(50):
            conn.execute("INSERT INTO bundle_chunks (device, tbl, data) VALUES (0, ?, ?)", [first + i, chunk_image([], width)])
        craft.reseal(conn)

    craft.rewrite(path, tamper)
    before = a.execute("SELECT name FROM _sync_tables ORDER BY name").fetchall()
    import_bundle(a, path)
    assert rows(a) == rows(b)
    assert a.execute("SELECT name FROM _sync_tables ORDER BY name").fetchall() == before
