"""Merging: operations apply in causal order (relayed too), concurrent edits of different
columns merge, the latest write of a column wins, an update beats a concurrent delete, and
foreign keys hold on both sides. When edits disagree: test_conflicts.py."""

from __future__ import annotations

import time

from sqlite_utils_sync import list_conflicts, sync_status


def test_relay_keeps_every_row_in_causal_order(tmp_path, trio, rows, sync):
    x, y, z = trio
    x.execute("INSERT INTO todos VALUES (1, 'draft', 0, 0)")
    sync(x, y, tmp_path)
    y.execute("UPDATE todos SET title = 'edited on y' WHERE id = 1")
    y.execute("INSERT INTO todos VALUES (2, 'from y', 0, 0)")
    sync(y, z, tmp_path)  # z gets x's insert and y's update in one bundle, relayed
    assert rows(z) == rows(y)
    assert z.execute("SELECT title FROM todos WHERE id = 1").fetchone() == ("edited on y",)
    assert list_conflicts(z) == []


def test_applying_remote_ops_captures_nothing(tmp_path, trio, sync):
    x, y, _ = trio
    x.executemany("INSERT INTO todos VALUES (?, 't', 0, 0)", [(i,) for i in range(5)])
    sync(x, y, tmp_path)
    y_device = sync_status(y)["device_id"]
    # y wrote only its knowledge tick; none of x's rows came back as y's ops.
    assert sync_status(y)["clock"][y_device] == 1
    assert y.execute("SELECT count(*) FROM _sync_ops WHERE kind != 3 AND op >> 40 = (1 << 22) - 1").fetchone()[0] == 0


def test_concurrent_edits_of_different_columns_merge(tmp_path, trio, rows, sync):
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


def test_update_beating_a_delete_brings_the_row_back_with_winning_values(tmp_path, trio, rows, sync):
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


def test_a_row_brought_back_takes_each_columns_latest_value_on_every_copy(tmp_path, trio, conflict_records, sync):
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


def test_foreign_keys_enforced_on_both_sides(tmp_path, make_db, rows, sync):
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
