"""A hub shared by actors with different table permissions, through a real ``datasette serve``.

The config is the README's (*Sharing a hub with per-table permissions*): ``tasks`` is shared by
alice and bob, ``salaries`` is alice's alone, ``catalogue`` is read-only to both. A pull
carries the values of the tables the actor may view (``view-table``) and withholds the others'
operations; a push may add new operations of a table only where the actor holds the write
action they need (``insert-row``, ``update-row``, ``delete-row``), else it is refused whole
with a 403 naming the table and the action, and the hub is left as it was.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import itertools
import json
import pathlib
import shutil
import sqlite3
import tempfile
import time
import uuid

import httpx
import msgpack
import pytest
from datasette.app import Datasette
from hypothesis import HealthCheck, given, settings, strategies as st

from datasette_sync import views
from sqlite_utils_sync import codec, enable_sync, export_bundle, import_bundle, sync_status
from sqlite_utils_sync.client import sync_with_hub

from conftest import SECRET
from test_live_hub import waiting_devices, wait_until

WRITES = {action: {"id": ["alice", "bob"]} for action in ("insert-row", "update-row", "delete-row")}
CONFIG = {
    "databases": {
        "hub": {
            "permissions": {
                "sync-export": {"id": ["alice", "bob"]},
                "sync-import": {"id": ["alice", "bob"]},
            },
            "tables": {
                "tasks": {"permissions": WRITES},
                "salaries": {
                    "allow": {"id": "alice"},
                    "permissions": {action: {"id": "alice"} for action in WRITES},
                },
            },
        }
    }
}
SCHEMA = {
    "tasks": "CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)",
    "salaries": "CREATE TABLE salaries (id INTEGER PRIMARY KEY, name TEXT, amount INTEGER)",
    "catalogue": "CREATE TABLE catalogue (id INTEGER PRIMARY KEY, item TEXT, price REAL)",
}
# What only alice may see: no byte of it may reach bob.
HIDDEN = [b"salaries", b"SECRET-PAYEE", b"SECRET-AMOUNT"]


def build_hub(path: pathlib.Path) -> pathlib.Path:
    """Three synced tables; the hub's salaries rows are written last, so a copy that withholds
    them still holds everything of the hub's device before them (see test_relaying...)."""
    conn = sqlite3.connect(path, isolation_level=None)
    for sql in SCHEMA.values():
        conn.execute(sql)
    enable_sync(conn, list(SCHEMA))
    conn.executemany("INSERT INTO catalogue VALUES (?, ?, ?)", [(1, "chair", 40.0), (2, "desk", 120.5)])
    conn.executemany("INSERT INTO tasks VALUES (?, ?, 0)", [(1, "order chairs"), (2, "pay invoices")])
    conn.executemany(
        "INSERT INTO salaries VALUES (?, ?, ?)", [(1, "SECRET-PAYEE-ann", "SECRET-AMOUNT-5100"), (2, "SECRET-PAYEE-bo", "x")]
    )
    conn.close()
    return path


def table_rows(path, table: str) -> list[tuple]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
    finally:
        conn.close()


def table_names(path) -> set[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE '\\_sync\\_%' ESCAPE '\\'")}
    finally:
        conn.close()


def digest(path) -> str:
    return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def bundle_header(data: bytes) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "b.bundle"
        path.write_bytes(data)
        conn = sqlite3.connect(path)
        try:
            return msgpack.unpackb(conn.execute("SELECT data FROM bundle_header").fetchone()[0])
        finally:
            conn.close()


def bundle_values(data: bytes) -> list:
    """Every value in every chunk image of a bundle."""
    values = []
    with tempfile.TemporaryDirectory() as directory:
        path = pathlib.Path(directory) / "b.bundle"
        path.write_bytes(data)
        conn = sqlite3.connect(path)
        try:
            for (image,) in conn.execute("SELECT data FROM bundle_chunks ORDER BY id"):
                chunk = sqlite3.connect(":memory:")
                chunk.deserialize(codec.unpack(image, codec.ZSTD, path.name))
                for (name,) in chunk.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall():
                    for row in chunk.execute(f'SELECT * FROM "{name}"'):
                        values.extend(row)
                chunk.close()
        finally:
            conn.close()
    return values


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def hub(tmp_path, datasette_server):
    path = build_hub(tmp_path / "hub.db")
    server = datasette_server([path], CONFIG)
    server.path = path
    return server


@pytest.fixture
def tokens(hub):
    # Unrestricted tokens: each actor may do what the config grants it.
    return {name: hub.token(name) for name in ("alice", "bob")}


def clone(run, hub, token, path) -> pathlib.Path:
    """A new copy of the hub for the token's actor, made as the README says: sync into a new file."""
    run(["sqlite-utils", "sync", path, hub.url + "/hub", "--token", token])
    return path


def copy_device(run, source: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
    shutil.copyfile(source, path)
    run(["sqlite-utils", "sync-new-device", path])
    return path


def test_a_pull_carries_only_the_tables_the_actor_may_view(hub, tokens):
    bob = hub.get("/hub/-/sync/export", headers=auth(tokens["bob"]))
    assert bob.status_code == 200
    assert json.loads(bob.headers["X-Sync-Scope"]) == ["catalogue", "tasks"]
    for secret in HIDDEN:
        assert secret not in bob.content  # not a value, not the table's name
    header = bundle_header(bob.content)
    assert header["scope"] == ["catalogue", "tasks"]
    assert header["withheld"] == 2 and header["operations"] == 4
    values = bundle_values(bob.content)
    assert "chair" in values and "order chairs" in values
    assert not any(isinstance(v, str) and v.startswith("SECRET") for v in values)

    # alice may view every table: today's full bundle, salaries included.
    alice = hub.get("/hub/-/sync/export", headers=auth(tokens["alice"]))
    assert json.loads(alice.headers["X-Sync-Scope"]) is None
    assert "scope" not in bundle_header(alice.content)
    assert "SECRET-PAYEE-ann" in bundle_values(alice.content)  # values travel compressed

    # A pull may ask for fewer tables, never for one the actor may not view.
    tasks = hub.get("/hub/-/sync/export", params={"table": "tasks"}, headers=auth(tokens["alice"]))
    assert tasks.status_code == 200 and json.loads(tasks.headers["X-Sync-Scope"]) == ["tasks"]
    assert b"desk" not in tasks.content and b"SECRET" not in tasks.content
    assert not [v for v in bundle_values(tasks.content) if isinstance(v, str) and ("desk" in v or "SECRET" in v)]
    hidden = hub.get("/hub/-/sync/export", params={"table": ["tasks", "salaries"]}, headers=auth(tokens["bob"]))
    assert hidden.status_code == 403
    assert hidden.json() == {
        "ok": False,
        "error": "Permission denied: table salaries cannot be pulled, it needs view-table on it",
        "reason": "table_forbidden",
    }
    # Each table named costs a permission check: a pull may name 500, each as often as it likes.
    many = hub.get("/hub/-/sync/export", params={"table": [f"t{i}" for i in range(501)]}, headers=auth(tokens["alice"]))
    assert many.status_code == 400
    assert many.json()["error"] == "a pull may name at most 500 tables, got 501 table parameters"
    again = hub.get("/hub/-/sync/export", params={"table": ["tasks"] * 1000}, headers=auth(tokens["alice"]))
    assert again.status_code == 200 and json.loads(again.headers["X-Sync-Scope"]) == ["tasks"]

    # The sync pages say what each actor syncs, naming no table it may not view.
    def access(token=None):
        response = hub.get("/hub/-/sync.json", headers=auth(token) if token else {})
        assert response.status_code == 200
        return response.json()["access"]

    writes = ["insert-row", "update-row", "delete-row"]
    assert access(tokens["alice"]) == {
        "pull": ["catalogue", "salaries", "tasks"],
        "push": {"salaries": writes, "tasks": writes},
    }
    assert access(tokens["bob"]) == {"pull": ["catalogue", "tasks"], "push": {"tasks": writes}}
    assert access() == {"pull": [], "push": {}}
    page = hub.get("/hub/-/sync", headers=auth(tokens["bob"])).text
    assert "Pulling brings you the rows of <code>catalogue</code>, <code>tasks</code>" in page
    assert "You may push <code>tasks</code> (insert-row, update-row, delete-row)" in page
    assert "salaries" not in page
    assert "You may not push changes to any table here" in hub.get("/hub/-/sync").text


def hub_before_salaries(tmp_path) -> tuple[pathlib.Path, sqlite3.Connection]:
    """A hub that logs tasks (one row) and catalogue, never salaries, and alice's copy of all
    three, empty: a table first logged on the hub after a permission check comes from her."""
    hub_path = tmp_path / "hub.db"
    conn = sqlite3.connect(hub_path, isolation_level=None)
    for name in ("tasks", "catalogue"):
        conn.execute(SCHEMA[name])
    enable_sync(conn, ["tasks", "catalogue"])
    conn.execute("INSERT INTO tasks VALUES (1, 'order chairs', 0)")
    conn.close()
    alice = sqlite3.connect(tmp_path / "alice.db", isolation_level=None)
    for sql in SCHEMA.values():
        alice.execute(sql)
    enable_sync(alice, list(SCHEMA))
    return hub_path, alice


def hub_clock(hub_path) -> dict:
    return sync_status(sqlite3.connect(f"file:{hub_path}?mode=ro", uri=True))["clock"]


def land(hub_path, bundle) -> None:
    """Import ``bundle`` into the hub file from a connection of its own (as a push would)."""
    hub = sqlite3.connect(hub_path, isolation_level=None)
    try:
        import_bundle(hub, str(bundle), alter=True)
    finally:
        hub.close()


def test_a_pull_waiting_when_a_table_it_may_not_view_is_first_pushed_never_carries_it(tmp_path, datasette_server):
    # The hub logs tasks and catalogue only, so bob may view every table it logs: his pull's
    # scope is "everything". While it waits, alice pushes the hub's first salaries rows. The
    # bundle that wakes him must withhold them (it carried them: the scope was decided before).
    hub_path, alice = hub_before_salaries(tmp_path)
    since = json.dumps(hub_clock(hub_path))
    alice.execute("INSERT INTO salaries VALUES (1, 'SECRET-PAYEE-ann', 'SECRET-AMOUNT-5100')")
    export_bundle(alice, tmp_path / "push.bundle")
    hub = datasette_server([hub_path], CONFIG)
    tokens = {name: hub.token(name) for name in ("alice", "bob")}
    device = uuid.uuid4().hex
    params = {"since": since, "wait": "60", "device": device}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pull = pool.submit(hub.get, "/hub/-/sync/export", params=params, headers=auth(tokens["bob"]))
        wait_until(lambda: pull.done() or device in waiting_devices(hub), "bob's pull to wait")
        assert not pull.done(), pull.result().text
        pushed = hub.post("/hub/-/sync/import", content=(tmp_path / "push.bundle").read_bytes(), headers=auth(tokens["alice"]))
        assert pushed.status_code == 200, pushed.text
        bob = pull.result()
    assert bob.status_code == 200
    assert json.loads(bob.headers["X-Sync-Scope"]) == ["catalogue", "tasks"]
    assert bundle_header(bob.content)["withheld"] >= 1
    for secret in HIDDEN:
        assert secret not in bob.content
    assert not any(isinstance(v, str) and v.startswith("SECRET") for v in bundle_values(bob.content))
    # alice may view salaries: her pull carries them.
    mine = hub.get("/hub/-/sync/export", params={"since": since}, headers=auth(tokens["alice"]))
    assert "SECRET-PAYEE-ann" in bundle_values(mine.content)


@pytest.mark.parametrize("path", ["/hub/-/sync.json", "/hub/-/sync/operations.json", "/hub/-/sync/conflicts.json", "/hub"])
async def test_a_table_first_logged_after_the_pages_permission_check_stays_off_them(tmp_path, monkeypatch, path):
    # The pages check which logged tables the actor may view, then read the log: alice's first
    # salaries rows land in between. The page must not show them to bob (it showed every value).
    hub_path, alice = hub_before_salaries(tmp_path)
    alice.execute("INSERT INTO salaries VALUES (1, 'SECRET-PAYEE-ann', 'SECRET-AMOUNT-5100')")
    export_bundle(alice, tmp_path / "push.bundle")
    real_check = views.viewable_tables

    async def then_salaries_arrive(datasette, request, db):
        visible = await real_check(datasette, request, db)
        land(hub_path, tmp_path / "push.bundle")
        return visible

    monkeypatch.setattr(views, "viewable_tables", then_salaries_arrive)
    ds = Datasette([str(hub_path)], config=CONFIG, secret=SECRET)
    await ds.invoke_startup()
    response = await ds.client.get(path, cookies={"ds_actor": ds.client.actor_cookie({"id": "bob"})})
    assert response.status_code == 200
    assert "tasks" in response.text or path.endswith("conflicts.json")
    for secret in HIDDEN:
        assert secret.decode() not in response.text
    assert table_rows(hub_path, "salaries") == [(1, "SECRET-PAYEE-ann", "SECRET-AMOUNT-5100")]


async def test_a_pull_never_anchors_on_an_operation_of_a_table_first_logged_after_its_check(tmp_path, monkeypatch):
    # A bundle's anchors fingerprint the last op the receiver says it has from each device. bob
    # names alice's salaries op (her clock is no secret) while it lands after his pull's
    # permission check: the bundle of every table had its digest in the header.
    hub_path, alice = hub_before_salaries(tmp_path)
    alice.execute("INSERT INTO tasks VALUES (2, 'pay invoices', 0)")
    export_bundle(alice, tmp_path / "first.bundle")
    land(hub_path, tmp_path / "first.bundle")
    before = hub_clock(hub_path)
    alice.execute("INSERT INTO salaries VALUES (1, 'SECRET-PAYEE-ann', 'SECRET-AMOUNT-5100')")
    alice_id, salary_seq = sync_status(alice)["device_id"], sync_status(alice)["clock"][sync_status(alice)["device_id"]]
    alice.execute("UPDATE tasks SET done = 1 WHERE id = 2")
    export_bundle(alice, tmp_path / "second.bundle", since=before)
    real_scope = views.pull_scope

    landed = []

    async def then_salaries_arrive(*args):
        scope = await real_scope(*args)
        if not landed:
            landed.append(True)
            land(hub_path, tmp_path / "second.bundle")
        return scope

    monkeypatch.setattr(views, "pull_scope", then_salaries_arrive)
    ds = Datasette([str(hub_path)], config=CONFIG, secret=SECRET)
    await ds.invoke_startup()
    since = json.dumps({**before, alice_id: salary_seq})
    response = await ds.client.get(
        "/hub/-/sync/export", params={"since": since}, cookies={"ds_actor": ds.client.actor_cookie({"id": "bob"})}
    )
    assert response.status_code == 200
    assert json.loads(response.headers["X-Sync-Scope"]) == ["catalogue", "tasks"]
    header = bundle_header(response.content)
    assert alice_id not in header["anchors"]
    assert "pay invoices" in bundle_values(response.content)  # the update of tasks after it


REFUSED = {
    "insert-row": ("INSERT INTO catalogue VALUES (3, 'lamp', 15.0)", "inserts rows into"),
    "update-row": ("UPDATE catalogue SET price = 1.0 WHERE id = 1", "updates rows of"),
    "delete-row": ("DELETE FROM catalogue WHERE id = 2", "deletes rows from"),
}


def test_a_copy_holds_what_its_actor_may_view_and_pushes_what_it_may_write(hub, tokens, tmp_path, run, run_json):
    # bob's new copy holds tasks and catalogue, knows that salaries' two operations exist,
    # and never got their values.
    bob = clone(run, hub, tokens["bob"], tmp_path / "bob.db")
    assert table_names(bob) == {"tasks", "catalogue"}
    assert table_rows(bob, "tasks") == table_rows(hub.path, "tasks")
    assert table_rows(bob, "catalogue") == table_rows(hub.path, "catalogue")
    status = run_json(["sqlite-utils", "sync-status", bob, "--json"])
    assert status["scope"] == ["catalogue", "tasks"] and status["withheld"] == 2
    assert not any(secret in bob.read_bytes() for secret in HIDDEN)

    # A push of an edit to a table bob may not write that way is refused whole, even beside
    # one he may make, and the hub is left exactly as it was.
    before = digest(hub.path)
    for action, (sql, verb) in REFUSED.items():
        copy = copy_device(run, bob, tmp_path / f"{action}.db")
        conn = sqlite3.connect(copy, isolation_level=None)
        conn.execute("INSERT INTO tasks VALUES (3, 'allowed on its own', 0)")
        conn.execute(sql)
        conn.close()
        result = run(["sqlite-utils", "sync", copy, hub.url + "/hub", "--token", tokens["bob"]], check=False)
        assert result.returncode == 1
        assert result.stderr == (
            f"Error: hub {hub.url}/hub does not allow import (push) (403): Permission denied: the bundle {verb} "
            f"table catalogue, which needs {action} on it. Nothing was imported\n"
        )
        assert digest(hub.path) == before

    # Operations the hub holds relay freely: bob's whole log carries the catalogue's.
    bundle = tmp_path / "everything.bundle"
    exported = run_json(["sqlite-utils", "export-bundle", bob, bundle, "--json"])
    response = hub.post("/hub/-/sync/import", content=bundle.read_bytes(), headers=auth(tokens["bob"]))
    assert response.status_code == 200, response.text
    assert response.json()["applied"] == 0 and response.json()["duplicates"] == exported["operations"] >= 4

    # What bob may write lands, and reaches alice's full copy.
    conn = sqlite3.connect(bob, isolation_level=None)
    conn.execute("INSERT INTO tasks VALUES (3, 'from bob', 0)")
    conn.execute("UPDATE tasks SET done = 1 WHERE id = 1")
    conn.close()
    pushed = run_json(["sqlite-utils", "sync", bob, hub.url + "/hub", "--token", tokens["bob"], "--json"])["pushed"]
    assert pushed["applied"] >= 2
    alice = clone(run, hub, tokens["alice"], tmp_path / "alice.db")
    assert table_names(alice) == set(SCHEMA)
    assert run_json(["sqlite-utils", "sync-status", alice, "--json"])["scope"] is None
    for table in SCHEMA:
        assert table_rows(alice, table) == table_rows(hub.path, table)
    assert table_rows(alice, "tasks") == [(1, "order chairs", 1), (2, "pay invoices", 0), (3, "from bob", 0)]


# Random per-actor permissions --------------------------------------------------------------

TABLES = sorted(SCHEMA)
OPEN_CONFIG = {
    "databases": {
        "hub": {
            "permissions": {
                action: {"id": "*"}
                for action in ("sync-export", "sync-import", "insert-row", "update-row", "delete-row", "alter-table")
            }
        }
    }
}


class Recorder(httpx.BaseTransport):
    """A real HTTP transport that keeps every bundle the hub sends."""

    def __init__(self):
        self.inner = httpx.HTTPTransport()
        self.bundles: list[bytes] = []

    def handle_request(self, request):
        response = self.inner.handle_request(request)
        body = response.read()
        if response.headers.get("content-type", "").startswith("application/vnd.sqlite3"):
            self.bundles.append(body)
        return httpx.Response(response.status_code, headers=response.headers, content=body, request=request)

    def close(self):
        self.inner.close()


def restricted_token(signer: Datasette, actor: str, views: set[str], writes: set[str]) -> str:
    """A token allowed to sync, to view ``views`` and to write ``writes`` (per table)."""
    tables = {
        table: ["vt"] + (["ir", "ur", "dr"] if table in writes else []) for table in views
    }
    restrictions = {"d": {"hub": ["vd", "sync-export", "sync-import", "alter-table"]}, "r": {"hub": tables}}
    return "dstok_" + signer.sign({"a": actor, "t": int(time.time()), "_r": restrictions}, namespace="token")


ACTOR = st.fixed_dictionaries(
    {
        "views": st.sets(st.sampled_from(TABLES), min_size=1),
        "writes": st.sets(st.sampled_from(TABLES)),
    }
)
EDIT = st.tuples(st.integers(0, 2), st.sampled_from(TABLES), st.integers(1, 4), st.sampled_from(["put", "delete"]))


def test_a_copy_of_some_tables_syncs_a_table_the_hub_has_not_seen(open_hub, tmp_path, run):
    """A copy that syncs tasks and a new notes table pulls with table=notes&table=tasks: the
    hub holds no notes operation yet, so its bundle carries all it has of notes (none)."""
    token = open_hub.token("carol")
    phone = tmp_path / "phone.db"
    conn = sqlite3.connect(phone, isolation_level=None)
    conn.execute(SCHEMA["tasks"])
    conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    conn.execute("INSERT INTO notes VALUES (1, 'first note')")
    conn.close()
    run(["sqlite-utils", "enable-sync", phone, "tasks", "notes", "--partial"])
    run(["sqlite-utils", "sync", phone, open_hub.url + "/hub", "--token", token])
    assert table_rows(phone, "tasks") == table_rows(open_hub.path, "tasks")
    # The hub keeps and relays notes without having the table: a new copy of notes gets it.
    tablet = tmp_path / "tablet.db"
    run(["sqlite-utils", "create-database", tablet])
    run(["sqlite-utils", "sync", tablet, open_hub.url + "/hub", "--token", token, "--alter", "--table", "notes"])
    assert table_names(tablet) == {"notes"} and table_rows(tablet, "notes") == [(1, "first note")]


def pull_push(hub, path, token: str, recorder: Recorder, alter: bool = False) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        sync_with_hub(conn, hub.url + "/hub", token=token, alter=alter, transport=recorder)
    finally:
        conn.close()


@pytest.fixture
def open_hub(tmp_path, datasette_server):
    path = build_hub(tmp_path / "hub.db")
    server = datasette_server([path], OPEN_CONFIG)
    server.path = path
    return server


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(actors=st.lists(ACTOR, min_size=2, max_size=3), edits=st.lists(EDIT, max_size=12))
def test_random_permissions_converge_and_never_leak(open_hub, actors, edits):
    """Actors with random view and write grants (token restrictions) edit the tables they may
    write, all sync twice: each copy holds exactly the tables its actor may view, equal to the
    hub's, and no bundle an actor received holds a byte of a table it may not view."""
    signer = Datasette([], secret=SECRET)
    run_id = next(COUNTER)
    folder = pathlib.Path(tempfile.mkdtemp(prefix="perm-"))
    try:
        devices = []
        for number, grant in enumerate(actors):
            writes = grant["writes"] & grant["views"]
            token = restricted_token(signer, f"actor{run_id}x{number}", grant["views"], writes)
            recorder = Recorder()
            path = folder / f"device{number}.db"
            sqlite3.connect(path).close()
            pull_push(open_hub, path, token, recorder, alter=True)
            devices.append((path, token, recorder, grant["views"], writes))
        for who, table, key, kind in edits:
            path, token, recorder, views, writes = devices[who % len(devices)]
            if table not in writes:
                continue
            conn = sqlite3.connect(path, isolation_level=None)
            if kind == "put":
                value = f"{table}-value-{run_id}-{who}-{key}"
                conn.execute(f"INSERT OR REPLACE INTO {table} VALUES (?, ?, ?)", [key, value, key])
            else:
                conn.execute(f"DELETE FROM {table} WHERE id = ?", [key])
            conn.close()
            pull_push(open_hub, path, token, recorder)
        for _ in range(2):
            for path, token, recorder, views, writes in devices:
                pull_push(open_hub, path, token, recorder)
        for path, token, recorder, views, writes in devices:
            assert table_names(path) == views
            for table in views:
                assert table_rows(path, table) == table_rows(open_hub.path, table), table
            hidden = [table for table in TABLES if table not in views]
            for bundle in recorder.bundles:
                for table in hidden:
                    assert table.encode() not in bundle
                    assert f"{table}-value".encode() not in bundle
                    if table == "salaries":
                        assert b"SECRET" not in bundle
    finally:
        shutil.rmtree(folder, ignore_errors=True)


COUNTER = itertools.count()
