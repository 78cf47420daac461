"""Schema versions: a database made with schema version 1 keeps working, read-only paths read
it as it is, and a database from a newer version is refused with one clear line."""

from __future__ import annotations

import json
import pathlib
import sqlite3

import pytest
import sqlite_utils
from datasette.app import Datasette

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, sync_status
from sqlite_utils_sync.schema import SCHEMA_VERSION

# The sync tables as schema version 1 created them (verbatim). The tables of version 2 were
# made there on first use: _sync_captured by enable-sync, the others later.
V1_SCHEMA = """
CREATE TABLE IF NOT EXISTS _sync_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    schema_version INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS _sync_devices (
    idx INTEGER PRIMARY KEY,
    device_id TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS _sync_tables (
    tid INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    columns TEXT NOT NULL,
    pk TEXT NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS _sync_ops (
    op INTEGER PRIMARY KEY,
    hlc INTEGER NOT NULL,
    tid INTEGER NOT NULL,
    kind INTEGER NOT NULL,
    mask INTEGER,
    rowkey TEXT,
    newkey TEXT
);
CREATE TABLE IF NOT EXISTS _sync_knowledge (
    device INTEGER NOT NULL,
    from_seq INTEGER NOT NULL,
    clock TEXT NOT NULL,
    PRIMARY KEY (device, from_seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _sync_unapplied (
    tid INTEGER NOT NULL,
    op INTEGER NOT NULL,
    PRIMARY KEY (tid, op)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _sync_peers (
    device_id TEXT PRIMARY KEY,
    clock TEXT NOT NULL,
    last_seen TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS _sync_imports (
    bundle_id TEXT PRIMARY KEY,
    source_device_id TEXT NOT NULL,
    imported_at TEXT NOT NULL,
    total_operations INTEGER NOT NULL,
    applied INTEGER NOT NULL,
    conflicts INTEGER NOT NULL,
    duplicates INTEGER NOT NULL,
    actor TEXT
);
CREATE TABLE IF NOT EXISTS _sync_clashes (
    tid INTEGER NOT NULL,
    rowkey TEXT NOT NULL,
    a INTEGER NOT NULL,
    b INTEGER NOT NULL,
    columns TEXT NOT NULL,
    PRIMARY KEY (tid, rowkey, a, b)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _sync_resolutions (
    tid INTEGER NOT NULL,
    rowkey TEXT NOT NULL,
    op INTEGER NOT NULL,
    PRIMARY KEY (tid, rowkey, op)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _sync_conflicts (
    id TEXT PRIMARY KEY,
    "table" TEXT NOT NULL,
    rowkey TEXT NOT NULL,
    pk TEXT NOT NULL,
    columns TEXT NOT NULL,
    versions TEXT NOT NULL,
    resolved_by TEXT
);
CREATE INDEX IF NOT EXISTS _sync_conflicts_row ON _sync_conflicts ("table", rowkey);
CREATE TRIGGER IF NOT EXISTS _sync_ops_append_only_update BEFORE UPDATE ON _sync_ops
BEGIN SELECT RAISE(ABORT, '_sync_ops is append-only: operations cannot be changed'); END;
CREATE TRIGGER IF NOT EXISTS _sync_ops_append_only_delete BEFORE DELETE ON _sync_ops
BEGIN SELECT RAISE(ABORT, '_sync_ops is append-only: operations cannot be deleted'); END;
"""
V1_CAPTURED = "CREATE TABLE IF NOT EXISTS _sync_captured (tid INTEGER PRIMARY KEY, columns TEXT NOT NULL)"
V1_TABLES = [
    "_sync_devices",
    "_sync_tables",
    "_sync_knowledge",
    "_sync_unapplied",
    "_sync_peers",
    "_sync_imports",
    "_sync_resolutions",
    "_sync_conflicts",
]
SYNC_PAGES = ("", "/operations", "/conflicts", "/clocks", "/imports")
SECOND_VERSION_TABLES = {"_sync_horizon", "_sync_settled", "_sync_captured", "_sync_device_actors"}


def concurrent_edits(tmp_path: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """``laptop`` and ``phone`` edited row 1 concurrently; ``laptop`` has imported the phone's
    edit, so it holds one conflict (a pair of clashing operations)."""
    laptop, phone = sqlite_utils.Database(tmp_path / "laptop.db"), sqlite_utils.Database(tmp_path / "phone.db")
    for db in (laptop, phone):
        db["todos"].create({"id": int, "title": str}, pk="id")
        enable_sync(db, ["todos"])
    laptop["todos"].insert_all([{"id": 1, "title": "buy milk"}, {"id": 2, "title": "walk dog"}])
    export_bundle(laptop, tmp_path / "first.bundle")
    import_bundle(phone, tmp_path / "first.bundle")
    laptop["todos"].update(1, {"title": "buy oat milk"})
    phone["todos"].update(1, {"title": "buy soy milk"})
    export_bundle(phone, tmp_path / "phone.bundle", since=sync_status(laptop)["clock"])
    import_bundle(laptop, tmp_path / "phone.bundle")
    phone["todos"].insert({"id": 3, "title": "call mum"})
    export_bundle(phone, tmp_path / "later.bundle", since=sync_status(laptop)["clock"])
    return tmp_path / "laptop.db", tmp_path / "later.bundle"


def version_1_copy(source: pathlib.Path, target: pathlib.Path, captured: bool = True) -> pathlib.Path:
    """``source``'s tables, log and triggers in a new file laid out as schema version 1."""
    conn = sqlite3.connect(target, isolation_level=None)
    conn.execute("ATTACH ? AS source", [str(source)])
    for statement in V1_SCHEMA.split(";\n"):
        if statement.strip():
            conn.execute(statement if "TRIGGER" not in statement else statement + ";")
    conn.execute("INSERT INTO _sync_state VALUES (1, 1)")
    (todos,) = conn.execute("SELECT sql FROM source.sqlite_master WHERE name = 'todos'").fetchone()
    conn.execute(todos)
    conn.execute("INSERT INTO todos SELECT * FROM source.todos")
    for (column,) in conn.execute("SELECT name FROM pragma_table_info('_sync_ops', 'source') WHERE name LIKE 'c%'"):
        conn.execute(f"ALTER TABLE _sync_ops ADD COLUMN {column}")
    conn.execute("INSERT INTO _sync_ops SELECT * FROM source._sync_ops")
    for table in V1_TABLES:
        conn.execute(f"INSERT INTO {table} SELECT * FROM source.{table}")
    conn.execute("INSERT INTO _sync_clashes SELECT * FROM source._sync_conflict_pairs")
    if captured:
        conn.execute(V1_CAPTURED)
        conn.execute("INSERT INTO _sync_captured SELECT * FROM source._sync_captured")
    for (trigger,) in conn.execute("SELECT sql FROM source.sqlite_master WHERE type = 'trigger' AND tbl_name = 'todos'"):
        conn.execute(trigger)
    conn.execute("DETACH source")
    conn.close()
    return target


def snapshot(path: pathlib.Path) -> dict:
    """What must survive an upgrade: rows, operations, conflicts, device id and the clash pairs."""
    conn = sqlite3.connect(path)
    pairs = "_sync_clashes" if "_sync_clashes" in table_names(conn) else "_sync_conflict_pairs"
    result = {
        "rows": conn.execute("SELECT * FROM todos ORDER BY id").fetchall(),
        "ops": conn.execute("SELECT op, hlc, tid, kind, mask, rowkey, newkey FROM _sync_ops ORDER BY op").fetchall(),
        "conflicts": conn.execute("SELECT * FROM _sync_conflicts ORDER BY id").fetchall(),
        "pairs": conn.execute(f"SELECT * FROM {pairs}").fetchall(),
        "device": conn.execute("SELECT device_id FROM _sync_devices ORDER BY idx DESC LIMIT 1").fetchone(),
    }
    conn.close()
    return result


def table_names(conn: sqlite3.Connection) -> set[str]:
    return {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def schema_version(path: pathlib.Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT schema_version FROM _sync_state").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def old(tmp_path):
    """A version-1 database holding rows, operations and an unresolved conflict, and a bundle
    with a later edit for it."""
    laptop, bundle = concurrent_edits(tmp_path)
    return version_1_copy(laptop, tmp_path / "old.db"), bundle


@pytest.mark.parametrize("captured", [True, False])
@pytest.mark.parametrize(
    "command",
    [["enable-sync", "{db}", "todos"], ["export-bundle", "{db}", "{tmp}/out.bundle"], ["import-bundle", "{db}", "{bundle}"]],
)
def test_a_version_1_database_is_upgraded_by_an_ordinary_command(tmp_path, old, command, captured, run):
    path, bundle = old
    if not captured:
        path = version_1_copy(tmp_path / "laptop.db", tmp_path / "older.db", captured=False)
    before = snapshot(path)
    assert len(before["pairs"]) == 1 and len(before["conflicts"]) == 1
    run(["sqlite-utils", *(arg.format(db=path, tmp=tmp_path, bundle=bundle) for arg in command)])
    assert schema_version(path) == SCHEMA_VERSION
    after = snapshot(path)
    assert after["pairs"] == before["pairs"] and after["conflicts"] == before["conflicts"]
    assert after["device"] == before["device"]
    if command[0] == "import-bundle":  # the bundle's one new operation and this copy's knowledge tick
        assert set(before["ops"]) < set(after["ops"]) and len(after["ops"]) == len(before["ops"]) + 2
    else:
        assert after["ops"] == before["ops"]
    expected = before["rows"] + ([(3, "call mum")] if command[0] == "import-bundle" else [])
    assert after["rows"] == expected
    conn = sqlite3.connect(path)
    assert SECOND_VERSION_TABLES <= table_names(conn) and "_sync_clashes" not in table_names(conn)
    conn.close()
    status = json.loads(run(["sqlite-utils", "sync-status", path, "--json"]).stdout)
    assert (status["unresolved_conflicts"], status["warnings"]) == (1, [])


def test_an_upgraded_database_resolves_its_old_conflict_and_syncs(tmp_path, old, run):
    path, bundle = old
    run(["sqlite-utils", "import-bundle", path, bundle])
    (conflict,) = json.loads(run(["sqlite-utils", "sync-conflicts", path, "--json"]).stdout)
    run(["sqlite-utils", "sync-resolve", path, conflict["id"]])
    assert json.loads(run(["sqlite-utils", "sync-status", path, "--json"]).stdout)["unresolved_conflicts"] == 0
    fresh = tmp_path / "fresh.db"
    run(["sqlite-utils", "create-database", fresh])
    run(["sqlite-utils", "export-bundle", path, tmp_path / "back.bundle"])
    run(["sqlite-utils", "import-bundle", fresh, tmp_path / "back.bundle", "--alter"])
    assert sqlite3.connect(fresh).execute("SELECT * FROM todos ORDER BY id").fetchall() == snapshot(path)["rows"]


def test_read_only_paths_read_a_version_1_database_as_it_is(tmp_path, old, run):
    path, _ = old
    before = path.read_bytes()
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
    status = sync_status(conn)
    assert status["unresolved_conflicts"] == 1 and status["warnings"] == []
    export_bundle(conn, tmp_path / "a.bundle")  # would repair, but cannot write: reads as it is
    export_bundle(conn, tmp_path / "b.bundle", repair=False)
    conn.close()
    assert path.read_bytes() == before
    fresh = tmp_path / "fresh.db"
    run(["sqlite-utils", "create-database", fresh])
    run(["sqlite-utils", "import-bundle", fresh, tmp_path / "a.bundle", "--alter"])
    assert sqlite3.connect(fresh).execute("SELECT count(*) FROM todos").fetchone() == (2,)


async def test_the_datasette_pages_read_a_version_1_database(old):
    path, _ = old
    before = path.read_bytes()
    datasette = Datasette(immutables=[str(path)])
    await datasette.invoke_startup()
    status = (await datasette.client.get("/old/-/sync.json")).json()
    assert status["unresolved_conflicts"] == 1
    for page in SYNC_PAGES:
        assert (await datasette.client.get(f"/old/-/sync{page}")).status_code == 200, page
    datasette.root_enabled = True
    export = await datasette.client.get("/old/-/sync/export", actor={"id": "root"})
    assert export.status_code == 200 and export.content
    assert path.read_bytes() == before


def make_newer(path: pathlib.Path) -> None:
    """Mark the file's sync tables as written by a future version of datasette-sync."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE _sync_state SET schema_version = 99")
    conn.close()


@pytest.mark.parametrize(
    "command",
    [
        ["sync-status", "{db}"],
        ["enable-sync", "{db}", "todos"],
        ["export-bundle", "{db}", "{tmp}/x.bundle"],
        ["import-bundle", "{db}", "{bundle}"],
        ["sync-resolve", "{db}", "abc"],
    ],
)
def test_a_database_from_a_newer_version_is_refused(tmp_path, old, command, run):
    path, bundle = old
    make_newer(path)
    before = path.read_bytes()
    result = run(["sqlite-utils", *(arg.format(db=path, tmp=tmp_path, bundle=bundle) for arg in command)], check=False)
    assert result.returncode == 1
    assert "schema version 99" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == before
    assert not (tmp_path / "x.bundle").exists()


async def test_a_hub_with_a_database_from_a_newer_version_says_so_and_serves_the_rest(old):
    path, _ = old
    make_newer(path)
    datasette = Datasette(immutables=[str(path)])
    await datasette.invoke_startup()
    datasette.root_enabled = True
    assert (await datasette.client.get("/old")).status_code == 200
    assert (await datasette.client.get("/old/todos")).status_code == 200
    assert (await datasette.client.get("/old/todos/1")).status_code == 200
    for page in SYNC_PAGES:
        response = await datasette.client.get(f"/old/-/sync{page}")
        assert response.status_code == 503, page
        assert "schema version 99" in response.text
    export = await datasette.client.get("/old/-/sync/export", actor={"id": "root"})
    assert export.status_code == 503
    assert export.json()["reason"] == "schema_too_new"
