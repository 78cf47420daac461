"""Bundles: idempotent, delta by acknowledgement, and bad input refused with nothing changed."""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
from click.testing import CliRunner
from sqlite_utils.cli import cli

from sqlite_utils_sync import BundleError, export_bundle, import_bundle, sync_status

from conftest import run
from sync_helpers import conflict_records, edit_chunks, edit_header, file_bytes, make_db, reseal, rewrite, rows, sync


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def pair(tmp_path):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0.5)", [(i, f"todo {i}") for i in range(1, 8)])
    return a, b


def test_export_import_cli_json_contract(tmp_path, pair):
    a, b = pair
    out = run_cli("export-bundle", tmp_path / "a.db", tmp_path / "x.bundle", "--json")
    exported = json.loads(out.output)
    assert set(exported) == {"bundle_id", "device_id", "operations", "bytes"}
    assert exported["operations"] == 7
    result = json.loads(run_cli("import-bundle", tmp_path / "b.db", tmp_path / "x.bundle", "--json").output)
    assert {k: result[k] for k in ("applied", "conflicts", "duplicates", "skipped")} == {
        "applied": 7,
        "conflicts": 0,
        "duplicates": 0,
        "skipped": False,
    }
    assert result["source_device_id"] == exported["device_id"]
    assert result["bundle_id"] == exported["bundle_id"]
    assert result["total_operations"] == 7
    assert rows(b) == rows(a)


def test_same_bundle_twice_is_skipped_and_overlap_counts_duplicates(tmp_path, pair):
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


def test_empty_delta_is_a_valid_bundle(tmp_path, pair):
    a, b = pair
    sync(a, b, tmp_path)
    result = export_bundle(a, tmp_path / "empty.bundle", since=sync_status(b)["clock"])
    assert result.operations == 0
    imported = import_bundle(b, tmp_path / "empty.bundle")
    assert imported.applied == 0 and not imported.skipped


def test_a_to_b_to_a_is_a_no_op(tmp_path, pair):
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


def test_lost_bundle_is_sent_again_by_acknowledgement(tmp_path, pair):
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


def test_since_takes_a_vector_clock(tmp_path, pair):
    a, b = pair
    device = sync_status(a)["device_id"]
    result = run_cli("export-bundle", tmp_path / "a.db", tmp_path / "d.bundle", "--since", json.dumps({device: 5}), "--json")
    assert json.loads(result.output)["operations"] == 2
    bad = run_cli("export-bundle", tmp_path / "a.db", tmp_path / "d.bundle", "--since", "{nope")
    assert bad.exit_code == 1 and "--since is not valid JSON" in bad.output


def test_gap_in_a_devices_sequence_is_refused(tmp_path, pair):
    a, b = pair
    device = sync_status(a)["device_id"]
    export_bundle(a, tmp_path / "late.bundle", since={device: 3})
    before = file_bytes(tmp_path / "b.db")
    result = run_cli("import-bundle", tmp_path / "b.db", tmp_path / "late.bundle")
    assert result.exit_code == 1
    assert f"starts device {device} at seq 4 but this database has only up to seq 0" in result.output
    assert "operations 1-3 are missing" in result.output
    assert file_bytes(tmp_path / "b.db") == before


def sealed(sql, *params):
    return lambda c: (edit_chunks(c, sql, *params), reseal(c))


FIRST = "WHERE seq = (SELECT min(seq) FROM ops)"

HOSTILE = {
    "tampered value": (
        lambda c: edit_chunks(c, f"UPDATE ops SET v1 = 'tampered' {FIRST}"),
        "hash_mismatch",
        "failed its integrity check",
    ),
    "internal table": (
        lambda c: (edit_header(c, lambda h: h["tables"][0].__setitem__(0, "_sync_devices")), reseal(c)),
        "internal_table",
        "operations on internal table '_sync_devices' are never accepted",
    ),
    "internal table under another case": (
        lambda c: (edit_header(c, lambda h: h["tables"][0].__setitem__(0, "_SYNC_Devices")), reseal(c)),
        "internal_table",
        "operations on internal table '_SYNC_Devices' are never accepted",
    ),
    "unknown column": (
        lambda c: (
            edit_header(c, lambda h: h["tables"][0][1].__setitem__(3, "secret")),
            reseal(c),
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
        lambda c: (edit_header(c, lambda h: h.__setitem__("operations", 5)), reseal(c)),
        "invalid_metadata",
        "its header counts 5 operations but it carries 7",
    ),
    "primary key marked as a dropped column": (
        lambda c: (edit_header(c, lambda h: h.__setitem__("dropped", {"todos": ["id"]})), reseal(c)),
        "invalid_metadata",
        "dropped-column list is invalid",
    ),
    "operation count out of range": (
        lambda c: (edit_header(c, lambda h: h.__setitem__("operations", 2**63)), reseal(c)),
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
        sealed("UPDATE ops SET seq = 77 WHERE seq = (SELECT min(seq) + 1 FROM ops)"),
        "missing_operations",
        "it lacks operation 2 of device",
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
    "chunk that is not a database": (
        lambda c: (c.execute("UPDATE bundle_chunks SET data = zeroblob(4096) WHERE id = 1"), reseal(c)),
        "invalid_operation",
        "has a chunk that",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_or_tampered_bundles_are_refused_and_change_nothing(tmp_path, pair, name):
    tamper, reason, message = HOSTILE[name]
    a, b = pair
    path = tmp_path / "x.bundle"
    export_bundle(a, path)
    rewrite(path, tamper)
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


def test_forged_dependency_clock_is_refused(tmp_path, pair):
    a, b = pair
    sync(a, b, tmp_path)
    b.execute("INSERT INTO todos VALUES (70, 'b', 0, 0)")
    path = tmp_path / "dep.bundle"
    export_bundle(b, path, since=sync_status(a)["clock"])

    def forge(conn):
        edit_chunks(conn, "UPDATE ops SET moved = ? WHERE kind = 3", json.dumps({"e" * 32: 5}), first_only=False)
        reseal(conn)

    rewrite(path, forge)
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
def test_garbage_files_are_refused(tmp_path, pair, content, message):
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


def test_truncated_bundle_is_refused(tmp_path, pair):
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


def test_bundle_is_opened_read_only_and_its_triggers_never_run(tmp_path, pair):
    a, b = pair
    path = tmp_path / "trap.bundle"
    export_bundle(a, path)
    rewrite(
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


def test_ops_for_a_table_not_synced_here_are_kept_not_applied(tmp_path):
    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL); CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"
    a = make_db(tmp_path / "a.db", schema, ("todos", "notes"))
    hub = make_db(tmp_path / "hub.db")  # syncs todos only, has no notes table
    c = make_db(tmp_path / "c.db", schema, ("todos", "notes"))
    a.execute("INSERT INTO notes VALUES (1, 'private')")
    a.execute("INSERT INTO todos VALUES (1, 'shared', 0, 0)")
    result = sync(a, hub, tmp_path)
    assert result.not_applied == {"notes": 1}
    assert not hub.execute("SELECT 1 FROM sqlite_master WHERE name = 'notes'").fetchone()
    out = run_cli("import-bundle", tmp_path / "hub.db", tmp_path / "b.bundle")
    assert out.exit_code == 0
    # Importing again with --alter creates the table and applies what was kept.
    out = run_cli("import-bundle", tmp_path / "hub.db", tmp_path / "b.bundle", "--alter")
    assert out.exit_code == 0
    assert hub.execute("SELECT id, body FROM notes").fetchall() == [(1, "private")]
    # The hub relays them onward.
    sync(hub, c, tmp_path)
    assert c.execute("SELECT body FROM notes").fetchall() == [("private",)]


def test_alter_adds_missing_columns_and_tables(tmp_path):
    a = make_db(tmp_path / "a.db")
    a.execute("ALTER TABLE todos ADD COLUMN due TEXT")
    a.execute("INSERT INTO todos VALUES (1, 'x', 0, 0, '2026-12-01')")
    fresh = sqlite3.connect(tmp_path / "fresh.db", isolation_level=None)
    export_bundle(a, tmp_path / "a.bundle")
    result = run_cli("import-bundle", tmp_path / "fresh.db", tmp_path / "a.bundle", "--alter", "--json")
    assert json.loads(result.output)["applied"] >= 1
    assert fresh.execute("SELECT id, title, due FROM todos").fetchall() == [(1, "x", "2026-12-01")]


def test_copied_database_is_detected_in_a_full_export(tmp_path, pair):
    import shutil

    a, b = pair
    sync(a, b, tmp_path)
    shutil.copy(tmp_path / "a.db", tmp_path / "copy.db")
    copy = sqlite3.connect(tmp_path / "copy.db", isolation_level=None)
    copy.execute("UPDATE todos SET title = 'edited on the copy' WHERE id = 2")
    a.execute("UPDATE todos SET title = 'edited on the original' WHERE id = 1")
    export_bundle(copy, tmp_path / "copy.bundle")  # everything, so the clash is among "duplicates"
    for receiver in ("a.db", "b.db"):
        if receiver == "b.db":
            sync(a, b, tmp_path)
        before = file_bytes(tmp_path / receiver)
        result = run_cli("import-bundle", tmp_path / receiver, tmp_path / "copy.bundle")
        assert result.exit_code == 1
        assert "differs from the copy here: two databases share that device id" in result.output
        assert file_bytes(tmp_path / receiver) == before


def test_own_bundle_imported_back_changes_nothing(tmp_path, pair):
    a, _ = pair
    export_bundle(a, tmp_path / "mine.bundle")
    before = file_bytes(tmp_path / "a.db")
    result = run_cli("import-bundle", tmp_path / "a.db", tmp_path / "mine.bundle")
    assert result.exit_code == 0
    assert "was exported by this database: nothing to do" in result.output
    assert file_bytes(tmp_path / "a.db") == before
    assert import_bundle(a, tmp_path / "mine.bundle").skipped


def test_copied_database_is_detected_and_can_get_a_new_identity(tmp_path, pair):
    import shutil

    a, b = pair
    sync(a, b, tmp_path)
    a.close()
    shutil.copy(tmp_path / "a.db", tmp_path / "copy.db")
    a = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    copy = sqlite3.connect(tmp_path / "copy.db", isolation_level=None)
    copy.execute("INSERT INTO todos VALUES (200, 'written on the copy', 0, 0)")
    a.execute("INSERT INTO todos VALUES (200, 'written on the original', 0, 0)")
    export_bundle(copy, tmp_path / "copy.bundle", since=sync_status(b)["clock"])
    import_bundle(b, tmp_path / "copy.bundle")
    with pytest.raises(BundleError, match="two databases share that device id") as error:
        sync(a, b, tmp_path)
    assert error.value.reason == "device_id_clash"

    fresh = tmp_path / "copy2.db"
    shutil.copy(tmp_path / "a.db", fresh)
    old_id = sync_status(a)["device_id"]
    result = run_cli("sync-new-device", fresh)
    new_id = result.output.strip()
    assert result.exit_code == 0 and len(new_id) == 32 and new_id != old_id
    copy2 = sqlite3.connect(fresh, isolation_level=None)
    assert sync_status(copy2)["device_id"] == new_id
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        copy2.execute("DELETE FROM _sync_ops")  # the log is still guarded after the move
    copy2.execute("INSERT INTO todos VALUES (300, 'copy2 edit', 0, 0)")
    c = make_db(tmp_path / "c.db")
    sync(a, c, tmp_path)
    sync(copy2, c, tmp_path)
    assert c.execute("SELECT title FROM todos WHERE id = 300").fetchone() == ("copy2 edit",)


def test_enabling_a_table_later_adopts_what_peers_wrote_instead_of_deleting_it(tmp_path):
    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL); CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"
    a = make_db(tmp_path / "a.db", schema, ("todos", "notes"))
    hub = make_db(tmp_path / "hub.db")
    a.executemany("INSERT INTO notes VALUES (?, ?)", [(1, "one"), (2, "two"), (3, "three")])
    sync(a, hub, tmp_path)
    a.execute("UPDATE notes SET body = 'TWO' WHERE id = 2")
    a.execute("DELETE FROM notes WHERE id = 3")
    sync(a, hub, tmp_path)
    # The hub starts syncing notes: it has one row of its own and one stale copy of a peer's row.
    hub.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    hub.executemany("INSERT INTO notes VALUES (?, ?)", [(2, "two"), (3, "three"), (9, "hub's own")])
    result = run_cli("enable-sync", tmp_path / "hub.db", "notes")
    assert result.exit_code == 0, result.output
    assert hub.execute("SELECT id, body FROM notes ORDER BY id").fetchall() == [(1, "one"), (2, "TWO"), (9, "hub's own")]
    c = make_db(tmp_path / "c.db", schema, ("todos", "notes"))
    sync(hub, c, tmp_path)
    sync(hub, a, tmp_path)
    for conn in (a, c):
        assert conn.execute("SELECT id, body FROM notes ORDER BY id").fetchall() == [(1, "one"), (2, "TWO"), (9, "hub's own")]


def run_on_a_terminal(*args):
    """Run a real sqlite-utils command with its stderr on a pseudo-terminal; return that output."""
    import os
    import pty
    import subprocess

    leader, follower = pty.openpty()
    process = subprocess.run(["sqlite-utils", *map(str, args)], stderr=follower, stdout=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_silent_hides_it(tmp_path):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, 't', 0, 0)", [(i,) for i in range(12000)])
    code, output = run_on_a_terminal("export-bundle", tmp_path / "a.db", tmp_path / "x.bundle")
    assert code == 0 and "Exporting" in output and "100%" in output
    code, output = run_on_a_terminal("import-bundle", tmp_path / "b.db", tmp_path / "x.bundle", "--silent")
    assert code == 0 and "Importing" not in output
    assert "Applied 12000 operation(s)" in output
    assert rows(b) == rows(a)


def test_reenabling_keeps_local_edits_made_while_disabled_and_adopts_what_arrived(tmp_path):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(1, "one"), (2, "two")])
    sync(a, b, tmp_path)  # b applies a's rows: a is their latest writer on b
    assert run_cli("disable-sync", tmp_path / "b.db", "todos").exit_code == 0
    b.execute("UPDATE todos SET title = 'edited on b while disabled' WHERE id = 1")
    a.execute("UPDATE todos SET title = 'TWO' WHERE id = 2")
    sync(a, b, tmp_path)  # kept, not applied
    assert b.execute("SELECT title FROM todos WHERE id = 2").fetchone() == ("two",)
    assert run_cli("enable-sync", tmp_path / "b.db", "todos").exit_code == 0
    assert b.execute("SELECT id, title FROM todos ORDER BY id").fetchall() == [
        (1, "edited on b while disabled"),
        (2, "TWO"),
    ]
    sync(b, a, tmp_path)
    assert rows(a) == rows(b)


def test_large_values_make_small_chunks(tmp_path):
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


def test_export_never_replaces_a_database_or_anything_but_an_old_bundle(tmp_path, pair):
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


def test_a_unique_value_taken_here_is_a_clear_error_and_a_way_on(tmp_path):
    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT UNIQUE)"
    a, b = make_db(tmp_path / "a.db", schema), make_db(tmp_path / "b.db", schema)
    a.execute("INSERT INTO todos VALUES (3, 'same')")
    b.execute("INSERT INTO todos VALUES (4, 'same')")
    export_bundle(a, tmp_path / "a.bundle")
    before = file_bytes(tmp_path / "b.db")
    result = run_cli("import-bundle", tmp_path / "b.db", tmp_path / "a.bundle")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("Error: Bundle a.bundle cannot be applied: UNIQUE constraint failed: todos.title")
    assert "If a row here holds that value, change it (the change syncs too) and import again" in result.output
    assert file_bytes(tmp_path / "b.db") == before
    assert not b.in_transaction
    b.execute("UPDATE todos SET title = 'same (phone)' WHERE id = 4")
    sync(a, b, tmp_path)
    sync(b, a, tmp_path)
    assert rows(a) == rows(b)
    assert a.execute("SELECT * FROM todos ORDER BY id").fetchall() == [(3, "same"), (4, "same (phone)")]


def test_commands_on_a_database_without_sync_or_with_an_empty_device_id_are_one_line(tmp_path, pair):
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    before = file_bytes(plain)
    for args, message in (
        (("sync-resolve", plain, "abc"), "Error: This database has no synced tables"),
        (("export-bundle", tmp_path / "a.db", tmp_path / "x.bundle", "--for", ""), "Error: --for takes a device id"),
    ):
        result = run_cli(*args)
        assert result.exit_code == 1 and result.output.startswith(message) and result.output.count("\n") == 1
    assert file_bytes(plain) == before
    assert not (tmp_path / "x.bundle").exists()


def test_text_that_is_not_utf8_travels_bit_identical(tmp_path, pair):
    # SQLite stores whatever bytes a client hands it as TEXT; sync carries them as they are.
    a, b = pair
    a.execute("INSERT INTO todos VALUES (50, CAST(x'ff00fe' AS TEXT), 0, 0)")
    a.execute("INSERT INTO todos VALUES (51, CAST(x'41ff42' AS TEXT), 0, 0)")
    result = run_cli("export-bundle", tmp_path / "a.db", tmp_path / "x.bundle")
    assert result.exit_code == 0, result.output
    assert import_bundle(b, tmp_path / "x.bundle").applied >= 2
    select = "SELECT id, hex(title), typeof(title) FROM todos WHERE id >= 50 ORDER BY id"
    assert b.execute(select).fetchall() == [(50, "FF00FE", "text"), (51, "41FF42", "text")]
    assert b.execute(select).fetchall() == a.execute(select).fetchall()


def test_an_untyped_key_column_elsewhere_may_send_integral_reals(tmp_path):
    a = make_db(tmp_path / "a.db", "CREATE TABLE todos (id PRIMARY KEY, title TEXT)")
    b = make_db(tmp_path / "b.db", "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT)")
    a.execute("INSERT INTO todos VALUES (2.0, 'two')")
    sync(a, b, tmp_path)
    assert b.execute("SELECT id, typeof(id), title FROM todos").fetchall() == [(2, "integer", "two")]


def test_unique_values_handed_between_rows_import_in_their_authors_order(tmp_path):
    # Reordering a list with a UNIQUE position column passes through a temporary value.
    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, position INTEGER UNIQUE)"
    a, b = make_db(tmp_path / "a.db", schema), make_db(tmp_path / "b.db", schema)
    a.executemany("INSERT INTO todos VALUES (?, ?, ?)", [(1, "milk", 1), (2, "eggs", 2), (3, "bread", 3)])
    sync(a, b, tmp_path)
    for position, row in ((-1, 1), (1, 3), (3, 2), (2, 1)):  # rotate: bread first, then milk, then eggs
        a.execute("UPDATE todos SET position = ? WHERE id = ?", [position, row])
    a.execute("UPDATE todos SET title = 'oat milk' WHERE id = 1")
    sync(a, b, tmp_path)
    assert rows(b) == rows(a)
    assert b.execute("SELECT title FROM todos ORDER BY position").fetchall() == [("bread",), ("oat milk",), ("eggs",)]


def test_an_ordered_import_keeps_concurrent_edits_that_win_here(tmp_path):
    import time

    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, position INTEGER UNIQUE, title TEXT)"
    a, b = make_db(tmp_path / "a.db", schema), make_db(tmp_path / "b.db", schema)
    a.executemany(
        "INSERT INTO todos VALUES (?, ?, ?)", [(1, 1, "milk"), (2, 2, "eggs"), (3, 3, "bread"), (4, 4, "tea")]
    )
    sync(a, b, tmp_path)
    a.execute("UPDATE todos SET title = 'from a' WHERE id = 1")
    a.execute("DELETE FROM todos WHERE id = 4")
    for position, row in ((-1, 2), (2, 3), (3, 2)):  # a swap: the import has to go in order
        a.execute("UPDATE todos SET position = ? WHERE id = ?", [position, row])
    time.sleep(0.01)
    b.execute("UPDATE todos SET title = 'from b, later' WHERE id = 1")  # wins on both sides
    b.execute("UPDATE todos SET title = 'kept by b' WHERE id = 4")  # update vs delete: the row stays
    sync(a, b, tmp_path)
    sync(b, a, tmp_path)
    assert rows(a) == rows(b)
    assert a.execute("SELECT id, position, title FROM todos ORDER BY id").fetchall() == [
        (1, 1, "from b, later"),
        (2, 3, "eggs"),
        (3, 2, "bread"),
        (4, 4, "kept by b"),
    ]
    assert conflict_records(a) == conflict_records(b)


def test_a_valid_merge_imports_even_when_the_authors_orders_cross(tmp_path):
    import time

    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, position INTEGER UNIQUE)"
    a, b = make_db(tmp_path / "a.db", schema), make_db(tmp_path / "b.db", schema)
    a.executemany("INSERT INTO todos VALUES (?, ?)", [(1, 1), (2, 2), (3, 3), (4, 4)])
    sync(a, b, tmp_path)
    a.execute("UPDATE todos SET position = 50 WHERE id = 1")
    time.sleep(0.01)
    b.execute("UPDATE todos SET position = 50 WHERE id = 2")  # taken here while a had it
    time.sleep(0.01)
    a.execute("UPDATE todos SET position = 70 WHERE id = 1")  # ...and a moved on
    for position, row in ((-1, 3), (3, 4), (4, 3)):
        a.execute("UPDATE todos SET position = ? WHERE id = ?", [position, row])
    sync(a, b, tmp_path)
    sync(b, a, tmp_path)
    assert rows(a) == rows(b)
    assert a.execute("SELECT * FROM todos ORDER BY id").fetchall() == [(1, 70), (2, 50), (3, 4), (4, 3)]


@pytest.mark.xfail(
    strict=True,
    reason="a primary key holding TEXT that is not UTF-8, edited on two copies, stops every later import "
    "on either side with invalid_text (the per-row merge cannot match the key), and there is no way out",
)
def test_text_that_is_not_utf8_in_a_primary_key_survives_concurrent_edits(tmp_path):
    schema = "CREATE TABLE notes (k TEXT PRIMARY KEY, v TEXT)"
    a, b = make_db(tmp_path / "a.db", schema, ("notes",)), make_db(tmp_path / "b.db", schema, ("notes",))
    a.execute("INSERT INTO notes VALUES (CAST(x'ff41' AS TEXT), 'one')")
    sync(a, b, tmp_path)  # the insert alone travels
    a.execute("UPDATE notes SET v = 'from a' WHERE k = CAST(x'ff41' AS TEXT)")
    b.execute("UPDATE notes SET v = 'from b' WHERE k = CAST(x'ff41' AS TEXT)")
    sync(a, b, tmp_path)  # BundleError invalid_text, on this import and every later one
    sync(b, a, tmp_path)
    select = "SELECT hex(k), typeof(k), v FROM notes"
    assert a.execute(select).fetchall() == b.execute(select).fetchall()
    assert len(conflict_records(a)) == len(conflict_records(b)) == 1
