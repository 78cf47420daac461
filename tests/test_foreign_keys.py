"""Foreign keys: sync writes with enforcement off, so SQLite's ``ON DELETE`` / ``ON UPDATE``
actions never change rows behind the log's back; the actions a copy's own edits run are
captured like any edit and reach every copy."""

from __future__ import annotations

import pytest

from sqlite_utils_sync import SyncError, export_bundle, import_bundle

SCHEMA = (
    "CREATE TABLE parents (id INTEGER PRIMARY KEY, name TEXT);"
    "CREATE TABLE children (id INTEGER PRIMARY KEY, parent INTEGER REFERENCES parents(id) ON DELETE CASCADE, name TEXT)"
)


@pytest.fixture
def pair(tmp_path, make_db, sync):
    """Two copies with foreign keys on, holding parent 1."""
    a, b = (make_db(tmp_path / f"{name}.db", SCHEMA, ("parents", "children")) for name in "ab")
    for conn in (a, b):
        conn.execute("PRAGMA foreign_keys = ON")
    a.execute("INSERT INTO parents VALUES (1, 'parent')")
    sync(a, b, tmp_path)
    return a, b


def test_an_import_runs_no_cascade_and_copies_converge(tmp_path, pair, sync, rows):
    a, b = pair
    a.execute("DELETE FROM parents WHERE id = 1")
    b.execute("INSERT INTO children VALUES (10, 1, 'added on b meanwhile')")
    for _ in range(2):
        sync(a, b, tmp_path, "a.bundle")
        sync(b, a, tmp_path, "b.bundle")
    # The child b added is kept on both (an orphan, as on every copy), not deleted on b alone.
    assert rows(a, "children") == rows(b, "children") == [(10, "integer", 1, "integer", "added on b meanwhile", "text")]
    assert rows(a, "parents") == rows(b, "parents") == []
    assert [c.execute("PRAGMA foreign_keys").fetchone()[0] for c in (a, b)] == [1, 1]


def test_a_cascade_on_the_authors_copy_reaches_the_others(tmp_path, pair, sync, rows):
    a, b = pair
    a.execute("INSERT INTO children VALUES (10, 1, 'child')")
    sync(a, b, tmp_path, "a1.bundle")
    a.execute("DELETE FROM parents WHERE id = 1")  # the cascade deletes the child on a, captured
    sync(a, b, tmp_path, "a2.bundle")
    assert rows(b, "children") == rows(a, "children") == []


def test_an_import_in_an_open_transaction_with_foreign_keys_on_is_refused(tmp_path, pair, file_bytes):
    a, b = pair
    a.execute("INSERT INTO parents VALUES (2, 'second')")
    export_bundle(a, tmp_path / "a.bundle")
    before = file_bytes(tmp_path / "b.db")
    b.execute("BEGIN")
    with pytest.raises(SyncError) as caught:
        import_bundle(b, tmp_path / "a.bundle")
    b.execute("ROLLBACK")
    assert "PRAGMA foreign_keys is on in this connection's open transaction" in str(caught.value)
    assert file_bytes(tmp_path / "b.db") == before
    import_bundle(b, tmp_path / "a.bundle")  # outside a transaction, it imports
    assert b.execute("SELECT name FROM parents WHERE id = 2").fetchone() == ("second",)


def test_an_export_in_an_open_transaction_with_foreign_keys_on_goes_ahead(tmp_path, pair):
    # An export applies no rows, so no foreign key action can run: it needs no refusal.
    a, b = pair
    a.execute("BEGIN")
    a.execute("INSERT INTO parents VALUES (2, 'second')")
    result = export_bundle(a, tmp_path / "a.bundle")
    a.execute("COMMIT")
    assert result.operations >= 2
    import_bundle(b, tmp_path / "a.bundle")
    assert b.execute("SELECT name FROM parents WHERE id = 2").fetchone() == ("second",)
