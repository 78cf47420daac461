"""The convergence judge with schema drift: copies add columns (declared alike wherever they
are added by hand), write them, drop columns with ``sqlite-utils transform`` (sync repairs
itself after), resolve conflicts, and sync with ``--alter`` in any order. Once everyone has
synced with everyone until nothing moves, every copy must have the same columns, the same
rows with the same values and types in each, and the same conflict records.

Left out, as documented limits (README, "Schema drift"): copies declaring a column differently,
renames, columns added while sync is disabled and written meanwhile, generated columns."""

from __future__ import annotations

import os
import pathlib
import sqlite3
import tempfile
import types

import pytest
import sqlite_utils
from hypothesis import HealthCheck, given, settings, strategies as st

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, list_conflicts, resolve_conflict, sync_status
from sqlite_utils_sync.capture import load_tables
from sqlite_utils_sync.reconcile import reconcile_table

TODOS = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL)"
# Every column a copy may have, declared the same way wherever it is added by hand. The first
# three are the table's own: a copy that dropped one may add it back.
DECLARED = {
    "title": "TEXT",
    "done": "INTEGER",
    "score": "REAL",
    "list": "TEXT DEFAULT 'g'",
    "prio": "INTEGER NOT NULL DEFAULT 0",
    "note": "TEXT",
}
COLUMNS = list(DECLARED)
# Some values are not of their column's type: affinity converts '7' to 7 in an INTEGER
# column, and every copy declares a column alike, so every copy must store the same.
VALUES = {
    "title": ["milk", "eggs", None, "", 3],
    "done": [0, 1, None, "7"],
    "score": [0.1 + 0.2, 1 / 3, -0.5, None, "2.5"],
    "list": ["g", "home", None],
    "prio": [0, 1, 2, "3"],  # NOT NULL
    "note": ["x", "y", None, "", b"\x00b"],
}

DEVICE = st.integers(0, 3)  # mod the device count
write = st.tuples(
    st.just("write"),
    DEVICE,
    st.sampled_from(["insert", "update", "update", "delete", "replace"]),
    st.integers(1, 3),  # row id
    st.integers(0, 10**6),  # picks the values and, for an update, the columns it sets
)
add = st.tuples(st.just("add"), DEVICE, st.integers(0, len(COLUMNS) - 1), st.booleans())  # then enable-sync?
setcol = st.tuples(st.just("setcol"), DEVICE, st.integers(0, len(COLUMNS) - 1), st.integers(1, 3), st.integers(0, 3))
drop = st.tuples(st.just("drop"), DEVICE, st.integers(0, len(COLUMNS) - 1))
# Two copies set the same column of a row to different values (a clash, once they meet).
clash = st.tuples(st.just("clash"), DEVICE, DEVICE, st.integers(0, len(COLUMNS) - 1), st.integers(1, 3))
exchange = st.tuples(st.just("sync"), DEVICE, DEVICE)
resolve = st.tuples(st.just("resolve"), DEVICE, st.booleans())  # keep a version, or what the table holds

# 80 take about 30 s on two cores; DRIFT_CONVERGENCE_EXAMPLES=1000 to look harder.
EXAMPLES = int(os.environ.get("DRIFT_CONVERGENCE_EXAMPLES", "80"))


@pytest.fixture(scope="session")
def helpers(make_db, conflict_records, knowledge):
    return types.SimpleNamespace(make_db=make_db, conflict_records=conflict_records, knowledge=knowledge)


def columns(conn) -> list[str]:
    return [r[1] for r in conn.execute("PRAGMA table_info(todos)")]


def alter_sync(source, target, folder: pathlib.Path):
    """Send ``target`` what it lacks from ``source``, adding the columns it lacks (``--alter``)."""
    path = folder / "b.bundle"
    export_bundle(source, path, since=sync_status(target)["clock"])
    return import_bundle(target, path, alter=True)


def pick(column: str, seed: int, salt: int = 0):
    pool = VALUES[column]
    return pool[(seed // (7 ** (COLUMNS.index(column) + salt))) % len(pool)]


def do_write(conn, kind, row_id, seed):
    present = columns(conn)[1:]
    exists = conn.execute("SELECT 1 FROM todos WHERE id = ?", [row_id]).fetchone()
    if kind == "insert":  # some columns left to their DEFAULT (or NULL) here
        present = [c for i, c in enumerate(present) if not (seed >> (i + 8)) & 1]
    names = ", ".join(["id", *present])
    marks = ", ".join("?" for _ in range(len(present) + 1))
    values = [row_id, *(pick(c, seed) for c in present)]
    if kind == "insert" and not exists:
        conn.execute(f"INSERT INTO todos ({names}) VALUES ({marks})", values)
    elif kind == "replace":
        conn.execute(f"INSERT OR REPLACE INTO todos ({names}) VALUES ({marks})", values)
    elif kind == "update" and exists:
        chosen = [c for i, c in enumerate(present) if (seed >> i) & 1] or present[:1]
        sets = ", ".join(f"{c} = ?" for c in chosen)
        conn.execute(f"UPDATE todos SET {sets} WHERE id = ?", [*(pick(c, seed, 1) for c in chosen), row_id])
    elif kind == "delete" and exists:
        conn.execute("DELETE FROM todos WHERE id = ?", [row_id])


def drop_column(path: pathlib.Path, conn, column):
    """Drop ``column`` with sqlite-utils transform (no trigger then), and let sync notice at once."""
    conn.close()
    db = sqlite_utils.Database(path)
    db.table("todos").transform(drop={column})
    db.close()
    conn = sqlite3.connect(str(path), isolation_level=None)
    enable_sync(conn, ["todos"])
    return conn


def everyone_syncs_until_quiet(devices, folder, rounds=6):
    for _ in range(rounds):
        moved = False
        for source in devices:
            for target in devices:
                if source is not target:
                    result = alter_sync(source, target, folder)
                    moved |= bool(result.applied or result.columns_added or result.tables_created)
        if not moved:
            return
    raise AssertionError(f"still not quiet after {rounds} rounds of everyone syncing with everyone")


def named_rows(conn, names):
    select = ", ".join(f"{c}, typeof({c})" for c in names)
    return [tuple(row) for row in conn.execute(f"SELECT {select} FROM todos ORDER BY id")]


def declared_types(conn):
    return {r[1]: r[2].upper() for r in conn.execute("PRAGMA table_info(todos)")}


def assert_converged(helpers, devices):
    names = sorted(columns(devices[0]))
    for i, conn in enumerate(devices):
        assert sorted(columns(conn)) == names, f"device {i} has other columns than device 0"
    for conn in devices:
        conn.execute("BEGIN")
        try:  # the table is exactly what its own log implies: a repair would find nothing to log
            assert reconcile_table(conn, load_tables(conn)["todos"]) == 0
        finally:
            conn.execute("ROLLBACK")
    first = devices[0]
    for other in devices[1:]:
        assert declared_types(other) == declared_types(first)
        assert named_rows(other, names) == named_rows(first, names)
        assert helpers.conflict_records(other) == helpers.conflict_records(first)
        assert sync_status(other)["clock"] == sync_status(first)["clock"]
        assert helpers.knowledge(other) == helpers.knowledge(first)


def play(helpers, device_count, steps, shared=True):
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        paths = [folder / f"d{i}.db" for i in range(device_count)]
        devices = [helpers.make_db(path, TODOS, ("todos",)) for path in paths]
        if shared:  # every copy holds the rows first, so that concurrent edits of them clash
            devices[0].execute("INSERT INTO todos VALUES (1, 'milk', 0, 0.5), (2, 'eggs', 1, 1.5), (3, 'bread', 0, NULL)")
            for target in devices[1:]:
                alter_sync(devices[0], target, folder)
        for step in steps:
            d = step[1] % device_count
            conn = devices[d]
            if step[0] == "write":
                do_write(conn, *step[2:])
            elif step[0] == "add":
                column = COLUMNS[step[2]]
                if column not in columns(conn):
                    conn.execute(f"ALTER TABLE todos ADD COLUMN {column} {DECLARED[column]}")
                    if step[3]:
                        enable_sync(conn, ["todos"])
            elif step[0] == "setcol":
                column = COLUMNS[step[2]]
                if column in columns(conn):
                    conn.execute(f"UPDATE todos SET {column} = ? WHERE id = ?", [VALUES[column][step[4] % len(VALUES[column])], step[3]])
            elif step[0] == "clash":
                column, row_id = COLUMNS[step[3]], step[4]
                for i, other in enumerate({d, step[2] % device_count}):
                    if column in columns(devices[other]):
                        value = VALUES[column][i + 1]  # neither is the value the rows start with
                        devices[other].execute(f"UPDATE todos SET {column} = ? WHERE id = ?", [value, row_id])
            elif step[0] == "drop":
                present = columns(conn)[1:]
                if len(present) > 1:
                    devices[d] = drop_column(paths[d], conn, present[step[2] % len(present)])
            elif step[0] == "sync":
                target = step[2] % device_count
                if target != d:
                    alter_sync(conn, devices[target], folder)
            else:
                open_conflicts = list_conflicts(conn)
                if open_conflicts:
                    conflict = open_conflicts[0]
                    keep = conflict["versions"][-1]["op"] if step[2] else None
                    resolve_conflict(conn, conflict["id"], keep=keep)
        # A bundle carries a table's columns only with operations of that table, and --alter adds
        # back a column a copy dropped only from such a bundle (README, Schema drift): each copy
        # writes a row of its own, so that its first bundle to each peer carries its columns.
        for i, conn in enumerate(devices):
            do_write(conn, "insert", 100 + i, i)
        everyone_syncs_until_quiet(devices, folder)
        assert_converged(helpers, devices)

        # Resolving everything anywhere clears it everywhere, and still converges.
        while open_conflicts := list_conflicts(devices[-1]):
            resolve_conflict(devices[-1], open_conflicts[0]["id"])
        everyone_syncs_until_quiet(devices, folder)
        assert_converged(helpers, devices)
        for conn in devices:
            assert list_conflicts(conn) == []
        for conn in devices:
            conn.close()


SCENARIO = dict(
    device_count=st.integers(min_value=2, max_value=4),
    shared=st.booleans(),
    steps=st.lists(st.one_of(write, write, clash, add, add, setcol, drop, exchange, exchange, resolve), min_size=5, max_size=40),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**SCENARIO)
def test_copies_whose_columns_drift_converge_to_identical_tables_and_conflicts(helpers, device_count, shared, steps):
    play(helpers, device_count, steps, shared)
