"""The sync pages of the Datasette plugin and their .json twins."""

import hashlib
import html
import json
import re
import sqlite3

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
    # The JSON twin keeps the keys of sync-status, and says what the visitor syncs.
    assert (await ds.client.get("/data/-/sync.json")).json().keys() == sync_status(data).keys() | {"access", "watching"}


async def test_overview_json_matches_sync_status(ds, paths):
    response = await ds.client.get("/data/-/sync.json")
    assert response.status_code == 200
    status = json.loads(json.dumps(sync_status(sqlite_utils.Database(paths[0]))))
    # An anonymous visitor may not export or import: they sync no table with this hub.
    assert response.json() == {**status, "access": {"pull": [], "push": {}}, "watching": []}


async def test_pages_on_database_without_sync(tmp_path):
    plain = sqlite_utils.Database(tmp_path / "plain.db")
    plain["t"].insert({"id": 1}, pk="id")
    before = file_digest(tmp_path / "plain.db")
    ds = Datasette([str(tmp_path / "plain.db")])
    response = await ds.client.get("/plain/-/sync.json")
    assert response.status_code == 200
    assert response.json()["enabled"] is False
    assert response.json().keys() == sync_status(plain).keys() | {"access", "watching"}
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
        overview = (await ds.client.get("/data/-/sync", actor=actor)).text
        assert ("not synced" in overview) is visible
        # The chart does not count their edits, nor the database page's panel list them.
        data_row = chart_rows(overview)[1][0]
        assert data_row[1] == (7 if visible else 6), data_row
        panel = visible_text((await ds.client.get("/data", actor=actor)).text)
        assert ("2 tables ( notes , todos )" in panel) is visible and ("1 table ( todos )" in panel) is not visible


async def test_pages_only_answer_get(ds):
    assert (await ds.client.post("/data/-/sync/operations", content=b"")).status_code == 405


async def test_unknown_database_is_404(ds):
    assert (await ds.client.get("/nope/-/sync")).status_code == 404
    assert (await ds.client.get("/nope/-/sync/conflicts.json")).status_code == 404


def chart_rows(html):
    """The activity chart as a reader sees it: per device row, its heading and the counts and
    conflict marks printed on its bars; and the time axis labels."""
    chart = html[html.index('class="sync-activity"') : html.index("</figure>")]
    rows = []
    for heading, bars in re.findall(
        r'<div class="sync-activity-device">(.*?)</div>\s*<ol class="sync-activity-bars"[^>]*>(.*?)</ol>', chart, re.S
    ):
        counts = [int(n) for n in re.findall(r'<span class="sync-bar-count">(\d+)</span>', bars)]
        marks = [int(n) for n in re.findall(r'<span class="sync-bar-mark">&#9888;(\d+)</span>', bars)]
        rows.append((visible_text(heading).strip(), sum(counts), sum(marks)))
    labels = re.findall(r'<span class="sync-tick[^"]*"[^>]*>(.*?)</span>', chart)
    axis = [visible_text(label).strip() for label in labels]
    return visible_text(chart), rows, axis


async def test_activity_chart_names_devices_prints_counts_and_marks_conflicts(ds, paths):
    data_id = sync_status(sqlite_utils.Database(paths[0]))["device_id"]
    phone_id = sync_status(sqlite_utils.Database(paths[1]))["device_id"]
    html = (await ds.client.get("/data/-/sync")).text
    text, rows, axis = chart_rows(html)
    # data: 3 inserts, 2 updates, 1 delete; phone: 3 updates, 1 insert. Each of the three
    # conflicts has one version from each device.
    assert rows == [
        (f"{data_id[:8]} this database 6 edits, 3 in conflict", 6, 3),
        (f"{phone_id[:8]} 4 edits, 3 in conflict", 4, 3),
    ]
    assert "10 edits by 2 devices, from " in text and "; 6 of them in unresolved conflicts." in text
    # A time axis that reads: round, distinct labels in order, start before end.
    assert len(axis) >= 2 and len(set(axis)) == len(axis) and axis == sorted(axis)
    assert all(re.fullmatch(r"\d\d:\d\d:\d\d", label) for label in axis), axis
    # Nothing left out silently: the ticks the chart does not count are said.
    ticks = (await ds.client.get("/data/-/sync/operations.json?type=tick")).json()["operations"]
    legend = visible_text(html[html.index("sync-activity-legend") :])
    assert f"Not counted: {len(ticks)} sync tick" in legend
    assert "Marked : edits that are versions of an unresolved conflict" in legend


def activity(first, last, devices=1, conflicts=None):
    """Chart data as chart.read returns it, for edits at ``first`` and ``last`` (ms) per device."""
    from datasette_sync import chart

    origin, step, slices = chart.choose_slices(first, last)
    rows = []
    for index in range(devices):
        counts = {}
        for moment in (first, last):
            counts[(moment - origin) // step] = counts.get((moment - origin) // step, 0) + 1 + index
        rows.append({"device_id": f"{index:032x}", "local": index == 0, "counts": counts, "conflicts": conflicts or {}})
    return {"first": first, "last": last, "origin": origin, "step": step, "slices": slices, "rows": rows, "ticks": 0}


def test_activity_axis_labels_stay_distinct_over_any_span():
    from datasette_sync import chart

    dec_4 = 1796342400000  # 2026-12-04 00:00 UTC
    spans = {
        "within a second": (dec_4 + 36_000_100, dec_4 + 36_000_900, r"\d\d:\d\d:\d\d"),
        "ten minutes": (dec_4 + 36_000_000, dec_4 + 36_600_000, r"\d\d:\d\d"),
        "three days": (dec_4 + 36_000_000, dec_4 + 3 * 86_400_000, r"Dec \d+( \d\d:\d\d)?"),
        "two months": (dec_4, dec_4 + 60 * 86_400_000, r"(Dec|Jan|Feb) \d+"),
        "ten years": (dec_4, dec_4 + 3650 * 86_400_000, r"\d{4}"),
    }
    for name, (first, last, pattern) in spans.items():
        built = chart.build(activity(first, last), label=str)
        labels = [tick["text"] for tick in built["axis"]]
        assert len(labels) >= 2 and len(set(labels)) == len(labels), (name, labels)
        assert all(re.fullmatch(pattern, label) for label in labels), (name, labels)
        assert built["axis"][0]["position"] == 0 and built["axis"][-1]["position"] == 1, name
        assert 1 <= built["slices"] <= chart.MAX_SLICES
        # Every edit is on a bar.
        assert sum(bar["count"] for bar in built["rows"][0]["bars"]) == 2, name
        # On a phone at most five labels remain, the first and last among them.
        phone = [tick for tick in built["axis"] if tick["phone"]]
        assert len(phone) <= 5 and phone[0] == built["axis"][0] and phone[-1] == built["axis"][-1], name


def test_activity_chart_caps_devices_and_says_how_many_more():
    from datasette_sync import chart

    built = chart.build(activity(0, 5000, devices=11), label=lambda device: "dev-" + device[-2:])
    assert len(built["rows"]) == chart.MAX_DEVICES
    assert built["rows"][0]["label"] == "dev-00"  # this database first, then the busiest
    assert [row["label"] for row in built["rows"][1:3]] == ["dev-0a", "dev-09"]
    assert built["more_devices"] == 3
    assert built["more_edits"] == sum(2 * (1 + index) for index in (1, 2, 3))  # the least busy three
    assert built["caption"].startswith(f"{sum(2 * (1 + i) for i in range(11))} edits by 11 devices")
    assert [chart.compact(n) for n in (999, 1234, 56_789, 999_499, 999_999)] == ["999", "1.2k", "57k", "999k", "1M"]


async def test_database_table_and_row_pages_show_sync_panels(ds, paths):
    phone_id = sync_status(sqlite_utils.Database(paths[1]))["device_id"]
    data_id = sync_status(sqlite_utils.Database(paths[0]))["device_id"]
    database = (await ds.client.get("/data")).text
    text = visible_text(database)
    operations = sync_status(sqlite_utils.Database(paths[0]))["operations"]
    assert f"Synced with other devices: 1 table ( todos ), {operations} operations from 2 devices." in text
    assert "3 unresolved conflicts : todos 3." in text
    assert 'href="/data/-/sync/conflicts"' in database

    table = (await ds.client.get("/data/todos")).text
    assert "This table is synced" in visible_text(table)
    assert "3 unresolved conflicts on rows of this table" in visible_text(table)
    assert 'href="/data/-/sync/conflicts?table=todos"' in table
    notes = (await ds.client.get("/data/notes")).text
    assert "sync-panel" not in notes

    row = (await ds.client.get("/data/todos/1")).text
    text = visible_text(row)
    conflict = next(c for c in list_conflicts(sqlite_utils.Database(paths[0])) if c["pk"] == [1])
    versions = " and ".join(v["device_id"][:8] for v in conflict["versions"])
    assert f"This row is in an unresolved conflict: title differs between {versions}. See and resolve it" in text
    assert f'href="/data/-/sync/conflicts?table=todos#conflict-{conflict["id"]}"' in row
    assert "Sync history" in text
    history = re.findall(r"UTC: (\w+) by (\w+)", text)
    assert history == [("update", phone_id[:8]), ("update", data_id[:8]), ("insert", data_id[:8])]
    assert "title = Buy soy milk" in text and "photo = <BLOB 3 bytes> 00 01 02" in text
    assert "/data/-/sync/operations?table=todos&amp;pk=%5B1%5D" in row

    quiet = visible_text((await ds.client.get("/data/todos/4")).text)
    assert "This row is synced. No unresolved conflict on it." in quiet
    assert re.findall(r"UTC: (\w+) by (\w+)", quiet) == [("insert", phone_id[:8])]


async def test_sync_panels_only_for_actors_who_may_see_sync_pages(paths):
    config = {"databases": {"data": {"permissions": {"sync-view": {"id": "admin"}}}}}
    ds = Datasette([str(paths[0])], config=config)
    for path in ("/data", "/data/todos", "/data/todos/1"):
        anonymous = await ds.client.get(path)
        assert anonymous.status_code == 200 and "sync-panel" not in anonymous.text, path
        assert "sync-panel" in (await ds.client.get(path, actor={"id": "admin"})).text, path


async def test_conflicts_page_says_what_resolving_needs(paths):
    grants = {"sync-resolve": {"id": "carol"}, "update-row": {"id": "carol"}}
    ds = Datasette([str(paths[0])], config={"databases": {"data": {"permissions": grants}}})
    hint = "Resolving needs the sync-resolve permission on database data."
    anonymous = visible_text((await ds.client.get("/data/-/sync/conflicts")).text).replace("&#39;", "'")
    assert f"{hint} You are not signed in" in anonymous
    alice = visible_text((await ds.client.get("/data/-/sync/conflicts", actor={"id": "alice"})).text)
    assert f"{hint} Actor 'alice' does not have it" in alice.replace("&#39;", "'")
    carol = (await ds.client.get("/data/-/sync/conflicts", actor={"id": "carol"})).text
    assert "Resolving needs" not in carol
    # The buttons are Datasette's: submit inputs in a form.core, one form per choice.
    assert carol.count('<form class="core sync-resolve"') == 3 * 3
    assert 'class="sync-secondary" value="Accept what is in the table now"' in carol
    immutable = Datasette(immutables=[str(paths[0])])
    text = visible_text((await immutable.client.get("/data/-/sync/conflicts")).text)
    assert "Database data is read-only here (immutable), so its conflicts cannot be resolved on this page" in text


async def test_resolving_from_a_filtered_page_comes_back_to_it(paths):
    grants = {"sync-resolve": {"id": "carol"}, "update-row": {"id": "carol"}, "insert-row": {"id": "carol"}}
    ds = Datasette([str(paths[0])], config={"databases": {"data": {"permissions": grants}}})
    page = (await ds.client.get("/data/-/sync/conflicts?table=todos&_size=2", actor={"id": "carol"})).text
    actions = re.findall(r'<form class="core sync-resolve" action="([^"]+)"', page)
    assert actions and all(a.endswith("/resolve?table=todos&amp;_size=2") for a in actions), actions
    response = await ds.client.post(
        html.unescape(actions[0]), content=b"keep=", actor={"id": "carol"},
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 302
    assert response.headers["location"] == "/data/-/sync/conflicts?table=todos&_size=2"
    # Only the page's own filters come back, and always to the conflicts page.
    crafted = await ds.client.post(
        html.unescape(actions[0]).split("?")[0] + "?table=todos&next=https%3A%2F%2Fevil.example&x=1", content=b"keep=",
        actor={"id": "carol"}, headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert crafted.status_code == 302
    assert crafted.headers["location"] == "/data/-/sync/conflicts?table=todos&next=https%3A%2F%2Fevil.example"


async def test_filters_use_datasette_form_styles(ds):
    html = (await ds.client.get("/data/-/sync/operations?type=update")).text
    form = html[html.index("<form") : html.index("</form>")]
    assert 'class="core filters sync-filters"' in form
    assert form.count('<span class="select-wrapper"><select') == 3
    assert '<input type="submit" value="Apply filters">' in form
    assert "<option selected>update</option>" in form and "Clear filters" in form


async def test_chart_and_row_panel_name_the_devices(tmp_path):
    from sqlite_utils_sync import set_device_name

    data = sqlite_utils.Database(tmp_path / "data.db")
    data["todos"].insert({"id": 1, "title": "Buy milk"}, pk="id")
    enable_sync(data, ["todos"])
    phone = sqlite_utils.Database(tmp_path / "phone.db")
    phone["todos"].create({"id": int, "title": str}, pk="id")
    enable_sync(phone, ["todos"])
    set_device_name(data, "laptop")
    set_device_name(phone, "phone")
    export_bundle(data, tmp_path / "first.bundle")
    import_bundle(phone, tmp_path / "first.bundle")
    data["todos"].update(1, {"title": "Buy oat milk"})
    phone["todos"].update(1, {"title": "Buy soy milk"})
    export_bundle(phone, tmp_path / "phone.bundle", since=sync_status(data)["clock"])
    import_bundle(data, tmp_path / "phone.bundle")
    laptop_id, phone_id = sync_status(data)["device_id"], sync_status(phone)["device_id"]
    ds = Datasette([str(tmp_path / "data.db")])
    _, rows, _ = chart_rows((await ds.client.get("/data/-/sync")).text)
    assert [row[0] for row in rows] == [
        f"laptop ({laptop_id[:8]}) this database 2 edits, 1 in conflict",
        f"phone ({phone_id[:8]}) 1 edit, 1 in conflict",
    ]
    row = visible_text((await ds.client.get("/data/todos/1")).text)
    assert f"between laptop ({laptop_id[:8]}) and phone ({phone_id[:8]})" in row or (
        f"between phone ({phone_id[:8]}) and laptop ({laptop_id[:8]})" in row
    )
    assert f"update by phone ({phone_id[:8]}): title = Buy soy milk" in row
    html = (await ds.client.get("/data/-/sync/conflicts?table=todos&all=1")).text
    form = html[html.index("<form") : html.index("</form>")]
    assert 'class="core filters sync-filters"' in form and "<option selected>todos</option>" in form
    assert '<input type="checkbox" name="all" value="1" checked>' in form
    assert '<input type="submit" value="Apply filters">' in form


async def test_conflicts_pages_show_a_dropped_table_as_missing(paths):
    conn = sqlite3.connect(paths[0])
    conn.execute("DROP TABLE todos")
    conn.close()
    ds = Datasette([str(paths[0])])
    data = await ds.client.get("/data/-/sync/conflicts.json")
    assert data.status_code == 200
    assert [(c["table"], c["current"]) for c in data.json()["conflicts"]] == [("todos", None)] * 3
    page = await ds.client.get("/data/-/sync/conflicts")
    assert page.status_code == 200
    assert visible_text(page.text).count("Table todos is not in this database (dropped?): there is no current row to show.") == 3


async def test_row_pages_after_the_key_column_is_renamed_outside_sync(paths):
    # sqlite-utils transform copies the table under the new column name: the sync tables still
    # record "id" as its key.
    sqlite_utils.Database(paths[0])["todos"].transform(rename={"id": "ident"})
    ds = Datasette([str(paths[0])])
    row = await ds.client.get("/data/todos/1")
    assert row.status_code == 200
    assert (await ds.client.get("/data/todos/1.json?_shape=array")).json()[0]["ident"] == 1
    assert "Sync history" not in row.text and "sync-panel" not in row.text
    conflicts = await ds.client.get("/data/-/sync/conflicts.json")
    assert conflicts.status_code == 200 and [c["current"] for c in conflicts.json()["conflicts"]] == [None] * 3


async def test_row_history_links_of_infinite_real_keys(tmp_path):
    data = sqlite_utils.Database(tmp_path / "data.db")
    data.execute("CREATE TABLE r (k REAL PRIMARY KEY, v TEXT)")
    enable_sync(data, ["r"])
    # A REAL column keeps text that is no number as text: 'inf' is a key of its own.
    for key, value in ((float("inf"), "plus"), (float("-inf"), "minus"), ("inf", "text")):
        data.execute("INSERT INTO r VALUES (?, ?)", [key, value])
    data.conn.commit()
    ds = Datasette([str(tmp_path / "data.db")])
    html = (await ds.client.get("/data/-/sync/operations?table=r")).text
    links = {}
    for row in re.findall(r"<tr>.*?</tr>", html, flags=re.DOTALL):
        value = re.search(r"<dt>v</dt><dd>(\w+)</dd>", row)
        if value is None:
            continue  # the header
        links[value.group(1)] = re.search(r'href="([^"]*pk=[^"]*)"', row).group(1).replace("&amp;", "&")
    assert sorted(links) == ["minus", "plus", "text"]
    for value, link in links.items():
        history = (await ds.client.get(link)).text
        assert re.findall(r"<dt>v</dt><dd>(\w+)</dd>", history) == [value], link
    # The text key's row page links to its own history, as the panel shows it.
    row = (await ds.client.get("/data/r/inf")).text
    assert "text" in row and "/data/-/sync/operations?table=r&amp;pk=%5B%22inf%22%5D" in row

    # A conflict on the key inf links to that row's history too.
    export_bundle(data, tmp_path / "first.bundle")
    phone = sqlite_utils.Database(tmp_path / "phone.db")
    phone.execute("CREATE TABLE r (k REAL PRIMARY KEY, v TEXT)")
    enable_sync(phone, ["r"])
    import_bundle(phone, tmp_path / "first.bundle")
    data.execute("UPDATE r SET v = 'laptop' WHERE k = ?", [float("inf")])
    data.conn.commit()
    phone.execute("UPDATE r SET v = 'phone' WHERE k = ?", [float("inf")])
    phone.conn.commit()
    export_bundle(phone, tmp_path / "phone.bundle", since=sync_status(data)["clock"])
    import_bundle(data, tmp_path / "phone.bundle")
    conflicts = (await ds.client.get("/data/-/sync/conflicts")).text
    link = re.search(r'<a href="([^"]+)">Row history</a>', conflicts).group(1).replace("&amp;", "&")
    history = (await ds.client.get(link)).text
    assert sorted(re.findall(r"<dt>v</dt><dd>(\w+)</dd>", history)) == ["laptop", "phone", "plus"], link


async def test_long_values_are_shortened_on_the_operations_page_and_overview(tmp_path):
    data = sqlite_utils.Database(tmp_path / "data.db")
    data["notes"].insert({"id": "k" * 5000, "body": "x" * 100_000}, pk="id")
    enable_sync(data, ["notes"])
    ds = Datasette([str(tmp_path / "data.db")])
    for path in ("/data/-/sync/operations", "/data/-/sync"):
        html = (await ds.client.get(path)).text
        text = visible_text(html)
        assert "x" * 200 + " … (100,000 characters)" in text, path
        assert "x" * 201 not in html, path
        assert "k" * 200 + " … (5,000 characters)" in text, path
    # The JSON has the whole value.
    operations = (await ds.client.get("/data/-/sync/operations.json")).json()["operations"]
    assert operations[0]["values"]["body"] == "x" * 100_000


def test_pages_answer_503_busy_while_another_process_holds_the_file_locked(paths, datasette_server):
    server = datasette_server([paths[0]])
    lock = sqlite3.connect(paths[0], isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # a sqlite3 shell inside a transaction, say
    lock.execute("UPDATE notes SET body = 'locked'")
    try:  # each page waits out Datasette's busy timeout (5 s): two of them
        response = server.get("/data/-/sync.json")
        assert response.status_code == 503
        assert response.json()["error"] == (
            "Database data is busy: another connection holds a lock on it. Retry in a few seconds"
        )
        assert server.get("/data/-/sync/conflicts").status_code == 503
    finally:
        lock.rollback()
    assert server.get("/data/-/sync.json").status_code == 200
    assert "Traceback" not in server.output()
