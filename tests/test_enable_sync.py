"""Enabling and disabling sync on a table: which tables may sync, what is logged on enabling,
and what peers wrote meanwhile (kept, not applied) is adopted once the table syncs again."""

from __future__ import annotations

import json
import sqlite3

import pytest

from sqlite_utils_sync import disable_sync, enable_sync, list_conflicts


def enable_reporting(conn, table: str) -> list[tuple[str, str]]:
    """Enable sync on ``table``: the (table, row key) of each row it kept as edited here over a
    peer's edit (``on_kept``)."""
    kept = []
    enable_sync(conn, [table], on_kept=lambda *row: kept.append(row))
    return kept


def test_existing_rows_are_logged_when_sync_is_enabled(tmp_path, make_db, rows, sync):
    conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    conn.execute("CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL)")
    conn.executemany("INSERT INTO todos VALUES (?, 'x', 0, 0)", [(i,) for i in range(10)])
    assert enable_sync(conn, ["todos"]) == {"todos": 10}
    assert enable_sync(conn, ["todos"]) == {"todos": 0}  # idempotent
    b = make_db(tmp_path / "b.db")
    sync(conn, b, tmp_path)
    assert len(rows(b)) == 10


@pytest.mark.parametrize(
    "setup,table,message",
    [
        ("", "missing", "Table 'missing' does not exist"),
        ("CREATE TABLE nopk (a TEXT)", "nopk", "Table 'nopk' has no explicit PRIMARY KEY"),
        ("CREATE VIRTUAL TABLE docs USING fts5(body)", "docs", "Table 'docs' is a virtual (e.g. FTS) table"),
        ("", "_sync_ops", "Table '_sync_ops' is internal"),
        ("CREATE VIRTUAL TABLE docs USING fts5(body)", "docs_data", "Table 'docs_data' holds the data of a virtual"),
        (
            "CREATE TABLE nk (id TEXT PRIMARY KEY, v); INSERT INTO nk VALUES (NULL, 1), ('a', 2)",
            "nk",
            "Table 'nk' has 1 row(s) whose primary key column 'id' is NULL: give them keys first",
        ),
        # 'alice' and 'ALICE' are one row here, two where keys compare exactly: each copy kept the other's.
        (
            "CREATE TABLE people (name TEXT PRIMARY KEY COLLATE NOCASE, v)",
            "people",
            "Table 'people' has primary key column 'name' with COLLATE NOCASE: sync tells rows apart by their exact key values",
        ),
        (
            "CREATE TABLE tags (a, b COLLATE RTRIM, PRIMARY KEY (a, b)) WITHOUT ROWID",
            "tags",
            "Table 'tags' has primary key column 'b' with COLLATE RTRIM",
        ),
        ("CREATE VIEW done AS SELECT * FROM todos WHERE done", "done", "'done' is a view: only tables can be synced"),
        # Bundles name every table and column: an empty name could never be imported anywhere.
        ('CREATE TABLE "" (id INTEGER PRIMARY KEY)', "", "A table with an empty name cannot be synced"),
        ('CREATE TABLE blank (id INTEGER PRIMARY KEY, "" TEXT)', "blank", "Table 'blank' has a column with an empty name"),
    ],
)
def test_enable_sync_refuses_bad_tables_and_changes_nothing(tmp_path, setup, table, message, file_bytes, make_db, run_cli):
    path = tmp_path / "data.db"
    conn = make_db(path)
    if setup:
        conn.executescript(setup)
    conn.close()
    before = file_bytes(path)
    result = run_cli("enable-sync", str(path), table)
    assert result.exit_code == 1
    assert message in result.output
    assert result.output.count("\n") == 1  # one line, no traceback
    assert file_bytes(path) == before


def test_the_missing_primary_key_hint_names_this_database(tmp_path, make_db, run_cli):
    path = tmp_path / "my notes.db"
    make_db(path, "CREATE TABLE notes (body TEXT)", ()).close()
    result = run_cli("enable-sync", str(path), "notes")
    assert result.exit_code == 1
    assert result.output.endswith("(add one, e.g. sqlite-utils transform 'my notes.db' notes --pk id)\n")


def test_enable_sync_finds_a_table_however_its_name_is_cased(tmp_path, make_db, run_cli):
    path = tmp_path / "data.db"
    make_db(path, "CREATE TABLE Todos (id INTEGER PRIMARY KEY, title TEXT)", ()).execute("INSERT INTO Todos VALUES (1, 'x')")
    result = run_cli("enable-sync", str(path), "TODOS", "todos")
    assert result.exit_code == 0
    assert "Todos" in result.output and result.output.count("\n") == 1
    assert list(json.loads(run_cli("sync-status", str(path), "--json").output)["tables"]) == ["Todos"]
    assert run_cli("disable-sync", str(path), "todos").exit_code == 0
    assert json.loads(run_cli("sync-status", str(path), "--json").output)["tables"] == {}


def test_disable_sync_stops_capture_and_keeps_the_log(tmp_path, make_db, run_cli):
    path = tmp_path / "data.db"
    conn = make_db(path)
    conn.execute("INSERT INTO todos VALUES (1, 'x', 0, 0)")
    assert run_cli("disable-sync", str(path), "todos").exit_code == 0
    conn.execute("INSERT INTO todos VALUES (2, 'y', 0, 0)")
    assert conn.execute("SELECT count(*) FROM _sync_ops WHERE kind = 0").fetchone()[0] == 1
    result = run_cli("disable-sync", str(path), "todos")
    assert result.exit_code == 1 and "Table 'todos' is not synced" in result.output


def test_enabling_a_table_later_adopts_what_peers_wrote_instead_of_deleting_it(tmp_path, make_db, run_cli, sync):
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


def test_reenabling_keeps_local_edits_made_while_disabled_and_adopts_what_arrived(tmp_path, make_db, rows, run_cli, sync):
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


def test_concurrent_edits_that_arrive_while_a_table_is_not_synced_still_become_a_conflict(tmp_path, trio, conflict_records, rows, sync):
    x, y, z = trio
    x.execute("INSERT INTO todos VALUES (1, 'orig', 0, 0)")
    for target in (y, z):
        sync(x, target, tmp_path)
    disable_sync(y, ["todos"])
    x.execute("UPDATE todos SET title = 'from x' WHERE id = 1")
    z.execute("UPDATE todos SET title = 'from z' WHERE id = 1")
    sync(x, y, tmp_path)
    sync(z, y, tmp_path)  # both kept, not applied: y does not sync todos now
    enable_sync(y, ["todos"])
    for source in (x, y, z):
        for target in (x, y, z):
            if source is not target:
                sync(source, target, tmp_path)
    assert rows(x) == rows(y) == rows(z)
    assert conflict_records(x) == conflict_records(y) == conflict_records(z)
    assert [c["columns"] for c in list_conflicts(y)] == [["title"]]


@pytest.mark.parametrize(
    "here,there,expected",
    [
        # Both change the title: this copy's edit is kept, not reverted by the peer's.
        ("UPDATE todos SET title = 'here' WHERE id = 1", "UPDATE todos SET title = 'there' WHERE id = 1", [(1, "here", 0), (2, "two", 0)]),
        # Each changes another column: both are kept.
        ("UPDATE todos SET done = 1 WHERE id = 1", "UPDATE todos SET title = 'there' WHERE id = 1", [(1, "there", 1), (2, "two", 0)]),
        # Deleted here, edited there: the delete is kept.
        ("DELETE FROM todos WHERE id = 1", "UPDATE todos SET title = 'there' WHERE id = 1", [(2, "two", 0)]),
        # Edited here, deleted there: the edited row is kept.
        ("UPDATE todos SET title = 'here' WHERE id = 1", "DELETE FROM todos WHERE id = 1", [(1, "here", 0), (2, "two", 0)]),
        # The same new key on both: this copy's row is kept.
        ("INSERT INTO todos VALUES (3, 'here', 0, 0)", "INSERT INTO todos VALUES (3, 'there', 0, 0)", [(1, "one", 0), (2, "two", 0), (3, "here", 0)]),
    ],
)
def test_edits_made_while_disabled_are_never_lost_to_peers_edits_of_the_same_row(tmp_path, make_db, sync, here, there, expected):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(1, "one"), (2, "two")])
    sync(a, b, tmp_path)
    disable_sync(b, ["todos"])
    b.execute(here)
    a.execute(there)
    a.execute("UPDATE todos SET title = 'TWO' WHERE id = 2")  # a row only the peer changed
    sync(a, b, tmp_path, "a.bundle")  # kept, not applied: b does not sync todos now
    kept = enable_reporting(b, "todos")
    # Only a value both changed is reported: kept here, the peer's in the log.
    assert kept == ([] if "done = 1" in here else [("todos", "1" if "id = 1" in here else "3")])
    for _ in range(2):
        sync(a, b, tmp_path, "a.bundle")
        sync(b, a, tmp_path, "b.bundle")
    expected = [(i, "TWO" if i == 2 else title, done) for i, title, done in expected]
    for conn in (a, b):
        assert conn.execute("SELECT id, title, done FROM todos ORDER BY id").fetchall() == expected


def test_enable_sync_says_which_local_edits_it_kept_over_a_peers(tmp_path, make_db, run_cli, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("INSERT INTO todos VALUES (1, 'one', 0, 0)")
    sync(a, b, tmp_path)
    disable_sync(b, ["todos"])
    b.execute("UPDATE todos SET title = 'here' WHERE id = 1")
    a.execute("UPDATE todos SET title = 'there' WHERE id = 1")
    sync(a, b, tmp_path)
    result = run_cli("enable-sync", tmp_path / "b.db", "todos")
    assert result.exit_code == 0
    assert result.output == (
        "todos: logged 1 existing or missed row change(s)\n"
        "todos: kept 1 row as edited here while sync was off, over a peer's edit of the same values that arrived "
        "meanwhile (the peer's stays in the log)\n"
    )


def test_a_table_first_enabled_takes_peers_values_over_its_stale_rows_whatever_it_declares(tmp_path, make_db, sync):
    # The hub declares the table otherwise (REAL, an extra column): its rows are still stale
    # copies of the peer's, not edits of its own, since it never synced the table.
    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL); CREATE TABLE notes (id INTEGER PRIMARY KEY, n INTEGER)"
    a = make_db(tmp_path / "a.db", schema, ("todos", "notes"))
    hub = make_db(tmp_path / "hub.db")
    a.executemany("INSERT INTO notes VALUES (?, ?)", [(1, 1), (2, 2), (3, 3)])
    a.execute("UPDATE notes SET n = 20 WHERE id = 2")
    a.execute("DELETE FROM notes WHERE id = 3")
    sync(a, hub, tmp_path)
    hub.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, n REAL, tag TEXT)")
    hub.executemany("INSERT INTO notes (id, n) VALUES (?, ?)", [(1, 1), (2, 2), (3, 3)])
    kept = enable_reporting(hub, "notes")
    assert kept == []
    assert hub.execute("SELECT id, n FROM notes ORDER BY id").fetchall() == [(1, 1.0), (2, 20.0)]
    sync(hub, a, tmp_path)
    assert a.execute("SELECT id, n FROM notes ORDER BY id").fetchall() == [(1, 1), (2, 20)]


def test_rows_inserted_while_disabled_are_kept_even_if_the_table_never_had_a_row(tmp_path, make_db, sync):
    # It was synced here (its triggers are recorded), so a row no operation made was inserted
    # here: not a stale copy of the peer's row with that key.
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    disable_sync(a, ["todos"])
    b.execute("INSERT INTO todos VALUES (1, 'from b', 0, 0)")
    sync(b, a, tmp_path)
    a.execute("INSERT INTO todos VALUES (1, 'from a', 0, 0)")
    kept = enable_reporting(a, "todos")
    assert kept == [("todos", "1")]
    sync(a, b, tmp_path)
    assert [c.execute("SELECT title FROM todos").fetchall() for c in (a, b)] == [[("from a",)], [("from a",)]]


def test_a_column_added_while_disabled_does_not_undo_a_peers_delete(tmp_path, make_db, sync):
    # The new column's DEFAULT is what ALTER TABLE gave the row, not an edit made here.
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, 'x', 0, 0)", [(1,), (2,)])
    sync(a, b, tmp_path)
    disable_sync(a, ["todos"])
    b.execute("DELETE FROM todos WHERE id = 1")
    sync(b, a, tmp_path)
    a.execute("ALTER TABLE todos ADD COLUMN z INTEGER NOT NULL DEFAULT 0")
    kept = enable_reporting(a, "todos")
    assert kept == []
    assert a.execute("SELECT id FROM todos").fetchall() == [(2,)]


def test_more_tables_than_a_bundle_may_name_are_refused(tmp_path, run_cli):
    # A bundle names every synced table, and copies take at most 1,000: enabling more would
    # make exports that no copy imports.
    path = tmp_path / "many.db"
    conn = sqlite3.connect(path)
    conn.executescript("".join(f"CREATE TABLE t{i} (id INTEGER PRIMARY KEY);" for i in range(1001)))
    conn.close()
    before = path.read_bytes()
    result = run_cli("enable-sync", path, *[f"t{i}" for i in range(1001)])
    assert result.exit_code == 1
    assert result.output == (
        "Error: Cannot sync 1001 tables in one database: a bundle names every synced table, and copies take "
        "at most 1000. Nothing was changed\n"
    )
    assert path.read_bytes() == before
