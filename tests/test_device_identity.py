"""Device identity: who may push a device's operations to a hub, and recovering from a clash.

Two databases holding different operations under one device id (a copied file edited on both
sides, or operations pushed under someone else's id) refuse each other's bundles with
``device_id_clash``. The error names one command, ``sync-new-device --recover``, which keeps
every edit and makes syncing work again. A hub lets only the actor that first pushed a
device's operations push new ones (``sync-relay`` lifts that), so a token holder cannot
write as another's device in the first place. A copied database is noticed whichever way its
operations arrive, and ``sync-new-device`` gives it an identity of its own.
"""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from sqlite_utils_sync import BundleError, SyncError, export_bundle, import_bundle, sync_status
from sqlite_utils_sync.oplog import LOCAL


CONFIG = {
    "databases": {
        "hub": {
            "permissions": {
                "sync-export": {"id": ["alice", "mallory", "relay"]},
                "sync-import": {"id": ["alice", "mallory", "relay"]},
                "sync-relay": {"id": "relay"},
                **{action: {"id": ["alice", "mallory", "relay"]} for action in ("insert-row", "update-row", "delete-row")},
            }
        }
    }
}
RECOVER = "run 'sqlite-utils sync-new-device --recover'"


@pytest.fixture(scope="session")
def status(run_json):
    """``status(path)``: ``sqlite-utils sync-status --json``, parsed."""

    def status(path) -> dict:
        return run_json(["sqlite-utils", "sync-status", path, "--json"])

    return status


@pytest.fixture(scope="session")
def send(run, run_json):
    """``send(source, target, bundle)``: export all of ``source`` to ``bundle``, import it into ``target`` (``--json``)."""

    def send(source, target, bundle) -> dict:
        if bundle.exists():
            bundle.unlink()
        run(["sqlite-utils", "export-bundle", source, bundle])
        return run_json(["sqlite-utils", "import-bundle", target, bundle, "--json"])

    return send


@pytest.fixture(scope="session")
def refused(run):
    """``refused(target, bundle)``: the import fails with exit 1 and ``target`` unchanged; returns stderr."""

    def refused(target, bundle):
        before = target.read_bytes()
        result = run(["sqlite-utils", "import-bundle", target, bundle], check=False)
        assert result.returncode == 1, result
        assert target.read_bytes() == before
        return result.stderr

    return refused


@pytest.fixture(scope="session")
def cli_sync(run):
    """``cli_sync(path, server, token, check=True)``: ``sqlite-utils sync`` with the hub, without ``--json``."""

    def cli_sync(path, server, token, check=True):
        args = ["sqlite-utils", "sync", path, server.url + "/hub", "--token", token]
        return run(args, check=check)

    return cli_sync


def push(server, bundle, token):
    return server.post(
        "/hub/-/sync/import",
        content=bundle.read_bytes(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/vnd.sqlite3"},
    )


def hub_owners(path) -> dict:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT device_id, actor FROM _sync_device_actors"))
    finally:
        conn.close()


def test_a_copied_file_edited_on_both_sides_recovers_with_the_command_the_error_names(tmp_path, conflicts, make_todos_db, run, todo_rows, upsert, refused, send, status):
    a = make_todos_db(tmp_path / "a.db", [{"id": 1, "title": "one", "done": 0}, {"id": 2, "title": "two", "done": 0}])
    b = tmp_path / "b.db"
    shutil.copy(a, b)  # and sync-new-device is forgotten
    upsert(a, {"id": 1, "title": "edited on a"})
    upsert(b, {"id": 2, "done": 1})
    upsert(b, {"id": 3, "title": "new on b", "done": 0})
    run(["sqlite-utils", "export-bundle", a, tmp_path / "a.bundle"])
    run(["sqlite-utils", "export-bundle", b, tmp_path / "b.bundle"])
    # Refused both ways, unchanged, with the command to run.
    for target, bundle in ((b, "a.bundle"), (a, "b.bundle")):
        error = refused(target, tmp_path / bundle)
        assert error.startswith(f"Error: Bundle {bundle}: ") and status(a)["device_id"] in error, error
        assert "device_id_clash" not in error and RECOVER in error and len(error.splitlines()) == 1
    old_id = status(b)["device_id"]
    new_id = run(["sqlite-utils", "sync-new-device", "--recover", b]).stdout.strip()
    assert new_id != old_id and status(b)["device_id"] == new_id
    send(b, a, tmp_path / "b.bundle")
    send(a, b, tmp_path / "a.bundle")
    expected = [
        {"id": 1, "title": "edited on a", "done": 0},
        {"id": 2, "title": "two", "done": 1},
        {"id": 3, "title": "new on b", "done": 0},
    ]
    assert todo_rows(a) == todo_rows(b) == expected
    assert conflicts(a) == conflicts(b) == []  # the moved operations are not made into conflicts
    # From then on both sync as two devices: edits travel, concurrent ones are conflicts.
    upsert(a, {"id": 3, "title": "a's title"})
    upsert(b, {"id": 3, "title": "b's title"})
    send(a, b, tmp_path / "a.bundle")
    send(b, a, tmp_path / "b.bundle")
    assert todo_rows(a) == todo_rows(b)
    assert len(conflicts(a)) == len(conflicts(b)) == 1
    # A third copy that meets everything agrees.
    c = make_todos_db(tmp_path / "c.db")
    send(a, c, tmp_path / "c.bundle")
    assert todo_rows(c) == todo_rows(a) and conflicts(c) == conflicts(a)


def test_recovery_moves_only_what_no_peer_acknowledged(tmp_path, conflicts, make_todos_db, run, todo_rows, upsert, refused, send, status):
    laptop = make_todos_db(tmp_path / "laptop.db", [{"id": 1, "title": "synced", "done": 0}])
    server = make_todos_db(tmp_path / "server.db")
    send(laptop, server, tmp_path / "up.bundle")
    send(server, laptop, tmp_path / "down.bundle")  # the laptop learns what the server holds
    old_id = status(laptop)["device_id"]
    acknowledged = status(laptop)["clock"][old_id]
    copy = tmp_path / "copy.db"
    shutil.copy(laptop, copy)
    upsert(laptop, {"id": 2, "title": "laptop, not synced", "done": 0})
    upsert(copy, {"id": 3, "title": "copy, not synced", "done": 0})
    send(laptop, server, tmp_path / "up.bundle")
    error = refused(copy, tmp_path / "up.bundle")  # the server's version reaches the copy
    assert RECOVER in error
    run(["sqlite-utils", "sync-new-device", "--recover", copy])
    # The acknowledged operations stay under the old id; the copy's own edit moved.
    assert status(copy)["clock"][old_id] == acknowledged
    send(server, copy, tmp_path / "down.bundle")
    send(copy, server, tmp_path / "copy.bundle")
    send(server, laptop, tmp_path / "down.bundle")
    assert todo_rows(laptop) == todo_rows(copy) == todo_rows(server) == [
        {"id": 1, "title": "synced", "done": 0},
        {"id": 2, "title": "laptop, not synced", "done": 0},
        {"id": 3, "title": "copy, not synced", "done": 0},
    ]
    assert conflicts(laptop) == conflicts(copy) == conflicts(server) == []


@pytest.fixture
def owned_hub(tmp_path, datasette_server, make_todos_db):
    hub_path = make_todos_db(tmp_path / "hub.db")
    server = datasette_server([hub_path], CONFIG)
    server.path = hub_path
    return server


def test_a_push_under_another_actors_device_is_refused(tmp_path, owned_hub, make_todos_db, run, todo_rows, upsert, cli_sync, status):
    hub = owned_hub
    alice, mallory = hub.token("alice"), hub.token("mallory")
    victim = make_todos_db(tmp_path / "victim.db", [{"id": 1, "title": "alice's", "done": 0}])
    cli_sync(victim, hub, alice)
    victim_id = status(victim)["device_id"]
    assert hub_owners(hub.path)[victim_id] == "alice"
    # Mallory writes the victim's next operation (from a copy of its file) and pushes it.
    forged = tmp_path / "forged.db"
    shutil.copy(victim, forged)
    upsert(forged, {"id": 1, "title": "mallory was here"})
    bundle = tmp_path / "forged.bundle"
    since = status(hub.path)["clock"]
    run(["sqlite-utils", "export-bundle", forged, bundle, "--since", __import__("json").dumps(since)])
    before = hub.path.read_bytes()
    response = push(hub, bundle, mallory)
    assert response.status_code == 403, response.text
    body = response.json()
    assert body["reason"] == "device_owned"
    assert body["error"].startswith(f"Bundle upload.bundle: it adds new operations of device {victim_id}, ")
    assert "sync-relay" in body["error"]
    assert hub.path.read_bytes() == before
    # Duplicates relay freely: Mallory may send what the hub holds already.
    full = tmp_path / "victim.bundle"
    run(["sqlite-utils", "export-bundle", victim, full])
    response = push(hub, full, mallory)
    assert response.status_code == 200, response.text
    assert response.json()["applied"] == 0 and response.json()["duplicates"] >= 1
    # Mallory's own device is hers; the victim's next edit reaches the hub.
    mine = make_todos_db(tmp_path / "mallory.db", [{"id": 9, "title": "mallory's own", "done": 0}])
    cli_sync(mine, hub, mallory)
    assert hub_owners(hub.path)[status(mine)["device_id"]] == "mallory"
    upsert(victim, {"id": 1, "title": "alice's edit"})
    cli_sync(victim, hub, alice)
    assert todo_rows(hub.path) == [{"id": 1, "title": "alice's edit", "done": 0}, {"id": 9, "title": "mallory's own", "done": 0}]
    # Through the CLI, the refusal is one line.
    upsert(mine, {"id": 9, "title": "edited"})
    result = run(["sqlite-utils", "sync", mine, hub.url + "/hub", "--token", alice], check=False)
    assert result.returncode == 1
    assert "(403): Bundle upload.bundle: it adds new operations of device" in result.stderr
    assert "sync-new-device --recover" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    # Who pushed which device is shown only to those who may export; an anonymous visitor of
    # the imports page does not learn who owns which device.
    anonymous = hub.get("/hub/-/sync/imports.json").json()["imports"]
    assert anonymous and {item["actor"] for item in anonymous} == {"(hidden)"}
    shown = hub.get("/hub/-/sync/imports.json", headers={"Authorization": f"Bearer {alice}"}).json()["imports"]
    assert {item["actor"] for item in shown} == {"alice", "mallory"}


def test_a_relay_pushes_others_devices_and_a_victim_of_a_forged_operation_recovers(tmp_path, owned_hub, conflicts, make_todos_db, run, todo_rows, upsert, cli_sync, status):
    hub = owned_hub
    alice, relay = hub.token("alice"), hub.token("relay")
    victim = make_todos_db(tmp_path / "victim.db", [{"id": 1, "title": "alice's", "done": 0}])
    cli_sync(victim, hub, alice)
    # A forged next operation of the victim's device gets in: a relay (sync-relay) may push
    # another actor's device's new operations.
    forged = tmp_path / "forged.db"
    shutil.copy(victim, forged)
    upsert(forged, {"id": 2, "title": "forged", "done": 0})
    bundle = tmp_path / "forged.bundle"
    run(["sqlite-utils", "export-bundle", forged, bundle])
    response = push(hub, bundle, relay)
    assert response.status_code == 200 and response.json()["applied"] >= 1, response.text
    assert hub_owners(hub.path)[status(victim)["device_id"]] == "alice"  # a relay claims nothing
    # The victim's own next edit: its sync now meets the forged operation.
    upsert(victim, {"id": 1, "title": "alice's edit"})
    before = victim.read_bytes()
    result = cli_sync(victim, hub, alice, check=False)
    assert result.returncode == 1
    assert RECOVER in result.stderr and len(result.stderr.splitlines()) == 1
    assert victim.read_bytes() == before
    run(["sqlite-utils", "sync-new-device", "--recover", victim])
    cli_sync(victim, hub, alice)
    expected = [{"id": 1, "title": "alice's edit", "done": 0}, {"id": 2, "title": "forged", "done": 0}]
    assert todo_rows(victim) == todo_rows(hub.path) == expected
    assert conflicts(victim) == conflicts(hub.path) == []
    assert hub_owners(hub.path)[status(victim)["device_id"]] == "alice"  # the new id is alice's too
    # And syncs normally from then on.
    upsert(victim, {"id": 3, "title": "later", "done": 0})
    cli_sync(victim, hub, alice)
    other = make_todos_db(tmp_path / "other.db")
    cli_sync(other, hub, alice)
    assert todo_rows(other) == todo_rows(victim) == todo_rows(hub.path)


def test_copied_database_is_detected_in_a_full_export(tmp_path, pair, file_bytes, run_cli, sync):
    a, b = pair
    sync(a, b, tmp_path)
    shutil.copy(tmp_path / "a.db", tmp_path / "copy.db")
    copy = sqlite3.connect(tmp_path / "copy.db", isolation_level=None)
    copy.execute("UPDATE todos SET title = 'edited on the copy' WHERE id = 2")
    a.execute("UPDATE todos SET title = 'edited on the original' WHERE id = 1")
    export_bundle(copy, tmp_path / "copy.bundle")  # everything, so the clash is among "duplicates"
    for receiver in ("a.db", "b.db"):
        if receiver == "b.db":
            sync(a, b, tmp_path)
        before = file_bytes(tmp_path / receiver)
        result = run_cli("import-bundle", tmp_path / receiver, tmp_path / "copy.bundle")
        assert result.exit_code == 1
        assert "differs from the copy here: two databases share that device id" in result.output
        assert file_bytes(tmp_path / receiver) == before


def test_copied_database_is_detected_and_can_get_a_new_identity(tmp_path, pair, make_db, run_cli, sync):
    a, b = pair
    sync(a, b, tmp_path)
    a.close()
    shutil.copy(tmp_path / "a.db", tmp_path / "copy.db")
    a = sqlite3.connect(tmp_path / "a.db", isolation_level=None)
    copy = sqlite3.connect(tmp_path / "copy.db", isolation_level=None)
    copy.execute("INSERT INTO todos VALUES (200, 'written on the copy', 0, 0)")
    a.execute("INSERT INTO todos VALUES (200, 'written on the original', 0, 0)")
    export_bundle(copy, tmp_path / "copy.bundle", since=sync_status(b)["clock"])
    import_bundle(b, tmp_path / "copy.bundle")
    with pytest.raises(BundleError, match="two databases share that device id") as error:
        sync(a, b, tmp_path)
    assert error.value.reason == "device_id_clash"

    fresh = tmp_path / "copy2.db"
    shutil.copy(tmp_path / "a.db", fresh)
    old_id = sync_status(a)["device_id"]
    result = run_cli("sync-new-device", fresh)
    new_id = result.output.strip()
    assert result.exit_code == 0 and len(new_id) == 32 and new_id != old_id
    copy2 = sqlite3.connect(fresh, isolation_level=None)
    assert sync_status(copy2)["device_id"] == new_id
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        copy2.execute("DELETE FROM _sync_ops")  # the log is still guarded after the move
    copy2.execute("INSERT INTO todos VALUES (300, 'copy2 edit', 0, 0)")
    c = make_db(tmp_path / "c.db")
    sync(a, c, tmp_path)
    sync(copy2, c, tmp_path)
    assert c.execute("SELECT title FROM todos WHERE id = 300").fetchone() == ("copy2 edit",)


def test_a_database_with_every_device_index_taken_refuses_a_new_device_in_one_line(tmp_path, make_db, refused):
    # Device indexes end below this database's own. Once the last one is taken (by a device
    # of an earlier bundle, say), another new device is refused with what is wrong, not with
    # "UNIQUE constraint failed: _sync_devices.idx" and advice to change a row of a table.
    phone = make_db(tmp_path / "phone.db")
    phone.execute("INSERT INTO todos VALUES (1, 'from a new device', 0, 0)")
    export_bundle(phone, tmp_path / "phone.bundle")
    full = make_db(tmp_path / "full.db")
    full.execute("INSERT INTO _sync_devices (idx, device_id) VALUES (?, ?)", [LOCAL - 1, "f" * 32])
    full.close()
    assert refused(tmp_path / "full.db", tmp_path / "phone.bundle").splitlines() == [
        "Error: This database has numbered 4,194,302 devices, as many as it can: it cannot take operations of another one"
    ]
    with pytest.raises(SyncError) as error:
        import_bundle(sqlite3.connect(tmp_path / "full.db", isolation_level=None), tmp_path / "phone.bundle")
    assert error.value.reason == "too_many_devices"


def test_a_hub_restored_from_a_backup_recovers_with_the_command_the_error_names(tmp_path, datasette_server, make_todos_db, run, todo_rows, cli_sync):
    """A hub's file restored from last night's backup is behind operations it wrote itself
    since (its knowledge ticks), which devices pulled and push back. It refuses them, naming
    the command to run on it; after that every edit syncs, the backup's missing ones included."""
    hub_path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "before the backup", "done": 0}])
    server = datasette_server([hub_path], CONFIG)
    token = server.token("alice")
    laptop = tmp_path / "laptop.db"
    cli_sync(laptop, server, token)
    shutil.copyfile(hub_path, tmp_path / "backup.db")
    run(["sqlite-utils", "insert", laptop, "todos", "-", "--pk", "id"], input='{"id": 2, "title": "after the backup", "done": 0}')
    cli_sync(laptop, server, token)  # the hub writes a tick under its own id: the backup lacks it
    server.proc.terminate()
    server.proc.wait()
    shutil.copyfile(tmp_path / "backup.db", hub_path)

    server = datasette_server([hub_path], CONFIG)
    refused = cli_sync(laptop, server, token, check=False)
    assert refused.returncode == 1 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "past the last one database hub.db holds" in refused.stderr and "hub.db restored from an older backup" in refused.stderr
    assert RECOVER + " on database hub.db (stop a hub serving it first)" in refused.stderr
    server.proc.terminate()
    server.proc.wait()

    run(["sqlite-utils", "sync-new-device", hub_path, "--recover"])
    server = datasette_server([hub_path], CONFIG)
    cli_sync(laptop, server, token)
    phone = tmp_path / "phone.db"
    cli_sync(phone, server, token)
    titles = ["before the backup", "after the backup"]
    assert [row["title"] for row in todo_rows(hub_path)] == titles
    assert [row["title"] for row in todo_rows(phone)] == titles
    assert [row["title"] for row in todo_rows(laptop)] == titles
