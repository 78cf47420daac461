"""Device names (issue 12, item 1): set with sync-name or enable-sync --name, shown by
sync-status, carried in bundles to every copy and hub, accepted wherever a device id is."""

from __future__ import annotations

import json
import shutil
import sqlite3

import pytest

from sqlite_utils_sync import import_bundle


def status(run_json, path) -> dict:
    return run_json(["sqlite-utils", "sync-status", path, "--json"])


def exchange(run, source, target, tmp_path, name="x.bundle") -> None:
    bundle = tmp_path / name
    run(["sqlite-utils", "export-bundle", source, bundle])
    run(["sqlite-utils", "import-bundle", target, bundle])


@pytest.fixture
def laptop_and_phone(tmp_path, make_todos_db, run):
    """laptop.db named laptop at enable-sync; phone.db a copy with its own id, named phone."""
    laptop = make_todos_db(tmp_path / "laptop.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    run(["sqlite-utils", "enable-sync", laptop, "todos", "--name", "laptop"])
    phone = tmp_path / "phone.db"
    shutil.copy(laptop, phone)
    run(["sqlite-utils", "sync-new-device", phone])
    run(["sqlite-utils", "sync-name", phone, "phone"])
    return laptop, phone


def test_names_show_in_status_and_reach_every_copy(tmp_path, laptop_and_phone, run, run_json):
    laptop, phone = laptop_and_phone
    laptop_id, phone_id = status(run_json, laptop)["device_id"], status(run_json, phone)["device_id"]
    assert status(run_json, laptop)["device_name"] == "laptop"
    assert status(run_json, phone)["device_name"] == "phone"
    assert f"Device: {phone_id} (phone)" in run(["sqlite-utils", "sync-status", phone]).stdout
    # phone -> laptop -> desktop: desktop never met phone, but learns its name by relay.
    exchange(run, phone, laptop, tmp_path)
    desktop = tmp_path / "desktop.db"
    shutil.copy(laptop, desktop)
    run(["sqlite-utils", "sync-new-device", desktop])
    exchange(run, laptop, desktop, tmp_path, "y.bundle")
    exchange(run, laptop, phone, tmp_path, "z.bundle")
    for path in (laptop, phone, desktop):
        assert dict(_names(run, path)) == {laptop_id: "laptop", phone_id: "phone"}
    assert status(run_json, desktop)["device_name"] is None  # a copy does not take the original's name


def _names(run, path) -> list[tuple[str, str]]:
    out = run(["sqlite-utils", "query", path, "select device_id, name from _sync_device_names"]).stdout
    return [(row["device_id"], row["name"]) for row in json.loads(out)]


def test_a_newer_name_wins_and_an_older_record_does_not_undo_it(tmp_path, laptop_and_phone, run, run_json):
    laptop, phone = laptop_and_phone
    phone_id = status(run_json, phone)["device_id"]
    old = tmp_path / "old.bundle"
    run(["sqlite-utils", "export-bundle", phone, old])
    run(["sqlite-utils", "sync-name", phone, "work phone"])
    exchange(run, phone, laptop, tmp_path)
    run(["sqlite-utils", "import-bundle", laptop, old])  # the older record arrives last
    assert dict(_names(run, laptop))[phone_id] == "work phone"
    # Only the device itself names itself: laptop relays phone's name, it cannot set it.
    exchange(run, laptop, phone, tmp_path, "back.bundle")
    assert status(run_json, phone)["device_name"] == "work phone"


def test_export_for_takes_a_name(tmp_path, laptop_and_phone, run, run_json, upsert):
    laptop, phone = laptop_and_phone
    exchange(run, phone, laptop, tmp_path)
    exchange(run, laptop, phone, tmp_path, "back.bundle")
    upsert(laptop, {"id": 2, "title": "Walk dog", "done": 0})
    by_name = run_json(["sqlite-utils", "export-bundle", laptop, tmp_path / "n.bundle", "--for", "phone", "--json"])
    phone_id = status(run_json, phone)["device_id"]
    by_id = run_json(["sqlite-utils", "export-bundle", laptop, tmp_path / "i.bundle", "--for", phone_id, "--json"])
    assert by_name["operations"] == by_id["operations"] == 1
    by_prefix = run_json(["sqlite-utils", "export-bundle", laptop, tmp_path / "p.bundle", "--for", phone_id[:8], "--json"])
    assert by_prefix["operations"] == 1


def test_an_ambiguous_or_unknown_name_is_refused_listing_the_ids(tmp_path, laptop_and_phone, run, run_json):
    laptop, phone = laptop_and_phone
    other = tmp_path / "other.db"
    shutil.copy(phone, other)
    run(["sqlite-utils", "sync-new-device", other])
    run(["sqlite-utils", "sync-name", other, "phone"])
    exchange(run, phone, laptop, tmp_path)
    exchange(run, other, laptop, tmp_path, "o.bundle")
    ids = sorted(status(run_json, p)["device_id"] for p in (phone, other))
    result = run(["sqlite-utils", "export-bundle", laptop, tmp_path / "a.bundle", "--for", "phone"], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip() == (
        f"Error: Device name 'phone' is ambiguous: it names {ids[0]}, {ids[1]}; use the device id"
    )
    result = run(["sqlite-utils", "sync-retire", laptop, "tablet"], check=False)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "No device here is named 'tablet'" in result.stderr and "laptop (" in result.stderr
    assert not (tmp_path / "a.bundle").exists()


@pytest.mark.parametrize(
    "name, problem",
    [
        ("", "non-empty"),
        ("x" * 65, "at most 64 characters"),
        ("tab\there", "printable"),
        (" padded", "leading or trailing"),
        ("0123456789abcdef0123456789abcdef", "must not look like a device id"),
    ],
)
def test_bad_names_are_one_line_and_change_nothing(tmp_path, laptop_and_phone, run, file_bytes, name, problem):
    laptop, _ = laptop_and_phone
    before = file_bytes(laptop)
    result = run(["sqlite-utils", "sync-name", laptop, name], check=False)
    assert result.returncode == 1 and problem in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert file_bytes(laptop) == before


@pytest.mark.parametrize(
    "records",
    [
        {"0" * 32: ["x" * 65, 1]},
        {"0" * 32: ["ok", -1]},
        {"not a device": ["ok", 1]},
        {"0" * 32: "ok"},
        ["ok"],
    ],
)
def test_a_bundle_with_bad_name_records_is_refused(tmp_path, laptop_and_phone, run, craft, file_bytes, records):
    laptop, phone = laptop_and_phone
    bundle = tmp_path / "x.bundle"
    run(["sqlite-utils", "export-bundle", phone, bundle])

    def tamper(conn):
        craft.edit_header(conn, lambda header: header.__setitem__("device_names", records))
        craft.reseal(conn)

    craft.rewrite(bundle, tamper)
    before = file_bytes(laptop)
    result = run(["sqlite-utils", "import-bundle", laptop, bundle], check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: Bundle x.bundle: device names are invalid"
    assert file_bytes(laptop) == before


def test_the_hub_shows_names_and_filters_by_name(tmp_path, laptop_and_phone, datasette_server, hub_config, make_todos_db, hub_sync, run_json):
    laptop, phone = laptop_and_phone
    hub_path = make_todos_db(tmp_path / "hub.db")
    server = datasette_server([hub_path], hub_config)
    token = server.token("alice")
    hub_sync(laptop, server, token)
    hub_sync(phone, server, token)
    laptop_id, phone_id = status(run_json, laptop)["device_id"], status(run_json, phone)["device_id"]
    clocks = server.get("/hub/-/sync/clocks", headers={"Authorization": f"Bearer {token}"})
    assert clocks.status_code == 200
    assert f"laptop ({laptop_id[:8]})" in clocks.text and f"phone ({phone_id[:8]})" in clocks.text
    listed = server.get("/hub/-/sync/clocks.json", headers={"Authorization": f"Bearer {token}"}).json()["devices"]
    assert {d["device_id"]: d["name"] for d in listed if d["name"]} == {laptop_id: "laptop", phone_id: "phone"}
    overview = server.get("/hub/-/sync", headers={"Authorization": f"Bearer {token}"})
    assert f"phone ({phone_id})" in overview.text
    ops = server.get("/hub/-/sync/operations.json?device=phone", headers={"Authorization": f"Bearer {token}"})
    assert ops.status_code == 200
    assert ops.json()["operations"] and {op["device_id"] for op in ops.json()["operations"]} == {phone_id}
    page = server.get("/hub/-/sync/operations?device=phone", headers={"Authorization": f"Bearer {token}"})
    assert f'value="{phone_id}" selected' in page.text
    unknown = server.get("/hub/-/sync/operations?device=tablet", headers={"Authorization": f"Bearer {token}"})
    assert unknown.status_code == 400 and "No device here is named" in unknown.text


def test_a_hub_takes_only_the_pushing_devices_own_name(tmp_path, laptop_and_phone, make_todos_db, run, run_json):
    """As the hub's import endpoint imports a push from an actor without sync-relay: names
    relayed for other devices are not taken (only a device names itself)."""
    laptop, phone = laptop_and_phone
    exchange(run, laptop, phone, tmp_path)  # phone now holds laptop's name record too
    bundle = tmp_path / "push.bundle"
    run(["sqlite-utils", "export-bundle", phone, bundle])
    hub = make_todos_db(tmp_path / "hub.db")
    conn = sqlite3.connect(hub)
    import_bundle(conn, str(bundle), actor="alice", may_relay=False)
    conn.commit()
    conn.close()
    assert dict(_names(run, hub)) == {status(run_json, phone)["device_id"]: "phone"}


def test_sync_conflicts_names_the_device_of_each_version(tmp_path, laptop_and_phone, run, upsert):
    laptop, phone = laptop_and_phone
    exchange(run, laptop, phone, tmp_path)
    upsert(laptop, {"id": 1, "title": "Buy oat milk", "done": 0})
    upsert(phone, {"id": 1, "title": "Buy soy milk", "done": 0})
    exchange(run, phone, laptop, tmp_path, "y.bundle")
    lines = run(["sqlite-utils", "sync-conflicts", laptop]).stdout.splitlines()
    versions = [line for line in lines if line.startswith("    ") and "now:" not in line]
    assert len(versions) == 2
    assert any("(laptop)" in line and "Buy oat milk" in line for line in versions)
    assert any("(phone)" in line and "Buy soy milk" in line for line in versions)
