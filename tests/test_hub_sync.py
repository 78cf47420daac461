"""``sqlite-utils sync`` against a hub.

Most tests run end to end: a real ``datasette serve`` subprocess with this project's plugin,
tokens from the real ``datasette create-token`` CLI, device databases made and synced with
the real ``sqlite-utils`` CLI. A few use an in-process hub (``httpx.MockTransport`` over the
core engine) for what a real server makes awkward: a dropped response, 413, temp files.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile

import httpx
import pytest
import sqlite_utils

from sqlite_utils_sync import export_bundle, import_bundle, sync_status
from sqlite_utils_sync.client import HubError, sync_with_hub
from sqlite_utils_sync.errors import SyncError


def moved(result) -> tuple[int, int]:
    pulled = result["pulled"]["total_operations"]
    if result["pulled_after_push"]:
        pulled += result["pulled_after_push"]["total_operations"]
    return pulled, result["pushed"]["total_operations"]


@pytest.fixture
def hub(tmp_path, datasette_server, hub_config, make_todos_db):
    hub_path = make_todos_db(tmp_path / "hub.db")
    server = datasette_server([hub_path], hub_config)
    server.path = hub_path
    return server


@pytest.fixture
def alice(hub):
    """A token restricted to exactly what syncing needs (see test_token_recipe)."""
    actions = ["sync-export", "sync-import", "view-database", "view-table", "insert-row", "update-row", "delete-row"]
    return hub.token("alice", *[arg for action in actions for arg in ("-d", "hub", action)])


def test_two_devices_converge_conflict_and_resolution(tmp_path, hub, alice, hub_sync, make_todos_db, run, run_json, todo_rows, upsert):
    a = make_todos_db(tmp_path / "a.db", [{"id": 1, "title": "Buy milk", "done": 0}, {"id": 2, "title": "Walk dog", "done": 0}])
    b = make_todos_db(tmp_path / "b.db")

    first = hub_sync(a, hub, alice)
    assert first["pulled"]["total_operations"] == 0
    assert first["pushed"]["total_operations"] >= 2
    assert first["pushed"]["applied"] == first["pushed"]["total_operations"]
    assert first["hub"]["device_id"] == sync_status(sqlite_utils.Database(hub.path))["device_id"]
    hub_sync(b, hub, alice)
    assert todo_rows(a) == todo_rows(b) == todo_rows(hub.path) == [
        {"id": 1, "title": "Buy milk", "done": 0},
        {"id": 2, "title": "Walk dog", "done": 0},
    ]

    # Both edit the same title offline, plus different columns of another row.
    # (One row per upsert: sqlite-utils fills keys missing from some rows of a batch with NULL.)
    upsert(a, {"id": 1, "title": "Buy oat milk"})
    upsert(a, {"id": 3, "title": "From A", "done": 0})
    upsert(b, {"id": 1, "title": "Buy soy milk"})
    upsert(b, {"id": 2, "done": 1})
    for path in (a, b, a, b):
        hub_sync(path, hub, alice)
    assert todo_rows(a) == todo_rows(b) == todo_rows(hub.path)
    assert todo_rows(a)[1:] == [{"id": 2, "title": "Walk dog", "done": 1}, {"id": 3, "title": "From A", "done": 0}]

    conflicts_a = run_json(["sqlite-utils", "sync-conflicts", a, "--json"])
    conflicts_b = run_json(["sqlite-utils", "sync-conflicts", b, "--json"])
    assert len(conflicts_a) == 1
    assert [c["id"] for c in conflicts_a] == [c["id"] for c in conflicts_b]
    conflict = conflicts_a[0]
    assert conflict["table"] == "todos" and conflict["pk"] == [1] and conflict["columns"] == ["title"]
    assert sorted(v["values"]["title"] for v in conflict["versions"]) == ["Buy oat milk", "Buy soy milk"]
    hub_conflicts = run_json(["sqlite-utils", "sync-conflicts", hub.path, "--json"])
    assert [c["id"] for c in hub_conflicts] == [conflict["id"]]

    # Quiet now: another run moves nothing either way, on both devices.
    for path in (a, b):
        assert moved(hub_sync(path, hub, alice)) == (0, 0)

    # Resolve on B, keeping A's version; it reaches A (and the hub) by syncing.
    keep = next(v["op"] for v in conflict["versions"] if v["values"]["title"] == "Buy oat milk")
    run(["sqlite-utils", "sync-resolve", b, conflict["id"], "--keep", keep])
    assert run_json(["sqlite-utils", "sync-conflicts", b, "--json"]) == []
    assert moved(hub_sync(b, hub, alice))[1] >= 1
    assert run_json(["sqlite-utils", "sync-conflicts", a, "--json"]) != []
    hub_sync(a, hub, alice)
    assert run_json(["sqlite-utils", "sync-conflicts", a, "--json"]) == []
    resolved = run_json(["sqlite-utils", "sync-conflicts", a, "--all", "--json"])
    assert [c["id"] for c in resolved] == [conflict["id"]] and resolved[0]["resolved"]
    assert run_json(["sqlite-utils", "sync-conflicts", hub.path, "--json"]) == []
    assert todo_rows(a) == todo_rows(b) == todo_rows(hub.path)
    assert todo_rows(a)[0]["title"] == "Buy oat milk"


def test_second_run_moves_nothing_and_human_output(tmp_path, hub, alice, clean_env, hub_sync, make_todos_db, run):
    a = make_todos_db(tmp_path / "a.db", [{"id": 1, "title": "One", "done": 0}])
    result = run(["sqlite-utils", "sync", a, hub.url + "/hub/"], env=clean_env(DATASETTE_SYNC_TOKEN=alice))
    assert result.stdout == ""
    # The one operation pulled is the hub's knowledge tick, written when it imported the push:
    # it changes no table, and the message says so.
    assert result.stderr == f"Synced with {hub.url}/hub. Nothing new to apply here. Sent 1 operation to the hub.\n"
    # The pull of the second run is empty even though the hub ticked when it imported the push.
    second = hub_sync(a, hub, alice)
    assert second["pulled"]["total_operations"] == 0
    assert second["pushed"]["total_operations"] == 0
    assert second["pulled_after_push"] is None
    assert second["hub"]["clock"] == sync_status(sqlite_utils.Database(a))["clock"]


def test_a_push_landing_during_a_sync_leaves_nothing_for_the_next(tmp_path, hub, alice, hub_sync, make_todos_db):
    # b syncs while a exports its push (a's progress callback runs it): a's push then makes
    # the hub tick, a pulls again and gets b's edit, and that import writes a tick of a's
    # after a's push. The run sends it too, so the next run moves nothing either way.
    a = make_todos_db(tmp_path / "a.db", [{"id": 1, "title": "From a", "done": 0}])
    b = make_todos_db(tmp_path / "b.db", [{"id": 2, "title": "From b", "done": 0}])
    synced_b = []

    def progress(stage, done, total):
        if stage == "push" and not synced_b:
            synced_b.append(hub_sync(b, hub, alice))

    result = sync_with_hub(sqlite_utils.Database(a), hub.url + "/hub", token=alice, progress=progress)
    assert synced_b and result["pulled_after_push"]["applied_by_table"] == {"todos": 1}
    a_clock = sync_status(sqlite_utils.Database(a))["clock"]
    assert result["hub"]["clock"] == a_clock
    second = hub_sync(a, hub, alice)
    assert moved(second) == (0, 0)
    assert sync_status(sqlite_utils.Database(hub.path))["clock"] == a_clock
    # Both pushes count: every operation of a reached the hub in this run.
    a_id = sync_status(sqlite_utils.Database(a))["device_id"]
    assert result["pushed"]["total_operations"] == a_clock[a_id]


def test_writes_through_datasette_write_api_reach_devices(tmp_path, hub, alice, hub_sync, make_todos_db, run_json, todo_rows, upsert):
    writer = hub.token("writer")
    headers = {"Authorization": f"Bearer {writer}"}
    response = hub.post("/hub/todos/-/insert", json={"rows": [{"id": 10, "title": "Inserted via API", "done": 0}, {"id": 11, "title": "Second", "done": 0}]}, headers=headers)
    assert response.status_code == 201, response.text
    for row in ({"id": 11, "done": 1}, {"id": 12, "title": "Upserted", "done": 0}):
        response = hub.post("/hub/todos/-/upsert", json={"rows": [row]}, headers=headers)
        assert response.status_code == 200, response.text
    response = hub.post("/hub/todos/-/insert", json={"rows": [{"id": 12, "title": "Replaced", "done": 1}], "replace": True}, headers=headers)
    assert response.status_code == 201, response.text

    status = run_json(["sqlite-utils", "sync-status", hub.path, "--json"])
    # 2 inserts, 1 update, 1 insert, and the replace: a delete and an insert (Datasette's write
    # connection has recursive_triggers on, so INSERT OR REPLACE fires the delete trigger too).
    assert status["tables"]["todos"]["operations"] == 6
    device = make_todos_db(tmp_path / "device.db")
    result = hub_sync(device, hub, alice)
    assert result["pulled"]["applied"] >= 5
    assert todo_rows(device) == todo_rows(hub.path) == [
        {"id": 10, "title": "Inserted via API", "done": 0},
        {"id": 11, "title": "Second", "done": 1},
        {"id": 12, "title": "Replaced", "done": 1},
    ]
    # And back: an edit on the device shows up in Datasette's own JSON API.
    upsert(device, {"id": 10, "done": 1})
    hub_sync(device, hub, alice)
    api = hub.get("/hub/todos/10.json?_shape=objects", headers=headers).json()
    assert api["rows"] == [{"id": 10, "title": "Inserted via API", "done": 1}]


def test_writes_that_change_a_synced_tables_schema_through_datasette_are_logged_at_once(
    tmp_path, hub, alice, hub_sync, make_todos_db, run, todo_rows
):
    # /-/alter rebuilds the table (its capture triggers go with it) and "alter": true adds a
    # column the triggers do not know: the writes that follow must still reach up-to-date
    # devices, and a new device's first sync must work.
    token = hub.token("alice")
    alice_headers = {"Authorization": f"Bearer {token}"}
    laptop = make_todos_db(tmp_path / "laptop.db", [{"id": 1, "title": "a", "done": 0}])
    hub_sync(laptop, hub, alice)
    response = hub.post(
        "/hub/todos/-/alter",
        json={"operations": [{"op": "alter_column", "args": {"name": "done", "default": 0}}]},
        headers=alice_headers,
    )
    assert response.status_code == 200, response.text
    response = hub.post("/hub/todos/1/-/update", json={"update": {"title": "edited on the hub"}}, headers=alice_headers)
    assert response.status_code == 200, response.text
    response = hub.post(
        "/hub/todos/-/insert", json={"row": {"id": 2, "title": "with a note", "note": "new column"}, "alter": True},
        headers=alice_headers,
    )
    assert response.status_code == 201, response.text

    run(["sqlite-utils", "sync", laptop, hub.url + "/hub", "--token", token, "--alter"])
    expected = [
        {"id": 1, "title": "edited on the hub", "done": 0, "note": None},
        {"id": 2, "title": "with a note", "done": 0, "note": "new column"},
    ]
    assert todo_rows(laptop) == todo_rows(hub.path) == expected
    phone = tmp_path / "phone.db"
    hub_sync(phone, hub, alice)
    assert todo_rows(phone) == expected


def test_a_transform_by_another_process_while_the_hub_runs_does_not_hide_later_edits(
    tmp_path, hub, alice, hub_sync, make_todos_db, run, todo_rows
):
    # sqlite-utils transform rebuilds the table, and its capture triggers go with it. A device
    # with nothing to push only pulls, so the hub's export must repair capture first.
    laptop = make_todos_db(tmp_path / "laptop.db", [{"id": 1, "title": "a", "done": 0}])
    hub_sync(laptop, hub, alice)
    run(["sqlite-utils", "transform", hub.path, "todos", "--default", "done", "0"])
    with sqlite3.connect(hub.path) as other:
        other.execute("UPDATE todos SET title = 'edited by another program' WHERE id = 1")
    hub_sync(laptop, hub, alice)
    assert todo_rows(laptop) == todo_rows(hub.path) == [{"id": 1, "title": "edited by another program", "done": 0}]


def test_a_hub_whose_clock_was_set_back_serves_its_later_edit(tmp_path, hub, alice, hub_sync, make_todos_db, run, shell, todo_rows):
    shell(hub.path, "INSERT INTO todos VALUES (1, 'buy milk', 0)")
    shell(hub.path, "UPDATE todos SET title = 'buy oat milk' WHERE id = 1", "-1d")
    device = make_todos_db(tmp_path / "device.db")
    result = hub_sync(device, hub, alice)  # a pull first: the hub exports from a read connection
    assert result["pulled"]["applied"] == 2
    assert todo_rows(device) == todo_rows(hub.path) == [{"id": 1, "title": "buy oat milk", "done": 0}]
    # A third copy meeting the hub's operations through the device agrees too.
    other = make_todos_db(tmp_path / "other.db")
    run(["sqlite-utils", "export-bundle", device, tmp_path / "d.bundle"])
    run(["sqlite-utils", "import-bundle", other, tmp_path / "d.bundle"])
    assert todo_rows(other) == todo_rows(hub.path)


def test_an_immutable_hub_whose_clock_was_set_back_serves_its_later_edit(tmp_path, datasette_server, hub_config, make_todos_db, run, shell, todo_rows):
    hub_path = make_todos_db(tmp_path / "hub.db")
    shell(hub_path, "INSERT INTO todos VALUES (1, 'buy milk', 0)")
    shell(hub_path, "UPDATE todos SET title = 'buy oat milk' WHERE id = 1", "-1d")
    before = hub_path.read_bytes()
    server = datasette_server([], hub_config, "-i", str(hub_path))
    device = make_todos_db(tmp_path / "device.db")
    response = server.get("/hub/-/sync/export", headers={"Authorization": f"Bearer {server.token('alice')}"})
    assert response.status_code == 200, response.text
    (tmp_path / "hub.bundle").write_bytes(response.content)
    run(["sqlite-utils", "import-bundle", device, tmp_path / "hub.bundle"])
    assert todo_rows(device) == todo_rows(hub_path) == [{"id": 1, "title": "buy oat milk", "done": 0}]
    assert hub_path.read_bytes() == before


def test_token_recipe(hub, tmp_path, hub_sync, make_todos_db):
    """Restricted tokens must name view-database too (sync actions also require it)."""
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}])
    without_view = hub.token("alice", "-d", "hub", "sync-export", "-d", "hub", "sync-import")
    result = hub_sync(device, hub, without_view, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: hub {hub.url}/hub does not allow export (pull) (403)"), result.stderr
    no_table = hub.token("alice", "-d", "hub", "sync-export", "-d", "hub", "view-database")
    result = hub_sync(device, hub, no_table, check=False)
    assert result.returncode == 1
    assert result.stderr.rstrip().endswith("nothing to pull; it needs view-table on a table"), result.stderr
    export_only = hub.token("alice", *[arg for action in ("sync-export", "view-database", "view-table") for arg in ("-d", "hub", action)])
    result = hub_sync(device, hub, export_only, check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: hub {hub.url}/hub does not allow import (push) (403)"), result.stderr
    unrestricted = hub.token("alice")
    assert moved(hub_sync(device, hub, unrestricted))[1] >= 1


def test_credentials_that_may_only_pull_make_and_keep_a_copy(hub, alice, tmp_path, hub_sync, make_todos_db, run, todo_rows):
    """A dashboard's copy: it pulls, and has nothing of its own to push but what it heard (its
    knowledge ticks), which a hub that may not hear from it does without."""
    writer = make_todos_db(tmp_path / "w.db", [{"id": 1, "title": "from the writer", "done": 0}])
    hub_sync(writer, hub, alice)
    reader = hub.token("bob", *[arg for action in ("sync-export", "view-database", "view-table") for arg in ("-d", "hub", action)])
    copy = tmp_path / "dashboard.db"
    assert hub_sync(copy, hub, reader)["pushed"]["not_pushed"] == f"hub {hub.url}/hub lets these credentials pull only, so this copy pushed nothing"
    assert [row["title"] for row in todo_rows(copy)] == ["from the writer"]
    run(["sqlite-utils", "insert", writer, "todos", "-", "--pk", "id"], input='{"id": 2, "title": "later", "done": 0}')
    hub_sync(writer, hub, alice)
    said = run(["sqlite-utils", "sync", copy, hub.url + "/hub", "--token", reader]).stderr
    assert said.endswith(f"Not pushed: hub {hub.url}/hub lets these credentials pull only, so this copy pushed nothing (no row changed here).\n")
    assert [row["title"] for row in todo_rows(copy)] == ["from the writer", "later"]
    # An edit of its own can't be sent with them: said, and what was pulled stays applied.
    run(["sqlite-utils", "insert", copy, "todos", "-", "--pk", "id"], input='{"id": 3, "title": "mine", "done": 0}')
    run(["sqlite-utils", "insert", writer, "todos", "-", "--pk", "id"], input='{"id": 4, "title": "newer", "done": 0}')
    hub_sync(writer, hub, alice)
    result = hub_sync(copy, hub, reader, check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"Error: hub {hub.url}/hub does not allow import (push) (403)")
    assert result.stderr.endswith("; what was pulled is applied here, but this copy's changes were not sent\n")
    assert [row["id"] for row in todo_rows(copy)] == [1, 2, 3, 4]


def test_a_token_pasted_with_a_line_break_works_and_a_broken_one_is_not_echoed(hub, alice, tmp_path, clean_env, make_todos_db, run):
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}])
    url = hub.url + "/hub"
    run(["sqlite-utils", "sync", device, url], env=clean_env(DATASETTE_SYNC_TOKEN=f" {alice}\n"))
    result = run(["sqlite-utils", "sync", device, url, "--token", alice[:20] + " " + alice[20:]], check=False)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: the token holds a space, a control or a non-ASCII character, which an HTTP header cannot carry: "
        "check --token or DATASETTE_SYNC_TOKEN\n"
    )
    assert alice[:20] not in result.stderr


def test_error_lines(hub, tmp_path, free_port, hub_sync, make_todos_db, run):
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}])

    def error(url, token):
        args = ["sqlite-utils", "sync", device, url] + (["--token", token] if token else [])
        result = run(args, check=False)
        assert result.returncode == 1, result
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        return lines[0]

    url = hub.url + "/hub"
    assert error(url, "dstok_not-a-real-token") == f"Error: hub {url} refused the token (401): Invalid token signature"
    assert error(url, None).startswith(f"Error: hub {url} does not allow export (pull) (403)")
    assert error(url, None).endswith("no token was sent: pass --token or set DATASETTE_SYNC_TOKEN")
    bob = hub.token("bob")  # sync-export but not sync-import
    assert error(url, bob).startswith(f"Error: hub {url} does not allow import (push) (403)")
    carol = hub.token("carol")  # nothing granted
    assert error(url, carol).startswith(f"Error: hub {url} does not allow export (pull) (403)")
    alice = hub.token("alice")
    assert error(hub.url + "/nope", alice).startswith(f"Error: hub {hub.url}/nope not found (404)")
    wider = tmp_path / "wider.db"
    run(["sqlite-utils", "create-table", wider, "todos", "id", "integer", "title", "text", "done", "integer", "notes", "text", "--pk", "id"])
    run(["sqlite-utils", "insert", wider, "todos", "-", "--pk", "id"], input='{"id": 5, "notes": "n"}')
    run(["sqlite-utils", "enable-sync", wider, "todos"])
    line = run(["sqlite-utils", "sync", wider, url, "--token", alice], check=False).stderr.strip()
    assert line.startswith(f"Error: hub {url} rejected the bundle (400): "), line
    assert "notes" in line and "\n" not in line
    closed = f"http://127.0.0.1:{free_port()}/data"
    assert error(closed, alice) == f"Error: cannot connect to {closed}: connection refused"
    assert error("ftp://example.com/data", alice).startswith("Error: Hub URL must be a database URL")
    # None of it changed the device, and bob's failed push pulled nothing harmful: a retry works.
    assert moved(hub_sync(device, hub, alice))[1] >= 1
    # URL schemes are case-insensitive.
    assert run(["sqlite-utils", "sync", device, url.replace("http://", "HTTP://"), "--token", alice]).returncode == 0


def test_a_full_copy_pulling_with_credentials_that_see_fewer_tables_is_told_what_to_do(
    tmp_path, datasette_server, hub_config, file_bytes, hub_sync, make_todos_db, run
):
    """bob may view todos but not notes: his pull withholds notes, which a full copy holds.
    One line for sync, naming neither the temporary bundle file nor export-bundle's --table."""
    hub_path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    run(["sqlite-utils", "create-table", hub_path, "notes", "id", "integer", "body", "text", "--pk", "id"])
    run(["sqlite-utils", "enable-sync", hub_path, "notes"])
    hub_config["databases"]["hub"]["tables"] = {"notes": {"allow": {"id": "alice"}}}
    hub = datasette_server([hub_path], hub_config)
    copy = tmp_path / "copy.db"
    hub_sync(copy, hub, hub.token("alice"))  # a full copy: todos and notes
    run(["sqlite-utils", "insert", hub_path, "notes", "-", "--pk", "id"], input='{"id": 1, "body": "only alice"}')
    before = file_bytes(copy)
    url = hub.url + "/hub"
    result = run(["sqlite-utils", "sync", copy, url, "--token", hub.token("bob")], check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (
        f"Error: hub {url} sends only tables todos to these credentials, but this copy holds every table: "
        "sync with --table for each table you may view (after disable-sync on the others), sync into a new "
        "file, or use credentials that may view them all\n"
    )
    assert file_bytes(copy) == before
    with pytest.raises(HubError) as caught:
        sync_with_hub(sqlite_utils.Database(copy), url, token=hub.token("bob"))
    assert caught.value.reason == "partial_bundle"


def test_hub_url_mistakes_are_one_line_errors(tmp_path, make_todos_db, run):
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}])
    example = "a database URL like http://127.0.0.1:8001/data"
    refused = {
        "http://127.0.0.1:abc/data": "is not a valid URL (Port could not be cast to integer value as 'abc')",
        "http://[::1/data": "is not a valid URL (Invalid IPv6 URL)",
        "http://127.0.0.1:8001/data?x=1": f"must not have a query string or fragment: use {example}",
        "http://127.0.0.1:8001/data#frag": f"must not have a query string or fragment: use {example}",
    }
    for url, message in refused.items():
        result = run(["sqlite-utils", "sync", device, url, "--token", "T"], check=False)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith(f"Error: Hub URL {url!r} {message}"), result.stderr
        assert result.stderr.count("\n") == 1, result.stderr


def test_busy_hub_says_so(hub, alice, tmp_path, hub_sync, make_todos_db, run, todo_rows):
    """The hub's database locked by another connection: the hub's reason in one line, nothing changed."""
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}])
    locker = sqlite3.connect(hub.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        # The hub waits 5 s for the lock, then answers 503; --retries 0: the client does not wait to retry.
        args = ["sqlite-utils", "sync", device, hub.url + "/hub", "--json", "--token", alice, "--retries", "0"]
        result = run(args, check=False)
    finally:
        locker.close()
    assert result.returncode == 1
    assert result.stderr == (
        f"Error: hub {hub.url}/hub could not do the export (pull) now (503): "
        "Database hub is busy: another connection holds a lock on it. Retry in a few seconds\n"
    )
    assert todo_rows(device) == [{"id": 1, "title": "x", "done": 0}] and todo_rows(hub.path) == []
    assert moved(hub_sync(device, hub, alice))[1] >= 1


def test_alter_adds_columns_both_ways_and_clones_a_new_device(hub, tmp_path, hub_sync, make_todos_db, run, todo_rows, upsert):
    alice = hub.token("alice")  # unrestricted: --alter also needs alter-table on the hub
    plain = make_todos_db(tmp_path / "plain.db", [{"id": 1, "title": "plain", "done": 0}])
    hub_sync(plain, hub, alice)
    wider = tmp_path / "wider.db"
    run(["sqlite-utils", "create-table", wider, "todos", "id", "integer", "title", "text", "done", "integer", "notes", "text", "--pk", "id"])
    run(["sqlite-utils", "enable-sync", wider, "todos"])
    upsert(wider, {"id": 2, "title": "wide", "done": 0, "notes": "a note"})
    run(["sqlite-utils", "sync", wider, hub.url + "/hub", "--token", alice, "--alter"])
    assert todo_rows(hub.path)[1] == {"id": 2, "title": "wide", "done": 0, "notes": "a note"}

    # The narrower device is told what to do, then does it.
    result = run(["sqlite-utils", "sync", plain, hub.url + "/hub", "--token", alice], check=False)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: Bundle from-hub.bundle: table 'todos' has column notes that this database lacks "
        "(import or sync with --alter to add it)\n"
    )
    run(["sqlite-utils", "sync", plain, hub.url + "/hub", "--token", alice, "--alter"])
    assert todo_rows(plain) == todo_rows(wider) == todo_rows(hub.path)

    # A database with tables but none synced is told what to do; a brand new empty one gets
    # the hub's tables.
    unsynced = tmp_path / "unsynced.db"
    run(["sqlite-utils", "create-table", unsynced, "other", "id", "integer", "--pk", "id"])
    result = run(["sqlite-utils", "sync", unsynced, hub.url + "/hub", "--token", alice], check=False)
    assert "run enable-sync first (or sync with --alter" in result.stderr
    fresh = tmp_path / "fresh.db"
    run(["sqlite-utils", "create-database", fresh])
    run(["sqlite-utils", "sync", fresh, hub.url + "/hub", "--token", alice])
    assert todo_rows(fresh) == todo_rows(hub.path)
    upsert(fresh, {"id": 3, "title": "from the clone", "done": 1})
    hub_sync(fresh, hub, alice)
    hub_sync(plain, hub, alice)
    assert todo_rows(plain) == todo_rows(fresh) == todo_rows(hub.path)
    assert len(todo_rows(plain)) == 3


def test_hub_compacts_and_new_devices_start_from_it(hub, alice, tmp_path, hub_sync, make_todos_db, run_json, todo_rows, upsert):
    a = make_todos_db(tmp_path / "a.db", [{"id": i, "title": f"todo {i}", "done": 0} for i in range(1, 6)])
    b = make_todos_db(tmp_path / "b.db")
    for path in (a, b, a):
        hub_sync(path, hub, alice)
    for round_ in range(4):
        upsert(a, {"id": 1, "title": f"a{round_}"})
        upsert(b, {"id": 2, "title": f"b{round_}"})
        for path in (a, b, a, b):
            hub_sync(path, hub, alice)
    # Compacting the file Datasette is serving, with the plain CLI.
    result = run_json(["sqlite-utils", "sync-compact", hub.path, "--json"])
    assert result["removed"] > 0
    # A new device starts from the hub's compacted log, and from then on syncs like the others.
    c = make_todos_db(tmp_path / "c.db")
    hub_sync(c, hub, alice)
    assert todo_rows(c) == todo_rows(hub.path) == todo_rows(a)
    upsert(c, {"id": 3, "done": 1})
    for path in (c, a, b):
        hub_sync(path, hub, alice)
    assert todo_rows(a) == todo_rows(b) == todo_rows(c) == todo_rows(hub.path)
    assert todo_rows(a)[2] == {"id": 3, "title": "todo 3", "done": 1}
    # A database with edits made before it ever synced is told, in one line, that it cannot join.
    stranger = make_todos_db(tmp_path / "s.db", [{"id": 1, "title": "mine", "done": 0}])
    before = todo_rows(hub.path)
    out = hub_sync(stranger, hub, alice, check=False)
    assert out.returncode == 1
    assert out.stderr.startswith("Error: Bundle from-hub.bundle: it comes from a compacted log")
    assert out.stderr.count("\n") == 1
    assert todo_rows(hub.path) == before and todo_rows(stranger) == [{"id": 1, "title": "mine", "done": 0}]


def test_bundle_size_limit_413(tmp_path, datasette_server, hub_config, hub_sync, make_todos_db):
    hub_path = make_todos_db(tmp_path / "hub.db")
    config = {**hub_config, "plugins": {"datasette-sync": {"max_bundle_bytes": 20_000}}}
    server = datasette_server([hub_path], config)
    device = make_todos_db(tmp_path / "d.db", [{"id": i, "title": "x" * 1000, "done": 0} for i in range(50)])
    result = hub_sync(device, server, server.token("alice"), check=False)
    assert result.returncode == 1
    url = server.url + "/hub"
    assert result.stderr.startswith(f"Error: hub {url} refused the bundle as too large (413): "), result.stderr
    assert "20000" in result.stderr


def test_read_only_hub_answers_403(tmp_path, datasette_server, hub_config, hub_sync, make_todos_db, todo_rows):
    hub_path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "published", "done": 0}])
    server = datasette_server([], hub_config, "-i", str(hub_path))
    device = make_todos_db(tmp_path / "d.db", [{"id": 2, "title": "x", "done": 0}])
    result = hub_sync(device, server, server.token("alice"), check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: hub {server.url}/hub does not allow import (push) (403)"), result.stderr
    assert result.stderr.endswith("; what was pulled is applied here, but this copy's changes were not sent\n")
    assert [row["id"] for row in todo_rows(device)] == [1, 2]


def test_a_copy_of_a_published_hub_syncs_with_nothing_to_push(tmp_path, datasette_server, hub_config, hub_sync, make_todos_db, todo_rows, run):
    """A hub published with ``datasette publish`` (immutable) serves pulls; a copy with no edit
    of its own, only what it heard, syncs with it without an error, by credentials that may
    push elsewhere too."""
    hub_path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "published", "done": 0}])
    server = datasette_server([], hub_config, "-i", str(hub_path))
    copy = tmp_path / "copy.db"
    token = server.token("alice")
    assert hub_sync(copy, server, token)["pushed"]["not_pushed"] == f"hub {server.url}/hub is read-only (immutable), so this copy pushed nothing"
    assert todo_rows(copy) == [{"id": 1, "title": "published", "done": 0}]
    said = run(["sqlite-utils", "sync", copy, server.url + "/hub", "--token", token]).stderr
    assert said.endswith(f"Not pushed: hub {server.url}/hub is read-only (immutable), so this copy pushed nothing (no row changed here).\n")


# -- An in-process hub over the core engine: the same contract, for failure injection -------


class FakeHub:
    def __init__(self, path, tokens=None, max_bytes=None):
        self.path = path
        self.tokens = tokens or {"T": {"export", "import"}}
        self.max_bytes = max_bytes
        self.drop_import_response = False
        self.requests = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        perms = self.tokens.get(request.headers.get("authorization", "").removeprefix("Bearer "))
        if perms is None:
            return httpx.Response(401, json={"ok": False, "error": "Invalid token"})
        db = sqlite_utils.Database(self.path)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "b.bundle")
            if request.url.path.endswith("/-/sync/export"):
                if "export" not in perms:
                    return httpx.Response(403, json={"ok": False, "error": "Permission denied: sync-export"})
                export_bundle(db, path, since=request.url.params.get("since"))
                with open(path, "rb") as fp:
                    content = fp.read()
                return httpx.Response(
                    200,
                    content=content,
                    headers={"Content-Type": "application/vnd.sqlite3", "X-Sync-Clock": json.dumps(sync_status(db)["clock"])},
                )
            if "import" not in perms:
                return httpx.Response(403, json={"ok": False, "error": "Permission denied: sync-import"})
            if self.max_bytes is not None and len(request.content) > self.max_bytes:
                return httpx.Response(413, json={"ok": False, "error": f"Bundle is larger than {self.max_bytes} bytes"})
            with open(path, "wb") as fp:
                fp.write(request.content)
            try:
                result = import_bundle(db, path)
            except SyncError as ex:
                return httpx.Response(400, json={"ok": False, "error": str(ex), "reason": ex.reason})
            if self.drop_import_response:
                raise httpx.ReadError("connection reset by peer")
            body = {**result.as_dict(), "clock": result.clock}
            return httpx.Response(200, json=body, headers={"X-Sync-Clock": json.dumps(result.clock)})


def fake_setup(tmp_path):
    for name in ("hub", "a", "b"):
        db = sqlite_utils.Database(tmp_path / f"{name}.db")
        db["todos"].create({"id": int, "title": str}, pk="id")
        from sqlite_utils_sync import enable_sync

        enable_sync(db, ["todos"])
    return [sqlite_utils.Database(tmp_path / f"{name}.db") for name in ("hub", "a", "b")]


@pytest.fixture
def temp_dir(tmp_path, monkeypatch):
    """Where the client's temp files go, to check that none are left behind."""
    path = tmp_path / "temp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


def test_rerun_after_lost_response_converges(tmp_path, temp_dir):
    hub_db, a, _ = fake_setup(tmp_path)
    fake = FakeHub(tmp_path / "hub.db")
    a["todos"].insert_all([{"id": i, "title": f"t{i}"} for i in range(5)])
    fake.drop_import_response = True
    with pytest.raises(HubError) as ex:
        sync_with_hub(a, "http://hub/hub", token="T", transport=httpx.MockTransport(fake))
    assert ex.value.reason == "connection_failed"
    assert list(temp_dir.iterdir()) == []
    assert hub_db["todos"].count == 5  # the hub did import it
    fake.drop_import_response = False
    again = sync_with_hub(a, "http://hub/hub", token="T", transport=httpx.MockTransport(fake))
    assert again["pushed"]["total_operations"] == 0  # nothing re-sent: the hub's clock has it
    assert again["pulled"]["total_operations"] == 1  # only the hub's knowledge tick
    assert moved(sync_with_hub(a, "http://hub/hub", token="T", transport=httpx.MockTransport(fake))) == (0, 0)
    assert list(temp_dir.iterdir()) == []


def test_errors_from_fake_hub(tmp_path, temp_dir):
    _, a, _ = fake_setup(tmp_path)
    a["todos"].insert({"id": 1, "title": "x" * 5000})
    fake = FakeHub(tmp_path / "hub.db", tokens={"T": {"export", "import"}, "R": {"export"}}, max_bytes=1000)
    transport = httpx.MockTransport(fake)
    with pytest.raises(HubError, match=r"^hub http://hub/hub refused the bundle as too large \(413\): Bundle is larger than 1000 bytes$"):
        sync_with_hub(a, "http://hub/hub", token="T", transport=transport)
    with pytest.raises(HubError, match=r"^hub http://hub/hub refused the token \(401\): Invalid token$"):
        sync_with_hub(a, "http://hub/hub", token="nope", transport=transport)
    with pytest.raises(HubError, match=r"requires a token \(401\): pass --token or set DATASETTE_SYNC_TOKEN"):
        sync_with_hub(a, "http://hub/hub", transport=transport)
    with pytest.raises(HubError, match=r"does not allow import \(push\) \(403\): Permission denied: sync-import"):
        sync_with_hub(a, "http://hub/hub", token="R", transport=transport)
    assert list(temp_dir.iterdir()) == []
    # A bundle the hub refuses (400): it has a column the hub's table lacks.
    fake.max_bytes = None
    wider = sqlite_utils.Database(tmp_path / "wider.db")
    wider["todos"].create({"id": int, "title": str, "notes": str}, pk="id")
    wider["todos"].insert({"id": 9, "title": "t", "notes": "n"})
    from sqlite_utils_sync import enable_sync

    enable_sync(wider, ["todos"])
    with pytest.raises(HubError, match=r"^hub http://hub/hub rejected the bundle \(400\): Bundle b.bundle: table 'todos' has column notes"):
        sync_with_hub(wider, "http://hub/hub", token="T", transport=transport)
    with pytest.raises(SyncError, match="no synced tables"):
        sync_with_hub(sqlite_utils.Database(memory=True), "http://hub/hub", token="T", transport=transport)
    assert list(temp_dir.iterdir()) == []


def test_progress_callback(tmp_path, temp_dir):
    _, a, b = fake_setup(tmp_path)
    a["todos"].insert_all([{"id": i, "title": f"t{i}"} for i in range(7)])
    fake = FakeHub(tmp_path / "hub.db")
    events = []
    sync_with_hub(a, "http://hub/hub", token="T", transport=httpx.MockTransport(fake), progress=lambda *e: events.append(e))
    assert ("push", 7, 7) in events
    events.clear()
    sync_with_hub(b, "http://hub/hub", token="T", transport=httpx.MockTransport(fake), progress=lambda *e: events.append(e))
    assert [e[0] for e in events][0] == "pull" and sum(e[1] for e in events if e[0] == "pull") == events[0][2]
    assert b["todos"].count == 7


def test_invalid_bundle_from_hub(tmp_path, temp_dir):
    _, a, _ = fake_setup(tmp_path)

    def handler(request):
        return httpx.Response(200, content=b"<html>not a bundle</html>", headers={"Content-Type": "text/html"})

    with pytest.raises(HubError, match=r"^hub http://hub/hub sent an invalid bundle: Bundle from-hub.bundle is not"):
        sync_with_hub(a, "http://hub/hub", token="T", transport=httpx.MockTransport(handler))
    assert list(temp_dir.iterdir()) == []


def test_a_copy_refuses_another_database_of_its_hub(tmp_path, datasette_server, make_todos_db, run, run_json, todo_rows, file_bytes):
    """A URL naming the hub's other database (``/notes`` for ``/todos``) would merge the two
    logs for good: each would pass the other's rows on to its own devices. A copy refuses a
    hub database that shares no table and no device with it, before anything is written or
    sent; ``--alter`` is the way to merge them on purpose."""
    todos = make_todos_db(tmp_path / "todos.db", [{"id": 1, "title": "a todo", "done": 0}])
    notes = tmp_path / "notes.db"
    run(["sqlite-utils", "create-table", notes, "notes", "id", "integer", "body", "text", "--pk", "id"])
    run(["sqlite-utils", "insert", notes, "notes", "-", "--pk", "id"], input='{"id": 1, "body": "private note"}')
    run(["sqlite-utils", "enable-sync", notes, "notes"])
    actions = ("sync-export", "sync-import", "insert-row", "update-row", "delete-row", "alter-table", "create-table")
    server = datasette_server([todos, notes], {"permissions": {action: {"id": "alice"} for action in actions}})
    token = server.token("alice")
    laptop = tmp_path / "laptop.db"
    run_json(["sqlite-utils", "sync", laptop, server.url + "/todos", "--token", token, "--json"])
    run(["sqlite-utils", "query", laptop, "INSERT INTO todos VALUES (2, 'on the laptop', 0)"])
    before, notes_before = file_bytes(laptop), file_bytes(notes)

    wrong = run(["sqlite-utils", "sync", laptop, server.url + "/notes", "--token", token], check=False)
    assert wrong.returncode == 1 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert wrong.stderr == (
        f"Error: hub {server.url}/notes syncs table(s) notes and none of this copy's (todos), and neither side holds "
        "an edit of the other: check the database name in the URL. Nothing was pulled or pushed; sync with --alter "
        "to merge the two\n"
    )
    assert file_bytes(laptop) == before and file_bytes(notes) == notes_before

    # The right database syncs as ever, and a device joining it never sees the note.
    run(["sqlite-utils", "sync", laptop, server.url + "/todos", "--token", token])
    phone = tmp_path / "phone.db"
    run(["sqlite-utils", "sync", phone, server.url + "/todos", "--token", token])
    assert [row["title"] for row in todo_rows(phone)] == ["a todo", "on the laptop"]
    assert b"private note" not in file_bytes(phone)

    # On purpose, with --alter: the hub's tables are added here, and this copy's there.
    merged = run_json(["sqlite-utils", "sync", laptop, server.url + "/notes", "--token", token, "--alter", "--json"])
    assert merged["pulled"]["tables_created"] == ["notes"]

    # A copy that never synced may join any hub: its own table, which the hub only keeps, goes there.
    own = tmp_path / "own.db"
    run(["sqlite-utils", "create-table", own, "ideas", "id", "integer", "text", "text", "--pk", "id"])
    run(["sqlite-utils", "insert", own, "ideas", "-", "--pk", "id"], input='{"id": 1, "text": "mine"}')
    run(["sqlite-utils", "enable-sync", own, "ideas"])
    joined = run_json(["sqlite-utils", "sync", own, server.url + "/todos", "--token", token, "--json"])
    assert joined["pushed"]["total_operations"] >= 1


def test_cors_reaches_the_sync_routes_as_datasettes_own(tmp_path, datasette_server, hub_config, make_todos_db):
    """With ``--cors``, a script on another origin may read the sync pages' JSON and the
    endpoints' answers (their X-Sync headers too), and its preflight of a push is answered;
    without it, nothing changes."""
    hub_path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "x", "done": 0}])
    with_cors = datasette_server([hub_path], hub_config, "--cors")
    without = datasette_server([hub_path], hub_config)
    auth = {"Authorization": f"Bearer {with_cors.token('alice')}", "Origin": "https://app.example"}
    for path in ("/hub/-/sync.json", "/hub/-/sync/operations.json", "/hub/-/sync/changes?since=%7B%7D", "/hub/-/sync/export"):
        response = with_cors.get(path, headers=auth)
        assert response.status_code == 200, (path, response.text[:200])
        assert response.headers["access-control-allow-origin"] == "*", path
        assert "X-Sync-Clock" in response.headers["access-control-expose-headers"], path
        assert "access-control-allow-origin" not in without.get(path, headers=auth).headers, path
    preflight = httpx.options(
        with_cors.url + "/hub/-/sync/import",
        headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"},
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert "Authorization" in preflight.headers["access-control-allow-headers"]
