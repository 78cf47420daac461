"""What syncing means: causal order, merges, conflicts and their resolution."""

from __future__ import annotations

import json
import pathlib
import time

import pytest
from click.testing import CliRunner
from sqlite_utils.cli import cli

from sqlite_utils_sync import SyncError, list_conflicts, resolve_conflict, sync_status

from sync_helpers import conflict_records, file_bytes, make_db, rows, sync


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def trio(tmp_path):
    return [make_db(tmp_path / f"{name}.db") for name in ("x", "y", "z")]


def test_relay_keeps_every_row_in_causal_order(tmp_path, trio):
    x, y, z = trio
    x.execute("INSERT INTO todos VALUES (1, 'draft', 0, 0)")
    sync(x, y, tmp_path)
    y.execute("UPDATE todos SET title = 'edited on y' WHERE id = 1")
    y.execute("INSERT INTO todos VALUES (2, 'from y', 0, 0)")
    sync(y, z, tmp_path)  # z gets x's insert and y's update in one bundle, relayed
    assert rows(z) == rows(y)
    assert z.execute("SELECT title FROM todos WHERE id = 1").fetchone() == ("edited on y",)
    assert list_conflicts(z) == []


def test_applying_remote_ops_captures_nothing(tmp_path, trio):
    x, y, _ = trio
    x.executemany("INSERT INTO todos VALUES (?, 't', 0, 0)", [(i,) for i in range(5)])
    sync(x, y, tmp_path)
    y_device = sync_status(y)["device_id"]
    # y wrote only its knowledge tick; none of x's rows came back as y's ops.
    assert sync_status(y)["clock"][y_device] == 1
    assert y.execute("SELECT count(*) FROM _sync_ops WHERE kind != 3 AND op >> 40 = (1 << 22) - 1").fetchone()[0] == 0


def test_concurrent_edits_of_different_columns_merge(tmp_path, trio):
    x, y, _ = trio
    x.execute("INSERT INTO todos VALUES (1, 'milk', 0, 1.0)")
    sync(x, y, tmp_path)
    x.execute("UPDATE todos SET title = 'oat milk' WHERE id = 1")
    y.execute("UPDATE todos SET done = 1 WHERE id = 1")
    sync(x, y, tmp_path)
    sync(y, x, tmp_path)
    assert rows(x) == rows(y)
    assert x.execute("SELECT title, done FROM todos").fetchone() == ("oat milk", 1)
    assert list_conflicts(x) == list_conflicts(y) == []


def test_identical_concurrent_edits_are_not_a_conflict(tmp_path, trio):
    x, y, _ = trio
    x.execute("INSERT INTO todos VALUES (1, 'milk', 0, 1.0)")
    sync(x, y, tmp_path)
    x.execute("UPDATE todos SET title = 'same' WHERE id = 1")
    y.execute("UPDATE todos SET title = 'same' WHERE id = 1")
    x.execute("INSERT INTO todos VALUES (2, 'twin', 0, 2.0)")
    y.execute("INSERT INTO todos VALUES (2, 'twin', 0, 2.0)")
    sync(x, y, tmp_path)
    sync(y, x, tmp_path)
    assert list_conflicts(x) == list_conflicts(y) == []
    assert rows(x) == rows(y)


def diverge(tmp_path, x, y, on_x: str, on_y: str):
    x.execute("INSERT INTO todos VALUES (1, 'milk', 0, 1.0)")
    sync(x, y, tmp_path)
    x.execute(on_x)
    y.execute(on_y)
    sync(x, y, tmp_path)
    sync(y, x, tmp_path)


@pytest.mark.parametrize(
    "on_x,on_y,columns",
    [
        ("UPDATE todos SET title = 'x title' WHERE id = 1", "UPDATE todos SET title = 'y title' WHERE id = 1", ["title"]),
        ("UPDATE todos SET title = 'x title' WHERE id = 1", "DELETE FROM todos WHERE id = 1", []),
        ("DELETE FROM todos WHERE id = 1", "UPDATE todos SET done = 1 WHERE id = 1", []),
    ],
)
def test_conflicts_are_detected_identically_on_both_sides(tmp_path, trio, on_x, on_y, columns):
    x, y, _ = trio
    diverge(tmp_path, x, y, on_x, on_y)
    assert rows(x) == rows(y)
    assert conflict_records(x) == conflict_records(y)
    [conflict] = list_conflicts(x)
    assert conflict["table"] == "todos"
    assert conflict["pk"] == [1]
    assert conflict["columns"] == columns
    assert len(conflict["versions"]) == 2
    assert conflict["resolved"] is False


def test_concurrent_inserts_of_one_key_with_different_values_conflict(tmp_path, trio):
    x, y, _ = trio
    x.execute("INSERT INTO todos VALUES (7, 'x version', 0, 1.0)")
    y.execute("INSERT INTO todos VALUES (7, 'y version', 1, 1.0)")
    sync(x, y, tmp_path)
    sync(y, x, tmp_path)
    assert rows(x) == rows(y)
    [conflict] = list_conflicts(y)
    assert conflict["columns"] == ["done", "title"]
    titles = {v["values"]["title"] for v in conflict["versions"]}
    assert titles == {"x version", "y version"}
    assert conflict["current"]["title"] in titles


def test_update_beating_a_delete_brings_the_row_back_with_winning_values(tmp_path, trio):
    x, y, z = trio
    x.execute("INSERT INTO todos VALUES (1, 'milk', 0, 1.0)")
    sync(x, y, tmp_path)
    sync(x, z, tmp_path)
    y.execute("DELETE FROM todos WHERE id = 1")
    time.sleep(0.01)  # not a timing assertion: makes the update's clock the later one
    x.execute("UPDATE todos SET title = 'later edit' WHERE id = 1")
    sync(y, z, tmp_path)  # z applies the delete first
    assert rows(z) == []
    sync(x, z, tmp_path)
    assert z.execute("SELECT id, title, done, score FROM todos").fetchall() == [(1, "later edit", 0, 1.0)]
    assert len(list_conflicts(z)) == 1


def test_a_row_brought_back_takes_each_columns_latest_value_on_every_copy(tmp_path, trio):
    x, y, z = trio
    y.execute("INSERT INTO todos VALUES (3, 'bread', 0, 0.0)")
    time.sleep(0.01)  # not a timing assertion: orders the clocks as the story says
    x.execute("INSERT INTO todos VALUES (3, 'eggs', 1, 0.0)")  # the same key, concurrently and later
    sync(x, y, tmp_path)
    y.execute("DELETE FROM todos WHERE id = 3")  # y deletes the row, having seen both inserts
    time.sleep(0.01)
    x.execute("UPDATE todos SET title = 'fish' WHERE id = 3")  # x, concurrently and later, edits it
    for source, target in ((y, x), (x, y), (x, z), (y, z)):
        sync(source, target, tmp_path)
    # The update beats the delete; `done` is still the later insert's, whichever copy is asked.
    for copy in (x, y, z):
        assert copy.execute("SELECT id, title, done FROM todos").fetchall() == [(3, "fish", 1)]
    assert conflict_records(x) == conflict_records(y) == conflict_records(z)


def test_cli_conflicts_json_and_resolution_syncs_everywhere(tmp_path, trio):
    x, y, z = trio
    diverge(
        tmp_path,
        x,
        y,
        "UPDATE todos SET title = 'x title' WHERE id = 1",
        "UPDATE todos SET title = 'y title' WHERE id = 1",
    )
    sync(y, z, tmp_path)
    listed = json.loads(run_cli("sync-conflicts", tmp_path / "z.db", "--json").output)
    [conflict] = listed
    assert set(conflict) >= {"id", "table", "pk", "columns", "versions", "current", "resolved"}
    assert set(conflict["versions"][0]) >= {"op", "device_id", "values"}
    y_version = next(v for v in conflict["versions"] if v["values"]["title"] == "y title")
    result = run_cli("sync-resolve", tmp_path / "x.db", conflict["id"], "--keep", y_version["op"])
    assert result.exit_code == 0
    assert x.execute("SELECT title FROM todos").fetchone() == ("y title",)
    assert list_conflicts(x) == []
    # A later plain edit elsewhere does not resolve anything by itself...
    z.execute("UPDATE todos SET done = 1 WHERE id = 1")
    assert len(list_conflicts(z)) == 1
    # ...the resolution does, once it arrives.
    for source, target in ((x, y), (y, z), (z, x), (x, y)):
        sync(source, target, tmp_path)
    for conn in trio:
        assert list_conflicts(conn) == []
        assert [c["resolved"] for c in list_conflicts(conn, include_resolved=True)] == [True]
        assert conn.execute("SELECT title, done FROM todos").fetchone() == ("y title", 1)
    all_resolved = json.loads(run_cli("sync-conflicts", tmp_path / "y.db", "--all", "--json").output)
    assert all_resolved[0]["resolved"] is True


def test_resolve_without_keep_accepts_the_current_value(tmp_path, trio):
    x, y, _ = trio
    diverge(
        tmp_path,
        x,
        y,
        "UPDATE todos SET title = 'x title' WHERE id = 1",
        "UPDATE todos SET title = 'y title' WHERE id = 1",
    )
    current = x.execute("SELECT title FROM todos").fetchone()
    [conflict] = list_conflicts(x)
    resolve_conflict(x, conflict["id"])
    assert x.execute("SELECT title FROM todos").fetchone() == current
    sync(x, y, tmp_path)
    assert list_conflicts(y) == []
    with pytest.raises(SyncError, match="already resolved"):
        resolve_conflict(x, conflict["id"])
    result = run_cli("sync-resolve", tmp_path / "x.db", "nope")
    assert result.exit_code == 1 and "No conflict with id nope" in result.output


def test_keep_must_name_a_version(tmp_path, trio):
    x, y, _ = trio
    diverge(tmp_path, x, y, "UPDATE todos SET title = 'a' WHERE id = 1", "UPDATE todos SET title = 'b' WHERE id = 1")
    [conflict] = list_conflicts(x)
    result = run_cli("sync-resolve", tmp_path / "x.db", conflict["id"], "--keep", "abc:1")
    assert result.exit_code == 1
    assert f"abc:1 is not a version of conflict {conflict['id']}" in result.output


def test_keeping_a_version_restores_only_the_disputed_columns(tmp_path, trio):
    x, y, _ = trio
    x.execute("INSERT INTO todos VALUES (1, 'milk', 0, 1.0)")
    sync(x, y, tmp_path)
    x.execute("UPDATE todos SET title = 'x title' WHERE id = 1")
    # y rewrites the whole row (an insert writes every column), disagreeing on the title only
    y.execute("INSERT OR REPLACE INTO todos VALUES (1, 'y title', 0, 1.0)")
    sync(y, x, tmp_path)
    x.execute("UPDATE todos SET score = 5.0 WHERE id = 1")  # a later edit, after seeing y's
    [conflict] = list_conflicts(x)
    assert conflict["columns"] == ["title"]
    y_version = next(v["op"] for v in conflict["versions"] if v["values"]["title"] == "y title")
    resolve_conflict(x, conflict["id"], keep=y_version)
    assert x.execute("SELECT title, score FROM todos").fetchone() == ("y title", 5.0)
    sync(x, y, tmp_path)
    assert rows(y) == rows(x)


def test_foreign_keys_enforced_on_both_sides(tmp_path):
    schema = (
        "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, list_id INTEGER REFERENCES lists(id) ON DELETE CASCADE);"
        "CREATE TABLE lists (id INTEGER PRIMARY KEY, name TEXT)"
    )
    a = make_db(tmp_path / "a.db", schema, ("todos", "lists"))
    b = make_db(tmp_path / "b.db", schema, ("todos", "lists"))
    for conn in (a, b):
        conn.execute("PRAGMA foreign_keys = ON")
    # Children arrive in the same bundle as their parent, whatever order tables are applied in.
    a.execute("INSERT INTO lists VALUES (1, 'groceries')")
    a.executemany("INSERT INTO todos VALUES (?, ?, 1)", [(1, "milk"), (2, "eggs")])
    sync(a, b, tmp_path)
    assert rows(b) == rows(a) and rows(b, "lists") == rows(a, "lists")
    # A cascade on the sender is captured row by row; the receiver ends up the same.
    a.execute("DELETE FROM lists WHERE id = 1")
    assert rows(a) == []
    sync(a, b, tmp_path)
    assert rows(b) == [] and rows(b, "lists") == []
    assert b.execute("PRAGMA foreign_key_check").fetchall() == []


def test_concurrent_edits_that_arrive_while_a_table_is_not_synced_still_become_a_conflict(tmp_path, trio):
    from sqlite_utils_sync import disable_sync, enable_sync

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


def test_resolving_right_after_a_column_was_added(tmp_path, trio):
    x, y, _ = trio
    x.execute("INSERT INTO todos VALUES (1, 'orig', 0, 0)")
    sync(x, y, tmp_path)
    x.execute("UPDATE todos SET title = 'from x' WHERE id = 1")
    y.execute("UPDATE todos SET title = 'from y' WHERE id = 1")
    sync(x, y, tmp_path)
    y.execute("ALTER TABLE todos ADD COLUMN due TEXT")  # capture is stale until repaired
    (conflict,) = list_conflicts(y)
    path = y.execute("PRAGMA database_list").fetchone()[2]
    result = CliRunner().invoke(cli, ["sync-resolve", path, conflict["id"]], catch_exceptions=False)
    assert result.exit_code == 0 and result.output.startswith(f"Resolved {conflict['id']} with operation")
    assert list_conflicts(y) == []


def test_keeping_a_version_whose_unique_value_is_taken_now_is_one_line(tmp_path):
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


def test_enabling_sync_where_a_peers_value_meets_a_unique_value_set_meanwhile_is_one_line(tmp_path):
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
