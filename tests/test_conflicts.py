"""Conflicts: concurrent edits that disagree are detected identically on every copy, listed,
and resolved (keeping a version, or what the table holds), and the resolution syncs everywhere."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from sqlite_utils.cli import cli

from sqlite_utils_sync import SyncError, list_conflicts, resolve_conflict


def test_identical_concurrent_edits_are_not_a_conflict(tmp_path, trio, rows, sync):
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


@pytest.fixture(scope="session")
def diverge(sync):
    """``diverge(tmp_path, x, y, on_x, on_y)``: x and y share a row, then each runs its own
    statement on it, then they sync both ways."""

    def diverge(tmp_path, x, y, on_x: str, on_y: str):
        x.execute("INSERT INTO todos VALUES (1, 'milk', 0, 1.0)")
        sync(x, y, tmp_path)
        x.execute(on_x)
        y.execute(on_y)
        sync(x, y, tmp_path)
        sync(y, x, tmp_path)

    return diverge


@pytest.mark.parametrize(
    "on_x,on_y,columns",
    [
        ("UPDATE todos SET title = 'x title' WHERE id = 1", "UPDATE todos SET title = 'y title' WHERE id = 1", ["title"]),
        ("UPDATE todos SET title = 'x title' WHERE id = 1", "DELETE FROM todos WHERE id = 1", []),
        ("DELETE FROM todos WHERE id = 1", "UPDATE todos SET done = 1 WHERE id = 1", []),
    ],
)
def test_conflicts_are_detected_identically_on_both_sides(tmp_path, trio, on_x, on_y, columns, conflict_records, rows, diverge):
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


def test_concurrent_inserts_of_one_key_with_different_values_conflict(tmp_path, trio, rows, sync):
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


def test_cli_conflicts_json_and_resolution_syncs_everywhere(tmp_path, trio, run_cli, sync, diverge):
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


def test_resolve_without_keep_accepts_the_current_value(tmp_path, trio, run_cli, sync, diverge):
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


def test_keep_must_name_a_version(tmp_path, trio, run_cli, diverge):
    x, y, _ = trio
    diverge(tmp_path, x, y, "UPDATE todos SET title = 'a' WHERE id = 1", "UPDATE todos SET title = 'b' WHERE id = 1")
    [conflict] = list_conflicts(x)
    result = run_cli("sync-resolve", tmp_path / "x.db", conflict["id"], "--keep", "abc:1")
    assert result.exit_code == 1
    assert f"abc:1 is not a version of conflict {conflict['id']}" in result.output


def test_keeping_a_version_restores_only_the_disputed_columns(tmp_path, trio, rows, sync):
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


def test_keeping_a_version_restores_the_whole_row_when_a_delete_was_disputed_too(tmp_path, trio, rows, everyone_syncs):
    # z deletes the row while x and y edit its title: the record's columns name the title (x
    # against y), but whether the row exists is disputed too, so keeping x's version restores
    # all of it, as it does without y's edit.
    x, y, z = trio
    x.execute("INSERT INTO todos VALUES (1, 'milk', 0, 1.0)")
    everyone_syncs(trio, tmp_path)
    z.execute("DELETE FROM todos WHERE id = 1")
    x.execute("UPDATE todos SET title = 'x title', done = 5 WHERE id = 1")
    y.execute("UPDATE todos SET title = 'y title' WHERE id = 1")
    everyone_syncs(trio, tmp_path)
    x.execute("UPDATE todos SET done = 9 WHERE id = 1")  # a plain later edit
    [conflict] = list_conflicts(x)
    assert conflict["columns"] == ["title"] and "delete" in [v["kind"] for v in conflict["versions"]]
    x_version = next(v["op"] for v in conflict["versions"] if v["values"] and v["values"].get("done") == 5)
    resolve_conflict(x, conflict["id"], keep=x_version)
    assert x.execute("SELECT title, done FROM todos").fetchone() == ("x title", 5)
    everyone_syncs(trio, tmp_path)
    assert rows(x) == rows(y) == rows(z)


def test_resolving_right_after_a_column_was_added(tmp_path, trio, sync):
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
