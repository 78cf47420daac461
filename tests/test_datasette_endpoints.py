"""The bundle endpoints: export, import, resolve; their check order and error answers."""

import asyncio
import json
import sqlite3
import tempfile

import pytest
import sqlite_utils
from datasette.app import Datasette

from sqlite_utils_sync import (
    enable_sync,
    export_bundle,
    import_bundle,
    list_conflicts,
    sync_status,
)
from sqlite_utils_sync.bundle import BundleReader

IMPORT_KEYS = {
    "bundle_id",
    "source_device_id",
    "total_operations",
    "applied",
    "conflicts",
    "duplicates",
    "skipped",
    "not_applied",
    "withheld",
    "applied_by_table",
    "tables_created",
    "columns_added",
}
ROOT = {"id": "root"}


def new_device(path, rows=()):
    db = sqlite_utils.Database(path)
    db["todos"].create({"id": int, "title": str, "done": int}, pk="id")
    enable_sync(db, ["todos"])
    db["todos"].insert_all(rows)
    return db


@pytest.fixture
def devices(tmp_path):
    """An empty hub and two phones with their own rows, each exported as a bundle."""
    hub = new_device(tmp_path / "hub.db")
    phones = []
    for number in (1, 2):
        phone = new_device(
            tmp_path / f"phone{number}.db", [{"id": number * 10 + i, "title": f"phone {number} #{i}"} for i in range(3)]
        )
        export_bundle(phone, tmp_path / f"phone{number}.bundle")
        phones.append(phone)
    return hub, phones


@pytest.fixture
async def ds(devices, tmp_path):
    datasette = Datasette(
        [str(tmp_path / "hub.db")],
        config={"plugins": {"datasette-sync": {"max_bundle_bytes": 200_000}}},
    )
    datasette.root_enabled = True
    await datasette.invoke_startup()
    return datasette


@pytest.fixture(autouse=True)
def own_tempdir(tmp_path, monkeypatch):
    """Bundles in flight go to a directory of their own, so tests can see it emptied."""
    directory = tmp_path / "tmp"
    directory.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def leftovers(directory):
    """Temporary bundle directories the plugin did not remove (Datasette keeps its own there too)."""
    return [p.name for p in directory.iterdir() if p.name.startswith("datasette-sync-")]


def snapshot(db):
    """What must not change after a refused request."""
    return {
        "todos": list(db["todos"].rows),
        "ops": db.execute("SELECT count(*) FROM _sync_ops").fetchone()[0],
        "imports": db.execute("SELECT count(*) FROM _sync_imports").fetchone()[0],
    }


async def test_import_then_export_round_trip(ds, devices, tmp_path, own_tempdir):
    hub, phones = devices
    bundle = (tmp_path / "phone1.bundle").read_bytes()
    response = await ds.client.post("/hub/-/sync/import", content=bundle, actor=ROOT)
    assert response.status_code == 200
    result = response.json()
    assert set(result) == IMPORT_KEYS | {"clock"}
    assert result["applied"] == result["total_operations"] == 3
    assert result["skipped"] is False and result["conflicts"] == 0
    assert result["source_device_id"] == sync_status(phones[0])["device_id"]
    assert result["clock"] == sync_status(hub)["clock"]
    assert json.loads(response.headers["x-sync-clock"]) == result["clock"]
    assert [r["title"] for r in hub["todos"].rows] == ["phone 1 #0", "phone 1 #1", "phone 1 #2"]
    assert (await ds.client.get("/hub/-/sync/imports.json", actor=ROOT)).json()["imports"][0]["actor"] == "root"

    # Pushing the same bundle again changes nothing.
    again = (await ds.client.post("/hub/-/sync/import", content=bundle, actor=ROOT)).json()
    assert again["skipped"] is True and again["applied"] == 0

    # Phone 2 pulls everything it lacks and ends up with phone 1's rows.
    since = json.dumps(sync_status(phones[1])["clock"])
    pulled = await ds.client.get("/hub/-/sync/export", params={"since": since}, actor=ROOT)
    assert pulled.status_code == 200
    assert pulled.headers["content-type"] == "application/vnd.sqlite3"
    assert json.loads(pulled.headers["x-sync-clock"]) == sync_status(hub)["clock"]
    (tmp_path / "pulled.bundle").write_bytes(pulled.content)
    import_bundle(phones[1], tmp_path / "pulled.bundle")
    titles = {r["title"] for r in phones[1]["todos"].rows}
    assert {"phone 1 #0", "phone 2 #0"} <= titles
    assert leftovers(own_tempdir) == []


async def test_export_without_since_is_everything(ds, devices, tmp_path, own_tempdir):
    hub = devices[0]
    import_bundle(hub, tmp_path / "phone1.bundle")
    response = await ds.client.get("/hub/-/sync/export", actor=ROOT)
    assert response.status_code == 200
    (tmp_path / "all.bundle").write_bytes(response.content)
    reader = BundleReader(tmp_path / "all.bundle")
    assert reader.header["operations"] == sync_status(hub)["operations"]
    reader.close()
    # A caller that already has everything gets an empty delta.
    since = json.dumps(sync_status(hub)["clock"])
    response = await ds.client.get("/hub/-/sync/export", params={"since": since}, actor=ROOT)
    assert response.headers["x-sync-operations"] == "0"
    bad = await ds.client.get("/hub/-/sync/export", params={"since": "{nope"}, actor=ROOT)
    assert bad.status_code == 400
    # Bundles are streamed from a temporary file that is gone once the response is sent.
    assert leftovers(own_tempdir) == []


async def test_export_errors(ds):
    response = await ds.client.get("/hub/-/sync/export", params={"since": "not json"}, actor=ROOT)
    assert response.status_code == 400
    assert response.json()["reason"] == "invalid_clock" and response.json()["ok"] is False
    assert response.json()["error"] == "since query parameter is not valid JSON: 'not json'"
    assert (await ds.client.get("/nope/-/sync/export", actor=ROOT)).status_code == 404
    assert (await ds.client.post("/hub/-/sync/export", actor=ROOT)).status_code == 405


async def test_export_from_database_without_sync(tmp_path):
    sqlite_utils.Database(tmp_path / "plain.db")["t"].insert({"id": 1}, pk="id")
    ds = Datasette([str(tmp_path / "plain.db")])
    ds.root_enabled = True
    response = await ds.client.get("/plain/-/sync/export", actor=ROOT)
    assert response.status_code == 400 and response.json()["reason"] == "not_enabled"


async def test_export_from_immutable_database(devices, tmp_path):
    hub = devices[0]
    import_bundle(hub, tmp_path / "phone1.bundle")
    before = (tmp_path / "hub.db").read_bytes()
    ds = Datasette(immutables=[str(tmp_path / "hub.db")])
    ds.root_enabled = True
    response = await ds.client.get("/hub/-/sync/export", actor=ROOT)
    assert response.status_code == 200
    assert json.loads(response.headers["x-sync-clock"]) == sync_status(hub)["clock"]
    assert (tmp_path / "hub.db").read_bytes() == before


async def test_check_order(devices, tmp_path, own_tempdir):
    """401 bad token, then 403 permission, then 403 read-only, then 413, then 400."""
    hub = devices[0]
    config = {
        "plugins": {"datasette-sync": {"max_bundle_bytes": 1000}},
        "databases": {"hub": {"permissions": {"sync-import": {"id": "alice"}}}},
    }
    ds = Datasette([str(tmp_path / "hub.db")], config=config)
    await ds.invoke_startup()
    before = snapshot(hub)
    huge, garbage, alice = b"x" * 5000, b"not a bundle", {"id": "alice"}

    async def post(body, **kwargs):
        return await ds.client.post("/hub/-/sync/import", content=body, **kwargs)

    bad_token = await post(huge, headers={"Authorization": "Bearer dstok_bad"})
    assert bad_token.status_code == 401
    # A token without Datasette's dstok_ prefix authenticates nobody either: 401, not 403.
    not_a_token = await post(huge, headers={"Authorization": "Bearer garbage"})
    assert not_a_token.status_code == 401 and not_a_token.json()["reason"] == "unauthorized"

    forbidden = await post(huge, actor={"id": "bob"})
    assert forbidden.status_code == 403
    # No detail about the database or the limit leaks to someone without permission: only
    # the action the endpoint needs.
    assert forbidden.json() == {"ok": False, "error": "Permission denied: needs sync-import", "reason": "forbidden"}

    too_large = await post(huge, actor=alice)
    assert too_large.status_code == 413
    assert too_large.json()["reason"] == "too_large" and "1000" in too_large.json()["error"]

    async def chunks():
        for _ in range(5):
            yield b"x" * 400

    streamed = await post(chunks(), actor=alice)  # no Content-Length: the stream is counted
    assert streamed.status_code == 413

    invalid = await post(garbage, actor=alice)
    assert invalid.status_code == 400
    body = invalid.json()
    assert body["ok"] is False and body["reason"] == "invalid_bundle"
    assert body["error"].startswith("Bundle upload.bundle is not a SQLite file")

    assert (await ds.client.post("/nope/-/sync/import", content=garbage, actor=alice)).status_code == 404
    assert snapshot(hub) == before
    assert leftovers(own_tempdir) == []

    # The same database served immutable: permission first, then read-only.
    immutable = Datasette(immutables=[str(tmp_path / "hub.db")], config=config)
    await immutable.invoke_startup()
    assert (await immutable.client.post("/hub/-/sync/import", content=huge)).status_code == 403
    read_only = await immutable.client.post("/hub/-/sync/import", content=huge, actor=alice)
    assert read_only.status_code == 403
    assert read_only.json()["reason"] == "read_only" and "read-only" in read_only.json()["error"]
    assert snapshot(hub) == before


async def test_tampered_bundle_is_refused(ds, devices, tmp_path, craft):
    hub = devices[0]
    path = tmp_path / "phone1.bundle"
    bundle = sqlite_utils.Database(path)
    [chunk] = [row["data"] for row in bundle["bundle_chunks"].rows][:1]
    tampered = craft.stored(craft.image(chunk).replace(b"phone 1", b"phone X"), chunk)
    bundle.execute("UPDATE bundle_chunks SET data = ? WHERE id = 1", [tampered])
    bundle.conn.commit()
    bundle.close()
    before = snapshot(hub)
    response = await ds.client.post("/hub/-/sync/import", content=path.read_bytes(), actor=ROOT)
    assert response.status_code == 400
    assert response.json()["reason"] == "hash_mismatch"
    assert "integrity check" in response.json()["error"]
    assert snapshot(hub) == before


async def test_bundle_that_cannot_apply_changes_nothing(ds, devices, tmp_path):
    hub, phones = devices
    # Phone 1's second bundle starts after operations the hub never saw.
    phones[0]["todos"].insert({"id": 99, "title": "later"})
    export_bundle(phones[0], tmp_path / "gap.bundle", since={sync_status(phones[0])["device_id"]: 3})
    before = snapshot(hub)
    response = await ds.client.post("/hub/-/sync/import", content=(tmp_path / "gap.bundle").read_bytes(), actor=ROOT)
    assert response.status_code == 400
    assert response.json()["reason"] == "missing_operations"
    assert snapshot(hub) == before


async def test_concurrent_pushes_all_land(ds, devices, tmp_path):
    hub, phones = devices
    extra = []
    for number in (3, 4, 5):
        phone = new_device(tmp_path / f"phone{number}.db", [{"id": number * 10, "title": f"phone {number}"}])
        export_bundle(phone, tmp_path / f"phone{number}.bundle")
        extra.append(phone)
    bodies = [(tmp_path / f"phone{n}.bundle").read_bytes() for n in (1, 2, 3, 4, 5)]
    responses = await asyncio.gather(
        *(ds.client.post("/hub/-/sync/import", content=body, actor=ROOT) for body in bodies)
    )
    assert [r.status_code for r in responses] == [200] * 5
    assert hub["todos"].count == 3 + 3 + 1 + 1 + 1
    clock = sync_status(hub)["clock"]
    for phone in phones + extra:
        device = sync_status(phone)["device_id"]
        assert clock[device] == sync_status(phone)["clock"][device]


def conflicted(tmp_path):
    """``data.db`` holding one conflict: the title of todo 1, oat milk here, soy milk on a phone."""
    data = new_device(tmp_path / "data.db", [{"id": 1, "title": "Buy milk"}])
    export_bundle(data, tmp_path / "first.bundle")
    phone = new_device(tmp_path / "phone.db")
    import_bundle(phone, tmp_path / "first.bundle")
    data["todos"].update(1, {"title": "Buy oat milk"})
    phone["todos"].update(1, {"title": "Buy soy milk"})
    export_bundle(phone, tmp_path / "phone.bundle", since=sync_status(data)["clock"])
    import_bundle(data, tmp_path / "phone.bundle")
    [conflict] = list_conflicts(data)
    return data, conflict


async def test_resolve_endpoint(tmp_path):
    data, conflict = conflicted(tmp_path)
    url = f"/data/-/sync/conflicts/{conflict['id']}/resolve"
    ds = Datasette([str(tmp_path / "data.db")])
    ds.root_enabled = True

    unknown = await ds.client.post("/data/-/sync/conflicts/0123abcd/resolve", json={}, actor=ROOT)
    assert unknown.status_code == 404 and unknown.json()["reason"] == "unknown_conflict"
    wrong = await ds.client.post(url, json={"keep": "abc:1"}, actor=ROOT)
    assert wrong.status_code == 400 and wrong.json()["reason"] == "unknown_version"
    assert (await ds.client.get(url, actor=ROOT)).status_code == 405

    keep = next(v for v in conflict["versions"] if v["values"]["title"] == "Buy soy milk")["op"]
    response = await ds.client.post(url, json={"keep": keep}, actor=ROOT)
    assert response.status_code == 200
    body = response.json()
    assert body["ok"] is True and body["conflict"]["resolved"] is True
    assert body["conflict"]["resolved_by"] == body["op"]
    assert data["todos"].get(1)["title"] == "Buy soy milk"

    again = await ds.client.post(url, json={"keep": keep}, actor=ROOT)
    assert again.status_code == 409 and again.json()["reason"] == "already_resolved"

    # A form post with an error comes back to the conflicts page with the message.
    form = await ds.client.post(url, data={"keep": keep}, actor=ROOT)
    assert form.status_code == 302
    page = await ds.client.get("/data/-/sync/conflicts?all=1", actor=ROOT, cookies=form.cookies)
    assert "already resolved" in page.text

    immutable = Datasette(immutables=[str(tmp_path / "data.db")])
    immutable.root_enabled = True
    refused = await immutable.client.post(url, json={}, actor=ROOT)
    assert refused.status_code == 403 and refused.json()["reason"] == "read_only"


async def test_resolving_a_conflict_of_a_dropped_table_is_refused_with_table_missing(tmp_path):
    data, conflict = conflicted(tmp_path)
    data["todos"].drop()  # through Datasette's /-/drop, or any other program
    before = data.execute("SELECT count(*) FROM _sync_ops").fetchone()
    ds = Datasette([str(tmp_path / "data.db")])
    ds.root_enabled = True
    url = f"/data/-/sync/conflicts/{conflict['id']}/resolve"
    for body in ({}, {"keep": conflict["versions"][0]["op"]}):
        response = await ds.client.post(url, json=body, actor=ROOT)
        assert response.status_code == 400
        assert response.json()["reason"] == "table_missing"
        assert response.json()["error"] == (
            f"Table 'todos' no longer exists here: conflict {conflict['id']} cannot be resolved until it is created again"
        )
    assert data.execute("SELECT count(*) FROM _sync_ops").fetchone() == before
    assert not list_conflicts(data, include_resolved=False)[0]["resolved"]
    page = (await ds.client.get("/data/-/sync/conflicts", actor=ROOT)).text
    assert "Table todos is not in this database" in page and 'class="core sync-resolve"' not in page


async def test_resolve_refuses_bodies_that_do_not_say_what_to_keep(tmp_path):
    data, conflict = conflicted(tmp_path)
    url = f"/data/-/sync/conflicts/{conflict['id']}/resolve"
    ds = Datasette([str(tmp_path / "data.db")])
    ds.root_enabled = True
    before = snapshot(data)
    refused = {
        "[1]": "must be a JSON object",
        '"str"': "must be a JSON object",
        "null": "must be a JSON object",
        '{"kepp": "x"}': 'Unknown key "kepp"',
        '{"keep": ""}': '"keep" must be an op id string like "<device id>:<seq>", got ""',
        '{"keep": 0}': "got 0",
        '{"keep": null}': "got null",
        '{"keep": ["a"]}': 'got ["a"]',
        "{nope": "not valid JSON",
    }
    for body, message in refused.items():
        response = await ds.client.post(url, content=body, headers={"Content-Type": "application/json"}, actor=ROOT)
        assert response.status_code == 400, body
        assert response.json()["ok"] is False and message in response.json()["error"], body
    # JSON sent as a form (curl -d without a Content-Type) has no keep field: refused too.
    curl = {"Accept": "application/json", "Content-Type": "application/x-www-form-urlencoded"}
    form = await ds.client.post(url, content='{"keep": "x"}', headers=curl, actor=ROOT)
    assert form.status_code == 400 and "no keep field" in form.json()["error"]
    assert snapshot(data) == before and not list_conflicts(data)[0]["resolved"]

    # An empty body accepts what is in the table now.
    response = await ds.client.post(url, content=b"", headers={"Content-Type": "application/json"}, actor=ROOT)
    assert response.status_code == 200 and response.json()["conflict"]["resolved"] is True
    assert list(data["todos"].rows) == before["todos"]


async def test_locked_database_answers_503(devices, tmp_path, own_tempdir):
    """Another connection holding the database locked is temporary: 503 and Retry-After, not a 500."""
    hub = devices[0]
    ds = Datasette([str(tmp_path / "hub.db")], settings={"num_sql_threads": 1})
    ds.root_enabled = True
    await ds.invoke_startup()  # it reads every schema, which the lock would stop
    db = ds.get_database("hub")
    # Give up on the lock after 50 ms rather than Python's default 5 s, to keep the test fast.
    await db.execute_fn(lambda conn: conn.execute("PRAGMA busy_timeout = 50"))
    await db.execute_write_fn(lambda conn: conn.execute("PRAGMA busy_timeout = 50"), transaction=False)
    bundle = (tmp_path / "phone1.bundle").read_bytes()
    before = snapshot(hub)
    locker = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        export = await ds.client.get("/hub/-/sync/export", actor=ROOT)
        push = await ds.client.post("/hub/-/sync/import", content=bundle, actor=ROOT)
    finally:
        locker.close()
    for response in (export, push):
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"
        body = response.json()
        assert body["reason"] == "busy"
        assert body["error"] == "Database hub is busy: another connection holds a lock on it. Retry in a few seconds"
    assert snapshot(hub) == before
    assert leftovers(own_tempdir) == []
    assert (await ds.client.post("/hub/-/sync/import", content=bundle, actor=ROOT)).json()["applied"] == 3


# Bad input never a 500; names, cookies and HEAD as Datasette's own pages take them ---------


def malformed_chunk_bundle(source, target, craft):
    """``source`` with its first chunk image's ops page broken, resealed with a valid hash:
    what any sender can make."""

    target.write_bytes(source.read_bytes())

    def tamper(conn):
        chunk_id, stored = conn.execute("SELECT id, data FROM bundle_chunks ORDER BY id").fetchone()
        data = craft.image(stored)
        page_size = int.from_bytes(data[16:18], "big") or 65536
        assert len(data) >= 2 * page_size
        broken = bytearray(data)
        broken[page_size : page_size + 8] = b"\xff" * 8  # page 2 (the ops table) is no b-tree page
        conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [craft.stored(bytes(broken), stored), chunk_id])
        craft.reseal(conn)

    craft.rewrite(target, tamper)
    return target


async def test_malformed_chunk_image_is_a_400(ds, devices, tmp_path, craft):
    hub = devices[0]
    path = malformed_chunk_bundle(tmp_path / "phone1.bundle", tmp_path / "malformed.bundle", craft)
    before = snapshot(hub)
    response = await ds.client.post("/hub/-/sync/import", content=path.read_bytes(), actor=ROOT)
    assert response.status_code == 400, response.text
    assert response.json()["ok"] is False
    assert response.json()["reason"] in ("invalid_bundle", "invalid_operation")
    assert "malformed" in response.json()["error"] or "cannot be read" in response.json()["error"]
    assert snapshot(hub) == before
    # The hub still takes a good bundle.
    response = await ds.client.post("/hub/-/sync/import", content=(tmp_path / "phone2.bundle").read_bytes(), actor=ROOT)
    assert response.status_code == 200


DEEP = "[" * 15_000


async def test_deeply_nested_arguments_and_bodies_are_400s(ds, devices, tmp_path):
    hub = devices[0]
    import_bundle(hub, tmp_path / "phone1.bundle")
    before = snapshot(hub)
    response = await ds.client.get("/hub/-/sync/export", params={"since": DEEP}, actor=ROOT)
    assert response.status_code == 400 and response.json()["reason"] == "invalid_clock", response.text
    response = await ds.client.get("/hub/-/sync/export", params={"since": '{"a":' * 3000}, actor=ROOT)
    assert response.status_code == 400 and response.json()["reason"] == "invalid_clock", response.text
    for pk in (DEEP, "9" * 5000, "9" * 5000 + ",1", "1e999999"):
        for page in ("/hub/-/sync/operations", "/hub/-/sync/operations.json"):
            response = await ds.client.get(page, params={"table": "todos", "pk": pk}, actor=ROOT)
            assert response.status_code in (200, 400), (page, pk[:20], response.status_code)
            if page.endswith(".json") and response.status_code == 200:
                assert response.json()["operations"] == []
    assert snapshot(hub) == before


async def test_resolve_with_hostile_bodies_is_a_4xx(conflicted_db):
    path = conflicted_db
    ds = Datasette([str(path)])
    ds.root_enabled = True
    await ds.invoke_startup()
    db = sqlite_utils.Database(path)
    [conflict] = list_conflicts(db)
    before = path.read_bytes()
    url = f"/data/-/sync/conflicts/{conflict['id']}/resolve"
    bodies = [
        ("application/json", DEEP.encode()),
        ("application/json", ('{"keep":' * 15_000).encode()),
        ("application/json", b'{"keep": "\xff\xfe"}'),
        ("application/json", b"\xff\xfe\x00{"),
        ("application/json", b'{"keep": "\\ud800"}'),
        ("application/json", b'{"keep": ' + b"9" * 5000 + b"}"),
        ("application/x-www-form-urlencoded", b"keep=\xff\xfe"),
        ("application/x-www-form-urlencoded", b"keep=" + b"%5B" * 15_000),
    ]
    for content_type, body in bodies:
        response = await ds.client.post(
            url, content=body, headers={"content-type": content_type, "accept": "application/json"}, actor=ROOT
        )
        assert 400 <= response.status_code < 500, (body[:30], response.status_code, response.text[:200])
        assert response.json()["ok"] is False
    assert path.read_bytes() == before


def test_export_with_messages_cookie_head_and_percent_encoded_name(tmp_path, datasette_server, conflicted_db):
    """On a real ``datasette serve``: a database named ``data base``, written ``data%20base``
    as clients do; the ``ds_messages`` cookie the resolve form sets; ``HEAD`` on export."""
    import httpx

    path = conflicted_db
    spaced = path.with_name("data base.db")
    path.rename(spaced)
    grants = {action: {"id": "alice"} for action in ("sync-export", "sync-import", "sync-resolve")}
    server = datasette_server([spaced], {"databases": {"data base": {"permissions": grants}}})
    bearer = {"Authorization": f"Bearer {server.token('alice')}"}
    [conflict] = list_conflicts(sqlite_utils.Database(spaced))
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for base in ("/data%20base", "/data~20base"):
            assert client.get(f"{base}/-/sync.json").json()["enabled"] is True, base
            response = client.get(f"{base}/-/sync/export", headers=bearer)
            assert response.status_code == 200, (base, response.text)
            assert response.content[:16] == b"SQLite format 3\x00"
        # The conflicts page's form (keep= accepts the table) answers with a redirect that
        # sets ds_messages; the browser sends it back on its next request.
        response = client.post(
            f"/data%20base/-/sync/conflicts/{conflict['id']}/resolve",
            content=b"keep=",
            headers={**bearer, "content-type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 302, response.text
        assert "ds_messages" in client.cookies
        get = client.get("/data%20base/-/sync/export", headers=bearer)
        assert get.status_code == 200, get.text
        assert get.content[:16] == b"SQLite format 3\x00"
        head = client.head("/data%20base/-/sync/export", headers=bearer)
        assert head.status_code == 200, head.text
        assert head.content == b""
        assert int(head.headers["content-length"]) > 0
        assert head.headers["x-sync-clock"] == get.headers["x-sync-clock"]
        assert head.headers["x-sync-operations"] == get.headers["x-sync-operations"]
        assert head.headers["content-type"] == "application/vnd.sqlite3"
        missing = client.get("/no%20such/-/sync/export", headers=bearer)
        assert missing.status_code == 404 and missing.json()["reason"] == "not_found"
    assert "Traceback" not in server.output()


async def test_a_table_whose_capture_cannot_be_repaired_does_not_stop_pulls_or_writes(tmp_path):
    # Another process changed a synced table's primary key while the hub runs: the hub's repair
    # before an export (and after a schema-changing write) cannot take that table, and leaves
    # it as sync-status shows it; pulls and Datasette's writes go on as before.
    path = tmp_path / "hub.db"
    db = sqlite_utils.Database(path)
    db["t"].insert({"id": 1, "v": "a"}, pk="id")
    db["other"].insert({"id": 1, "v": "o"}, pk="id")
    enable_sync(db, ["t", "other"])
    grants = {"sync-export": True, "sync-view": True, "create-table": True, "insert-row": True}
    ds = Datasette([str(path)], config={"permissions": grants})
    await ds.invoke_startup()
    db["t"].transform(pk="v")
    for url in ("/hub/-/sync/export", "/hub/-/sync/export?table=other"):
        response = await ds.client.get(url)
        assert response.status_code == 200 and response.content.startswith(b"SQLite format 3\0")
    created = await ds.client.post("/hub/-/create", json={"table": "unrelated", "row": {"id": 1}, "pk": "id"})
    assert created.status_code == 201, created.text
    assert "no capture triggers" in " ".join(sync_status(db)["warnings"])
