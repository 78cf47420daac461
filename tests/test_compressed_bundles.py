"""Compressed bundles (the header's "codec"), and chunk images built by SQL.

Bundles are written with their chunk images compressed (zstd); bundles without a codec, as
every version before wrote them, still import; a codec this version does not know, and a
compressed chunk that would decompress beyond what it declares or beyond MAX_RATIO times its
own size (a decompression bomb), are refused with one line, the database left as it was.
"""

from __future__ import annotations

import pathlib
import random
import shutil
import threading
import sqlite3

import msgpack
import pytest
import zstandard

from sqlite_utils_sync import BundleError, api, bundle, codec, enable_sync, export_bundle, import_bundle

OLD_BUNDLE = pathlib.Path(__file__).parent / "bundles" / "format2-uncompressed.bundle"


@pytest.fixture(scope="session")
def cli_refusal(run, file_bytes):
    """The real CLI's import: exit 1, one line and no traceback, the database byte-identical;
    returns the line."""

    def cli_refusal(db: pathlib.Path, bundle: pathlib.Path) -> str:
        before = file_bytes(db)
        result = run(["sqlite-utils", "import-bundle", db, bundle], check=False)
        assert result.returncode == 1, result.stderr[-2000:]
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
        assert file_bytes(db) == before
        return result.stderr.strip()

    return cli_refusal


def chunks(path) -> list[bytes]:
    bundle = sqlite3.connect(path)
    try:
        return [data for (data,) in bundle.execute("SELECT data FROM bundle_chunks ORDER BY id")]
    finally:
        bundle.close()


def bundle_format(path) -> str:
    bundle = sqlite3.connect(path)
    try:
        return bundle.execute("SELECT value FROM bundle_meta WHERE key = 'format'").fetchone()[0]
    finally:
        bundle.close()


def header(path) -> dict:
    bundle = sqlite3.connect(path)
    try:
        return msgpack.unpackb(bundle.execute("SELECT data FROM bundle_header").fetchone()[0])
    finally:
        bundle.close()


def todos(conn) -> list[tuple]:
    """Every row with its types; TEXT as its bytes (some is not UTF-8)."""
    return conn.execute(
        "SELECT id, CAST(title AS BLOB), typeof(title), done, typeof(done), score, typeof(score) FROM todos ORDER BY id"
    ).fetchall()


def ops(image: bytes) -> list[tuple]:
    conn = sqlite3.connect(":memory:")
    conn.text_factory = bytes
    try:
        conn.deserialize(image)
        return conn.execute("SELECT *, typeof(moved) FROM ops ORDER BY seq").fetchall()
    finally:
        conn.close()


def busy_table(conn) -> None:
    """Runs of well over a hundred operations: inserts, updates, a key move, deletes, TEXT
    that is not UTF-8, a BLOB."""
    conn.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(1, 301)])
    conn.execute("UPDATE todos SET done = 1, score = NULL WHERE id % 3 = 0")
    conn.execute("UPDATE todos SET id = 5000 WHERE id = 7")
    conn.execute("DELETE FROM todos WHERE id % 10 = 0")
    conn.execute("UPDATE todos SET title = CAST(x'ff00e9' AS TEXT) WHERE id = 11")
    conn.execute("UPDATE todos SET title = x'00ff' WHERE id = 12")


def test_bundles_are_compressed_by_default_and_import_as_they_are(tmp_path, make_db, rows):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    busy_table(a)
    exported = export_bundle(a, tmp_path / "zstd.bundle")
    export_bundle(a, tmp_path / "plain.bundle", codec=None)
    assert header(tmp_path / "zstd.bundle")["codec"] == "zstd"
    assert "codec" not in header(tmp_path / "plain.bundle")
    # A new format name: a reader from before compression refuses the bundle as an unknown
    # format, in one line, instead of failing on a chunk it cannot open.
    assert bundle_format(tmp_path / "zstd.bundle") == "datasette-sync-bundle/3"
    assert bundle_format(tmp_path / "plain.bundle") == "datasette-sync-bundle/2"
    stored = chunks(tmp_path / "zstd.bundle")
    assert all(data.startswith(codec.ZSTD_MAGIC) for data in stored)
    assert sum(map(len, stored)) * 3 < sum(map(len, chunks(tmp_path / "plain.bundle")))
    assert import_bundle(b, str(tmp_path / "zstd.bundle")).applied == exported.operations > 400
    assert todos(b) == todos(a)


def test_a_bundle_written_before_compression_still_imports(tmp_path, make_db, rows):
    # Written by the exporter before the codec existed (no "codec" key, chunks as they are):
    # 150 todos, every third done, 7 moved to 1000, every tenth deleted, one TEXT not UTF-8.
    assert "codec" not in header(OLD_BUNDLE) and bundle_format(OLD_BUNDLE) == "datasette-sync-bundle/2"
    b = make_db(tmp_path / "b.db")
    result = import_bundle(b, str(OLD_BUNDLE))
    assert (result.applied, result.conflicts) == (218, 0)
    assert b.execute("SELECT count(*), sum(id), sum(done), total(score) FROM todos").fetchone() == (135, 12118, 46, 2529.5)
    assert b.execute("SELECT CAST(title AS BLOB), typeof(title) FROM todos WHERE id = 2000").fetchone() == (
        b"\xff\x00\xe9", "text",
    )


def test_chunks_built_by_sql_hold_exactly_what_row_by_row_ones_do(tmp_path, make_db):
    # An export inside the caller's transaction cannot attach the scratch schema: it builds
    # every chunk row by row, as exports did before; both must say the same, byte for byte.
    a = make_db(tmp_path / "a.db")
    busy_table(a)
    # A second table: runs of both, long and short, in turn.
    a.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    enable_sync(a, ["notes"])
    a.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"note {i}") for i in range(1, 201)])
    for i in range(1, 41):
        a.execute("UPDATE notes SET body = 'again' WHERE id = ?", [i])
        a.execute("UPDATE todos SET done = 2 WHERE id = ?", [i])
    a.execute("UPDATE todos SET score = 1.5")
    a.execute("UPDATE notes SET body = body || '!'")
    export_bundle(a, tmp_path / "sql.bundle", codec=None)
    a.execute("BEGIN")
    export_bundle(a, tmp_path / "rows.bundle", codec=None)
    a.execute("ROLLBACK")
    by_sql, by_row = chunks(tmp_path / "sql.bundle"), chunks(tmp_path / "rows.bundle")
    assert len(by_sql) == len(by_row) and any(len(data) > 4096 for data in by_sql)
    assert [ops(data) for data in by_sql] == [ops(data) for data in by_row]


def test_a_large_export_stores_its_chunks_in_order_and_stops_cleanly(tmp_path, make_db, rows, file_bytes):
    # Past CHUNK_OPS operations an export stores each chunk on a thread while SQLite builds
    # the next: the chunks must come out as the row-by-row export makes them, in order, and
    # an export stopped midway must leave the old bundle and nothing else.
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("BEGIN")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(1, 12_001)])
    a.execute("COMMIT")
    a.execute("UPDATE todos SET done = 1 WHERE id % 7 = 0")
    exported = export_bundle(a, tmp_path / "sql.bundle")
    a.execute("BEGIN")
    export_bundle(a, tmp_path / "rows.bundle")
    a.execute("ROLLBACK")
    by_sql = chunks(tmp_path / "sql.bundle")
    assert len(by_sql) >= 3 and by_sql == chunks(tmp_path / "rows.bundle")
    assert import_bundle(b, str(tmp_path / "sql.bundle")).applied == exported.operations
    assert rows(b) == rows(a)

    before, files = file_bytes(tmp_path / "sql.bundle"), sorted(tmp_path.iterdir())
    a.execute("UPDATE todos SET score = 0")
    seen = []

    def progress(done: int, total: int) -> None:
        seen.append(done)
        if len(seen) == 2:
            raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        export_bundle(a, tmp_path / "sql.bundle", progress=progress)
    assert file_bytes(tmp_path / "sql.bundle") == before
    assert sorted(tmp_path.iterdir()) == files


def test_a_large_export_builds_every_other_chunk_on_a_second_connection_with_the_same_result(
    tmp_path, make_db, rows, monkeypatch
):
    # An export that holds the write lock and wrote nothing builds chunks on a second
    # connection too, guessing where each starts; runs of two tables that end short of
    # CHUNK_OPS, and a second device's operations, make some guesses wrong. The bundle must be
    # the one a single connection makes (here: row by row, inside the caller's transaction).
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    for conn in (a, b):
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        enable_sync(conn, ["notes"])
    b.execute("BEGIN")
    b.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"from b {i}") for i in range(100_001, 107_001)])
    b.execute("COMMIT")
    export_bundle(b, tmp_path / "b.bundle")
    import_bundle(a, str(tmp_path / "b.bundle"))
    a.execute("BEGIN")
    next_id = 1
    for todos, notes in ((12_000, 300), (7_500, 50), (4_999, 5_001), (10_000, 0)):
        a.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(next_id, next_id + todos)])
        a.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"note {i}") for i in range(next_id, next_id + notes)])
        next_id += todos + notes
    a.execute("COMMIT")
    export_bundle(a, tmp_path / "settles.bundle")  # the first export settles the new clocks
    taken = []
    real_take = bundle.PeerBuilder.take
    monkeypatch.setattr(bundle.PeerBuilder, "take", lambda self, op, tid: taken.append(real_take(self, op, tid)) or taken[-1])
    exported = export_bundle(a, tmp_path / "two.bundle")
    built_there = sum(made is not None for made in taken)
    a.execute("BEGIN")
    export_bundle(a, tmp_path / "one.bundle")
    a.execute("ROLLBACK")
    assert built_there >= 3 and len(taken) > built_there  # some guesses were used, some were not
    assert chunks(tmp_path / "two.bundle") == chunks(tmp_path / "one.bundle")
    c = make_db(tmp_path / "c.db")
    c.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    enable_sync(c, ["notes"])
    assert import_bundle(c, str(tmp_path / "two.bundle")).applied == exported.operations
    assert rows(c) == rows(a) and rows(c, "notes") == rows(a, "notes")


def test_while_the_second_connection_is_behind_the_exporting_one_builds_ahead_with_the_same_result(
    tmp_path, make_db, rows, monkeypatch
):
    # The second connection builds nothing until the exporting one has built a chunk ahead
    # (the one after those queued there): the exporting connection must then use its own
    # image when it gets there, and every chunk must still be the one a single connection makes.
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("BEGIN")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(1, 40_001)])
    a.execute("COMMIT")
    export_bundle(a, tmp_path / "settles.bundle")
    built_ahead = threading.Event()
    by_exporter, real_sql_image = [], bundle.sql_image

    def sql_image(conn, columns, run, clock_fixes):
        if conn is a:
            by_exporter.append(run[0])
            if len(by_exporter) >= 2:
                built_ahead.set()
        else:
            assert built_ahead.wait(60)
        return real_sql_image(conn, columns, run, clock_fixes)

    monkeypatch.setattr(bundle, "sql_image", sql_image)
    exported = export_bundle(a, tmp_path / "two.bundle")
    monkeypatch.setattr(bundle, "sql_image", real_sql_image)
    first = min(by_exporter)
    assert by_exporter[:2] == [first, first + 3 * bundle.CHUNK_OPS]  # its own chunk, then one ahead
    assert len(chunks(tmp_path / "two.bundle")) == 8 > len(by_exporter)
    a.execute("BEGIN")
    export_bundle(a, tmp_path / "one.bundle")
    a.execute("ROLLBACK")
    assert chunks(tmp_path / "two.bundle") == chunks(tmp_path / "one.bundle")
    assert import_bundle(b, str(tmp_path / "two.bundle")).applied == exported.operations == 40_000
    assert rows(b) == rows(a)


def peers_opened(monkeypatch) -> list:
    """What each export's ``PeerBuilder.open`` returned (None: refused), in order."""
    opened, real_open = [], bundle.PeerBuilder.open
    monkeypatch.setattr(bundle.PeerBuilder, "open", lambda conn, *args: opened.append(real_open(conn, *args)) or opened[-1])
    return opened


def settled_wal_log(tmp_path, make_db, n: int) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """``a.db`` in WAL mode with ``n`` todos, exported once (which settles their clocks), and an
    empty ``b.db``."""
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("PRAGMA journal_mode = WAL")
    a.execute("BEGIN")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(1, n + 1)])
    a.execute("COMMIT")
    export_bundle(a, tmp_path / "settles.bundle")
    return a, b


def test_only_an_export_that_holds_the_write_lock_builds_on_a_second_connection(tmp_path, make_db, rows, monkeypatch):
    # A read-only connection's BEGIN IMMEDIATE takes no write lock: in WAL mode another
    # connection may commit (a compaction, say) between its snapshot and a second
    # connection's, so such an export must build every chunk itself.
    a, b = settled_wal_log(tmp_path, make_db, 12_000)
    opened = peers_opened(monkeypatch)
    export_bundle(a, tmp_path / "writable.bundle")
    assert len(opened) == 1 and opened[0] is not None
    read_only = sqlite3.connect(f"{(tmp_path / 'a.db').as_uri()}?mode=ro", uri=True, isolation_level=None)
    exported = export_bundle(read_only, tmp_path / "read-only.bundle")
    read_only.close()
    assert len(opened) == 1
    assert chunks(tmp_path / "read-only.bundle") == chunks(tmp_path / "writable.bundle")
    assert import_bundle(b, str(tmp_path / "read-only.bundle")).applied == exported.operations == 12_000
    assert rows(b) == rows(a)


def test_a_hub_export_on_a_read_only_connection_builds_on_two_and_lets_writers_in_once_both_read(
    tmp_path, make_db, rows, monkeypatch
):
    # A hub exports on a read-only connection, without repair. Writers are held off only until
    # the second connection has begun reading: a push that commits during the export goes in
    # at once and is not in the bundle, which is the one a single connection makes.
    a, b = settled_wal_log(tmp_path, make_db, 30_000)
    hub = sqlite3.connect(f"{(tmp_path / 'a.db').as_uri()}?mode=ro", uri=True, isolation_level=None)
    hub.row_factory = sqlite3.Row  # as Datasette's connections have it
    hub.execute("BEGIN")  # inside the caller's transaction: one connection, row by row
    export_bundle(hub, tmp_path / "one.bundle", repair=False)
    hub.execute("ROLLBACK")
    pusher = sqlite3.connect(tmp_path / "a.db", isolation_level=None, timeout=0)
    opened, pushed = [], []
    real_open, real_take = bundle.PeerBuilder.open, bundle.PeerBuilder.take

    def open_while_writers_wait(conn, *args):
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            pusher.execute("INSERT INTO todos VALUES (30002, 'too early', 0, 0)")
        opened.append(real_open(conn, *args))
        return opened[-1]

    monkeypatch.setattr(bundle.PeerBuilder, "open", open_while_writers_wait)

    def take(self, op, tid):
        if not pushed:  # fails (database is locked) if writers are still held off
            pusher.execute("INSERT INTO todos VALUES (30001, 'pushed meanwhile', 0, 0)")
            pushed.append(op)
        return real_take(self, op, tid)

    monkeypatch.setattr(bundle.PeerBuilder, "take", take)
    exported = export_bundle(hub, tmp_path / "two.bundle", repair=False)
    assert len(opened) == 1 and opened[0] is not None and pushed
    assert exported.operations == 30_000
    assert chunks(tmp_path / "two.bundle") == chunks(tmp_path / "one.bundle")
    # While a writer is at work: no second connection, and no waiting for the writer.
    pusher.execute("BEGIN IMMEDIATE")
    assert export_bundle(hub, tmp_path / "busy.bundle", repair=False).operations == 30_001
    pusher.execute("ROLLBACK")
    assert len(opened) == 1
    hub.close()
    pusher.close()
    assert import_bundle(b, str(tmp_path / "two.bundle")).applied == 30_000
    assert rows(b) == rows(a)[:-1] and rows(a)[-1][2:4] == ("pushed meanwhile", "text")


def test_a_hub_export_looks_for_unsettled_clocks_after_letting_writers_in(tmp_path, make_db, rows, monkeypatch):
    # Local operations nobody settled yet (written past the engine, as Datasette's row API
    # does) are sent with settled clocks; finding them scans each of them, so writers must
    # not wait for it (it held them off for 0.53 s of a 0.80 s export of 1M ops).
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("PRAGMA journal_mode = WAL")
    a.execute("BEGIN")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(1, 12_001)])
    a.execute("COMMIT")
    pusher = sqlite3.connect(tmp_path / "a.db", isolation_level=None, timeout=0)
    real_unsettled = api.unsettled_clocks

    def while_a_push_commits(conn):
        pusher.execute("INSERT INTO todos VALUES (20000, 'pushed meanwhile', 0, 0)")  # database is locked if held off
        return real_unsettled(conn)

    opened = peers_opened(monkeypatch)
    monkeypatch.setattr(api, "unsettled_clocks", while_a_push_commits)
    hub = sqlite3.connect(f"{(tmp_path / 'a.db').as_uri()}?mode=ro", uri=True, isolation_level=None)
    hub.row_factory = sqlite3.Row
    assert export_bundle(hub, tmp_path / "hub.bundle", repair=False).operations == 12_000
    hub.close()
    pusher.close()
    assert len(opened) == 1 and opened[0] is not None
    assert import_bundle(b, str(tmp_path / "hub.bundle")).applied == 12_000
    assert rows(b) == rows(a)[:-1]


def test_an_export_of_an_immutable_file_takes_no_lock_and_builds_on_two(tmp_path, make_db, monkeypatch):
    # Datasette opens a file served with -i as immutable=1: nothing writes it, so no writer is
    # held off, and the second connection is opened the same way. A lock connection would
    # open it for writing: here, where a WAL was left beside it (its writer died), that
    # checkpointed the WAL into the file mid-export and deleted it.
    a, _ = settled_wal_log(tmp_path, make_db, 12_000)
    a.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    a.execute("PRAGMA wal_autocheckpoint = 0")
    a.execute("INSERT INTO todos VALUES (12001, 'only in the WAL', 0, 0)")
    for suffix in ("", "-wal"):
        shutil.copyfile(tmp_path / f"a.db{suffix}", tmp_path / f"served.db{suffix}")
    a.close()
    files = lambda: {p.name: p.read_bytes() for p in tmp_path.glob("served.db*")}  # noqa: E731
    before = files()
    opened = peers_opened(monkeypatch)
    served = sqlite3.connect(f"{(tmp_path / 'served.db').as_uri()}?immutable=1", uri=True, isolation_level=None)
    served.row_factory = sqlite3.Row
    assert export_bundle(served, tmp_path / "served.bundle", repair=False, immutable=True).operations == 12_000
    served.close()
    assert len(opened) == 1 and opened[0] is not None
    assert files() == before and "served.db-wal" in before


def test_a_guess_among_another_tables_operations_is_dropped_not_an_error(tmp_path, make_db, rows, monkeypatch):
    # While the second connection is behind, the exporting one builds the next guess itself.
    # After a run of todos comes a stretch of more than 5,000 notes: a guess inside it holds
    # no op of todos. It is dropped (it was a TypeError, a 500 on a hub), and the bundle is
    # still the one a single connection makes.
    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT);CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"
    a = make_db(tmp_path / "a.db", schema, ("todos", "notes"))
    b = make_db(tmp_path / "b.db", schema, ("todos", "notes"))
    a.execute("BEGIN")
    a.executemany("INSERT INTO todos VALUES (?, ?)", [(i, f"todo {i}") for i in range(1, 6_001)])
    a.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"note {i}") for i in range(1, 20_001)])
    a.executemany("INSERT INTO todos VALUES (?, ?)", [(i, f"todo {i}") for i in range(6_001, 7_001)])
    a.execute("COMMIT")
    export_bundle(a, tmp_path / "settles.bundle")
    a.execute("BEGIN")  # inside the caller's transaction: one connection
    export_bundle(a, tmp_path / "one.bundle", repair=False)
    a.execute("ROLLBACK")
    real_image = bundle.sql_image

    def slow_second_connection(conn, *args):
        if threading.current_thread() is not threading.main_thread():
            threading.Event().wait(0.05)
        return real_image(conn, *args)

    monkeypatch.setattr(bundle, "sql_image", slow_second_connection)
    hub = sqlite3.connect(f"{(tmp_path / 'a.db').as_uri()}?mode=ro", uri=True, isolation_level=None)
    hub.row_factory = sqlite3.Row
    assert export_bundle(hub, tmp_path / "two.bundle", repair=False).operations == 27_000
    hub.close()
    assert chunks(tmp_path / "two.bundle") == chunks(tmp_path / "one.bundle")
    assert import_bundle(b, str(tmp_path / "two.bundle")).applied == 27_000
    assert rows(b, "notes") == rows(a, "notes") and rows(b) == rows(a)


def test_a_long_run_of_large_values_still_makes_small_chunks(tmp_path, make_db, rows):
    # 120 values of 200 kB in one run: the image built by SQL passes its page limit, and the
    # run is split as a row-by-row export splits it (a chunk is held whole in memory).
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    noise = random.Random(14)
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(i, noise.randbytes(200_000)) for i in range(1, 121)])
    export_bundle(a, tmp_path / "big.bundle")
    sizes = [len(data) for data in chunks(tmp_path / "big.bundle")]
    assert len(sizes) >= 3 and max(sizes) < 8 * 1024 * 1024 + 64 * 1024
    assert import_bundle(b, str(tmp_path / "big.bundle")).applied == 120
    assert rows(b) == rows(a)


def lying_frame(content: bytes, declared: int) -> bytes:
    """A zstd frame of ``content`` whose header declares ``declared`` bytes."""
    frame = bytearray(zstandard.ZstdCompressor(level=1).compress(content))
    descriptor = frame[4]
    width = {0: 1 if descriptor & 0x20 else 0, 1: 2, 2: 4, 3: 8}[descriptor >> 6]
    assert width == 4, "content sized so that the frame declares it in four bytes"
    at = 5 + (0 if descriptor & 0x20 else 1) + (0, 1, 2, 4)[descriptor & 3]
    frame[at : at + 4] = declared.to_bytes(4, "little")
    return bytes(frame)


def replace_first_chunk(conn, data: bytes, craft) -> None:
    first = conn.execute("SELECT min(id) FROM bundle_chunks WHERE tbl >= 0").fetchone()[0]
    conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [data, first])
    craft.reseal(conn)


BOMBS = {
    # 64 MB of zeros in a frame of a few kB: refused before a byte is decompressed.
    "declares 64 MB": (
        lambda image: zstandard.ZstdCompressor(level=1).compress(b"\0" * (64 << 20)),
        "more than 64 times its size",
    ),
    # 40 MB from a frame of about 5 MB (within the ratio): refused before a byte is
    # decompressed, as more than any image a writer compresses.
    "declares 40 MB within the ratio": (
        lambda image: zstandard.ZstdCompressor(level=1).compress(
            random.Random(7).randbytes(40 << 20).translate(bytes(b % 2 for b in range(256)))
        ),
        "more than the 33554432 a writer compresses",
    ),
    # Declares the image's size but holds 20 MB more: zstd stops at the declared size.
    "holds more than it declares": (
        lambda image: lying_frame(image + b"\0" * (20 << 20), len(image)),
        "cannot be decompressed",
    ),
    "declares no size": (
        lambda image: zstandard.ZstdCompressor(write_content_size=False).compress(image),
        "does not declare its size",
    ),
    "not a frame": (lambda image: b"\x00\x01" + image[:100], "not a zstd frame"),
    "a damaged frame": (
        lambda image: (lambda f: f[:12] + bytes(b ^ 0x5A for b in f[12:40]) + f[40:])(codec.pack(image, "zstd")),
        "cannot be decompressed",
    ),
}


@pytest.mark.parametrize("name", BOMBS)
def test_crafted_compressed_chunks_are_refused_in_one_line(tmp_path, make_db, craft, file_bytes, cli_refusal, name):
    make, message = BOMBS[name]
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    busy_table(a)
    path = tmp_path / "crafted.bundle"
    export_bundle(a, path)
    image = codec.unpack(chunks(path)[0], "zstd", "x")
    craft.rewrite(path, lambda conn: replace_first_chunk(conn, make(image), craft))
    before = file_bytes(tmp_path / "b.db")
    with pytest.raises(BundleError) as caught:
        import_bundle(b, str(path))
    assert caught.value.reason == "invalid_operation"
    assert str(caught.value).startswith("Bundle crafted.bundle has a chunk that cannot be decompressed")
    assert message in str(caught.value)
    b.close()
    assert file_bytes(tmp_path / "b.db") == before
    assert cli_refusal(tmp_path / "b.db", path) == f"Error: {caught.value}"


def test_an_unknown_codec_is_refused_in_one_line(tmp_path, make_db, craft, file_bytes, cli_refusal):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    busy_table(a)
    path = tmp_path / "future.bundle"
    export_bundle(a, path)

    def future(conn):
        craft.edit_header(conn, lambda h: h.update(codec="lz4"))
        craft.reseal(conn)

    craft.rewrite(path, future)
    before = file_bytes(tmp_path / "b.db")
    with pytest.raises(BundleError) as caught:
        import_bundle(b, str(path))
    assert caught.value.reason == "unsupported_format"
    assert str(caught.value) == (
        "Bundle future.bundle has chunks compressed with 'lz4', which this version cannot read (it reads zstd)"
    )
    b.close()
    assert file_bytes(tmp_path / "b.db") == before
    assert cli_refusal(tmp_path / "b.db", path) == f"Error: {caught.value}"


@pytest.mark.parametrize("fmt, change", [("datasette-sync-bundle/2", None), ("datasette-sync-bundle/3", "drop")])
def test_a_format_that_disagrees_with_the_codec_is_refused(tmp_path, make_db, craft, file_bytes, fmt, change):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    busy_table(a)
    path = tmp_path / "mixed.bundle"
    export_bundle(a, path)

    def mix(conn):
        conn.execute("UPDATE bundle_meta SET value = ? WHERE key = 'format'", [fmt])
        if change == "drop":
            craft.edit_header(conn, lambda h: h.pop("codec"))
        craft.reseal(conn)

    craft.rewrite(path, mix)
    before = file_bytes(tmp_path / "b.db")
    with pytest.raises(BundleError) as caught:
        import_bundle(b, str(path))
    assert caught.value.reason == "invalid_metadata"
    assert "disagree" in str(caught.value) and "mixed.bundle" in str(caught.value)
    b.close()
    assert file_bytes(tmp_path / "b.db") == before
