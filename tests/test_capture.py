"""Capture: every client's writes are logged by pure-SQL triggers, and triggers that went
missing or stale are replaced at the next sync. Exactness of the values: test_exact_values.py;
schema changes: test_schema_drift.py."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess

import pytest
import sqlite_utils

from sqlite_utils_sync import sync_status


def test_ops_are_captured_from_sqlite3_sqlite_utils_and_the_sqlite3_shell(tmp_path, make_db):
    path = tmp_path / "data.db"
    conn = make_db(path)
    conn.execute("INSERT INTO todos VALUES (1, 'from sqlite3', 0, 1.5)")
    sqlite_utils.Database(path)["todos"].insert({"id": 2, "title": "from sqlite-utils", "done": 0, "score": 2.5})
    if shutil.which("sqlite3"):
        subprocess.run(["sqlite3", str(path), "INSERT INTO todos VALUES (3, 'from the shell', 0, 3.5)"], check=True)
        expected = 3
    else:
        expected = 2
    count = conn.execute("SELECT count(*) FROM _sync_ops WHERE kind = 0").fetchone()[0]
    assert count == expected
    assert sync_status(conn)["tables"]["todos"]["operations"] == expected


def test_triggers_use_only_builtin_functions(tmp_path, make_db):
    path = tmp_path / "data.db"
    make_db(path).close()
    # A fresh connection with nothing registered from Python can still write.
    plain = sqlite3.connect(path)
    plain.execute("INSERT INTO todos VALUES (1, 'x', 0, 0)")
    plain.execute("UPDATE todos SET done = 1")
    plain.execute("DELETE FROM todos")
    plain.commit()
    kinds = [k for (k,) in plain.execute("SELECT kind FROM _sync_ops WHERE kind != 3 ORDER BY op")]
    assert kinds == [0, 1, 2]


@pytest.mark.parametrize("recursive", ["on", "off"])
def test_insert_or_replace_and_upsert_replicate_with_or_without_recursive_triggers(tmp_path, recursive, make_db, rows, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute(f"PRAGMA recursive_triggers = {recursive}")
    a.execute("INSERT INTO todos VALUES (1, 'one', 0, 1.0), (2, 'two', 0, 2.0)")
    sync(a, b, tmp_path)
    a.execute("INSERT OR REPLACE INTO todos VALUES (1, 'replaced', 1, 9.0)")
    a.execute("INSERT INTO todos VALUES (2, 'upserted', 1, 8.0) ON CONFLICT (id) DO UPDATE SET title = excluded.title")
    sync(a, b, tmp_path)
    assert rows(b) == rows(a)
    assert [r[2] for r in rows(b)] == ["replaced", "upserted"]


def test_delete_removes_exactly_that_row(tmp_path, make_db, rows, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(1, "c"), (2, "b"), (3, "a")])
    sync(a, b, tmp_path)
    a.execute("DELETE FROM todos WHERE id = 1")
    sync(a, b, tmp_path)
    assert [r[0] for r in rows(b)] == [2, 3]


def test_log_is_append_only(tmp_path, make_db):
    conn = make_db(tmp_path / "a.db")
    conn.execute("INSERT INTO todos VALUES (1, 'x', 0, 0)")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE _sync_ops SET hlc = 0")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM _sync_ops")


def test_a_null_primary_key_is_refused_while_synced(tmp_path, make_db):
    # SQLite lets a rowid table's TEXT PRIMARY KEY hold NULL, and every NULL key looks the same to a peer.
    path = tmp_path / "data.db"
    conn = make_db(path, "CREATE TABLE t (id TEXT PRIMARY KEY, v)", ("t",))
    conn.execute("INSERT INTO t VALUES ('a', 1)")
    shell = subprocess.run(
        ["sqlite3", str(path), "INSERT INTO t VALUES (NULL, 2); UPDATE t SET id = NULL WHERE id = 'a';"],
        capture_output=True,
        text=True,
    )
    assert shell.returncode != 0
    assert "table 't' is synced, so its primary key (id) cannot be NULL" in shell.stderr
    assert conn.execute("SELECT id, v FROM t").fetchall() == [("a", 1)]
    assert conn.execute("SELECT count(*) FROM _sync_ops WHERE tid != 0").fetchone() == (1,)


def test_replace_that_removes_another_row_replicates_with_recursive_triggers(tmp_path, make_db, rows, sync):
    schema = "CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT UNIQUE)"
    a = make_db(tmp_path / "a.db", schema, ("people",))
    b = make_db(tmp_path / "b.db", schema, ("people",))
    a.execute("INSERT INTO people VALUES (1, 'x@example.com')")
    sync(a, b, tmp_path)
    a.execute("PRAGMA recursive_triggers = on")
    a.execute("INSERT OR REPLACE INTO people VALUES (2, 'x@example.com')")  # removes row 1
    sync(a, b, tmp_path)
    assert rows(b, "people") == rows(a, "people") == [(2, "integer", "x@example.com", "text")]


def test_a_column_named_like_the_trigger_clock_keeps_working_after_imports(tmp_path, make_db, rows, sync):
    # Importing rewrites the clock floor inside each capture trigger; quoted names are not touched.
    schema = """CREATE TABLE t (id INTEGER PRIMARY KEY, "VALUES (max(1, " TEXT, 'it''s' TEXT)"""
    a, b = (make_db(tmp_path / f"{n}.db", schema, ("t",)) for n in ("a", "b"))
    a.execute("INSERT INTO t VALUES (1, 'from a', 'x')")
    sync(a, b, tmp_path)
    b.execute("INSERT INTO t VALUES (2, 'from b', 'y')")
    b.execute("""UPDATE t SET "VALUES (max(1, " = 'edited on b' WHERE id = 1""")
    sync(b, a, tmp_path)
    assert rows(a, "t") == rows(b, "t")
    assert b.execute("SELECT * FROM t ORDER BY id").fetchall() == [(1, "edited on b", "x"), (2, "from b", "y")]
    assert sync_status(a)["warnings"] == sync_status(b)["warnings"] == []


def test_import_repairs_stale_triggers_on_the_receiver(tmp_path, make_db, rows, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    b.execute("DROP TRIGGER _sync_insert_todos")
    b.execute("INSERT INTO todos VALUES (9, 'missed on b', 0, 0)")
    a.execute("INSERT INTO todos VALUES (1, 'from a', 0, 0)")
    sync(a, b, tmp_path)
    assert sync_status(b)["warnings"] == []
    sync(b, a, tmp_path)
    assert rows(a) == rows(b)
    assert [r[0] for r in rows(a)] == [1, 9]


# The capture triggers datasette-sync made before they carried a clock floor: each looked up the
# last operation's clock. Taken verbatim from a database that version made.
EARLIER_CLOCK = (
    "(SELECT max(hlc + 1, CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) * 1024) "
    "FROM _sync_ops ORDER BY op DESC LIMIT 1)"
)


EARLIER_TRIGGERS = [
    'CREATE TRIGGER "_sync_insert_todos" AFTER INSERT ON "todos"\nBEGIN\n'
    "  INSERT INTO _sync_ops (hlc, tid, kind, mask, rowkey, c0, c1, c2, c3)\n"
    f'  VALUES ({EARLIER_CLOCK}, 1, 0, 15, NEW."id", NEW."id", NEW."title", NEW."done", NEW."score");\nEND',
    'CREATE TRIGGER "_sync_update_todos" AFTER UPDATE ON "todos"\n'
    'WHEN (NEW."id" IS NOT OLD."id") OR (NEW."title" IS NOT OLD."title") OR (NEW."done" IS NOT OLD."done") '
    'OR (NEW."score" IS NOT OLD."score")\nBEGIN\n'
    "  INSERT INTO _sync_ops (hlc, tid, kind, mask, rowkey, newkey, c0, c1, c2, c3)\n"
    f'  VALUES ({EARLIER_CLOCK}, 1, 1, ((NEW."id" IS NOT OLD."id") << 0) | ((NEW."title" IS NOT OLD."title") << 1) '
    '| ((NEW."done" IS NOT OLD."done") << 2) | ((NEW."score" IS NOT OLD."score") << 3), OLD."id",\n'
    '    CASE WHEN (NEW."id" IS NOT OLD."id") THEN NEW."id" END, NEW."id", NEW."title", NEW."done", NEW."score");\nEND',
    'CREATE TRIGGER "_sync_delete_todos" AFTER DELETE ON "todos"\nBEGIN\n'
    "  INSERT INTO _sync_ops (hlc, tid, kind, mask, rowkey, c0)\n"
    f'  VALUES ({EARLIER_CLOCK}, 1, 2, 0, OLD."id", OLD."id");\nEND',
]


def test_triggers_an_earlier_version_made_raise_no_warning_and_are_replaced_at_the_next_sync(tmp_path, make_db, rows, sync):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("BEGIN")
    for kind in ("insert", "update", "delete"):
        a.execute(f"DROP TRIGGER _sync_{kind}_todos")
    for sql in EARLIER_TRIGGERS:
        a.execute(sql)
    a.execute("COMMIT")
    a.execute("INSERT INTO todos VALUES (1, 'captured by the old triggers', 0, 0)")
    a.execute("UPDATE todos SET done = 1 WHERE id = 1")
    # They capture every write, so there is nothing to warn about.
    assert sync_status(a)["warnings"] == []
    assert sync_status(a)["tables"]["todos"]["operations"] == 2
    sync(a, b, tmp_path)
    assert rows(b) == rows(a) == [(1, "integer", "captured by the old triggers", "text", 1, "integer", 0.0, "real")]
    triggers = [sql for (sql,) in a.execute("SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'todos'")]
    assert len(triggers) == 3 and not any("ORDER BY op DESC" in sql for sql in triggers)
    a.execute("DELETE FROM todos WHERE id = 1")  # and the new ones capture too
    sync(a, b, tmp_path)
    assert rows(b) == rows(a) == []
