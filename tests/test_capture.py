"""Capture: every client's writes are logged by pure-SQL triggers, with exact values."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess

import pytest
import sqlite_utils
from hypothesis import HealthCheck, given, settings, strategies as st
from click.testing import CliRunner
from sqlite_utils.cli import cli

from sqlite_utils_sync import SyncError, enable_sync, sync_status

from sync_helpers import file_bytes, make_db, rows, sync

TRICKY_VALUES = [
    2**63 - 1,
    -(2**63),
    0.1 + 0.2,
    1 / 3,
    1e308,
    5e-324,
    "",
    "ünïcödé ✓ 🚀",
    b"\x00\xff\x10binary",
    b"",
    None,
]


def test_ops_are_captured_from_sqlite3_sqlite_utils_and_the_sqlite3_shell(tmp_path):
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


def test_triggers_use_only_builtin_functions(tmp_path):
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
def test_insert_or_replace_and_upsert_replicate_with_or_without_recursive_triggers(tmp_path, recursive):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute(f"PRAGMA recursive_triggers = {recursive}")
    a.execute("INSERT INTO todos VALUES (1, 'one', 0, 1.0), (2, 'two', 0, 2.0)")
    sync(a, b, tmp_path)
    a.execute("INSERT OR REPLACE INTO todos VALUES (1, 'replaced', 1, 9.0)")
    a.execute("INSERT INTO todos VALUES (2, 'upserted', 1, 8.0) ON CONFLICT (id) DO UPDATE SET title = excluded.title")
    sync(a, b, tmp_path)
    assert rows(b) == rows(a)
    assert [r[2] for r in rows(b)] == ["replaced", "upserted"]


def test_values_arrive_bit_identical_with_the_same_type(tmp_path):
    schema = "CREATE TABLE things (id INTEGER PRIMARY KEY, value)"
    a = make_db(tmp_path / "a.db", schema, ("things",))
    b = make_db(tmp_path / "b.db", schema, ("things",))
    a.executemany("INSERT INTO things VALUES (?, ?)", list(enumerate(TRICKY_VALUES)))
    sync(a, b, tmp_path)
    got = b.execute("SELECT value, typeof(value) FROM things ORDER BY id").fetchall()
    assert got == a.execute("SELECT value, typeof(value) FROM things ORDER BY id").fetchall()
    assert [v for v, _ in got] == TRICKY_VALUES
    # Updates too, including a change of type that compares equal (1 -> 1.0).
    a.execute("UPDATE things SET value = 1 WHERE id = 0")
    a.execute("UPDATE things SET value = 1.0 WHERE id = 0")
    sync(a, b, tmp_path)
    assert b.execute("SELECT value, typeof(value) FROM things WHERE id = 0").fetchone() == (1.0, "real")


REAL_SCHEMAS = [
    ('CREATE TABLE "order" ("select" TEXT PRIMARY KEY, "group by" TEXT, "it""s" INTEGER)', "order", ["b's", "x", 1]),
    ("CREATE TABLE pairs (a TEXT, b INTEGER, note TEXT, PRIMARY KEY (a, b))", "pairs", ["k", 2, "n"]),
    ("CREATE TABLE wr (k BLOB PRIMARY KEY, v TEXT) WITHOUT ROWID", "wr", [b"\x01\x02", "v"]),
    ("CREATE TABLE reals (k REAL PRIMARY KEY, v TEXT)", "reals", [0.1 + 0.2, "v"]),
]


@pytest.mark.parametrize("schema,table,values", REAL_SCHEMAS)
def test_real_schemas_insert_update_move_delete(tmp_path, schema, table, values):
    a = make_db(tmp_path / "a.db", schema, (table,))
    b = make_db(tmp_path / "b.db", schema, (table,))
    columns = [r[1] for r in a.execute(f'PRAGMA table_info("{table.replace(chr(34), chr(34) * 2)}")')]
    quoted = [f'"{c.replace(chr(34), chr(34) * 2)}"' for c in columns]
    t = f'"{table}"'
    a.execute(f"INSERT INTO {t} VALUES ({', '.join('?' * len(values))})", values)
    other = list(values)
    other[0] = other[0] + other[0] if not isinstance(other[0], float) else 2.5
    a.execute(f"INSERT INTO {t} VALUES ({', '.join('?' * len(other))})", other)
    sync(a, b, tmp_path)
    assert rows(b, table) == rows(a, table)
    # Update a non-key column of the first row only.
    a.execute(f"UPDATE {t} SET {quoted[-1]} = 'changed' WHERE {quoted[0]} = ?", [values[0]])
    sync(a, b, tmp_path)
    assert rows(b, table) == rows(a, table)
    # Change the primary key: replicates as a move.
    moved = "moved" if isinstance(values[0], str) else (b"moved" if isinstance(values[0], bytes) else 99.5)
    a.execute(f"UPDATE {t} SET {quoted[0]} = ? WHERE {quoted[0]} = ?", [moved, values[0]])
    sync(a, b, tmp_path)
    assert rows(b, table) == rows(a, table)
    # Delete exactly that row.
    a.execute(f"DELETE FROM {t} WHERE {quoted[0]} = ?", [moved])
    sync(a, b, tmp_path)
    assert rows(b, table) == rows(a, table)
    assert len(rows(b, table)) == 1


def test_delete_removes_exactly_that_row(tmp_path):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(1, "c"), (2, "b"), (3, "a")])
    sync(a, b, tmp_path)
    a.execute("DELETE FROM todos WHERE id = 1")
    sync(a, b, tmp_path)
    assert [r[0] for r in rows(b)] == [2, 3]


def test_log_is_append_only(tmp_path):
    conn = make_db(tmp_path / "a.db")
    conn.execute("INSERT INTO todos VALUES (1, 'x', 0, 0)")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("UPDATE _sync_ops SET hlc = 0")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        conn.execute("DELETE FROM _sync_ops")


def test_existing_rows_are_logged_when_sync_is_enabled(tmp_path):
    conn = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    conn.execute("CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL)")
    conn.executemany("INSERT INTO todos VALUES (?, 'x', 0, 0)", [(i,) for i in range(10)])
    assert enable_sync(conn, ["todos"]) == {"todos": 10}
    assert enable_sync(conn, ["todos"]) == {"todos": 0}  # idempotent
    b = make_db(tmp_path / "b.db")
    sync(conn, b, tmp_path)
    assert len(rows(b)) == 10


def run_cli(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


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
    ],
)
def test_enable_sync_refuses_bad_tables_and_changes_nothing(tmp_path, setup, table, message):
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


def test_enable_sync_cli_and_status_json(tmp_path):
    path = tmp_path / "data.db"
    sqlite_utils.Database(path)["todos"].insert({"id": 1, "title": "x"}, pk="id")
    result = run_cli("enable-sync", str(path), "todos")
    assert result.exit_code == 0
    status = json.loads(run_cli("sync-status", str(path), "--json").output)
    assert set(status) >= {"device_id", "clock", "tables", "operations", "unresolved_conflicts"}
    assert len(status["device_id"]) == 32
    assert status["clock"] == {status["device_id"]: 1}
    assert status["operations"] == 1
    assert list(status["tables"]) == ["todos"]


def test_disable_sync_stops_capture_and_keeps_the_log(tmp_path):
    path = tmp_path / "data.db"
    conn = make_db(path)
    conn.execute("INSERT INTO todos VALUES (1, 'x', 0, 0)")
    assert run_cli("disable-sync", str(path), "todos").exit_code == 0
    conn.execute("INSERT INTO todos VALUES (2, 'y', 0, 0)")
    assert conn.execute("SELECT count(*) FROM _sync_ops WHERE kind = 0").fetchone()[0] == 1
    result = run_cli("disable-sync", str(path), "todos")
    assert result.exit_code == 1 and "Table 'todos' is not synced" in result.output


SQLITE_VALUES = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",))),
    st.binary(),
)


@settings(max_examples=int(os.environ.get("VALUE_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keys=st.lists(
        st.one_of(
            st.integers(-(2**63), 2**63 - 1),
            st.floats(allow_nan=False),
            st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")),
            st.binary(),
        ),
        min_size=1,
        max_size=6,
    ),
    values=st.lists(SQLITE_VALUES, min_size=6, max_size=6),
    key_type=st.sampled_from(["", "REAL", "TEXT", "NUMERIC", "INT", "BLOB"]),
)
def test_any_key_and_value_round_trips_exactly(tmp_path_factory, keys, values, key_type):
    folder = tmp_path_factory.mktemp("values")
    schema = f"CREATE TABLE t (k {key_type} PRIMARY KEY, v)"
    a = make_db(folder / "a.db", schema, ("t",))
    b = make_db(folder / "b.db", schema, ("t",))
    for key, value in zip(keys, values):
        a.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", [key, value])
    sync(a, b, folder)
    assert rows(b, "t") == rows(a, "t")
    # Every copy computes the same row key for every operation (it identifies rows in conflicts).
    assert keys_of(b) == keys_of(a)
    # Updates and deletes find exactly the right rows, whatever the key looks like.
    first = a.execute("SELECT k FROM t ORDER BY rowid LIMIT 1").fetchone()[0]
    a.execute("UPDATE t SET v = 'updated' WHERE k IS ?", [first])
    a.execute("DELETE FROM t WHERE k IS NOT ? AND rowid = (SELECT max(rowid) FROM t)", [first])
    sync(a, b, folder)
    assert rows(b, "t") == rows(a, "t")


def test_text_keys_with_nul_are_refused_not_merged(tmp_path):
    schema = "CREATE TABLE t (k TEXT PRIMARY KEY, v)"
    a = make_db(tmp_path / "a.db", schema, ("t",))
    b = make_db(tmp_path / "b.db", schema, ("t",))
    a.executemany("INSERT INTO t VALUES (?, ?)", [("a\x00b", 1), ("a\x00c", 2)])
    before = file_bytes(tmp_path / "b.db")
    with pytest.raises(SyncError, match="primary key value contains a NUL character") as error:
        sync(a, b, tmp_path)
    assert error.value.reason == "unsupported_key"
    assert file_bytes(tmp_path / "b.db") == before


def test_a_null_primary_key_is_refused_while_synced(tmp_path):
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


def test_enable_sync_finds_a_table_however_its_name_is_cased(tmp_path):
    path = tmp_path / "data.db"
    make_db(path, "CREATE TABLE Todos (id INTEGER PRIMARY KEY, title TEXT)", ()).execute("INSERT INTO Todos VALUES (1, 'x')")
    result = run_cli("enable-sync", str(path), "TODOS", "todos")
    assert result.exit_code == 0
    assert "Todos" in result.output and result.output.count("\n") == 1
    assert list(json.loads(run_cli("sync-status", str(path), "--json").output)["tables"]) == ["Todos"]
    assert run_cli("disable-sync", str(path), "todos").exit_code == 0
    assert json.loads(run_cli("sync-status", str(path), "--json").output)["tables"] == {}


def keys_of(conn):
    devices = dict(conn.execute("SELECT idx, device_id FROM _sync_devices"))
    return sorted(
        (devices[op >> 40], op & (2**40 - 1), rowkey, newkey)
        for op, rowkey, newkey in conn.execute("SELECT op, rowkey, newkey FROM _sync_ops WHERE tid != 0")
    )


def test_enable_sync_notes_secondary_unique_constraints(tmp_path):
    path = tmp_path / "people.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT UNIQUE)")
    result = CliRunner().invoke(cli, ["enable-sync", str(path), "people"])
    assert result.exit_code == 0
    assert "Note: people has UNIQUE(email)" in result.output
    assert "recursive_triggers=ON" in result.output


def test_replace_that_removes_another_row_replicates_with_recursive_triggers(tmp_path):
    schema = "CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT UNIQUE)"
    a = make_db(tmp_path / "a.db", schema, ("people",))
    b = make_db(tmp_path / "b.db", schema, ("people",))
    a.execute("INSERT INTO people VALUES (1, 'x@example.com')")
    sync(a, b, tmp_path)
    a.execute("PRAGMA recursive_triggers = on")
    a.execute("INSERT OR REPLACE INTO people VALUES (2, 'x@example.com')")  # removes row 1
    sync(a, b, tmp_path)
    assert rows(b, "people") == rows(a, "people") == [(2, "integer", "x@example.com", "text")]


def test_rowid_keys_are_logged_exactly_as_quote_writes_them(tmp_path):
    # The capture triggers of an INTEGER PRIMARY KEY table store the key itself (TEXT affinity
    # renders it); an import computes it with quote(). Both must give one text per row.
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    ids = [-(2**63), -1, 0, 7, 2**63 - 1]
    a.executemany("INSERT INTO todos VALUES (?, 'x', 0, 0)", [(i,) for i in ids])
    a.execute("UPDATE todos SET id = 8 WHERE id = 7")
    a.execute("DELETE FROM todos WHERE id = -1")
    sync(a, b, tmp_path)
    logged = a.execute("SELECT rowkey, newkey FROM _sync_ops WHERE tid != 0 ORDER BY op").fetchall()
    assert logged == [(str(i), None) for i in ids] + [("7", "8"), ("-1", None)]
    assert keys_of(b) == keys_of(a)
    assert rows(b) == rows(a)


def test_a_column_named_like_the_trigger_clock_keeps_working_after_imports(tmp_path):
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
