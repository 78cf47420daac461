"""Compressed bundles (the header's "codec"), and chunk images built by SQL.

Bundles are written with their chunk images compressed (zstd); bundles without a codec, as
every version before wrote them, still import; a codec this version does not know, and a
compressed chunk that would decompress beyond what it declares or beyond MAX_RATIO times its
own size (a decompression bomb), are refused with one line, the database left as it was.
"""

from __future__ import annotations

import pathlib
import random
import sqlite3

import msgpack
import pytest
import zstandard

from sqlite_utils_sync import BundleError, codec, enable_sync, export_bundle, import_bundle

from conftest import chunks

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
    refused_as_a_format(
        b, tmp_path / "b.db", path, file_bytes, cli_refusal,
        "Bundle future.bundle has chunks compressed with 'lz4', which this version cannot read (it reads zstd)",
    )


def refused_as_a_format(conn, db_path, bundle, file_bytes, cli_refusal, message: str) -> None:
    """The library and the real CLI refuse ``bundle`` with ``unsupported_format`` and exactly
    ``message``, the database byte-identical."""
    before = file_bytes(db_path)
    with pytest.raises(BundleError) as caught:
        import_bundle(conn, str(bundle))
    assert caught.value.reason == "unsupported_format"
    assert str(caught.value) == message
    conn.close()
    assert file_bytes(db_path) == before
    assert cli_refusal(db_path, bundle) == f"Error: {caught.value}"


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


def test_a_bundle_of_the_first_format_is_refused_as_a_format_not_as_a_damaged_file(tmp_path, make_db, file_bytes, cli_refusal):
    """Format 1 laid out its chunks otherwise (no device or table per chunk): the refusal says
    which format it is, as for any format this version does not read."""
    b = make_db(tmp_path / "b.db")
    path = tmp_path / "first.bundle"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE bundle_meta (key TEXT PRIMARY KEY, value)")
    old.execute("CREATE TABLE bundle_header (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    old.execute("CREATE TABLE bundle_chunks (id INTEGER PRIMARY KEY, data BLOB NOT NULL)")
    old.executemany("INSERT INTO bundle_meta VALUES (?, ?)", [("format", "datasette-sync-bundle/1"), ("sha256", "0" * 64)])
    old.commit()
    old.close()
    refused_as_a_format(
        b, tmp_path / "b.db", path, file_bytes, cli_refusal,
        "Bundle first.bundle has format 'datasette-sync-bundle/1', expected datasette-sync-bundle/3 or datasette-sync-bundle/2",
    )
