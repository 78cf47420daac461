"""Bundles made to hurt: each is refused with one line (exit 1 from the real CLI, a
BundleError from the library), the database byte-identical, the process alive, and the work
it costs bounded by its size. Values that are not valid UTF-8 travel bit-identical.
"""

from __future__ import annotations

import http.server
import pathlib
import sqlite3
import subprocess
import sys
import threading

import pytest

from conftest import executable, make_todos_db, run
from sync_helpers import edit_header, file_bytes, make_db, reseal, rewrite, sync

from sqlite_utils_sync import (
    BundleError,
    enable_sync,
    export_bundle,
    import_bundle,
    list_conflicts,
    resolve_conflict,
    sync_status,
)
from sqlite_utils_sync.oplog import parse_clock


@pytest.fixture
def pair(tmp_path):
    """A and B in sync; then B edits, so B's bundles carry a knowledge tick and its edits."""
    a = make_db(tmp_path / "a.db")
    b = make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(i, f"t{i}") for i in range(1, 6)])
    sync(a, b, tmp_path)
    b.execute("UPDATE todos SET title = 'b' WHERE id = 2")
    return a, b


def refused_by_cli(db: pathlib.Path, bundle: pathlib.Path, starts: str = "Error: Bundle ") -> str:
    """Import with the real CLI: exit 1, one line, no traceback, database byte-identical."""
    before = file_bytes(db)
    result = run(["sqlite-utils", "import-bundle", db, bundle], check=False)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert result.stderr.startswith(starts), result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert file_bytes(db) == before
    return result.stderr


def refused_by_library(conn, db: pathlib.Path, bundle: pathlib.Path) -> BundleError:
    before = file_bytes(db)
    with pytest.raises(BundleError) as error:
        import_bundle(conn, bundle)
    assert str(error.value).startswith(f"Bundle {bundle.name}") and "\n" not in str(error.value)
    assert file_bytes(db) == before
    return error.value


def tick_chunk(conn, sql: str) -> None:
    """Run ``sql`` in the knowledge-tick chunk image (table position -1) and re-sign."""
    for chunk_id, data in conn.execute("SELECT id, data FROM bundle_chunks WHERE tbl = -1").fetchall():
        image = sqlite3.connect(":memory:")
        image.deserialize(data)
        image.execute("PRAGMA writable_schema = ON")
        image.execute(sql)
        image.commit()
        conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [image.serialize(), chunk_id])
        image.close()
    reseal(conn)


# -- 2. crafted images must not crash the process ------------------------------------------------


CRASHERS = {
    "tick clock that is not UTF-8": "UPDATE ops SET moved = CAST(x'7b22ff22' AS TEXT)",
    "chunk schema text that is not UTF-8": (
        "UPDATE sqlite_master SET sql = substr(sql, 1, length(sql) - 1) || CAST(x'2c20ff' AS TEXT) || ')'"
    ),
    "chunk schema that does not parse, not UTF-8": "UPDATE sqlite_master SET sql = CAST(x'435245415445ff' AS TEXT)",
}


@pytest.mark.parametrize("name", list(CRASHERS))
def test_crafted_chunk_images_are_one_line_not_a_crash(tmp_path, pair, name):
    a, b = pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    rewrite(path, lambda c: tick_chunk(c, CRASHERS[name]))
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
def test_a_hub_serving_a_crafted_bundle_does_not_crash_the_client(tmp_path, pair, hostile_hub, name):
    a, b = pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    rewrite(path, lambda c: tick_chunk(c, CRASHERS[name]))
    url = hostile_hub(path.read_bytes())
    before = file_bytes(tmp_path / "a.db")
    result = run(["sqlite-utils", "sync", tmp_path / "a.db", url], check=False)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert file_bytes(tmp_path / "a.db") == before


# -- 6. work and memory bounded by the body's size -----------------------------------------------


def peak_rss_mb(args: list) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``args`` under a small wrapper whose only child it is: its peak memory, in MB."""
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
def test_a_small_bundle_cannot_cost_memory_beyond_its_size(tmp_path, pair, name):
    a, b = pair
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
def test_a_chunk_image_that_computes_values_is_refused_before_they_are_read(tmp_path, pair, statement):
    a, b = pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)

    def tamper(conn):
        chunks = conn.execute("SELECT id, data FROM bundle_chunks").fetchall()
        for chunk_id, data in chunks:
            image = sqlite3.connect(":memory:")
            image.deserialize(data)
            image.execute("PRAGMA writable_schema = ON")
            image.execute(statement)
            image.commit()
            conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [image.serialize(), chunk_id])
            image.close()
        reseal(conn)

    rewrite(path, tamper)
    error = refused_by_library(a, tmp_path / "a.db", path)
    assert "not a table of operations" in str(error)
    result, peak = peak_rss_mb(["sqlite-utils", "import-bundle", tmp_path / "a.db", path])
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr[-2000:]
    assert peak < 150, f"peak memory {peak:.0f} MB"


def test_a_bundle_file_with_a_damaged_btree_is_refused_before_it_is_read(tmp_path, pair):
    # A damaged b-tree can reach pages twice (a loop, shared overflow pages): reading it could
    # cost far more than the file. quick_check walks each page once and refuses it first.
    a, b = pair
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


# -- 7. errors that used to escape as something else ---------------------------------------------


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
        (lambda h: h.__setitem__("anchors", {"e" * 32: [1, "x" * 5000]}), "anchors are invalid"),
        (lambda h: h.__setitem__("devices", "e" * 32), "device list is invalid"),
    ],
)
def test_header_with_missing_keys_or_wrong_types_is_one_line(tmp_path, pair, change, message):
    a, b = pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    rewrite(path, lambda c: (edit_header(c, change), reseal(c)))
    error = refused_by_library(a, tmp_path / "a.db", path)
    assert error.reason in ("invalid_metadata", "invalid_clock") and message in str(error), str(error)
    refused_by_cli(tmp_path / "a.db", path)


def test_deeply_nested_header_and_clock_are_one_line(tmp_path, pair):
    a, b = pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    rewrite(path, lambda c: (c.execute("UPDATE bundle_header SET data = ?", [b"\x91" * 100_000 + b"\xc0"]), reseal(c)))
    assert refused_by_library(a, tmp_path / "a.db", path).reason == "invalid_metadata"
    refused_by_cli(tmp_path / "a.db", path)
    deep = "[" * 15_000
    with pytest.raises(BundleError) as error:
        parse_clock(deep, "since query parameter")
    assert error.value.reason == "invalid_clock" and len(str(error.value)) < 200
    result = run(["sqlite-utils", "export-bundle", tmp_path / "b.db", tmp_path / "y.bundle", "--since", deep], check=False)
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr


def test_schema_text_that_is_not_utf8_in_the_bundle_file_is_one_line(tmp_path, pair):
    # A raw bit flip there used to surface as a UnicodeDecodeError traceback.
    a, b = pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)
    data = bytearray(path.read_bytes())
    at = data.index(b"CREATE TABLE bundle_header (id INTEGER PRIMARY KEY, data BLOB")
    data[at + 2] = 0xFF  # CR\xffATE: SQLite's error message quotes it, and Python cannot decode that
    path.write_bytes(bytes(data))
    assert refused_by_library(a, tmp_path / "a.db", path).reason == "invalid_bundle"
    refused_by_cli(tmp_path / "a.db", path)


def test_damaged_chunk_image_is_a_bundle_error_not_a_database_error(tmp_path, pair):
    a, b = pair
    path = tmp_path / "x.bundle"
    export_bundle(b, path)

    def damage(conn):
        chunk_id, data = conn.execute("SELECT id, data FROM bundle_chunks WHERE tbl >= 0").fetchone()
        data = bytearray(data)
        page_size = int.from_bytes(data[16:18], "big")
        data[page_size : page_size + 8] = b"\x0d\xff\xff\xff\xff\xff\xff\xff"  # the ops table's page header
        conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [bytes(data), chunk_id])
        reseal(conn)

    rewrite(path, damage)
    error = refused_by_library(a, tmp_path / "a.db", path)
    assert error.reason == "invalid_operation" and "chunk" in str(error)
    refused_by_cli(tmp_path / "a.db", path)


# -- 8. values that are not valid UTF-8 travel bit-identical -------------------------------------


def test_text_that_is_not_utf8_travels_bit_identical_through_a_hub(tmp_path, datasette_server):
    hub_path = make_todos_db(tmp_path / "hub.db")
    config = {"databases": {"hub": {"permissions": {"sync-export": {"id": "alice"}, "sync-import": {"id": "alice"}}}}}
    server = datasette_server([hub_path], config)
    token = server.token("alice", "-d", "hub", "view-database", "-d", "hub", "sync-export", "-d", "hub", "sync-import")
    a_path, b_path = make_todos_db(tmp_path / "a.db"), make_todos_db(tmp_path / "b.db")
    a = sqlite3.connect(a_path, isolation_level=None)
    # Written with the sqlite3 module: SQLite stores these bytes as TEXT without a word.
    a.execute("INSERT INTO todos VALUES (1, CAST(x'41FF42' AS TEXT), 0)")
    a.execute("INSERT INTO todos VALUES (2, CAST(x'C3' AS TEXT), 0)")
    a.execute("UPDATE todos SET title = CAST(x'FE41' AS TEXT) WHERE id = 2")  # two ops on a row: through Python
    a.execute("INSERT INTO todos VALUES (3, x'41FF42', 0)")  # the same bytes as a BLOB stay a BLOB
    a.close()
    for path in (a_path, b_path):
        result = run(["sqlite-utils", "sync", path, server.url + "/hub", "--token", token, "--json"], check=False)
        assert result.returncode == 0, result.stderr
    select = "SELECT id, hex(title), typeof(title) FROM todos ORDER BY id"
    expected = [(1, "41FF42", "text"), (2, "FE41", "text"), (3, "41FF42", "blob")]
    for path in (a_path, hub_path, b_path):
        assert sqlite3.connect(path).execute(select).fetchall() == expected, path
    # And back: B edits another row, A pulls; nothing differs anywhere.
    sqlite3.connect(b_path, isolation_level=None).execute("UPDATE todos SET done = 1 WHERE id = 1")
    for path in (b_path, a_path):
        assert run(["sqlite-utils", "sync", path, server.url + "/hub", "--token", token]).returncode == 0
    for path in (a_path, hub_path, b_path):
        assert sqlite3.connect(path).execute(select).fetchall() == expected, path
        assert sqlite3.connect(path).execute("SELECT done FROM todos WHERE id = 1").fetchone() == (1,)


def test_conflicts_and_enable_sync_keep_text_that_is_not_utf8_exact(tmp_path):
    # A connection that decodes with replacement (as Datasette's do) must not change a value
    # that passes through Python: a concurrent edit, a resolution, enable-sync over old rows.
    c = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    c.execute("CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL)")
    c.execute("INSERT INTO todos VALUES (9, CAST(x'ff61' AS TEXT), 0, 0)")
    c.text_factory = lambda data: str(data, "utf-8", "replace")
    enable_sync(c, ["todos"])
    assert c.execute("SELECT hex(c1), typeof(c1) FROM _sync_ops WHERE tid != 0").fetchall() == [("FF61", "text")]
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("INSERT INTO todos VALUES (1, 'x', 0, 0)")
    sync(a, b, tmp_path)
    a.execute("UPDATE todos SET title = CAST(x'41ff42' AS TEXT) WHERE id = 1")
    b.execute("UPDATE todos SET title = CAST(x'43ff44' AS TEXT) WHERE id = 1")
    b.text_factory = a.text_factory = c.text_factory
    sync(a, b, tmp_path)
    sync(b, a, tmp_path)
    select = "SELECT hex(title), typeof(title) FROM todos"
    assert a.execute(select).fetchall() == b.execute(select).fetchall()
    (conflict,) = list_conflicts(b)
    # Keep the version the table does not hold: it is written from Python.
    current = conflict["current"]["title"]
    version = next(v for v in conflict["versions"] if v["values"]["title"][0] != current[0])
    resolve_conflict(b, conflict["id"], keep=version["op"])
    kept = b.execute(select).fetchall()
    assert kept == [("41FF42" if version["values"]["title"][0] == "A" else "43FF44", "text")]
    sync(b, a, tmp_path)
    assert a.execute(select).fetchall() == kept
