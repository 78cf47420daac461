"""How an import writes the rows it touches: rows that one bundle touches several times, all
by one device and nothing concurrent, are written set-based (TableUpdate.single_author_rows),
and must end exactly as when the same operations arrive one at a time, or in two bundles, or at
a copy with a column more; rows with concurrent operations are merged a page of rows at a time."""

from __future__ import annotations

import pathlib
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st

from sqlite_utils_sync import list_conflicts

from conftest import TODOS, _make_db, _sync

COLUMNS = ("title", "done", "score")
VALUES = st.one_of(
    st.none(),
    st.integers(-3, 3),
    st.sampled_from([0.1 + 0.2, 1e308, -0.5, 2.0]),
    st.sampled_from(["", "milk", "1"]),
    st.sampled_from([b"", b"\x00\xff"]),
)
step = st.one_of(
    st.tuples(st.just("put"), st.integers(1, 4), st.sets(st.sampled_from(COLUMNS), min_size=1), st.lists(VALUES, min_size=3, max_size=3)),
    st.tuples(st.just("delete"), st.integers(1, 4)),
)


def apply_step(conn, step) -> None:
    if step[0] == "delete":
        conn.execute("DELETE FROM todos WHERE id = ?", [step[1]])
        return
    _, key, columns, values = step
    written = {c: v for c, v in zip(COLUMNS, values) if c in columns}
    if conn.execute("SELECT 1 FROM todos WHERE id = ?", [key]).fetchone():
        conn.execute(f"UPDATE todos SET {', '.join(f'{c} = ?' for c in written)} WHERE id = ?", [*written.values(), key])
    else:
        conn.execute(f"INSERT INTO todos (id, {', '.join(written)}) VALUES (?{', ?' * len(written)})", [key, *written.values()])


def todos(conn) -> list[tuple]:
    return [tuple(r) for r in conn.execute("SELECT id, typeof(id), title, typeof(title), done, typeof(done), score, typeof(score) FROM todos ORDER BY id")]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(step, max_size=6), after=st.lists(step, min_size=1, max_size=12))
def test_several_operations_of_one_device_on_a_row_apply_as_one_at_a_time(before, after):
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        source = _make_db(folder / "source.db")
        whole = _make_db(folder / "whole.db")  # everything in one bundle at the end
        stepwise = _make_db(folder / "stepwise.db")  # one bundle per statement
        halves = _make_db(folder / "halves.db")  # ``before`` in one bundle, ``after`` in another
        wider = _make_db(folder / "wider.db", TODOS + "; ALTER TABLE todos ADD COLUMN note TEXT DEFAULT 'local'")
        for s in before:
            apply_step(source, s)
            _sync(source, stepwise, folder, "step.bundle")
        for target in (halves, wider):
            _sync(source, target, folder, "before.bundle")
        for s in after:
            apply_step(source, s)
            _sync(source, stepwise, folder, "step.bundle")
        for target in (halves, wider, whole):
            _sync(source, target, folder, "after.bundle")
        expected = todos(source)
        assert todos(whole) == todos(stepwise) == todos(halves) == todos(wider) == expected
        # A row created from operations that never wrote the extra column holds NULL there.
        keys_before = {s[1] for s in before}
        assert all(note is None for key, note in wider.execute("SELECT id, note FROM todos") if key not in keys_before)
        assert list_conflicts(whole) == list_conflicts(halves) == list_conflicts(wider) == []


def test_a_relayed_bundle_mixes_rows_of_one_device_and_of_two(tmp_path, make_db, rows, sync):
    """Two devices' operations on the same rows in one bundle (relayed, not concurrent) and a
    second bundle touching rows the receiver holds: the per-row and set-based paths meet."""
    x, y, z = (make_db(tmp_path / f"{name}.db") for name in "xyz")
    x.executemany("INSERT INTO todos VALUES (?, ?, 0, 1.5)", [(i, f"t{i}") for i in range(1, 6)])
    x.execute("UPDATE todos SET done = 1 WHERE id <= 3")
    sync(x, y, tmp_path)
    y.execute("UPDATE todos SET title = 'from y' WHERE id IN (1, 4)")  # had seen x's edits
    y.execute("DELETE FROM todos WHERE id = 5")
    x.execute("UPDATE todos SET score = 9.0 WHERE id = 2")
    sync(x, y, tmp_path)
    result = sync(y, z, tmp_path)  # x's and y's operations in one bundle
    assert result.conflicts == 0
    assert rows(z) == rows(y) == [
        (1, "integer", "from y", "text", 1, "integer", 1.5, "real"),
        (2, "integer", "t2", "text", 1, "integer", 9.0, "real"),
        (3, "integer", "t3", "text", 1, "integer", 1.5, "real"),
        (4, "integer", "from y", "text", 0, "integer", 1.5, "real"),
    ]
    # Rows z holds, each edited twice more by x alone: updated in place, set-based.
    x.execute("UPDATE todos SET title = 'again', done = 0 WHERE id IN (2, 3)")
    x.execute("UPDATE todos SET title = NULL WHERE id = 3")
    assert sync(x, z, tmp_path).applied == 3
    assert rows(z)[1:3] == [
        (2, "integer", "again", "text", 0, "integer", 9.0, "real"),
        (3, "integer", None, "null", 0, "integer", 1.5, "real"),
    ]


def test_thousands_of_concurrent_rows_merge_a_page_at_a_time(tmp_path, make_db, rows, conflict_records, sync):
    """More rows with concurrent operations than one page of the per-row path holds (2,000),
    and a primary-key move whose two keys fall in different pages: both copies converge."""
    x, y = make_db(tmp_path / "x.db"), make_db(tmp_path / "y.db")
    x.executemany("INSERT INTO todos VALUES (?, 't', 0, 1.0)", [(i,) for i in range(1, 2101)])
    sync(x, y, tmp_path)
    x.execute("UPDATE todos SET title = 'x'")
    x.execute("UPDATE todos SET id = 9999 WHERE id = 1")  # '1' sorts first, '9999' last
    y.execute("UPDATE todos SET score = 2.0")
    y.execute("UPDATE todos SET title = 'y' WHERE id % 2 = 0")
    sync(x, y, tmp_path, "to-y.bundle")
    sync(y, x, tmp_path, "to-x.bundle")
    assert rows(x) == rows(y)
    assert conflict_records(x) == conflict_records(y)
    assert len(conflict_records(x)) >= 1050  # every even row's title, and the moved row
    odd = x.execute("SELECT DISTINCT title, score FROM todos WHERE id % 2 = 1 AND id BETWEEN 3 AND 2099").fetchall()
    assert odd == [("x", 2.0)]  # concurrent edits of different columns merged
    assert x.execute("SELECT count(*) FROM todos WHERE id BETWEEN 2 AND 2100").fetchone() == (2099,)
