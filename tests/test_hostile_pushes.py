"""A token holder's crafted pushes, through a real ``datasette serve``: a push does only what
its actor is granted, and its answer tells nothing of a table the actor may not view.

The hub is the README's team hub (see test_table_permissions): bob may view and write
``tasks``, view ``catalogue``, and may not view ``salaries``. Bundles are crafted the way a
hostile peer would: headers and chunk images rewritten, then resealed.
"""

from __future__ import annotations

import shutil
import sqlite3
import time

import pytest

from sqlite_utils_sync import BundleError, SyncError, codec, enable_sync, export_bundle, import_bundle, sync_status
from sqlite_utils_sync.bundle import op_fingerprint
from sqlite_utils_sync.oplog import INSERT, LOCAL, RESOLUTION, op_id

from conftest import BundleCraft
from test_table_permissions import CONFIG, WRITES, auth, build_hub, clone, copy_device, digest, hub, table_rows, tokens  # noqa: F401

SECRET_ROW = [1, "SECRET-PAYEE-ann", "SECRET-AMOUNT-5100"]  # the hub's salaries row 1


def hub_device(path) -> str:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT device_id FROM _sync_devices WHERE idx = ?", [LOCAL]).fetchone()[0]
    finally:
        conn.close()


def hub_op(path, table: str, rowkey: str) -> tuple[int, int]:
    """(seq, hlc) of the hub's own operation on one row."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(
            "SELECT o.op & ?, o.hlc FROM _sync_ops o JOIN _sync_tables t ON t.tid = o.tid WHERE t.name = ? AND o.rowkey = ?",
            [(1 << 40) - 1, table, rowkey],
        ).fetchone()
    finally:
        conn.close()


def crafted(template, path, header: dict, ops: list[tuple]) -> bytes:
    """A bundle made from ``template`` with ``header``'s keys replaced and one chunk holding
    ``ops`` (seq, hlc, kind, mask, moved, values...) of the header's first device and table."""
    shutil.copyfile(template, path)
    conn = sqlite3.connect(path)
    BundleCraft.edit_header(conn, lambda h: (h.update(header), h.pop("device_names", None), h.pop("retired", None)))
    conn.execute("DELETE FROM bundle_chunks")
    image = sqlite3.connect(":memory:")
    width = len(ops[0]) - 5
    image.execute(f"CREATE TABLE ops (seq INTEGER PRIMARY KEY, hlc, kind, mask, moved{''.join(f', v{i}' for i in range(width))})")
    image.executemany(f"INSERT INTO ops VALUES ({', '.join('?' * (5 + width))})", ops)
    image.commit()
    conn.execute("INSERT INTO bundle_chunks VALUES (1, 0, 0, ?)", [codec.pack(image.serialize(), codec.ZSTD)])
    image.close()
    BundleCraft.reseal(conn)
    conn.commit()
    conn.close()
    return path.read_bytes()


def bob_template(run, hub, tokens, tmp_path):
    """A bundle of bob's new copy of the hub, to craft pushes from."""
    bob = clone(run, hub, tokens["bob"], tmp_path / "bob.db")
    template = tmp_path / "template.bundle"
    export_bundle(sqlite3.connect(bob), str(template))
    return template


def test_a_push_repeating_an_operation_of_a_hidden_table_answers_the_same_whatever_it_guesses(hub, tokens, tmp_path, run):
    template = bob_template(run, hub, tokens, tmp_path)
    device = hub_device(hub.path)
    seq, hlc = hub_op(hub.path, "salaries", "1")
    before = digest(hub.path)

    def probe(table: str, columns: list[str], values: list) -> tuple[int, str]:
        header = {
            "devices": [device], "tables": [[table, columns, ["id"]]], "column_types": {table: {c: "" for c in columns}},
            "anchors": {}, "since": {}, "clock": {device: seq}, "operations": 1, "scope": None, "withheld": 0,
        }
        data = crafted(template, tmp_path / "probe.bundle", header, [(seq, hlc, INSERT, 7, None, *values)])
        response = hub.post("/hub/-/sync/import", content=data, headers=auth(tokens["bob"]))
        return response.status_code, response.json()["reason"]

    # The hub's salaries operation passed off as one of a table bob may write: the hub's copy
    # is never compared with it value by value, so a right guess and a wrong one get the same
    # answer (a right guess was taken as a duplicate, 200).
    wrong = [1, "SECRET-PAYEE-xyz", "SECRET-AMOUNT-0"]
    assert probe("tasks", ["id", "title", "done"], SECRET_ROW) == probe("tasks", ["id", "title", "done"], wrong) == (
        400,
        "device_id_clash",
    )
    # Named as it is: a push may not repeat an operation the hub holds of a table the actor
    # may not view (it would be compared with the hub's copy).
    assert probe("salaries", ["id", "name", "amount"], SECRET_ROW) == probe("salaries", ["id", "name", "amount"], wrong) == (
        403,
        "table_forbidden",
    )
    assert digest(hub.path) == before


def test_a_push_anchored_on_an_operation_of_a_hidden_table_answers_the_same_whatever_it_guesses(hub, tokens, tmp_path, run):
    bob = clone(run, hub, tokens["bob"], tmp_path / "bob.db")
    device = hub_device(hub.path)
    seq, _ = hub_op(hub.path, "salaries", "1")
    hub_conn = sqlite3.connect(f"file:{hub.path}?mode=ro", uri=True)
    right = op_fingerprint(hub_conn, op_id(LOCAL, seq))
    hub_conn.close()
    conn = sqlite3.connect(bob, isolation_level=None)
    answers = []
    for n, fingerprint in enumerate([right, "0" * len(right)]):
        conn.execute("INSERT INTO tasks VALUES (?, 'from bob', 0)", [10 + n])
        path = tmp_path / f"anchored-{n}.bundle"
        export_bundle(conn, str(path), since=hub.get("/hub/-/sync/changes").json()["clock"])
        BundleCraft.rewrite(path, lambda b: (BundleCraft.edit_header(b, lambda h: h["anchors"].update({device: [seq, fingerprint]})), BundleCraft.reseal(b)))
        response = hub.post("/hub/-/sync/import", content=path.read_bytes(), headers=auth(tokens["bob"]))
        answers.append((response.status_code, response.json().get("applied")))
    conn.close()
    # A wrong fingerprint of the hub's salaries operation was a device_id_clash (400), a
    # right one accepted: bob could confirm a guess of the whole operation.
    assert answers == [(200, 1), (200, 1)]
    assert table_rows(hub.path, "tasks")[-2:] == [(10, "from bob", 0), (11, "from bob", 0)]


RESOLVER_CONFIG = {
    "databases": {
        "hub": {
            "permissions": {"sync-export": {"id": ["alice", "bob"]}, "sync-import": {"id": ["alice", "bob"]}},
            "tables": {
                "tasks": {"permissions": {"update-row": {"id": ["alice", "bob"]}, **{a: {"id": "alice"} for a in ("insert-row", "delete-row")}}},
                "salaries": {"allow": {"id": "alice"}},
            },
        }
    }
}


@pytest.mark.parametrize(
    "sql, action",
    [("DELETE FROM tasks WHERE id = 2", "delete-row"), ("INSERT INTO tasks VALUES (7, 'bob may not insert', 0)", "insert-row")],
)
def test_a_resolution_needs_what_it_does_to_the_row(tmp_path, datasette_server, run, sql, action):
    hub = datasette_server([build_hub(tmp_path / "hub.db")], RESOLVER_CONFIG)
    hub.path = tmp_path / "hub.db"
    token = hub.token("bob")
    bob = clone(run, hub, token, tmp_path / "bob.db")
    conn = sqlite3.connect(bob, isolation_level=None)
    conn.execute(sql)
    path = tmp_path / "resolution.bundle"
    export_bundle(conn, str(path), since=hub.get("/hub/-/sync/changes").json()["clock"])
    conn.close()
    # The same operation flagged as a conflict's resolution: it was taken as an update.
    BundleCraft.rewrite(path, lambda b: (BundleCraft.edit_chunks(b, f"UPDATE ops SET kind = kind | {RESOLUTION} WHERE kind != 3", first_only=False), BundleCraft.reseal(b)))
    before = digest(hub.path)
    response = hub.post("/hub/-/sync/import", content=path.read_bytes(), headers=auth(token))
    assert response.status_code == 403 and response.json()["reason"] == "table_forbidden"
    assert f"which needs {action} on it" in response.json()["error"]
    assert digest(hub.path) == before
    assert table_rows(hub.path, "tasks") == [(1, "order chairs", 0), (2, "pay invoices", 0)]


def hub_names(hub) -> dict:
    conn = sqlite3.connect(f"file:{hub.path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT device_id, name FROM _sync_device_names").fetchall())
    finally:
        conn.close()


def test_a_push_names_and_retires_only_devices_its_actor_owns(hub, tokens, tmp_path, run):
    # carol's device reached the hub through its operator (sqlite-utils import-bundle on the
    # hub's file): no actor owns it.
    carol = copy_device(run, hub.path, tmp_path / "carol.db")
    conn = sqlite3.connect(carol, isolation_level=None)
    conn.execute("UPDATE catalogue SET price = 45.0 WHERE id = 1")
    conn.close()
    run(["sqlite-utils", "export-bundle", carol, tmp_path / "carol.bundle"])
    run(["sqlite-utils", "import-bundle", hub.path, tmp_path / "carol.bundle"])
    bob = clone(run, hub, tokens["bob"], tmp_path / "bob.db")
    carol_id = hub_device(carol)

    # bob retires carol's device: refused whole, and carol syncs on.
    run(["sqlite-utils", "sync-retire", bob, carol_id])
    result = run(["sqlite-utils", "sync", bob, hub.url + "/hub", "--token", tokens["bob"]], check=False)
    assert result.returncode == 1
    assert "403" in result.stderr and "retiring it needs the sync-relay permission" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1

    # bob's bundle says it comes from the hub's own device and names it: the name is not taken.
    bob2 = clone(run, hub, tokens["bob"], tmp_path / "bob2.db")
    conn = sqlite3.connect(bob2, isolation_level=None)
    conn.execute("UPDATE tasks SET done = 1 WHERE id = 1")
    path = tmp_path / "names.bundle"
    export_bundle(conn, str(path), since=hub.get("/hub/-/sync/changes").json()["clock"])
    conn.close()
    device = hub_device(hub.path)
    named = {device: ["alice-laptop", time.time_ns() // 1_000_000 << 10], hub_device(bob2): ["bobs-phone", 1 << 10]}
    BundleCraft.rewrite(path, lambda b: (BundleCraft.edit_header(b, lambda h: h.update(source=device, device_names=named)), BundleCraft.reseal(b)))
    response = hub.post("/hub/-/sync/import", content=path.read_bytes(), headers=auth(tokens["bob"]))
    assert response.status_code == 200, response.text
    assert device not in hub_names(hub)
    assert table_rows(hub.path, "tasks")[0] == (1, "order chairs", 1)


def test_the_pages_count_nothing_of_a_hidden_table(hub, tokens, tmp_path, run):
    alice = clone(run, hub, tokens["alice"], tmp_path / "alice.db")
    time.sleep(0.01)  # alice's salaries edit gets a later clock than anything else of her device
    conn = sqlite3.connect(alice, isolation_level=None)
    conn.execute("UPDATE salaries SET amount = 'SECRET-AMOUNT-5200' WHERE id = 1")
    conn.close()
    run(["sqlite-utils", "sync", alice, hub.url + "/hub", "--token", tokens["alice"]])
    alice_id = hub_device(alice)

    def clocks(token) -> dict:
        devices = hub.get("/hub/-/sync/clocks.json", headers=auth(token)).json()["devices"]
        return {d["device_id"]: d for d in devices}

    # alice's last edit is her salaries update; bob sees her device as last seen before it.
    assert clocks(tokens["bob"])[alice_id]["last_seen"] < clocks(tokens["alice"])[alice_id]["last_seen"]
    imports = lambda token: hub.get("/hub/-/sync/imports.json", headers=auth(token)).json()["imports"]  # noqa: E731
    assert {i["conflicts"] for i in imports(tokens["alice"])} == {0}
    assert {i["conflicts"] for i in imports(tokens["bob"])} == {None}
    assert "—" in hub.get("/hub/-/sync/imports", headers=auth(tokens["bob"])).text


DROPBOX_CONFIG = {
    "databases": {
        "hub": {
            "permissions": {"sync-import": {"id": "sensor"}},
            "tables": {"tasks": {"allow": {"id": "alice"}, "permissions": {"insert-row": {"id": "sensor"}}}},
        }
    }
}


def test_a_device_that_may_write_a_table_it_may_not_view_pushes_its_new_rows(tmp_path, datasette_server):
    hub = datasette_server([build_hub(tmp_path / "hub.db")], DROPBOX_CONFIG)
    hub.path = tmp_path / "hub.db"
    token = hub.token("sensor")
    sensor = sqlite3.connect(tmp_path / "sensor.db", isolation_level=None)
    sensor.execute("CREATE TABLE tasks (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)")
    enable_sync(sensor, ["tasks"])
    sensor.execute("INSERT INTO tasks VALUES (50, 'reading', 0)")
    path = tmp_path / "sensor.bundle"
    export_bundle(sensor, str(path))
    for _ in range(2):  # sent again (its answer lost): the same bundle, taken once
        response = hub.post("/hub/-/sync/import", content=path.read_bytes(), headers=auth(token))
        assert response.status_code == 200, response.text
    assert table_rows(hub.path, "tasks")[-1] == (50, "reading", 0)


def test_a_push_learns_no_clock_of_an_operation_it_may_not_view(tmp_path, make_db, craft):
    # The hub's import as it runs for eve, who may view only `public` and owns no device: a
    # bundle whose clocks fall below a hidden operation's was refused as such, and eve could
    # binary-search that clock. Devices she does not own are refused first, whatever the clock.
    x = make_db(tmp_path / "x.db", "CREATE TABLE public (id INTEGER PRIMARY KEY, v); CREATE TABLE secret (id INTEGER PRIMARY KEY, v)", ("public", "secret"))
    x.execute("INSERT INTO public VALUES (1, 'p')")
    time.sleep(0.01)
    x.execute("INSERT INTO secret VALUES (1, 's')")
    export_bundle(x, str(tmp_path / "x1.bundle"))
    hub = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
    import_bundle(hub, str(tmp_path / "x1.bundle"), create_tables=True, actor="bob", may_relay=False)
    (secret,) = hub.execute("SELECT hlc FROM _sync_ops o JOIN _sync_tables t USING (tid) WHERE t.name = 'secret'").fetchone()
    time.sleep(0.01)
    x.execute("INSERT INTO public VALUES (2, 'p2')")
    export_bundle(x, str(tmp_path / "x2.bundle"), since=sync_status(hub)["clock"])

    def probe(hlc):
        path = tmp_path / "probe.bundle"
        shutil.copyfile(tmp_path / "x2.bundle", path)
        craft.rewrite(path, lambda c: (craft.edit_chunks(c, "UPDATE ops SET hlc = ?", hlc, first_only=False), craft.reseal(c)))
        with pytest.raises((BundleError, SyncError)) as error:
            import_bundle(hub, str(path), actor="eve", may_relay=False, visible={"public"})
        return error.value.reason

    assert [probe(hlc) for hlc in (secret - 1, secret, secret + 1)] == ["device_owned"] * 3


def naming(template, path, tables: list[list]) -> bytes:
    """A bundle of no operations made from ``template`` whose header names ``tables``."""
    shutil.copyfile(template, path)
    conn = sqlite3.connect(path)
    BundleCraft.edit_header(conn, lambda h: h.update(tables=tables, operations=0, withheld=0, scope=None, column_types={}, anchors={}))
    conn.execute("DELETE FROM bundle_chunks")
    BundleCraft.reseal(conn)
    conn.commit()
    conn.close()
    return path.read_bytes()


def test_a_push_naming_a_hidden_table_answers_the_same_whatever_it_guesses(hub, tokens, tmp_path, run):
    # Its schema was compared with the hub's before: a wrong key, a column in another case,
    # another case of the name each said something of the table; a right guess was taken.
    template = bob_template(run, hub, tokens, tmp_path)
    before = digest(hub.path)
    device, hlc = "ab" * 16, time.time_ns() // 1_000_000 << 10
    answers = set()
    for table in (["salaries", ["id", "name", "amount"], ["id"]], ["salaries", ["id", "name", "amount"], ["name"]],
                  ["salaries", ["id", "NAME", "amount"], ["id"]], ["Salaries", ["id", "name", "amount"], ["id"]]):
        header = {
            "devices": [device], "tables": [table], "column_types": {}, "anchors": {}, "since": {},
            "clock": {device: 1}, "operations": 1, "scope": None, "withheld": 0,
        }
        data = crafted(template, tmp_path / "probe.bundle", header, [(1, hlc, INSERT, 7, None, 9, "x", "y")])
        response = hub.post("/hub/-/sync/import", content=data, headers=auth(tokens["bob"]))
        answers.add((response.status_code, response.json()["reason"], response.json()["error"].replace(table[0], "T")))
    assert answers == {(403, "table_forbidden", "Permission denied: the bundle names table T, which these credentials may neither view nor write. Nothing was imported")}
    assert digest(hub.path) == before


def test_tables_a_push_only_names_are_not_stored(hub, tokens, tmp_path, run):
    # A header of made-up names with no operation: none is stored (each would be checked and
    # sent on every pull for good), and pulls of some tables go on answering.
    template = bob_template(run, hub, tokens, tmp_path)
    count = "SELECT count(*) FROM _sync_tables"
    before = sqlite3.connect(hub.path).execute(count).fetchone()
    names = [[f"made_up_{i}", ["id"], ["id"]] for i in range(900)]
    response = hub.post("/hub/-/sync/import", content=naming(template, tmp_path / "names.bundle", names), headers=auth(tokens["bob"]))
    assert response.status_code == 200, response.text
    assert sqlite3.connect(hub.path).execute(count).fetchone() == before
    # More than a bundle may name is refused before any name is looked at.
    names = [[f"made_up_{i}", ["id"], ["id"]] for i in range(1200)]
    response = hub.post("/hub/-/sync/import", content=naming(template, tmp_path / "more.bundle", names), headers=auth(tokens["bob"]))
    assert (response.status_code, response.json()["reason"]) == (400, "invalid_metadata")
    assert "more than the 1000 a bundle may name" in response.json()["error"]
    assert sqlite3.connect(hub.path).execute(count).fetchone() == before
    assert hub.get("/hub/-/sync/export", headers=auth(tokens["bob"])).status_code == 200
