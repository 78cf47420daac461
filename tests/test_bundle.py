"""Bundle files: export and import are idempotent, a delta follows a vector clock or what the
receiver acknowledged, a gap is refused, chunks stay small, and an import is all or nothing.
Bundles made to hurt are in test_hostile_bundles.py and test_fuzz_bundles.py."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import sqlite_utils

from sqlite_utils_sync import export_bundle, import_bundle, sync_status

from conftest import chunks


def test_same_bundle_twice_is_skipped_and_overlap_counts_duplicates(tmp_path, pair, file_bytes, rows):
    a, b = pair
    export_bundle(a, tmp_path / "first.bundle")
    assert import_bundle(b, tmp_path / "first.bundle").applied == 7
    b.execute("INSERT INTO todos VALUES (50, 'local, not yet sent', 0, 0)")
    before = file_bytes(tmp_path / "b.db")
    again = import_bundle(b, tmp_path / "first.bundle")
    assert again.skipped and again.applied == 0
    assert file_bytes(tmp_path / "b.db") == before  # not even bookkeeping changed
    assert import_bundle(b, tmp_path / "first.bundle", alter=True).skipped  # nothing to add either
    assert file_bytes(tmp_path / "b.db") == before
    a.execute("INSERT INTO todos VALUES (100, 'new', 0, 0)")
    export_bundle(a, tmp_path / "overlap.bundle")  # everything again, plus one
    overlap = import_bundle(b, tmp_path / "overlap.bundle")
    assert (overlap.applied, overlap.duplicates, overlap.skipped) == (1, 7, False)
    assert rows(b) == sorted(rows(a) + [(50, "integer", "local, not yet sent", "text", 0, "integer", 0.0, "real")])


def test_empty_delta_is_a_valid_bundle(tmp_path, pair, sync):
    a, b = pair
    sync(a, b, tmp_path)
    result = export_bundle(a, tmp_path / "empty.bundle", since=sync_status(b)["clock"])
    assert result.operations == 0
    imported = import_bundle(b, tmp_path / "empty.bundle")
    assert imported.applied == 0 and not imported.skipped


def test_a_one_op_delta_export_does_the_same_work_from_a_ten_times_longer_log(tmp_path, make_db):
    # Deltas are O(delta): the SQLite work of exporting one new operation, counted in VM
    # instructions by a progress handler (no timing), does not grow with the log. A scan of
    # the longer log would add over 45,000 rows' worth.
    def delta_work(n: int) -> int:
        conn = make_db(tmp_path / f"{n}.db")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(1, n + 1)])
        conn.execute("COMMIT")
        export_bundle(conn, tmp_path / f"all-{n}.bundle")  # settles the captured clocks, once
        since = sync_status(conn)["clock"]
        conn.execute("INSERT INTO todos VALUES (?, 'one more', 0, 0)", [n + 1])
        work = [0]

        def count() -> int:
            work[0] += 1
            return 0

        conn.set_progress_handler(count, 100)
        assert export_bundle(conn, tmp_path / f"delta-{n}.bundle", since=since).operations == 1
        conn.set_progress_handler(None, 0)
        conn.close()
        return work[0] * 100

    short, long = delta_work(5_000), delta_work(50_000)
    assert long <= short * 1.1 + 1_000, (short, long)


def test_a_to_b_to_a_is_a_no_op(tmp_path, pair, rows, sync):
    a, b = pair
    sync(a, b, tmp_path)
    before = rows(a)
    back = sync(b, a, tmp_path)
    assert rows(a) == before
    # B had nothing of its own except its knowledge tick: no data, no new capture on A.
    assert a.execute("SELECT count(*) FROM _sync_ops WHERE kind != 3").fetchone()[0] == 7
    assert back.conflicts == 0
    # And a second round moves nothing at all.
    assert export_bundle(a, tmp_path / "n.bundle", since=sync_status(b)["clock"]).operations == 0
    assert export_bundle(b, tmp_path / "n.bundle", since=sync_status(a)["clock"]).operations == 0


def test_lost_bundle_is_sent_again_by_acknowledgement(tmp_path, pair, rows, run_cli, sync):
    a, b = pair
    sync(a, b, tmp_path)
    sync(b, a, tmp_path)  # A learns what B has acknowledged
    b_id = sync_status(b)["device_id"]
    a.execute("INSERT INTO todos VALUES (50, 'lost in the mail', 0, 0)")
    export_bundle(a, tmp_path / "lost.bundle", for_device=b_id)  # never delivered
    a.execute("INSERT INTO todos VALUES (51, 'second', 0, 0)")
    result = run_cli("export-bundle", tmp_path / "a.db", tmp_path / "next.bundle", "--for", b_id, "--json")
    assert json.loads(result.output)["operations"] == 2
    import_bundle(b, tmp_path / "next.bundle")
    assert rows(b) == rows(a)


def test_the_first_export_for_a_device_sends_everything(tmp_path, pair, rows, run_cli):
    a, b = pair
    b_id = sync_status(b)["device_id"]  # nothing of B was ever imported into A
    result = run_cli("export-bundle", tmp_path / "a.db", tmp_path / "first.bundle", "--for", b_id, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["operations"] == 7  # every todo of a.db
    import_bundle(b, tmp_path / "first.bundle")
    assert rows(b) == rows(a)


def test_since_takes_the_receivers_sync_status_output(tmp_path, pair, rows, run_cli, sync):
    a, b = pair
    sync(a, b, tmp_path)
    a.execute("INSERT INTO todos VALUES (60, 'new since', 0, 0)")
    status = run_cli("sync-status", tmp_path / "b.db", "--json").output
    result = run_cli("export-bundle", tmp_path / "a.db", tmp_path / "d.bundle", "--since", status, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["operations"] == 1
    import_bundle(b, tmp_path / "d.bundle")
    assert rows(b) == rows(a)


def test_since_takes_a_vector_clock(tmp_path, pair, run_cli):
    a, b = pair
    device = sync_status(a)["device_id"]
    result = run_cli("export-bundle", tmp_path / "a.db", tmp_path / "d.bundle", "--since", json.dumps({device: 5}), "--json")
    assert json.loads(result.output)["operations"] == 2
    bad = run_cli("export-bundle", tmp_path / "a.db", tmp_path / "d.bundle", "--since", "{nope")
    assert bad.exit_code == 1 and "--since is not valid JSON" in bad.output


def test_gap_in_a_devices_sequence_is_refused(tmp_path, pair, file_bytes, run_cli):
    a, b = pair
    device = sync_status(a)["device_id"]
    export_bundle(a, tmp_path / "late.bundle", since={device: 3})
    before = file_bytes(tmp_path / "b.db")
    result = run_cli("import-bundle", tmp_path / "b.db", tmp_path / "late.bundle")
    assert result.exit_code == 1
    assert f"starts device {device} at seq 4 but this database has only up to seq 0" in result.output
    assert "operations 1-3 are missing" in result.output
    assert file_bytes(tmp_path / "b.db") == before


def test_own_bundle_imported_back_changes_nothing(tmp_path, pair, file_bytes, run_cli):
    a, _ = pair
    export_bundle(a, tmp_path / "mine.bundle")
    before = file_bytes(tmp_path / "a.db")
    result = run_cli("import-bundle", tmp_path / "a.db", tmp_path / "mine.bundle")
    assert result.exit_code == 0
    assert "was exported by this database: nothing to do" in result.output
    assert file_bytes(tmp_path / "a.db") == before
    assert import_bundle(a, tmp_path / "mine.bundle").skipped


def test_large_values_make_small_chunks(tmp_path, make_db, rows):
    # A chunk is held whole in memory while it is written and read: big BLOBs make small ones.
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    photo = bytes(range(256)) * (12 * 1024)  # 3 MB
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(i, photo) for i in range(1, 7)])
    path = tmp_path / "photos.bundle"
    export_bundle(a, path)
    bundle = sqlite3.connect(path)
    sizes = [length for (length,) in bundle.execute("SELECT length(data) FROM bundle_chunks ORDER BY id")]
    bundle.close()
    assert len(sizes) == 3 and max(sizes) < 8 * 1024 * 1024 + 64 * 1024
    assert import_bundle(b, path).applied == 6
    assert rows(b) == rows(a)


def test_export_never_replaces_a_database_or_anything_but_an_old_bundle(tmp_path, pair, file_bytes, run_cli):
    a, b = pair
    (tmp_path / "notes.txt").write_text("mine")
    cases = {
        "a.db": "it exists and is not a bundle",  # the database itself
        "b.db": "it exists and is not a bundle",
        "notes.txt": "it exists and is not a bundle",
        "missing/x.bundle": "directory",
        "/dev/null": "it exists and is not a regular file",
    }
    for target, message in cases.items():
        path = target if target.startswith("/") else tmp_path / target
        before = file_bytes(path) if target.endswith((".db", ".txt")) else None
        result = run_cli("export-bundle", tmp_path / "a.db", path)
        assert result.exit_code == 1, target
        assert result.output.startswith(f"Error: Cannot write bundle {path}: ") and message in result.output
        assert result.output.count("\n") == 1
        if before is not None:
            assert file_bytes(path) == before
    for _ in range(2):  # an old bundle is replaced
        assert run_cli("export-bundle", tmp_path / "a.db", tmp_path / "x.bundle").exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "x.bundle").stat().st_mode & 0o777 == 0o666 & ~umask  # not private like a temp file
    assert import_bundle(b, tmp_path / "x.bundle").applied == 7


IMPORTER = """
import sqlite3, sys, time
from sqlite_utils_sync import import_bundle
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
# Slow the import down so it can be killed mid-way: sleep in a progress callback.
def progress(done, total):
    print("progress", flush=True)
    time.sleep(30)
import_bundle(conn, sys.argv[2], progress=progress)
"""


def test_killing_the_importer_midway_leaves_the_database_unchanged(tmp_path, make_db, rows):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, 't', 0, 0)", [(i,) for i in range(12000)])
    export_bundle(a, tmp_path / "big.bundle")
    b.close()
    process = subprocess.Popen(
        [sys.executable, "-c", IMPORTER, str(tmp_path / "b.db"), str(tmp_path / "big.bundle")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().strip() == "progress"  # a chunk is written, uncommitted
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    b = sqlite_utils.Database(tmp_path / "b.db").conn
    assert b.execute("SELECT count(*) FROM todos").fetchone()[0] == 0
    assert b.execute("SELECT count(*) FROM _sync_ops WHERE kind = 0").fetchone()[0] == 0
    result = import_bundle(b, tmp_path / "big.bundle")
    assert result.applied == 12000
    assert rows(b) == rows(a)


def test_tables_written_in_turn_go_in_one_chunk_per_table(tmp_path, make_db, rows):
    # A list and its first item in each transaction: every run is one operation long. Such
    # stretches go as one chunk per table (not one per operation); long runs around them,
    # and ones that start inside them, still go as runs of their own.
    schema = "CREATE TABLE lists (id INTEGER PRIMARY KEY, name TEXT); " + (
        "CREATE TABLE items (id INTEGER PRIMARY KEY, list INTEGER, title TEXT, done INTEGER)"
    )
    a = make_db(tmp_path / "a.db", schema, ("lists", "items"))
    a.execute("BEGIN")
    for i in range(1, 3001):
        a.execute("INSERT INTO lists VALUES (?, ?)", [i, f"list {i}"])
        a.execute("INSERT INTO items VALUES (?, ?, ?, 0)", [i, i, f"item {i}"])
    a.executemany("INSERT INTO items VALUES (?, 1, ?, 0)", [(i, f"more {i}") for i in range(3001, 3501)])
    for i in range(1, 41):
        a.execute("UPDATE lists SET name = 'renamed' WHERE id = ?", [i])
        a.execute("UPDATE items SET done = 1 WHERE id = ?", [i])
    a.execute("COMMIT")
    exported = export_bundle(a, tmp_path / "a.bundle")
    assert exported.operations == 6580
    # lists and items up to 5,000 operations, then to the long run, the long run, the updates.
    assert len(chunks(tmp_path / "a.bundle")) == 7
    assert exported.bytes < 20 * exported.operations
    b = make_db(tmp_path / "b.db", schema, ("lists", "items"))
    assert import_bundle(b, tmp_path / "a.bundle").applied == 6580
    for table in ("lists", "items"):
        assert rows(b, table) == rows(a, table)


def test_operations_of_tables_written_in_turn_kept_for_later_are_exactly_theirs(tmp_path, make_db):
    # A copy that syncs neither table yet keeps each table's operations for when it does; the
    # chunks of the two tables interleave, and each keeps only its own.
    schema = "CREATE TABLE lists (id INTEGER PRIMARY KEY, name TEXT); CREATE TABLE items (id INTEGER PRIMARY KEY, body TEXT)"
    a = make_db(tmp_path / "a.db", schema, ("lists", "items"))
    for i in range(1, 51):
        a.execute("INSERT INTO lists VALUES (?, ?)", [i, f"list {i}"])
        a.execute("INSERT INTO items VALUES (?, ?)", [i, f"item {i}"])
    export_bundle(a, tmp_path / "one.bundle")
    c = sqlite3.connect(tmp_path / "c.db", isolation_level=None)
    assert import_bundle(c, tmp_path / "one.bundle").not_applied == {"lists": 50, "items": 50}
    assert c.execute(
        "SELECT count(*) FROM _sync_unapplied u JOIN _sync_ops o USING (op) WHERE u.tid != o.tid"
    ).fetchone() == (0,)
    a.execute("INSERT INTO items VALUES (100, 'later')")
    export_bundle(a, tmp_path / "two.bundle", since=sync_status(c)["clock"])
    result = import_bundle(c, tmp_path / "two.bundle", create_tables=True)
    assert result.applied_by_table == {"items": 51}  # the 50 kept, and the new one
    assert c.execute("SELECT count(*) FROM items").fetchone() == (51,)


def test_importing_a_bundle_into_itself_is_refused_and_changes_nothing(tmp_path, make_db, run, file_bytes):
    make_db(tmp_path / "a.db").execute("INSERT INTO todos VALUES (1, 'milk', 0, 0)")
    run(["sqlite-utils", "export-bundle", tmp_path / "a.db", tmp_path / "a.bundle"])
    before = file_bytes(tmp_path / "a.bundle")
    result = run(["sqlite-utils", "import-bundle", tmp_path / "a.bundle", tmp_path / "a.bundle"], check=False)
    assert result.returncode == 1
    assert result.stderr == "Error: Bundle a.bundle is the database it would be imported into\n"
    assert file_bytes(tmp_path / "a.bundle") == before


def test_an_export_of_some_of_over_a_thousand_tables_answers(tmp_path, make_db):
    # The tables wanted were an OR chain in SQL, which SQLite refuses past 1,000 terms.
    from sqlite_utils_sync.bundle import stretches
    from sqlite_utils_sync.oplog import LOCAL, device_range

    conn = make_db(tmp_path / "a.db")
    conn.executemany("INSERT INTO todos VALUES (?, 'x', 0, 0)", [(i,) for i in range(1, 11)])
    found = list(stretches(conn, *device_range(LOCAL), set(range(1, 1500))))
    assert found and all(wanted for wanted, _, _ in found)
