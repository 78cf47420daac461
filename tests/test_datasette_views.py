"""The sync pages of the Datasette plugin and their .json twins."""

import hashlib
import json
import re

import pytest
import sqlite_utils
from datasette.app import Datasette

from sqlite_utils_sync import (
    compact_log,
    enable_sync,
    export_bundle,
    import_bundle,
    list_conflicts,
    resolve_conflict,
    sync_status,
)


def make_databases(tmp_path):
    """Two copies that edit the same rows concurrently, then ``data`` imports ``phone``'s
    edits: three conflicts (a title, a done flag, and an update against a delete)."""
    data = sqlite_utils.Database(tmp_path / "data.db")
    data["todos"].insert_all(
        [
            {"id": 1, "title": "Buy milk", "done": 0, "photo": b"\x00\x01\x02"},
            {"id": 2, "title": "Walk dog", "done": 0, "photo": None},
            {"id": 3, "title": "Call mum", "done": 0, "photo": None},
        ],
        pk="id",
    )
    data["notes"].insert({"id": 1, "body": "not synced"}, pk="id")
    enable_sync(data, ["todos"])
    export_bundle(data, tmp_path / "first.bundle")
    phone = sqlite_utils.Database(tmp_path / "phone.db")
    phone["todos"].create({"id": int, "title": str, "done": int, "photo": bytes}, pk="id")
    enable_sync(phone, ["todos"])
    import_bundle(phone, tmp_path / "first.bundle")
    data["todos"].update(1, {"title": "Buy oat milk"})
    data["todos"].update(2, {"done": 1})
    data["todos"].delete(3)
    phone["todos"].update(1, {"title": "Buy soy milk"})
    phone["todos"].update(2, {"done": 2})
    phone["todos"].update(3, {"title": "Call mum tonight"})
    phone["todos"].insert({"id": 4, "title": "", "done": None, "photo": None})
    export_bundle(phone, tmp_path / "phone.bundle", since=sync_status(data)["clock"])
    import_bundle(data, tmp_path / "phone.bundle", actor="alice")
    return tmp_path / "data.db", tmp_path / "phone.db"


@pytest.fixture
def paths(tmp_path):
    return make_databases(tmp_path)


@pytest.fixture
async def ds(paths):
    datasette = Datasette([str(paths[0])])
    await datasette.invoke_startup()
    return datasette


def visible_text(html):
    """The page as a reader sees it: tags and repeated whitespace removed."""
    html = re.sub(r"<(style|script)\b.*?</\1>", "", html, flags=re.DOTALL)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace("&lt;", "<").replace("&gt;", ">")


def file_digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_overview_page(ds, paths):
    status = sync_status(sqlite_utils.Database(paths[0]))
    response = await ds.client.get("/data/-/sync")
    assert response.status_code == 200
    text = visible_text(response.text)
    assert status["device_id"] in text
    assert "Unresolved conflicts 3" in text
    assert "todos" in text and f"{status['tables']['todos']['operations']}" in text
    assert "Activity" in text and "this database" in text
    # The phone is a known peer, with its acknowledged clock.
    phone_id = sync_status(sqlite_utils.Database(paths[1]))["device_id"]
    assert "Peers" in text and phone_id in text
    assert "Latest operations" in text


async def test_overview_says_when_the_log_was_compacted(tmp_path):
    data = sqlite_utils.Database(tmp_path / "data.db")
    data["todos"].insert({"id": 1, "title": "draft"}, pk="id")
    enable_sync(data, ["todos"])
    ds = Datasette([str(tmp_path / "data.db")])
    assert "Compacted" not in visible_text((await ds.client.get("/data/-/sync")).text)
    data["todos"].update(1, {"title": "second draft"})
    data["todos"].update(1, {"title": "final"})
    assert compact_log(data).removed == 1  # the middle draft: the insert still wrote "id" last
    text = visible_text((await ds.client.get("/data/-/sync")).text)
    device = sync_status(data)["device_id"]
    assert "Compacted history no copy needs any more was removed by sync-compact" in text
    assert f"up to seq 2 of {device[:8]}" in text
    # The JSON twin keeps the keys of sync-status.
    assert (await ds.client.get("/data/-/sync.json")).json().keys() == sync_status(data).keys()


async def test_overview_json_matches_sync_status(ds, paths):
    response = await ds.client.get("/data/-/sync.json")
    assert response.status_code == 200
    assert response.json() == json.loads(json.dumps(sync_status(sqlite_utils.Database(paths[0]))))


async def test_pages_on_database_without_sync(tmp_path):
    plain = sqlite_utils.Database(tmp_path / "plain.db")
    plain["t"].insert({"id": 1}, pk="id")
    before = file_digest(tmp_path / "plain.db")
    ds = Datasette([str(tmp_path / "plain.db")])
    response = await ds.client.get("/plain/-/sync.json")
    assert response.status_code == 200
    assert response.json()["enabled"] is False
    assert response.json().keys() == sync_status(plain).keys()
    response = await ds.client.get("/plain/-/sync")
    assert response.status_code == 200
    assert "Sync is not enabled on this database" in visible_text(response.text)
    for page in ("operations", "conflicts", "clocks", "imports"):
        for suffix in ("", ".json"):
            assert (await ds.client.get(f"/plain/-/sync/{page}{suffix}")).status_code == 200
    assert (await ds.client.get("/plain/-/sync/conflicts.json")).json() == {"conflicts": [], "next": None}
    # No links into sync pages from a database or table that does not sync.
    assert "Sync status" not in (await ds.client.get("/plain")).text
    assert "This table is synced" not in (await ds.client.get("/plain/t")).text
    assert file_digest(tmp_path / "plain.db") == before


async def test_immutable_database_pages_only_read(paths):
    before = file_digest(paths[0])
    ds = Datasette(immutables=[str(paths[0])])
    for page in ("", "/operations", "/conflicts", "/clocks", "/imports"):
        for suffix in ("", ".json"):
            response = await ds.client.get(f"/data/-/sync{page}{suffix}")
            assert response.status_code == 200, page + suffix
    assert (await ds.client.get("/data/-/sync.json")).json()["unresolved_conflicts"] == 3
    assert (await ds.client.get("/data/todos/1")).status_code == 200
    assert file_digest(paths[0]) == before


async def test_operations_newest_first_and_paginated(ds, paths):
    status = sync_status(sqlite_utils.Database(paths[0]))
    seen, url = [], "/data/-/sync/operations.json?_size=4"
    while url:
        data = (await ds.client.get(url)).json()
        assert set(data) == {"operations", "next"}
        assert len(data["operations"]) <= 4
        seen += data["operations"]
        url = f"/data/-/sync/operations.json?_size=4&next={data['next']}" if data["next"] else None
    labels = [op["op"] for op in seen]
    assert len(labels) == len(set(labels)) == status["operations"]
    clocks = [op["hlc"] for op in seen]
    assert clocks == sorted(clocks, reverse=True)
    assert {op["device_id"] for op in seen} == set(status["clock"])


async def test_operations_filters(ds, paths):
    phone_id = sync_status(sqlite_utils.Database(paths[1]))["device_id"]
    by_device = (await ds.client.get(f"/data/-/sync/operations.json?device={phone_id}")).json()["operations"]
    assert by_device and {op["device_id"] for op in by_device} == {phone_id}

    updates = (await ds.client.get("/data/-/sync/operations.json?type=update")).json()["operations"]
    assert updates and {op["type"] for op in updates} == {"update"}

    deletes = (await ds.client.get("/data/-/sync/operations.json?type=delete&table=todos")).json()["operations"]
    assert [(op["table"], op["pk"]) for op in deletes] == [("todos", [3])]

    # Row history: the JSON form the row link uses, and a plain typed value.
    for pk in ("[1]", "1"):
        row_ops = (await ds.client.get(f"/data/-/sync/operations.json?table=todos&pk={pk}")).json()["operations"]
        assert [op["type"] for op in row_ops] == ["update", "update", "insert"]
        assert {op["values"]["title"] for op in row_ops} == {"Buy milk", "Buy oat milk", "Buy soy milk"}

    assert (await ds.client.get("/data/-/sync/operations.json?table=nope")).json()["operations"] == []
    assert (await ds.client.get("/data/-/sync/operations.json?table=todos&pk=[[1]]")).json()["operations"] == []
    assert (await ds.client.get("/data/-/sync/operations.json?type=bogus")).status_code == 400
    assert (await ds.client.get("/data/-/sync/operations.json?next=garbage")).status_code == 400


async def test_arguments_that_cannot_mean_anything_are_400(ds):
    refused = {
        '/operations?table=todos&pk=[{"$base64":true,"encoded":5}]': 'must be base64 text, got 5',
        '/operations?table=todos&pk=[{"$base64":true,"encoded":null}]': "must be base64 text, got null",
        '/operations?table=todos&pk=[{"$base64":true,"encoded":"A"}]': 'must be base64 text, got "A"',
        '/operations?table=todos&pk=[{"$base64":true,"encoded":"é"}]': 'must be base64 text, got "\\u00e9"',
        '/operations?table=todos&pk=["\\ud800"]': "lone surrogate",
        "/operations?next=99999999999999999999999999,1": "Invalid next token: '99999999999999999999999999,1'",
        "/conflicts?next=abc": "Invalid next token: 'abc' is not a conflict id",
        "/imports?next=abc": "Invalid next token: 'abc' is not a bundle id",
    }
    for path, message in refused.items():
        page, query = path.split("?")
        for suffix in (".json", ""):
            response = await ds.client.get(f"/data/-/sync{page}{suffix}?{query}")
            assert response.status_code == 400, path + suffix
            text = response.json()["error"] if suffix else visible_text(response.text).replace("&#34;", '"')
            assert message in text.replace("&#39;", "'"), path + suffix


async def test_operations_page_shows_readable_values(ds):
    response = await ds.client.get("/data/-/sync/operations?table=todos&type=insert")
    assert response.status_code == 200
    text = visible_text(response.text)
    # BLOBs as size and hex; NULL and the empty string told apart.
    assert "<BLOB 3 bytes> 00 01 02" in text
    assert 'title "" done NULL' in text
    json_ops = (await ds.client.get("/data/-/sync/operations.json?table=todos&type=insert")).json()["operations"]
    inserted = {op["pk"][0]: op["values"] for op in json_ops}
    assert inserted[1]["photo"] == {"$base64": True, "encoded": "AAEC"}
    assert inserted[4]["title"] == "" and inserted[4]["done"] is None


async def test_conflicts_json_matches_list_conflicts(ds, paths):
    response = await ds.client.get("/data/-/sync/conflicts.json")
    assert response.status_code == 200
    data = response.json()
    assert data == {"conflicts": list_conflicts(sqlite_utils.Database(paths[0])), "next": None}
    assert len(data["conflicts"]) == 3

    first = (await ds.client.get("/data/-/sync/conflicts.json?_size=2")).json()
    assert len(first["conflicts"]) == 2 and first["next"]
    rest = (await ds.client.get(f"/data/-/sync/conflicts.json?_size=2&next={first['next']}")).json()
    assert [c["id"] for c in first["conflicts"] + rest["conflicts"]] == [c["id"] for c in data["conflicts"]]
    assert rest["next"] is None

    only_todos = (await ds.client.get("/data/-/sync/conflicts.json?table=todos")).json()["conflicts"]
    assert len(only_todos) == 3
    assert (await ds.client.get("/data/-/sync/conflicts.json?table=notes")).json()["conflicts"] == []


async def test_conflicts_page_shows_versions_side_by_side(ds, paths):
    response = await ds.client.get("/data/-/sync/conflicts")
    assert response.status_code == 200
    text = visible_text(response.text)
    assert "disagreement on title" in text
    assert "disagreement on done" in text
    assert "an edit against a delete" in text
    assert "Buy oat milk" in text and "Buy soy milk" in text
    assert "title differs" in text
    # Every conflict says which version the table holds now.
    assert text.count("in the table now") == 3
    conflicts = list_conflicts(sqlite_utils.Database(paths[0]))
    for conflict in conflicts:
        assert conflict["id"] in text
    # Anonymous visitors cannot resolve: no form.
    assert "Keep " not in text and "/resolve" not in response.text


async def test_conflicts_page_shortens_long_values(ds, paths):
    db = sqlite_utils.Database(paths[0])
    long_title = "word " * 4000
    db["todos"].update(1, {"title": long_title})  # now the table holds 20,000 characters
    text = visible_text((await ds.client.get("/data/-/sync/conflicts")).text)
    assert long_title not in text
    assert long_title[:200] + "… (20,000 characters)" in text
    conflicts = (await ds.client.get("/data/-/sync/conflicts.json")).json()["conflicts"]
    assert {c["current"]["title"] for c in conflicts if c["pk"] == [1]} == {long_title}


async def test_resolved_conflicts_need_all(ds, paths):
    db = sqlite_utils.Database(paths[0])
    conflict = list_conflicts(db)[0]
    resolve_conflict(db, conflict["id"], keep=conflict["versions"][0]["op"])
    unresolved = (await ds.client.get("/data/-/sync/conflicts.json")).json()["conflicts"]
    assert conflict["id"] not in [c["id"] for c in unresolved] and len(unresolved) == 2
    everything = (await ds.client.get("/data/-/sync/conflicts.json?all=1")).json()["conflicts"]
    resolved = [c for c in everything if c["id"] == conflict["id"]]
    assert resolved and resolved[0]["resolved"] is True
    text = visible_text((await ds.client.get("/data/-/sync/conflicts?all=1")).text)
    assert "resolved by" in text and "Show only unresolved" in text


async def test_clocks_page(ds, paths):
    status = sync_status(sqlite_utils.Database(paths[0]))
    data = (await ds.client.get("/data/-/sync/clocks.json")).json()
    assert {d["device_id"]: d["seq"] for d in data["devices"]} == status["clock"]
    assert [d["local"] for d in data["devices"]] == [True, False]
    phone_id = sync_status(sqlite_utils.Database(paths[1]))["device_id"]
    assert [p["device_id"] for p in data["peers"]] == [phone_id]
    text = visible_text((await ds.client.get("/data/-/sync/clocks")).text)
    for device in status["clock"]:
        assert f"{device} " in text
    assert "What each peer has acknowledged" in text


async def test_imports_page(ds):
    # Who pushed is shown to those who may export (here root); it tells who owns which device.
    ds.root_enabled = True
    root = {"id": "root"}
    data = (await ds.client.get("/data/-/sync/imports.json", actor=root)).json()
    assert data["next"] is None
    [entry] = data["imports"]
    assert entry["actor"] == "alice"
    assert entry["applied"] == entry["total_operations"] > 0
    assert entry["conflicts"] == 3
    text = visible_text((await ds.client.get("/data/-/sync/imports", actor=root)).text)
    assert entry["bundle_id"] in text and "alice" in text
    [hidden] = (await ds.client.get("/data/-/sync/imports.json")).json()["imports"]
    assert hidden["actor"] == "(hidden)" and hidden["bundle_id"] == entry["bundle_id"]
    assert "alice" not in visible_text((await ds.client.get("/data/-/sync/imports")).text)


async def test_links_into_sync_pages(ds):
    database_page = (await ds.client.get("/data")).text
    assert 'href="/data/-/sync"' in database_page and "Sync status" in database_page

    table_page = await ds.client.get("/data/todos")
    assert "This table is synced" in visible_text(table_page.text)
    assert 'href="/data/-/sync/operations?table=todos"' in table_page.text

    row_page = await ds.client.get("/data/todos/1")
    assert "Sync history" in row_page.text
    link = re.search(r'href="(/data/-/sync/operations\?[^"]+)"[^>]*>\s*Sync history', row_page.text).group(1)
    history = await ds.client.get(link.replace("&amp;", "&").replace("/operations?", "/operations.json?"))
    assert {tuple(op["pk"]) for op in history.json()["operations"]} == {(1,)}

    # A table that is not synced gets no note and no links.
    notes_page = await ds.client.get("/data/notes")
    assert "This table is synced" not in notes_page.text and "Sync operations" not in notes_page.text
    assert "Sync history" not in (await ds.client.get("/data/notes/1")).text


async def test_rows_of_tables_the_actor_cannot_view_stay_hidden(paths):
    db = sqlite_utils.Database(paths[0])
    enable_sync(db, ["notes"])
    config = {"databases": {"data": {"tables": {"notes": {"allow": {"id": "admin"}}}}}}
    ds = Datasette([str(paths[0])], config=config)
    for actor, visible in ((None, False), ({"id": "admin"}, True)):
        status = (await ds.client.get("/data/-/sync.json", actor=actor)).json()
        assert ("notes" in status["tables"]) is visible
        ops = (await ds.client.get("/data/-/sync/operations.json?_size=100", actor=actor)).json()["operations"]
        assert ("notes" in {op["table"] for op in ops}) is visible
        only_notes = (await ds.client.get("/data/-/sync/operations.json?table=notes", actor=actor)).json()
        assert bool(only_notes["operations"]) is visible
        assert ("not synced" in (await ds.client.get("/data/-/sync", actor=actor)).text) is visible


async def test_pages_only_answer_get(ds):
    assert (await ds.client.post("/data/-/sync/operations", content=b"")).status_code == 405


async def test_unknown_database_is_404(ds):
    assert (await ds.client.get("/nope/-/sync")).status_code == 404
    assert (await ds.client.get("/nope/-/sync/conflicts.json")).status_code == 404
