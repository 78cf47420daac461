"""Clocks a receiver refuses: past the valid range, or too far ahead of its own wall clock.

An accepted clock becomes the floor of every later clock on the receiver, so one far-future
clock pushed to a hub would otherwise spread to every copy (or, at the top of the range, make
the hub's own next operation invalid and every pull from it fail). Bundles are crafted as a
hostile sender would: edited and re-signed with a valid hash.
"""

from __future__ import annotations

import json
import time

import pytest
import sqlite_utils

from sqlite_utils_sync import import_bundle
from sqlite_utils_sync.errors import SyncError


DAY = 86400


def hlc_in(days: float) -> int:
    """The clock a device whose wall clock is ``days`` ahead gives an operation now."""
    return int((time.time() + days * DAY) * 1000) * 1024


@pytest.fixture(scope="session")
def crafted(craft, make_todos_db, run, run_json):
    """A re-signed one-row bundle from a new device whose operations (``kinds``) carry ``clock``."""

    def crafted(tmp_path, clock: int, name: str = "crafted.bundle", kinds: str = "kind != 3") -> tuple:
        source = make_todos_db(tmp_path / f"{name}.db", [{"id": 7, "title": "from the future", "done": 0}])
        bundle = tmp_path / name
        run(["sqlite-utils", "export-bundle", source, bundle])

        def tamper(conn):
            craft.edit_chunks(conn, f"UPDATE ops SET hlc = ? WHERE {kinds}", clock, first_only=False)
            craft.reseal(conn)

        craft.rewrite(bundle, tamper)
        device = run_json(["sqlite-utils", "sync-status", source, "--json"])["device_id"]
        return bundle, device

    return crafted


def post(server, bundle, token):
    return server.post(
        "/hub/-/sync/import",
        content=bundle.read_bytes(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/vnd.sqlite3"},
    )


def alice_token(server):
    return server.token("alice")


@pytest.mark.parametrize(
    "clock, reason, text",
    [
        (1 << 62, "invalid_operation", "has a clock out of range"),
        (hlc_in(30), "clock_ahead", "has a clock 30.0 days ahead of this machine's clock"),
    ],
    ids=["out-of-range", "30-days-ahead"],  # stable names: the clock is read when tests are collected
)
def test_a_hub_refuses_a_far_future_clock_and_keeps_serving_pulls(tmp_path, datasette_server, clock, reason, text, hub_config, hub_sync, make_todos_db, todo_rows, upsert, crafted):
    hub_path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "kept", "done": 0}])
    server = datasette_server([hub_path], hub_config)
    token = alice_token(server)
    bundle, device = crafted(tmp_path, clock)
    before = hub_path.read_bytes()
    response = post(server, bundle, token)
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["reason"] == reason
    assert body["error"].startswith("Bundle upload.bundle: operation " + device + ":1 " + text), body
    assert "\n" not in body["error"]
    assert hub_path.read_bytes() == before
    # Pulls and pushes go on as before.
    device_db = make_todos_db(tmp_path / "device.db")
    hub_sync(device_db, server, token)
    upsert(device_db, {"id": 2, "title": "new", "done": 0})
    hub_sync(device_db, server, token)
    assert todo_rows(device_db) == todo_rows(hub_path) == [{"id": 1, "title": "kept", "done": 0}, {"id": 2, "title": "new", "done": 0}]


def test_a_hub_accepts_clocks_within_its_configured_bound(tmp_path, datasette_server, hub_config, make_todos_db, run, todo_rows, crafted):
    hub_path = make_todos_db(tmp_path / "hub.db")
    config = hub_config
    config["plugins"] = {"datasette-sync": {"max_clock_skew": "60d"}}
    server = datasette_server([hub_path], config)
    token = alice_token(server)
    bundle, _ = crafted(tmp_path, hlc_in(30))
    response = post(server, bundle, token)
    assert response.status_code == 200, response.text
    assert response.json()["applied"] >= 1
    # Still never past the valid range, whatever the bound.
    top, _ = crafted(tmp_path, 1 << 62, "top.bundle")
    assert post(server, top, token).json()["reason"] == "invalid_operation"
    # The hub serves pulls; a client takes the clocks with a bound as wide as the hub's.
    device = make_todos_db(tmp_path / "device.db")
    args = ["sqlite-utils", "sync", device, server.url + "/hub", "--token", token]
    refused = run(args, check=False)
    assert refused.returncode == 1
    assert "days ahead of this machine's clock" in refused.stderr and "Traceback" not in refused.stderr
    run([*args, "--max-clock-skew", "60d"])
    assert todo_rows(device) == todo_rows(hub_path) == [{"id": 7, "title": "from the future", "done": 0}]


def test_a_hub_with_an_invalid_setting_refuses_to_start_with_one_line(tmp_path, hub_config, make_todos_db, run):
    hub_path = make_todos_db(tmp_path / "hub.db")
    for setting, value, message in (
        ("max_clock_skew", "a week", "max_clock_skew (datasette-sync plugin config) must be a duration like 90s, 36h or 7d"),
        ("max_bundle_bytes", "lots", "max_bundle_bytes (datasette-sync plugin config) must be a positive whole number"),
    ):
        config = hub_config
        config["plugins"] = {"datasette-sync": {setting: value}}
        config_path = tmp_path / "bad.json"
        config_path.write_text(json.dumps(config))
        result = run(["datasette", "serve", hub_path, "-c", config_path, "--get", "/-/versions.json"], check=False)
        assert result.returncode == 1, result
        assert result.stderr.startswith("Error: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_the_cli_refuses_a_clock_too_far_ahead_unless_the_bound_allows_it(tmp_path, make_todos_db, run, todo_rows, upsert, crafted):
    target = make_todos_db(tmp_path / "target.db", [{"id": 1, "title": "kept", "done": 0}])
    bundle, device = crafted(tmp_path, hlc_in(30))
    before = target.read_bytes()
    result = run(["sqlite-utils", "import-bundle", target, bundle], check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: Bundle crafted.bundle: operation {device}:1 has a clock 30.0 days ahead")
    assert "max_clock_skew allows (7 days)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert target.read_bytes() == before
    run(["sqlite-utils", "import-bundle", target, bundle, "--max-clock-skew", "31d"])
    # The receiver still writes, and a copy that accepts the same bound takes its edits.
    upsert(target, {"id": 1, "title": "edited after", "done": 1})
    run(["sqlite-utils", "export-bundle", target, tmp_path / "after.bundle"])
    other = make_todos_db(tmp_path / "other.db")
    run(["sqlite-utils", "import-bundle", other, tmp_path / "after.bundle", "--max-clock-skew", "31d"])
    assert todo_rows(other) == todo_rows(target) == [
        {"id": 1, "title": "edited after", "done": 1},
        {"id": 7, "title": "from the future", "done": 0},
    ]


def test_the_top_of_the_range_is_refused_whatever_the_bound(tmp_path, make_todos_db, run, crafted):
    target = make_todos_db(tmp_path / "target.db")
    bundle, device = crafted(tmp_path, 1 << 62)
    before = target.read_bytes()
    result = run(["sqlite-utils", "import-bundle", target, bundle, "--max-clock-skew", "36500d"], check=False)
    assert result.returncode == 1
    assert f"operation {device}:1 has a clock out of range" in result.stderr
    assert target.read_bytes() == before


def test_knowledge_ticks_are_bounded_too(tmp_path, craft, make_todos_db, run):
    # A tick's clock is a clock like any other: a relay's bundle carries the relay's ticks.
    source = make_todos_db(tmp_path / "source.db", [{"id": 1, "title": "a", "done": 0}])
    relay = make_todos_db(tmp_path / "relay.db")
    run(["sqlite-utils", "export-bundle", source, tmp_path / "s.bundle"])
    run(["sqlite-utils", "import-bundle", relay, tmp_path / "s.bundle"])  # the relay writes a tick
    bundle = tmp_path / "r.bundle"
    run(["sqlite-utils", "export-bundle", relay, bundle])

    def tamper(conn):
        craft.edit_chunks(conn, "UPDATE ops SET hlc = ? WHERE kind = 3", hlc_in(30), first_only=False)
        craft.reseal(conn)

    craft.rewrite(bundle, tamper)
    target = make_todos_db(tmp_path / "target.db")
    before = target.read_bytes()
    result = run(["sqlite-utils", "import-bundle", target, bundle], check=False)
    assert result.returncode == 1 and "days ahead of this machine's clock" in result.stderr, result.stderr
    assert target.read_bytes() == before


def test_the_python_api_takes_the_bound(tmp_path, make_todos_db, crafted):
    target = make_todos_db(tmp_path / "target.db")
    bundle, _ = crafted(tmp_path, hlc_in(3))
    db = sqlite_utils.Database(target)
    with pytest.raises(SyncError) as refused:
        import_bundle(db, bundle, max_clock_skew="1d")
    assert refused.value.reason == "clock_ahead"
    with pytest.raises(SyncError) as invalid:
        import_bundle(db, bundle, max_clock_skew="soon")
    assert invalid.value.reason == "invalid_argument"
    assert import_bundle(db, bundle).applied >= 1  # the default bound (7 days) takes 3 days fast
