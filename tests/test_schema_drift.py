"""Copies whose schemas differ or change: columns added (with or without a default), dropped,
or added back, tables missing here or renamed, and ``--alter``. Capture that a schema change
made stale is noticed and repaired without losing a write."""

from __future__ import annotations

import json
import sqlite3

import pytest
from click.testing import CliRunner
from sqlite_utils.cli import cli

from sqlite_utils_sync import (
    disable_sync,
    enable_sync,
    export_bundle,
    import_bundle,
    list_conflicts,
    resolve_conflict,
    sync_status,
)


def test_add_column_is_detected_and_missed_writes_reach_peers(tmp_path, make_db, rows, run_cli, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("INSERT INTO todos VALUES (1, 'milk', 0, 1.0)")
    sync(a, b, tmp_path)
    a.execute("ALTER TABLE todos ADD COLUMN due TEXT")
    a.execute("UPDATE todos SET due = '2026-12-24' WHERE id = 1")  # the old trigger misses this
    a.execute("INSERT INTO todos VALUES (2, 'eggs', 0, 2.0, '2027-01-01')")
    status = run_cli("sync-status", tmp_path / "a.db")
    assert "Warning: table 'todos' has columns not captured: due" in status.output
    b.execute("ALTER TABLE todos ADD COLUMN due TEXT")
    sync(a, b, tmp_path)  # the export repairs first
    assert rows(b) == rows(a)
    assert b.execute("SELECT due FROM todos ORDER BY id").fetchall() == [("2026-12-24",), ("2027-01-01",)]
    assert sync_status(a)["warnings"] == []


def test_column_added_with_a_default_reaches_a_peer_that_adds_it_without_one(tmp_path, make_db, rows, run_cli, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 1.0)", [(1, "milk"), (2, "eggs")])
    sync(a, b, tmp_path)
    # Existing rows get the default without any trigger firing.
    a.execute("ALTER TABLE todos ADD COLUMN list TEXT DEFAULT 'groceries'")
    a.execute("UPDATE todos SET list = 'urgent' WHERE id = 1")
    export_bundle(a, tmp_path / "a.bundle")
    assert run_cli("import-bundle", tmp_path / "b.db", tmp_path / "a.bundle", "--alter").exit_code == 0
    assert b.execute("SELECT id, list FROM todos ORDER BY id").fetchall() == [(1, "urgent"), (2, "groceries")]
    assert rows(b) == rows(a)


def test_same_column_and_default_added_on_both_copies_is_no_conflict(tmp_path, make_db, rows, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 1.0)", [(1, "milk"), (2, "eggs")])
    sync(a, b, tmp_path)
    for conn in (a, b):
        conn.execute("ALTER TABLE todos ADD COLUMN list TEXT DEFAULT 'groceries'")
    sync(a, b, tmp_path)
    sync(b, a, tmp_path)
    assert rows(a) == rows(b)
    assert sync_status(a)["unresolved_conflicts"] == sync_status(b)["unresolved_conflicts"] == 0


def test_columns_added_in_another_order_on_each_copy_still_sync(tmp_path, make_db, run_cli, sync):
    # Each copy numbers its columns in the order it first saw them, so the two disagree here.
    base = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT)"
    a, b = make_db(tmp_path / "a.db", base), make_db(tmp_path / "b.db", base)
    for conn, order in ((a, ("done INTEGER", "note TEXT")), (b, ("note TEXT", "done INTEGER"))):
        for column in order:
            conn.execute(f"ALTER TABLE todos ADD COLUMN {column}")
        assert run_cli("enable-sync", conn.execute("PRAGMA database_list").fetchone()[2], "todos").exit_code == 0
    a.execute("INSERT INTO todos (id, title, done, note) VALUES (1, 'milk', 0, 'semi-skimmed')")
    sync(a, b, tmp_path)
    a.execute("UPDATE todos SET done = 1 WHERE id = 1")
    b.execute("UPDATE todos SET note = 'oat' WHERE id = 1")
    sync(a, b, tmp_path)
    sync(b, a, tmp_path)
    expected = [(1, "milk", 1, "oat")]
    for conn in (a, b):
        assert conn.execute("SELECT id, title, done, note FROM todos").fetchall() == expected
        assert sync_status(conn)["unresolved_conflicts"] == 0


@pytest.mark.parametrize("alter", [[], ["--alter"]])
def test_a_column_added_in_another_case_on_each_copy_is_refused_with_what_to_rename(tmp_path, make_db, run, file_bytes, alter):
    # SQLite takes Note and note as one column name; sync matches names exactly.
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("ALTER TABLE todos ADD COLUMN Note TEXT")
    b.execute("ALTER TABLE todos ADD COLUMN note TEXT")
    a.execute("INSERT INTO todos VALUES (1, 'milk', 0, 0, 'oat')")
    run(["sqlite-utils", "export-bundle", tmp_path / "a.db", tmp_path / "a.bundle"])
    before = file_bytes(tmp_path / "b.db")
    result = run(["sqlite-utils", "import-bundle", tmp_path / "b.db", tmp_path / "a.bundle", *alter], check=False)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: Bundle a.bundle: table 'todos' has column 'Note', called 'note' here; sync matches column names "
        "exactly, so rename one of them to match (ALTER TABLE ... RENAME COLUMN ...)\n"
    )
    assert file_bytes(tmp_path / "b.db") == before


def test_columns_that_differ_in_a_non_ascii_letters_case_are_two_columns(tmp_path, make_db, run, rows):
    # SQLite folds only ASCII letters in names: é and É are two columns, so --alter adds é.
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute('ALTER TABLE todos ADD COLUMN "é" TEXT')
    b.execute('ALTER TABLE todos ADD COLUMN "É" TEXT')
    a.execute("INSERT INTO todos VALUES (1, 'milk', 0, 0, 'lait')")
    run(["sqlite-utils", "export-bundle", tmp_path / "a.db", tmp_path / "a.bundle"])
    run(["sqlite-utils", "import-bundle", tmp_path / "b.db", tmp_path / "a.bundle", "--alter"])
    assert b.execute('SELECT "é", "É" FROM todos').fetchall() == [("lait", None)]


def test_transform_drops_triggers_and_the_repair_logs_what_was_missed(tmp_path, make_db, rows, run_cli, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(1, "one"), (2, "two"), (3, "three")])
    sync(a, b, tmp_path)
    a.close()
    result = CliRunner().invoke(cli, ["transform", str(tmp_path / "a.db"), "todos", "--type", "score", "float"])
    assert result.exit_code == 0, result.output
    a = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    assert "no capture triggers" in " ".join(sync_status(a)["warnings"])
    a.execute("UPDATE todos SET title = 'ONE' WHERE id = 1")
    a.execute("DELETE FROM todos WHERE id = 2")
    a.execute("INSERT INTO todos VALUES (4, 'four', 0, 0)")
    # enable-sync repairs explicitly, too
    repaired = run_cli("enable-sync", tmp_path / "a.db", "todos")
    assert repaired.exit_code == 0, repaired.output
    sync(a, b, tmp_path)
    assert rows(b) == rows(a)
    assert [r[0] for r in rows(b)] == [1, 3, 4]


def test_dropping_a_column_on_one_copy(tmp_path, make_db, run_cli, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("INSERT INTO todos VALUES (1, 'milk', 0, 2.5)")
    sync(a, b, tmp_path)
    # SQLite refuses ALTER TABLE DROP COLUMN while a trigger names the column...
    with pytest.raises(sqlite3.OperationalError, match="error in trigger"):
        a.execute("ALTER TABLE todos DROP COLUMN score")
    # ...so drop it with sqlite-utils transform (sync repairs itself afterwards), or around
    # disable-sync / enable-sync.
    a.close()
    assert run_cli("transform", tmp_path / "a.db", "todos", "--drop", "score").exit_code == 0
    a = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    a.execute("UPDATE todos SET title = 'oat milk' WHERE id = 1")
    a.execute("INSERT INTO todos VALUES (2, 'eggs', 0)")
    assert run_cli("disable-sync", tmp_path / "a.db", "todos").exit_code == 0
    a.execute("ALTER TABLE todos DROP COLUMN done")
    assert run_cli("enable-sync", tmp_path / "a.db", "todos").exit_code == 0
    a.execute("INSERT INTO todos VALUES (3, 'bread')")
    sync(a, b, tmp_path)
    # The copy that kept the columns keeps the values it had. Bundles carry the sender's columns
    # as they are when exported: row 2's done was dropped on a before a sent it.
    assert b.execute("SELECT * FROM todos ORDER BY id").fetchall() == [
        (1, "oat milk", 0, 2.5),
        (2, "eggs", None, None),
        (3, "bread", None, None),
    ]
    b.execute("UPDATE todos SET title = 'brown bread', done = 1 WHERE id = 3")
    sync(b, a, tmp_path)
    assert a.execute("SELECT * FROM todos ORDER BY id").fetchall() == [(1, "oat milk"), (2, "eggs"), (3, "brown bread")]


def test_a_copy_that_dropped_a_column_relays_it_untouched(tmp_path, make_db, run_cli, sync):
    a, b, c = (make_db(tmp_path / f"{name}.db") for name in "abc")
    b.close()
    assert run_cli("transform", tmp_path / "b.db", "todos", "--drop", "score").exit_code == 0
    b = sqlite3.connect(tmp_path / "b.db", isolation_level=None)
    a.execute("INSERT INTO todos VALUES (1, 'milk', 0, 2.5)")
    sync(a, b, tmp_path)
    assert b.execute("SELECT * FROM todos").fetchall() == [(1, "milk", 0)]
    sync(b, c, tmp_path)  # the relay sends the column it dropped, marked as dropped
    assert c.execute("SELECT * FROM todos").fetchall() == [(1, "milk", 0, 2.5)]
    export_bundle(a, tmp_path / "a.bundle")  # the same operation straight from its author
    result = import_bundle(c, tmp_path / "a.bundle")
    assert (result.applied, result.duplicates) == (0, 1)
    fresh = make_db(tmp_path / "fresh.db", "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)")
    sync(b, fresh, tmp_path)  # a copy that never had the column need not add it
    assert fresh.execute("SELECT * FROM todos").fetchall() == [(1, "milk", 0)]
    a.execute("UPDATE todos SET score = 3.5 WHERE id = 1")
    for source, target in ((a, b), (b, c), (b, fresh), (a, c)):
        sync(source, target, tmp_path)
    assert c.execute("SELECT * FROM todos").fetchall() == [(1, "milk", 0, 3.5)]


def test_adding_a_dropped_column_back_takes_the_values_peers_wrote(tmp_path, make_db, run_cli, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("INSERT INTO todos VALUES (1, 'milk', 0, 2.5)")
    sync(a, b, tmp_path)
    a.close()
    assert run_cli("transform", tmp_path / "a.db", "todos", "--drop", "score").exit_code == 0
    a = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    b.execute("UPDATE todos SET score = 9.5 WHERE id = 1")
    sync(b, a, tmp_path)  # a keeps b's value in its log, not in its table
    a.execute("ALTER TABLE todos ADD COLUMN score REAL")
    assert run_cli("enable-sync", tmp_path / "a.db", "todos").exit_code == 0
    assert a.execute("SELECT * FROM todos").fetchall() == [(1, "milk", 0, 9.5)]
    sync(a, b, tmp_path)
    assert b.execute("SELECT * FROM todos").fetchall() == [(1, "milk", 0, 9.5)]


@pytest.mark.parametrize("upgraded", [False, True])
def test_a_column_added_back_around_disable_sync_keeps_peer_values_and_local_edits(tmp_path, upgraded, make_db, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0.5)", [(1, "milk"), (2, "eggs")])
    sync(a, b, tmp_path)
    disable_sync(a, ["todos"])
    a.execute("ALTER TABLE todos DROP COLUMN score")
    enable_sync(a, ["todos"])
    if upgraded:  # the drop was synced by a version that did not record what capture covered
        a.execute("DROP TABLE _sync_captured")
        a.execute("ALTER TABLE _sync_conflict_pairs RENAME TO _sync_clashes")
        a.execute("UPDATE _sync_state SET schema_version = 1")
    b.execute("UPDATE todos SET score = 9.5 WHERE id = 1")
    sync(b, a, tmp_path)
    disable_sync(a, ["todos"])
    a.execute("ALTER TABLE todos ADD COLUMN score REAL")
    a.execute("UPDATE todos SET score = 7.5 WHERE id = 2")  # written here after adding it back
    enable_sync(a, ["todos"])
    sync(a, b, tmp_path)
    for conn in (a, b):
        assert conn.execute("SELECT id, score FROM todos ORDER BY id").fetchall() == [(1, 9.5), (2, 7.5)]


def test_a_row_from_a_copy_without_the_column_gets_null_not_the_default(tmp_path, make_db, sync):
    # The DEFAULT is this copy's own: the copy the row came from, and any copy that adds the
    # column later, hold NULL there, so NULL is what every copy must hold.
    schema = "CREATE TABLE t (id TEXT PRIMARY KEY, x)"
    a, b = make_db(tmp_path / "a.db", schema, ("t",)), make_db(tmp_path / "b.db", schema, ("t",))
    a.execute("INSERT INTO t (id, x) VALUES ('k1', 'hello')")
    b.execute("ALTER TABLE t ADD COLUMN n DEFAULT 'dv'")
    b.execute("INSERT INTO t (id, x) VALUES ('k0', 'mine')")
    sync(a, b, tmp_path)
    export_bundle(b, tmp_path / "b.bundle")
    import_bundle(a, tmp_path / "b.bundle", alter=True)
    expected = [("k0", "mine", "dv"), ("k1", "hello", None)]
    for conn in (a, b):
        assert conn.execute("SELECT id, x, n FROM t ORDER BY id").fetchall() == expected


def test_a_not_null_column_takes_its_default_for_rows_from_a_copy_without_it(tmp_path, make_db, sync):
    schema = "CREATE TABLE t (id TEXT PRIMARY KEY, x)"
    a, b = make_db(tmp_path / "a.db", schema, ("t",)), make_db(tmp_path / "b.db", schema, ("t",))
    a.execute("ALTER TABLE t ADD COLUMN prio INTEGER NOT NULL DEFAULT 0")
    b.execute("INSERT INTO t (id, x) VALUES ('k1', 'from b')")
    sync(b, a, tmp_path)
    assert a.execute("SELECT id, x, prio FROM t").fetchall() == [("k1", "from b", 0)]


def test_an_import_into_a_synced_table_that_no_longer_exists_says_so(tmp_path, make_todos_db, run, run_json):
    """A synced table dropped or renamed (sqlite-utils, or Datasette's drop/rename on a hub):
    the import is refused with one line naming the table and what to do, not a SQL syntax error."""

    a = make_todos_db(tmp_path / "a.db", [{"id": 1, "title": "one", "done": 0}])
    b = make_todos_db(tmp_path / "b.db")
    run(["sqlite-utils", "export-bundle", a, tmp_path / "1.bundle"])
    run(["sqlite-utils", "import-bundle", b, tmp_path / "1.bundle"])
    run(["sqlite-utils", "rename-table", b, "todos", "todos_old"])
    run(["sqlite-utils", "insert", a, "todos", "-", "--pk", "id"], input=json.dumps([{"id": 2, "title": "two", "done": 0}]))
    run(["sqlite-utils", "export-bundle", a, tmp_path / "2.bundle"])
    before = b.read_bytes()
    result = run(["sqlite-utils", "import-bundle", b, tmp_path / "2.bundle"], check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "Error: table 'todos' is synced but no longer exists in this database (dropped or renamed): rename it back, "
        "or run 'sqlite-utils disable-sync DB todos' to stop syncing it (its operations are then kept, unapplied)"
    ]
    assert b.read_bytes() == before
    # Either way out works.
    run(["sqlite-utils", "rename-table", b, "todos_old", "todos"])
    run(["sqlite-utils", "import-bundle", b, tmp_path / "2.bundle"])
    assert run_json(["sqlite-utils", "rows", b, "todos"]) == run_json(["sqlite-utils", "rows", a, "todos"])


def test_ops_for_a_table_not_synced_here_are_kept_not_applied(tmp_path, make_db, run_cli, sync):
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


def test_alter_adds_missing_columns_and_tables(tmp_path, make_db, run_cli):
    a = make_db(tmp_path / "a.db")
    a.execute("ALTER TABLE todos ADD COLUMN due TEXT")
    a.execute("INSERT INTO todos VALUES (1, 'x', 0, 0, '2026-12-01')")
    fresh = sqlite3.connect(tmp_path / "fresh.db", isolation_level=None)
    export_bundle(a, tmp_path / "a.bundle")
    result = run_cli("import-bundle", tmp_path / "fresh.db", tmp_path / "a.bundle", "--alter", "--json")
    assert json.loads(result.output)["applied"] >= 1
    assert fresh.execute("SELECT id, title, due FROM todos").fetchall() == [(1, "x", "2026-12-01")]


@pytest.mark.parametrize(
    "sender_key, receiver_key, key",
    [("id", "id TEXT", 1), ("id", "id INT", "1"), ("id", "id NUMERIC", "2.5"), ("id TEXT", "id REAL", "1e3")],
)
def test_a_key_this_copy_would_store_as_another_value_is_refused(tmp_path, make_db, run, file_bytes, sender_key, receiver_key, key):
    # SQLite converts a value to its column's affinity: 1 becomes '1' in a TEXT key column, so
    # the row would have another key here than on its sender, and copies would mix up rows.
    sender = make_db(tmp_path / "sender.db", f"CREATE TABLE t ({sender_key} PRIMARY KEY, v)", ("t",))
    sender.execute("INSERT INTO t VALUES (?, 'from sender')", [key])
    bundle = tmp_path / "key.bundle"
    export_bundle(sender, bundle)
    receiver = make_db(tmp_path / "receiver.db", f"CREATE TABLE t ({receiver_key} PRIMARY KEY, v)", ("t",))
    receiver.execute("INSERT INTO t VALUES ('its own', 'here')")
    before = file_bytes(tmp_path / "receiver.db")
    result = run(["sqlite-utils", "import-bundle", tmp_path / "receiver.db", bundle], check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: Bundle key.bundle: table 't' has key column id of ")
    assert f"affinity here, which would store the key {key!r} as another value" in result.stderr
    assert file_bytes(tmp_path / "receiver.db") == before


def test_keys_every_copy_stores_alike_sync_whatever_the_declared_types(tmp_path, make_db, rows, sync):
    sender = make_db(tmp_path / "sender.db", "CREATE TABLE t (id PRIMARY KEY, v)", ("t",))
    sender.executemany("INSERT INTO t VALUES (?, ?)", [(1, "int"), ("a", "text"), (2.5, "real"), (b"k", "blob")])
    receiver = make_db(tmp_path / "receiver.db", "CREATE TABLE t (id NUMERIC PRIMARY KEY, v)", ("t",))
    sync(sender, receiver, tmp_path)
    assert rows(receiver, "t") == rows(sender, "t")


def test_a_key_column_transform_made_text_still_starts_copies_and_takes_its_operations_back(tmp_path, run, shell):
    a, b, c = (tmp_path / f"{name}.db" for name in "abc")
    shell(a, "CREATE TABLE t (id PRIMARY KEY, v); INSERT INTO t VALUES (1, 'one'), (2, 'two')")
    run(["sqlite-utils", "enable-sync", a, "t"])
    run(["sqlite-utils", "export-bundle", a, tmp_path / "first.bundle"])
    run(["sqlite-utils", "import-bundle", b, tmp_path / "first.bundle"])
    # transform makes the untyped key TEXT; the repair logs the rows again under '1' and '2'.
    run(["sqlite-utils", "transform", a, "t"])
    run(["sqlite-utils", "enable-sync", a, "t"])
    # b's bundle holds a's own first operations, with integer keys: held here, they are no new keys.
    run(["sqlite-utils", "export-bundle", b, tmp_path / "back.bundle"])
    assert "were here already" in run(["sqlite-utils", "import-bundle", a, tmp_path / "back.bundle"]).stderr
    # A new copy takes a's table as declared (TEXT), so its keys are stored as they were sent.
    run(["sqlite-utils", "export-bundle", a, tmp_path / "full.bundle"])
    run(["sqlite-utils", "import-bundle", c, tmp_path / "full.bundle"])
    rows = "SELECT id, typeof(id), v FROM t ORDER BY id"
    assert sqlite3.connect(c).execute(rows).fetchall() == sqlite3.connect(a).execute(rows).fetchall() == [
        ("1", "text", "one"),
        ("2", "text", "two"),
    ]


def _dropped_dispute(tmp_path, make_db, run_cli, sync):
    """a, b and c hold row 1; a and b set its score concurrently (and b its title too); c
    retitles it after seeing both; then a drops the disputed column."""
    a, b, c = (make_db(tmp_path / f"{name}.db") for name in "abc")
    a.execute("INSERT INTO todos VALUES (1, 'milk', 0, 1.0)")
    sync(a, b, tmp_path)
    sync(a, c, tmp_path)
    a.execute("UPDATE todos SET score = 2 WHERE id = 1")
    b.execute("UPDATE todos SET score = 3, title = 'milk-b' WHERE id = 1")
    sync(b, a, tmp_path)
    sync(a, c, tmp_path)
    c.execute("UPDATE todos SET title = 'milk-c' WHERE id = 1")
    sync(c, a, tmp_path)
    a.close()
    assert run_cli("transform", tmp_path / "a.db", "todos", "--drop", "score").exit_code == 0
    return sqlite3.connect(tmp_path / "a.db", isolation_level=None), b, c


@pytest.mark.parametrize("keep_score", [2.0, 3.0, None])
def test_resolving_after_the_disputed_column_was_dropped_keeps_later_edits_of_other_columns(
    tmp_path, make_db, run_cli, sync, keep_score
):
    a, b, c = _dropped_dispute(tmp_path, make_db, run_cli, sync)
    (held,) = c.execute("SELECT score FROM todos").fetchone()  # the latest version (c saw both)
    (conflict,) = list_conflicts(a)
    assert conflict["columns"] == ["score"]
    keep = None if keep_score is None else next(v["op"] for v in conflict["versions"] if v["values"]["score"] == keep_score)
    resolve_conflict(a, conflict["id"], keep=keep)
    for source, target in ((a, b), (a, c), (b, a), (c, a), (b, c), (c, b)):
        sync(source, target, tmp_path)
    assert a.execute("SELECT * FROM todos").fetchall() == [(1, "milk-c", 0)]
    # The copies that kept the column hold the version chosen (or the one they held); the
    # title c wrote after seeing both versions is not put back to b's.
    score = held if keep_score is None else keep_score
    for conn in (b, c):
        assert conn.execute("SELECT * FROM todos").fetchall() == [(1, "milk-c", 0, score)]
    for conn in (a, b, c):
        assert sync_status(conn)["unresolved_conflicts"] == 0


def test_a_resolution_after_the_disputed_column_was_dropped_does_not_clash_with_other_columns(
    tmp_path, make_db, run_cli, sync
):
    a, b, c = _dropped_dispute(tmp_path, make_db, run_cli, sync)
    (held,) = c.execute("SELECT score FROM todos").fetchone()  # the latest version (c saw both)
    c.execute("UPDATE todos SET title = 'oat milk' WHERE id = 1")  # concurrent with the resolution
    resolve_conflict(a, list_conflicts(a)[0]["id"])
    for source, target in ((a, b), (c, b), (b, a), (b, c)):
        sync(source, target, tmp_path)
    assert a.execute("SELECT * FROM todos").fetchall() == [(1, "oat milk", 0)]
    for conn in (b, c):
        assert conn.execute("SELECT * FROM todos").fetchall() == [(1, "oat milk", 0, held)]
    for conn in (a, b, c):
        assert sync_status(conn)["unresolved_conflicts"] == 0


def test_a_not_null_column_whose_default_is_an_expression_is_declared_without_it(tmp_path, make_db, run):
    a = make_db(tmp_path / "a.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, at TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)", ("t",))
    a.execute("INSERT INTO t (id) VALUES (1)")
    export_bundle(a, tmp_path / "a.bundle")
    run(["sqlite-utils", "import-bundle", tmp_path / "new.db", tmp_path / "a.bundle"])
    new = sqlite3.connect(tmp_path / "new.db")
    assert [(r[1], r[3], r[4]) for r in new.execute("PRAGMA table_info(t)")] == [("id", 0, None), ("at", 0, None)]
    assert new.execute("SELECT * FROM t").fetchall() == a.execute("SELECT * FROM t").fetchall()


@pytest.mark.parametrize(
    "default, value, sent",
    [
        ("'it''s groceries'", "it's groceries", "'it''s groceries'"),
        ("-1", -1, "-1"),
        ("TRUE", 1, "1"),
        ("FALSE", 0, "0"),
        ('"groceries"', "groceries", "'groceries'"),
        ("('x')", "x", "'x'"),
        ("- 1", -1, "-1"),
        ("+ 'x'", "x", "'x'"),
        ("0x00000000000000001", 1, "1"),  # hex goes as decimal (see the next test)
    ],
)
def test_a_not_null_default_column_reaches_peers_and_new_copies_as_declared(tmp_path, make_db, rows, sync, run, default, value, sent):
    # A row b writes before it has the column gets a's DEFAULT on a (the column can't hold
    # NULL), unlogged: b and a new copy must declare the column alike to hold the same. The
    # DEFAULT travels as the literal SQLite makes of it, however it was written.
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("INSERT INTO todos VALUES (1, 'milk', 0, 1.0)")
    sync(a, b, tmp_path)
    a.execute(f"ALTER TABLE todos ADD COLUMN extra NOT NULL DEFAULT {default}")
    b.execute("INSERT INTO todos VALUES (2, 'from b', 0, 0.5)")
    sync(b, a, tmp_path)
    export_bundle(a, tmp_path / "a.bundle")
    import_bundle(b, tmp_path / "a.bundle", alter=True)
    run(["sqlite-utils", "import-bundle", tmp_path / "new.db", tmp_path / "a.bundle"])
    new = sqlite3.connect(tmp_path / "new.db")
    for conn in (a, b, new):
        assert conn.execute("SELECT id, extra FROM todos ORDER BY id").fetchall() == [(1, value), (2, value)]
    for conn in (b, new):
        assert [(r[3], r[4]) for r in conn.execute("PRAGMA table_info(todos)") if r[1] == "extra"] == [(1, sent)]
    assert rows(b) == rows(a) == rows(new)


def test_a_hex_default_reaches_rows_a_copy_held_as_the_integer(tmp_path, make_db, run):
    # SQLite's ALTER TABLE gives the rows that exist a hex DEFAULT of 0x80000000 or more as
    # TEXT ('0x80000000'), where CREATE TABLE and inserts store the integer: it goes as decimal.
    make_db(tmp_path / "a.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, c INTEGER NOT NULL DEFAULT 0x80000000)", ("t",)).execute(
        "INSERT INTO t (id) VALUES (1)"
    )
    b = make_db(tmp_path / "b.db", "CREATE TABLE t (id INTEGER PRIMARY KEY)", ("t",))
    b.execute("INSERT INTO t VALUES (2)")
    run(["sqlite-utils", "export-bundle", tmp_path / "a.db", tmp_path / "a.bundle"])
    run(["sqlite-utils", "import-bundle", tmp_path / "b.db", tmp_path / "a.bundle", "--alter"])
    assert b.execute("SELECT id, c, typeof(c) FROM t ORDER BY id").fetchall() == [(1, 2147483648, "integer"), (2, 2147483648, "integer")]
