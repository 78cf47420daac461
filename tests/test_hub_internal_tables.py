"""The ``_sync_*`` tables through Datasette's own pages and write API, on a real hub.

Every actor, root and holders of every database-level write grant included, is refused every
change to a ``_sync_*`` table, and nobody reads their values through a table, row, ``.json``
or ``.csv`` page: they hold the values of tables the actor may not view. The synced tables'
own pages and write API keep working, and a push afterwards still lands.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3

import httpx
import pytest
from datasette.utils import tilde_encode

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, sync_status


WRITES = ["insert-row", "update-row", "delete-row", "drop-table", "alter-table", "create-table", "set-column-type"]
CONFIG = {
    "databases": {
        "hub": {
            "permissions": {
                **{action: {"id": ["writer", "pusher"]} for action in WRITES},
                "execute-write-sql": {"id": ["writer"]},
                "sync-export": {"id": ["pusher", "root"]},
                "sync-import": {"id": ["pusher", "root"]},
            },
            "tables": {
                # Only root may view secret: the config's own table-level deny for others.
                "secret": {"allow": {"id": "root"}},
                # Grants on a _sync_* table itself, at the same (table) level as the plugin's
                # deny: the deny must still win.
                "_sync_ops": {
                    "allow": True,
                    "permissions": {action: {"id": "writer"} for action in WRITES if action != "create-table"},
                },
                "_sync_conflicts": {"allow": True},
            },
        }
    }
}
MARKERS = ["SECRET-HUB-VERSION", "SECRET-PHONE-VERSION"]


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def contents(path) -> dict[str, list]:
    """Every table's rows, to compare after a refused write (WAL-safe, unlike bytes alone)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        schema = conn.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
        return {"": schema, **{n: conn.execute(f'SELECT * FROM "{n}" ORDER BY 1').fetchall() for n in names}}
    finally:
        conn.close()


def build_hub(tmp_path, make_todos_db):
    """``hub.db``: synced ``todos`` and ``secret``, with a conflict on secret row 1."""
    path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    hub = sqlite3.connect(path, isolation_level=None)
    hub.execute("CREATE TABLE secret (id INTEGER PRIMARY KEY, code TEXT)")
    hub.execute("INSERT INTO secret VALUES (1, 'SECRET-ORIGINAL')")
    enable_sync(hub, ["secret"])
    phone = sqlite3.connect(tmp_path / "phone.db", isolation_level=None)
    phone.execute("CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)")
    phone.execute("CREATE TABLE secret (id INTEGER PRIMARY KEY, code TEXT)")
    enable_sync(phone, ["todos", "secret"])
    export_bundle(hub, tmp_path / "first.bundle")
    import_bundle(phone, tmp_path / "first.bundle")
    hub.execute("UPDATE secret SET code = ? WHERE id = 1", [MARKERS[0]])
    phone.execute("UPDATE secret SET code = ? WHERE id = 1", [MARKERS[1]])
    export_bundle(phone, tmp_path / "phone.bundle", since=sync_status(hub)["clock"])
    import_bundle(hub, tmp_path / "phone.bundle")
    assert hub.execute("SELECT count(*) FROM _sync_conflicts").fetchone()[0] == 1
    hub.close()
    phone.close()
    return path


@pytest.fixture
def hub(tmp_path, datasette_server, make_todos_db):
    path = build_hub(tmp_path, make_todos_db)
    server = datasette_server([path], CONFIG, "--root")
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield path, server, client


def sync_tables(path) -> list[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name LIKE '\\_sync\\_%' ESCAPE '\\' ORDER BY name")]
    finally:
        conn.close()


def sample_row(path, table) -> tuple[dict, str]:
    """A row of ``table`` as JSON (a NULL row if it is empty), and its row URL path."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        info = conn.execute(f'PRAGMA table_info("{table}")').fetchall()
        pks = [c["name"] for c in sorted(info, key=lambda c: c["pk"]) if c["pk"]]
        select = "rowid, *" if not pks else "*"
        row = conn.execute(f'SELECT {select} FROM "{table}" LIMIT 1').fetchone()
        values = dict(row) if row else {c["name"]: 1 if c["pk"] else None for c in info}
        values = {k: v for k, v in values.items() if not isinstance(v, bytes)}
        keys = [values.get(pk, 1) for pk in pks] if pks else [values.get("rowid", 1)]
        values.pop("rowid", None)
        return values, ",".join(tilde_encode(str(k)) for k in keys)
    finally:
        conn.close()


def write_requests(path, table):
    row, pk_path = sample_row(path, table)
    column = next(iter(row))
    yield f"/hub/{table}/-/insert", {"rows": [row]}
    yield f"/hub/{table}/-/insert", {"rows": [row], "replace": True}
    yield f"/hub/{table}/-/insert", {"rows": [row], "ignore": True}
    yield f"/hub/{table}/-/upsert", {"rows": [row]}
    yield f"/hub/{table}/{pk_path}/-/update", {"update": {column: None}}
    yield f"/hub/{table}/{pk_path}/-/delete", {}
    yield f"/hub/{table}/-/drop", {"confirm": True}
    yield f"/hub/{table}/-/alter", {"operations": [{"type": "add_column", "name": "forged", "column_type": "text"}]}
    yield f"/hub/{table}/-/set-column-type", {"column": column, "column_type": "email"}
    yield "/hub/-/create", {"table": table, "rows": [row]}
    yield "/hub/-/create", {"table": table, "rows": [row], "replace": True}
    yield "/hub/-/execute-write", {"sql": f'DELETE FROM "{table}"'}
    yield "/hub/-/execute-write", {"sql": f'DROP TABLE "{table}"'}


def test_no_actor_changes_a_sync_table_through_datasette(hub, tmp_path, run):
    path, server, client = hub
    before_digest, before = digest(path), contents(path)
    tables = sync_tables(path)
    assert {"_sync_ops", "_sync_conflicts", "_sync_devices", "_sync_peers"} <= set(tables)
    tokens = {actor: server.token(actor) for actor in ("writer", "pusher", "root")}
    tried = 0
    for table in tables:
        for route, body in write_requests(path, table):
            for actor in ("writer", "root"):
                token = tokens[actor]
                response = client.post(route, json=body, headers={"Authorization": f"Bearer {token}"})
                tried += 1
                assert 400 <= response.status_code < 500, (actor, route, body, response.status_code, response.text)
    # New tables named _sync_* (create-table is granted on the whole database).
    for actor, token in tokens.items():
        for body in (
            {"table": "_sync_forged", "columns": [{"name": "id", "type": "integer"}], "pk": "id"},
            {"table": "_SYNC_Forged2", "rows": [{"id": 1}]},
        ):
            response = client.post("/hub/-/create", json=body, headers={"Authorization": f"Bearer {tokens[actor]}"})
            assert 400 <= response.status_code < 500, (actor, body, response.status_code, response.text)
        response = client.post(
            "/hub/-/execute-write", json={"sql": "CREATE TABLE _sync_forged3 (id)"}, headers={"Authorization": f"Bearer {token}"}
        )
        assert 400 <= response.status_code < 500, (actor, response.status_code, response.text)
    assert tried > 100
    assert contents(path) == before
    assert digest(path) == before_digest
    assert "Traceback" not in server.output()

    # The sync endpoints still work: a push lands and the write API on todos is captured.
    # pusher may not view secret: its copy holds todos only.
    phone = tmp_path / "pusher.db"
    run(["sqlite-utils", "insert", phone, "todos", "-", "--pk", "id"], input=json.dumps([{"id": 7, "title": "From the phone", "done": 0}]))
    run(["sqlite-utils", "enable-sync", phone, "todos"])
    result = run(["sqlite-utils", "sync", phone, server.url + "/hub", "--token", tokens["pusher"], "--json", "--table", "todos"])
    assert json.loads(result.stdout)
    auth = {"Authorization": f"Bearer {tokens['writer']}"}
    assert client.post("/hub/todos/-/insert", json={"rows": [{"id": 8, "title": "Via the API", "done": 0}]}, headers=auth).status_code == 201
    assert client.post("/hub/todos/8/-/update", json={"update": {"done": 1}}, headers=auth).status_code == 200
    # Write SQL on a synced table works too: its capture triggers may write the log.
    response = client.post(
        "/hub/-/execute-write", json={"sql": "UPDATE todos SET title = 'Via SQL' WHERE id = 8"}, headers=auth
    )
    assert response.status_code == 200, response.text[:300]
    conn = sqlite3.connect(path)
    titles = [r[0] for r in conn.execute("SELECT title FROM todos ORDER BY id")]
    logged = conn.execute("SELECT count(*) FROM _sync_ops").fetchone()[0]
    conn.close()
    assert titles == ["Buy milk", "From the phone", "Via SQL"]
    assert logged >= len(before["_sync_ops"]) + 4  # the push, both API writes and the SQL were logged
    # A synced table itself can still be altered, rebuilt and dropped by those granted it
    # (its capture triggers go with it), without a 500.
    for route, body in (
        ("/hub/todos/-/alter", {"operations": [{"op": "add_column", "args": {"name": "note", "type": "text"}}]}),
        ("/hub/todos/-/alter", {"operations": [{"op": "rename_column", "args": {"name": "note", "to": "memo"}}]}),
        ("/hub/todos/-/drop", {"confirm": True}),
    ):
        response = client.post(route, json=body, headers=auth)
        assert response.status_code == 200, (route, response.status_code, response.text[:300])
    assert "Traceback" not in server.output()


ROW_WRITES = ("insert-row", "update-row", "delete-row")
TABLE_GRANTS = {
    "databases": {
        "hub": {
            "allow": {"id": "tablewriter"},
            "permissions": {"execute-write-sql": {"id": "tablewriter"}},
            # tablewriter may write todos rows (and, for write SQL, what its triggers write).
            "tables": {table: {"permissions": {a: {"id": "tablewriter"} for a in ROW_WRITES}} for table in ("todos", "_sync_ops")},
        }
    }
}


def test_write_sql_with_table_grants_needs_them_on_the_log_too(tmp_path, datasette_server, make_todos_db):
    """Datasette's write SQL asks for the row write actions on every table a statement's
    triggers write, the log included: the README's recipe grants them on ``_sync_ops`` beside
    the synced table. The log stays closed to the actor all the same, and to anyone else the
    log's row routes answer 403, as for any table they may not write."""
    path = build_hub(tmp_path, make_todos_db)
    without = json.loads(json.dumps(TABLE_GRANTS))
    del without["databases"]["hub"]["tables"]["_sync_ops"]
    refused = datasette_server([path], without)
    response = httpx.post(
        refused.url + "/hub/-/execute-write", json={"sql": "INSERT INTO todos VALUES (9, 'By SQL', 0)"},
        headers={"Authorization": f"Bearer {refused.token('tablewriter')}"}, timeout=30,
    )
    assert response.status_code == 403 and "_sync_ops" in response.text
    server = datasette_server([path], TABLE_GRANTS)
    client = httpx.Client(base_url=server.url, timeout=30)
    existing = contents(path)["_sync_ops"][-1][0]
    for op in (existing, existing + 1):  # one that exists, one that does not: told apart by nothing
        assert client.post(f"/hub/_sync_ops/{op}/-/update", json={"update": {"hlc": 0}}).status_code == 403
        assert client.post(f"/hub/_sync_ops/{op}/-/delete", json={}).status_code == 403
    auth = {"Authorization": f"Bearer {server.token('tablewriter')}"}
    before_ops = len(contents(path)["_sync_ops"])
    response = client.post("/hub/-/execute-write", json={"sql": "INSERT INTO todos VALUES (9, 'By SQL', 0)"}, headers=auth)
    assert response.status_code == 200, response.text[:300]
    response = client.post("/hub/-/execute-write", json={"sql": "UPDATE todos SET done = 1 WHERE id = 9"}, headers=auth)
    assert response.status_code == 200, response.text[:300]
    after = contents(path)
    assert (9, "By SQL", 1) in after["todos"]
    assert len(after["_sync_ops"]) == before_ops + 2
    for route, body in [
        *write_requests(path, "_sync_ops"),
        ("/hub/-/execute-write", {"sql": "INSERT INTO _sync_ops (op, hlc, tid, kind) VALUES (1, 1, 1, 0)"}),
        ("/hub/-/execute-write", {"sql": "UPDATE _sync_ops SET hlc = 0"}),
    ]:
        response = client.post(route, json=body, headers=auth)
        assert 400 <= response.status_code < 500, (route, body, response.status_code, response.text[:300])
    assert contents(path) == after
    assert "Traceback" not in server.output()
    client.close()


PAGES = [
    "/hub/{t}",
    "/hub/{t}.json",
    "/hub/{t}.json?_shape=array",
    "/hub/{t}.csv",
    "/hub/{t}.json?_facet=c0",
    "/hub/{t}/1",
    "/hub/{t}/1.json",
]


def test_sync_table_pages_reveal_nothing(hub):
    path, server, client = hub
    tables = sync_tables(path)
    tokens = {
        "writer": server.token("writer"),
        # A token restricted to viewing _sync_ops: restrictions narrow grants, never widen them.
        "restricted": server.token("alice", "-d", "hub", "view-database", "-r", "hub", "_sync_ops", "view-table"),
        "root": server.token("root"),
    }
    viewers = [("anonymous", {})] + [(actor, {"Authorization": f"Bearer {t}"}) for actor, t in tokens.items()]
    for table in tables:
        for page in PAGES:
            for upper in (False, True):
                route = page.format(t=table.upper() if upper else table)
                for actor, headers in viewers:
                    response = client.get(route, headers=headers)
                    assert response.status_code in (403, 404), (actor, route, response.status_code)
                    for marker in MARKERS:
                        assert marker not in response.text, (actor, route)
    for actor, headers in viewers:
        # (Datasette lists every table's column names in table_columns, secret's too: names, not values.)
        listed = [t["name"] for t in client.get("/hub.json", headers=headers).json()["tables"]]
        assert not [name for name in listed if name.startswith("_sync_")], actor
        assert ("todos" in listed) == (actor != "restricted"), actor
        assert "_sync_" not in client.get("/-/tables.json", headers=headers).text, actor
    # The synced tables' own pages stay as they are: todos for all, secret for root only.
    assert client.get("/hub/todos.json?_shape=array").json() == [{"id": 1, "title": "Buy milk", "done": 0}]
    assert client.get("/hub/todos/1.json").status_code == 200
    assert client.get("/hub/secret.json").status_code == 403
    root = {"Authorization": f"Bearer {tokens['root']}"}
    assert MARKERS[0] in client.get("/hub/secret.json", headers=root).text or MARKERS[1] in client.get("/hub/secret.json", headers=root).text
    # The sync pages hide secret's operations and conflict from those who may not view it.
    for route in ("/hub/-/sync/operations.json", "/hub/-/sync/conflicts.json?all=1", "/hub/-/sync.json"):
        for actor, headers in viewers[:3]:
            text = client.get(route, headers=headers).text
            assert all(marker not in text for marker in MARKERS), (actor, route)
    assert MARKERS[1] in client.get("/hub/-/sync/conflicts.json", headers=root).text


def test_no_table_is_renamed_into_a_sync_name(hub, tmp_path, run):
    """SQLite tells the write guard only the old name of a renamed table: renaming one into
    ``_sync_*`` would plant an engine table the engine creates only when first needed, such as
    ``_sync_device_actors`` claiming others' devices, or ``_sync_horizon``."""
    path, server, client = hub
    auth = {"Authorization": f"Bearer {server.token('writer')}"}
    columns = [{"name": "device_id", "type": "text"}, {"name": "actor", "type": "text"}, {"name": "since", "type": "text"}]
    response = client.post("/hub/-/create", json={"table": "claims", "columns": columns, "pk": "device_id"}, headers=auth)
    assert response.status_code == 201, response.text
    before = contents(path)
    for route, body in (
        ("/hub/claims/-/alter", {"operations": [{"op": "rename_table", "args": {"to": "_sync_device_actors"}}]}),
        ("/hub/claims/-/alter", {"operations": [{"op": "rename_table", "args": {"to": "_SYNC_Horizon"}}]}),
        ("/hub/-/execute-write", {"sql": "ALTER TABLE claims RENAME TO _sync_device_actors"}),
        ("/hub/-/execute-write", {"sql": "ALTER TABLE todos RENAME TO _sync_horizon"}),
    ):
        response = client.post(route, json=body, headers=auth)
        assert 400 <= response.status_code < 500, (route, body, response.status_code, response.text[:300])
        assert contents(path) == before, (route, body)
    assert "Traceback" not in server.output()
    # Renaming to an ordinary name still works, and a push still lands and is owned by its pusher.
    response = client.post("/hub/claims/-/alter", json={"operations": [{"op": "rename_table", "args": {"to": "claims2"}}]}, headers=auth)
    assert response.status_code == 200, response.text[:300]
    phone = tmp_path / "phone2.db"
    run(["sqlite-utils", "insert", phone, "todos", "-", "--pk", "id"], input=json.dumps([{"id": 7, "title": "From the phone", "done": 0}]))
    run(["sqlite-utils", "enable-sync", phone, "todos"])
    run(["sqlite-utils", "sync", phone, server.url + "/hub", "--token", server.token("pusher"), "--table", "todos"])
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT actor FROM _sync_device_actors").fetchall() == [("pusher",)]
    finally:
        conn.close()
