"""Cluster retention with real ``nats-server`` and ``datasette serve`` processes: a hub gone
for good stops holding the stream back (``forget_after``), and comes back through the
snapshot; a snapshot carries the device claims; a hub stops cleanly on SIGINT/SIGTERM.

The fixtures and helpers are tests/test_cluster.py's (one JetStream node is enough here).
"""

from __future__ import annotations

import shutil
import signal

import pytest
import sqlite_utils

from nats_cluster import wait_for
from sqlite_utils_sync import export_bundle, sync_status, sync_with_hub
from test_cluster import NATS_SERVER, STREAM, alice_token, cluster_config, nats_server, start_hub, todos_db  # noqa: F401

pytestmark = pytest.mark.skipif(not shutil.which(NATS_SERVER), reason="nats-server is not installed")
pytest.importorskip("nats")


def consumers(server) -> set[str]:
    async def names(js):
        return {info.name for info in await js.consumers_info(STREAM)}

    return server.ask(names)


def push(path, hub, *rows: dict) -> None:
    """Write ``rows`` into the device's todos and sync it with ``hub`` as alice, in this process
    (a CLI process per sync would double this file's time)."""
    db = sqlite_utils.Database(path)
    try:
        db["todos"].upsert_all(rows, pk="id")
        sync_with_hub(db, hub.url + "/hub", token=alice_token())
    finally:
        db.close()


def stream_state(server):
    async def state(js):
        return (await js.stream_info(STREAM)).state

    return server.ask(state)


# How ``datasette serve`` without cluster mode exits once uvicorn has shut down gracefully:
# uvicorn re-raises the signal it caught, so SIGTERM ends the process by SIGTERM and SIGINT
# raises KeyboardInterrupt, which click reports as "Aborted!" (exit 1).
EXIT_CODES = {signal.SIGINT: (0, 1), signal.SIGTERM: (0, -signal.SIGTERM)}


def stop_cleanly(hub, sig=signal.SIGTERM) -> None:
    """Stop a hub as Datasette is stopped; it must go as without cluster mode: a graceful
    shutdown, the usual exit code, no traceback and no task left pending."""
    hub.proc.send_signal(sig)
    code = hub.proc.wait(timeout=30)
    output = hub.output()
    assert code in EXIT_CODES[sig], output
    assert "Application shutdown complete" in output and "Finished server process" in output, output
    assert "Traceback" not in output and "Task was destroyed" not in output, output


def test_a_hub_gone_for_good_is_forgotten_and_catches_up_from_the_snapshot_when_it_returns(
    tmp_path, nats_server, start_hub, datasette_server, hub_config, todo_rows
):
    server = nats_server()
    # forget_after is each hub's own consumer's: b's is short, a's long (a keeps pulling anyway).
    a = start_hub(server, "a", snapshot_every=3, forget_after=600)
    b = start_hub(server, "b", snapshot_every=3, forget_after=2)
    phone = todos_db(tmp_path / "phone.db")
    push(phone, a, {"id": 1, "title": "One", "done": 0})
    wait_for(lambda: todo_rows(b.path) == todo_rows(phone), what="hub b to import the push to hub a")
    # The last push b takes before it stops for longer than forget_after.
    push(phone, b, {"id": 2, "title": "Pushed to b", "done": 0})
    stop_cleanly(b, signal.SIGTERM)

    wait_for(lambda: "b_hub" not in consumers(server), timeout=30, what="the server to forget hub b's consumer")
    held_back = stream_state(server).last_seq  # b's ack floor is at most this
    for i in (3, 4):  # two pushes and a's two knowledge ticks: a snapshot is due
        push(phone, a, {"id": i, "title": f"Pushed to a {i}", "done": 0})
    expected = todo_rows(phone)
    wait_for(lambda: todo_rows(a.path) == expected, what="hub a to hold every push")
    # b no longer holds retention back: a purged past everything b had acknowledged.
    wait_for(lambda: stream_state(server).first_seq > held_back + 1, what="hub a to purge past hub b's floor")

    config = cluster_config(hub_config, server.url, "b", snapshot_every=3, forget_after=2)
    path, b = b.path, datasette_server([b.path], config)
    wait_for(lambda: todo_rows(path) == expected, what="hub b to catch up from the snapshot", show=b.output)
    assert "b_hub" in consumers(server)
    # It consumes after the snapshot like any hub: a new push to a reaches it.
    push(phone, a, {"id": 5, "title": "After b came back", "done": 0})
    expected = todo_rows(phone)
    wait_for(lambda: todo_rows(path) == expected, what="a push to hub a to reach hub b again", show=b.output)


def test_a_hub_joining_from_the_snapshot_keeps_the_device_claims_made_elsewhere(
    tmp_path, nats_server, start_hub, hub_config, todo_rows
):
    permissions = hub_config["databases"]["hub"]["permissions"]
    for action in ("sync-import", "insert-row", "update-row"):
        permissions[action]["id"] = [*permissions[action]["id"], "bob"]
    server = nats_server()
    a = start_hub(server, "a", snapshot_every=3)
    phone = todos_db(tmp_path / "phone.db")
    push(phone, a, {"id": 1, "title": "Buy milk", "done": 0})  # alice (no sync-relay) now owns the phone
    for i, name in ((2, "laptop"), (3, "tablet")):  # other devices' pushes: a snapshots, purges the phone's
        push(todos_db(tmp_path / f"{name}.db"), a, {"id": i, "title": name, "done": 0})
    wait_for(lambda: stream_state(server).first_seq > 1, what="hub a to snapshot and purge the phone's push")

    c = start_hub(server, "c")
    expected = todo_rows(a.path)
    wait_for(lambda: todo_rows(c.path) == expected, what="hub c to join from the snapshot")
    # Bob pushes new operations of alice's phone to hub C: refused there as on hub A.
    shutil.copy(phone, tmp_path / "stolen.db")
    stolen = sqlite_utils.Database(tmp_path / "stolen.db")
    stolen["todos"].insert({"id": 2, "title": "Not yours", "done": 0})
    bundle = tmp_path / "stolen.bundle"
    export_bundle(stolen, bundle, since=sync_status(sqlite_utils.Database(c.path))["clock"])
    answer = c.post("/hub/-/sync/import", content=bundle.read_bytes(), headers={"Authorization": f"Bearer {alice_token('bob')}"})
    assert (answer.status_code, answer.json().get("reason")) == (403, "device_owned"), answer.text
    assert todo_rows(c.path) == expected
    stop_cleanly(c, signal.SIGINT)  # (SIGTERM: the test above)


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "7d"])
def test_forget_after_must_be_whole_seconds(value):
    from datasette_sync.cluster import parse_settings

    with pytest.raises(ValueError) as caught:
        parse_settings({"servers": ["nats://127.0.0.1:4222"], "hub": "a", "forget_after": value})
    assert str(caught.value) == f"cluster forget_after must be a whole number at least 1, got {value!r}"


def test_forget_after_defaults_to_a_week():
    from datasette_sync.cluster import parse_settings

    assert parse_settings({"servers": ["nats://127.0.0.1:4222"], "hub": "a"}).forget_after == 7 * 24 * 3600
