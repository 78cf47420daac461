"""UNIQUE constraints across copies. Rows that swap or rotate UNIQUE values converge,
however the permutation was logged: step by step through a temporary value (sync on), or as
one direct swap (made while sync was off, logged when it was enabled again), and also on a
copy that adopts it on enabling; an import applies such steps in their authors' order, and
keeps the concurrent edits that win here. A value taken here is a one-line error that says
what to do, on import, on enabling and on resolving."""

from __future__ import annotations

import pathlib
import shutil
import sqlite3
import subprocess
import time

import pytest

from sqlite_utils_sync import BundleError, disable_sync, enable_sync, export_bundle, import_bundle, list_conflicts
from sqlite_utils_sync.reconcile import reconcile_table
from sqlite_utils_sync.capture import load_tables


needs_shell = pytest.mark.skipif(not shutil.which("sqlite3"), reason="needs the sqlite3 shell")

T_UNIQ = "CREATE TABLE t_uniq (id INTEGER PRIMARY KEY, code TEXT UNIQUE, qty INTEGER)"
SWAP_THROUGH_TMP = (
    "UPDATE t_uniq SET code = 'tmp' WHERE id = 1; "
    "UPDATE t_uniq SET code = 'X' WHERE id = 2; "
    "UPDATE t_uniq SET code = 'Y' WHERE id = 1;"
)


def sqlite3_shell(path, sql: str) -> None:
    subprocess.run(["sqlite3", str(path), sql], check=True, capture_output=True)


@pytest.fixture(scope="session")
def cli(run):
    """``cli(*args)``: the real ``sqlite-utils`` command, which must succeed."""

    def cli(*args):
        return run(["sqlite-utils", *args])

    return cli


def table(path):
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT id, code, qty FROM t_uniq ORDER BY id").fetchall()
    finally:
        conn.close()


def logged_codes(path):
    """Every code value any operation on t_uniq carries: a value set aside never is one."""
    conn = sqlite3.connect(path)
    try:
        slot = conn.execute("SELECT value FROM _sync_tables, json_each(columns) WHERE key = 'code'").fetchone()[0]
        return {code for (code,) in conn.execute(f"SELECT DISTINCT c{slot} FROM _sync_ops WHERE kind != 3")}
    finally:
        conn.close()


def assert_table_matches_its_log(conn, name):
    """A repair would log nothing: no write made on the way (a value set aside) was captured,
    and nothing the operations imply is missing."""
    conn.execute("BEGIN")
    try:
        assert reconcile_table(conn, load_tables(conn)[name]) == 0
        assert not conn.execute("SELECT 1 FROM _sync_unapplied LIMIT 1").fetchone()
    finally:
        conn.execute("ROLLBACK")


@pytest.fixture(scope="session")
def copies(cli):
    """``names`` copies of t_uniq holding (1, 'X'), (2, 'Y'), all synced from the first."""

    def copies(tmp_path, names):
        paths = [tmp_path / f"{name}.db" for name in names]
        for path in paths:
            sqlite3_shell(path, T_UNIQ)
        sqlite3_shell(paths[0], "INSERT INTO t_uniq VALUES (1, 'X', 10), (2, 'Y', 20)")
        for path in paths:
            cli("enable-sync", path, "t_uniq")
        cli("export-bundle", paths[0], tmp_path / "first.bundle")
        for path in paths[1:]:
            cli("import-bundle", path, tmp_path / "first.bundle")
        return paths

    return copies


@needs_shell
def test_a_swap_made_while_sync_was_disabled_imports_on_every_peer(tmp_path, cli, copies):
    a, b, c = copies(tmp_path, "abc")
    cli("disable-sync", a, "t_uniq")
    sqlite3_shell(a, SWAP_THROUGH_TMP)
    cli("enable-sync", a, "t_uniq")  # logs the result: a direct two-row swap
    cli("export-bundle", a, tmp_path / "swap.bundle")
    cli("import-bundle", b, tmp_path / "swap.bundle")
    cli("export-bundle", b, tmp_path / "relay.bundle")  # and onward from b
    cli("import-bundle", c, tmp_path / "relay.bundle")
    assert table(a) == table(b) == table(c) == [(1, "Y", 10), (2, "X", 20)]
    assert logged_codes(b) == logged_codes(a) == {"X", "Y"}
    for path in (b, c):  # nothing was captured on the way: the tables are what their logs say
        assert_table_matches_its_log(sqlite3.connect(path, isolation_level=None), "t_uniq")


@needs_shell
def test_enabling_a_table_that_received_a_peers_swap_adopts_it(tmp_path, cli, copies):
    a, b, c = copies(tmp_path, "abc")
    cli("disable-sync", b, "t_uniq")  # b writes nothing to t_uniq meanwhile
    sqlite3_shell(a, SWAP_THROUGH_TMP)  # sync on: logged step by step
    cli("export-bundle", a, tmp_path / "swap.bundle")
    cli("import-bundle", b, tmp_path / "swap.bundle")  # kept, not applied
    cli("import-bundle", c, tmp_path / "swap.bundle")
    assert table(b) == [(1, "X", 10), (2, "Y", 20)]
    cli("enable-sync", b, "t_uniq")
    assert table(a) == table(b) == table(c) == [(1, "Y", 10), (2, "X", 20)]
    cli("export-bundle", b, tmp_path / "back.bundle")
    cli("import-bundle", a, tmp_path / "back.bundle")
    assert table(a) == [(1, "Y", 10), (2, "X", 20)]
    assert logged_codes(b) == {"X", "Y", "tmp"}  # the peer's steps, and nothing of b's own
    assert_table_matches_its_log(sqlite3.connect(b, isolation_level=None), "t_uniq")


ROTATE = [(1, "tmp"), (3, "X"), (2, "Z"), (1, "Y")]  # X, Y, Z on rows 1, 2, 3 -> Y, Z, X

SCHEMAS = {
    "column constraint": ("CREATE TABLE t (id INTEGER PRIMARY KEY, code TEXT UNIQUE, qty INTEGER)", "code"),
    "unique index, NOT NULL": (
        "CREATE TABLE t (id INTEGER PRIMARY KEY, code TEXT NOT NULL, qty INTEGER);"
        "CREATE UNIQUE INDEX t_code ON t (code)",
        "code",
    ),
    "STRICT, NOT NULL integer": (
        "CREATE TABLE t (id INTEGER PRIMARY KEY, code INTEGER NOT NULL UNIQUE, qty INTEGER) STRICT",
        "code",
    ),
    "expression index": (
        "CREATE TABLE t (id INTEGER PRIMARY KEY, code TEXT, qty INTEGER);"
        "CREATE UNIQUE INDEX t_code ON t (lower(code))",
        "code",
    ),
}


def rotation_values(schema):
    if "INTEGER NOT NULL UNIQUE" in schema:
        return {"X": 1, "Y": 2, "Z": 3, "tmp": -7}
    return {v: v for v in ("X", "Y", "Z", "tmp")}


@pytest.mark.parametrize("schema_name", SCHEMAS)
@pytest.mark.parametrize("disabled", ["sender", "receiver"])
def test_a_three_way_rotation_converges_across_disable_and_enable(tmp_path, schema_name, disabled, make_db, rows, sync):
    schema, column = SCHEMAS[schema_name]
    value = rotation_values(schema)
    a, b, c = (make_db(tmp_path / f"{n}.db", schema, ("t",)) for n in "abc")
    a.executemany("INSERT INTO t VALUES (?, ?, ?)", [(1, value["X"], 1), (2, value["Y"], 2), (3, value["Z"], 3)])
    sync(a, b, tmp_path)
    sync(a, c, tmp_path)
    if disabled == "sender":
        disable_sync(a, ["t"])
    if disabled == "receiver":
        disable_sync(b, ["t"])
    for row, code in ROTATE:
        a.execute(f"UPDATE t SET {column} = ? WHERE id = ?", [value[code], row])
    b.execute("UPDATE t SET qty = 20 WHERE id = 2")  # an edit of another column meanwhile
    if disabled == "sender":
        enable_sync(a, ["t"])
    sync(a, b, tmp_path)
    if disabled == "receiver":
        enable_sync(b, ["t"])
    for source, target in ((b, c), (b, a), (c, a)):
        sync(source, target, tmp_path)
    expected = [(1, value["Y"], 1), (2, value["Z"], 20), (3, value["X"], 3)]
    for conn in (a, b, c):
        assert conn.execute("SELECT * FROM t ORDER BY id").fetchall() == expected
    assert rows(a, "t") == rows(b, "t") == rows(c, "t")
    for conn in (a, b, c):  # what was set aside on the way was never captured
        assert_table_matches_its_log(conn, "t")


COMPOSITE = (
    "CREATE TABLE shifts (id INTEGER PRIMARY KEY, day TEXT NOT NULL, slot INTEGER NOT NULL, who TEXT,"
    " UNIQUE (day, slot))"
)


@pytest.mark.parametrize("disabled", ["sender", "receiver"])
def test_a_swap_in_a_composite_unique_constraint_converges(tmp_path, disabled, make_db, rows, sync):
    a, b = (make_db(tmp_path / f"{n}.db", COMPOSITE, ("shifts",)) for n in "ab")
    a.executemany(
        "INSERT INTO shifts VALUES (?, ?, ?, ?)",
        [(1, "mon", 1, "ann"), (2, "mon", 2, "bob"), (3, "tue", 1, "cy")],
    )
    sync(a, b, tmp_path)
    disable_sync(a if disabled == "sender" else b, ["shifts"])
    for row, slot in ((1, 99), (2, 1), (1, 2)):  # ann and bob swap Monday's slots
        a.execute("UPDATE shifts SET slot = ? WHERE id = ?", [slot, row])
    if disabled == "sender":
        enable_sync(a, ["shifts"])
    sync(a, b, tmp_path)
    if disabled == "receiver":
        enable_sync(b, ["shifts"])
    sync(b, a, tmp_path)
    expected = [(1, "mon", 2, "ann"), (2, "mon", 1, "bob"), (3, "tue", 1, "cy")]
    assert a.execute("SELECT * FROM shifts ORDER BY id").fetchall() == expected
    assert rows(a, "shifts") == rows(b, "shifts")
    assert_table_matches_its_log(b, "shifts")


def test_a_final_state_that_breaks_the_constraint_is_still_refused(tmp_path, file_bytes, make_db, sync):
    # Setting values aside only lets values move: two rows ending with one value still fail.
    schema = "CREATE TABLE t (id INTEGER PRIMARY KEY, code TEXT NOT NULL UNIQUE)"
    a, b = make_db(tmp_path / "a.db", schema, ("t",)), make_db(tmp_path / "b.db", schema, ("t",))
    a.executemany("INSERT INTO t VALUES (?, ?)", [(1, "X"), (2, "Y")])
    sync(a, b, tmp_path)
    disable_sync(a, ["t"])
    for row, code in ((1, "tmp"), (2, "X"), (1, "Y")):
        a.execute("UPDATE t SET code = ? WHERE id = ?", [code, row])
    enable_sync(a, ["t"])  # a direct swap: row 1 takes Y
    time.sleep(0.01)
    b.execute("UPDATE t SET code = 'Q' WHERE id = 2")  # later than a's swap: row 2 keeps Q
    b.execute("INSERT INTO t VALUES (3, 'Y')")  # and Y, free here, goes to a new row
    export_bundle(a, tmp_path / "a.bundle")
    before = file_bytes(tmp_path / "b.db")
    with pytest.raises(BundleError) as caught:
        import_bundle(b, tmp_path / "a.bundle")
    assert caught.value.reason == "constraint_failed"
    assert "UNIQUE constraint failed: t.code" in str(caught.value)
    assert file_bytes(tmp_path / "b.db") == before


def test_enable_sync_notes_a_unique_expression_index_without_a_traceback(tmp_path, run):
    path = tmp_path / "e.db"
    conn = sqlite3.connect(path)
    conn.executescript("CREATE TABLE t (id INTEGER PRIMARY KEY, code TEXT); CREATE UNIQUE INDEX t_code ON t (lower(code))")
    conn.close()
    result = run(["sqlite-utils", "enable-sync", path, "t"], check=False)
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert "Note: t has UNIQUE(<expression>): an INSERT OR REPLACE" in result.stderr


CASCADE = (
    "CREATE TABLE t (id INTEGER PRIMARY KEY, code TEXT UNIQUE);"
    "CREATE TABLE c (id INTEGER PRIMARY KEY, pcode TEXT REFERENCES t (code) ON UPDATE CASCADE)"
)


@pytest.mark.parametrize("disabled", ["sender", "receiver"])
def test_rows_whose_foreign_key_cascades_from_a_swapped_value_keep_their_own_values(tmp_path, disabled, make_db, sync):
    # On the author the children follow their parent rows (the cascade is captured); values
    # set aside on the way must not reach them on the copies.
    a, b = (make_db(tmp_path / f"{n}.db", CASCADE, ("t", "c")) for n in "ab")
    for conn in (a, b):
        conn.execute("PRAGMA foreign_keys = ON")
    a.execute("INSERT INTO t VALUES (1, 'X'), (2, 'Y')")
    a.execute("INSERT INTO c VALUES (10, 'X'), (20, 'Y')")
    sync(a, b, tmp_path)
    disable_sync(a if disabled == "sender" else b, ["t"])
    for row, code in ((1, "tmp"), (2, "X"), (1, "Y")):
        a.execute("UPDATE t SET code = ? WHERE id = ?", [code, row])
    if disabled == "sender":
        enable_sync(a, ["t"])
    sync(a, b, tmp_path)
    if disabled == "receiver":
        enable_sync(b, ["t"])
    for conn in (a, b):
        assert conn.execute("SELECT * FROM t ORDER BY id").fetchall() == [(1, "Y"), (2, "X")]
        assert conn.execute("SELECT * FROM c ORDER BY id").fetchall() == [(10, "Y"), (20, "X")]
        assert_table_matches_its_log(conn, "c")


def test_a_unique_value_taken_here_is_a_clear_error_and_a_way_on(tmp_path, file_bytes, make_db, rows, run_cli, sync):
    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT UNIQUE)"
    a, b = make_db(tmp_path / "a.db", schema), make_db(tmp_path / "b.db", schema)
    a.execute("INSERT INTO todos VALUES (3, 'same')")
    b.execute("INSERT INTO todos VALUES (4, 'same')")
    export_bundle(a, tmp_path / "a.bundle")
    before = file_bytes(tmp_path / "b.db")
    result = run_cli("import-bundle", tmp_path / "b.db", tmp_path / "a.bundle")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("Error: Bundle a.bundle cannot be applied: UNIQUE constraint failed: todos.title")
    assert "If a row here holds that value, change it (the change syncs too) and try again" in result.output
    assert file_bytes(tmp_path / "b.db") == before
    assert not b.in_transaction
    b.execute("UPDATE todos SET title = 'same (phone)' WHERE id = 4")
    sync(a, b, tmp_path)
    sync(b, a, tmp_path)
    assert rows(a) == rows(b)
    assert a.execute("SELECT * FROM todos ORDER BY id").fetchall() == [(3, "same"), (4, "same (phone)")]


def test_unique_values_handed_between_rows_import_in_their_authors_order(tmp_path, make_db, rows, sync):
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


def test_an_ordered_import_keeps_concurrent_edits_that_win_here(tmp_path, conflict_records, make_db, rows, sync):
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


def test_a_valid_merge_imports_even_when_the_authors_orders_cross(tmp_path, make_db, rows, sync):
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


def test_keeping_a_version_whose_unique_value_is_taken_now_is_one_line(tmp_path, make_db, run_cli, sync):
    schema = "CREATE TABLE items (id INTEGER PRIMARY KEY, code TEXT UNIQUE)"
    x, y = make_db(tmp_path / "x.db", schema, ("items",)), make_db(tmp_path / "y.db", schema, ("items",))
    x.execute("INSERT INTO items VALUES (1, 'aa'), (2, 'cc')")
    sync(x, y, tmp_path)
    x.execute("UPDATE items SET code = 'bb' WHERE id = 2")
    time.sleep(0.01)
    y.execute("UPDATE items SET code = 'zz' WHERE id = 2")  # later: in the table now
    sync(x, y, tmp_path)
    y.execute("UPDATE items SET code = 'bb' WHERE id = 1")  # the losing version's value, taken
    (conflict,) = list_conflicts(y)
    losing = next(v["op"] for v in conflict["versions"] if v["values"]["code"] == "bb")
    path = y.execute("PRAGMA database_list").fetchone()[2]
    before = pathlib.Path(path).read_bytes()
    result = run_cli("sync-resolve", path, conflict["id"], "--keep", losing)
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert f"Error: Conflict {conflict['id']} cannot be resolved that way: UNIQUE constraint failed" in result.output
    assert pathlib.Path(path).read_bytes() == before


def test_enabling_sync_where_a_peers_value_meets_a_unique_value_set_meanwhile_is_one_line(tmp_path, file_bytes, make_db, run_cli, sync):
    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT UNIQUE)"
    a, b = make_db(tmp_path / "a.db", schema), make_db(tmp_path / "b.db", schema)
    a.execute("INSERT INTO todos VALUES (1, 'milk')")
    sync(a, b, tmp_path)
    run_cli("disable-sync", tmp_path / "b.db", "todos")
    b.execute("INSERT INTO todos VALUES (2, 'eggs')")  # written while b does not sync todos
    a.execute("UPDATE todos SET title = 'eggs' WHERE id = 1")
    sync(a, b, tmp_path)  # kept for later: b does not sync todos now
    before = file_bytes(tmp_path / "b.db")
    result = run_cli("enable-sync", tmp_path / "b.db", "todos")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert result.output.startswith("Error: Cannot bring todos up to date with what peers wrote while sync was off")
    assert "UNIQUE constraint failed: todos.title" in result.output
    assert file_bytes(tmp_path / "b.db") == before
    # Once the local row gives the value up, enabling takes the peer's value.
    b.execute("UPDATE todos SET title = 'eggs (b)' WHERE id = 2")
    assert run_cli("enable-sync", tmp_path / "b.db", "todos").exit_code == 0
    assert b.execute("SELECT id, title FROM todos ORDER BY id").fetchall() == [(1, "eggs"), (2, "eggs (b)")]


def test_enable_sync_notes_secondary_unique_constraints(tmp_path, run_cli):
    path = tmp_path / "people.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE people (id INTEGER PRIMARY KEY, email TEXT UNIQUE)")
    result = run_cli("enable-sync", path, "people")
    assert result.exit_code == 0
    assert "Note: people has UNIQUE(email)" in result.output
    assert "recursive_triggers=ON" in result.output


@pytest.mark.parametrize(
    "declared,value,error",
    [
        ("title TEXT CHECK (title != 'bad')", "'bad'", "CHECK constraint failed"),
        ("title TEXT NOT NULL", "NULL", "NOT NULL constraint failed: todos.title"),
    ],
)
def test_a_constraint_only_this_copy_declares_is_a_clear_error(tmp_path, file_bytes, make_db, run_cli, declared, value, error):
    a = make_db(tmp_path / "a.db", "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT)")
    b = make_db(tmp_path / "b.db", f"CREATE TABLE todos (id INTEGER PRIMARY KEY, {declared})")
    a.execute(f"INSERT INTO todos VALUES (1, {value})")
    export_bundle(a, tmp_path / "a.bundle")
    before = file_bytes(tmp_path / "b.db")
    result = run_cli("import-bundle", tmp_path / "b.db", tmp_path / "a.bundle")
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert error in result.output
    assert "declare the table alike on every copy, or change the value where it was written" in result.output
    assert file_bytes(tmp_path / "b.db") == before
