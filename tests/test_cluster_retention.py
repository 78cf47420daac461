"""Cluster retention with real ``nats-server`` and ``datasette serve`` processes (harness
tests/nats_cluster.py, one JetStream node): a hub gone for good stops holding the stream back
(``forget_after``) and catches up through the snapshot when it returns; a snapshot carries
the device claims; a hub stops cleanly on SIGINT and SIGTERM.
"""

from __future__ import annotations

import signal
import sqlite3

import httpx
import pytest
import sqlite_utils

from nats_cluster import Cluster, Hub, actor_token, cluster_config, missing, wait_for
from sqlite_utils_sync import enable_sync, export_bundle, sync_status, sync_with_hub

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

STREAM = "datasette-sync"


@pytest.fixture
def nats(tmp_path):
    """One JetStream node, stopped at teardown."""
    node = Cluster(tmp_path / "nats", 1).start()
    yield node
    node.stop()


@pytest.fixture
def hub(tmp_path, hub_config, nats):
    """``hub(name, **cluster_settings)``: a started hub serving its own empty synced ``hub.db``
    (``hub(name, path=...)`` serves that file again); stopped at teardown."""
    started: list[Hub] = []

    def start(name: str, path=None, **settings) -> Hub:
        if path is None:
            (tmp_path / name).mkdir()
            path = todos_db(tmp_path / name / "hub.db")
        started.append(Hub(path, cluster_config(hub_config, nats.urls, name, **settings), name).start())
        return started[-1]

    yield start
    for each in started:
        each.stop()


def todos_db(path):
    db = sqlite_utils.Database(path)
    db["todos"].create({"id": int, "title": str, "done": int}, pk="id")
    enable_sync(db, ["todos"])
    db.close()
    return path



def cluster_values(path) -> dict:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT key, value FROM _sync_cluster"))
    finally:
        conn.close()


def push(path, hub: Hub, *rows: dict) -> None:
    """Write ``rows`` into the device's todos and sync it with ``hub`` as alice, in this process
    (a CLI process per sync would double this file's time)."""
    db = sqlite_utils.Database(path)
    try:
        db["todos"].upsert_all(rows, pk="id")
        sync_with_hub(db, hub.db_url, token=actor_token())
    finally:
        db.close()


# How ``datasette serve`` without cluster mode exits once uvicorn has shut down gracefully:
# uvicorn re-raises the signal it caught, so SIGTERM ends the process by SIGTERM and SIGINT
# raises KeyboardInterrupt, which click reports as "Aborted!" (exit 1).
EXIT_CODES = {signal.SIGINT: (0, 1), signal.SIGTERM: (0, -signal.SIGTERM)}


def stop_cleanly(hub, sig=signal.SIGTERM) -> None:
    """Stop a hub as Datasette is stopped; it must go as without cluster mode: a graceful
    shutdown, the usual exit code, no traceback and no task left pending."""
    hub.proc.send_signal(sig)
    code = hub.proc.wait(timeout=30)
    output = hub.log()
    assert code in EXIT_CODES[sig], output
    assert "Application shutdown complete" in output and "Finished server process" in output, output
    assert "Traceback" not in output and "Task was destroyed" not in output, output


def test_a_hub_gone_for_good_is_forgotten_and_catches_up_from_the_snapshot_when_it_returns(tmp_path, nats, hub, todo_rows):
    # forget_after is each hub's own consumer's: b's is short, a's long (a keeps pulling anyway).
    a = hub("a", snapshot_every=3, forget_after=600)
    b = hub("b", snapshot_every=3, forget_after=2)
    phone = todos_db(tmp_path / "phone.db")
    push(phone, a, {"id": 1, "title": "One", "done": 0})
    wait_for(lambda: todo_rows(b.path) == todo_rows(phone), what="hub b to import the push to hub a")
    # The last push b takes before it stops for longer than forget_after.
    push(phone, b, {"id": 2, "title": "Pushed to b", "done": 0})
    stop_cleanly(b, signal.SIGTERM)

    wait_for(lambda: "b_hub" not in nats.consumers(STREAM), timeout=30, what="the server to forget hub b's consumer")
    held_back = nats.stream_state(STREAM).last_seq  # b's ack floor is at most this
    for i in (3, 4):  # two pushes and a's two knowledge ticks: a snapshot is due
        push(phone, a, {"id": i, "title": f"Pushed to a {i}", "done": 0})
    expected = todo_rows(phone)
    wait_for(lambda: todo_rows(a.path) == expected, what="hub a to hold every push")
    # b no longer holds retention back: a purged past everything b had acknowledged.
    wait_for(lambda: nats.stream_state(STREAM).first_seq > held_back + 1, what="hub a to purge past hub b's floor")

    b.start()  # same file, same settings: no consumer any more, the messages it lacks purged
    wait_for(lambda: todo_rows(b.path) == expected, what="hub b to catch up from the snapshot", show=b.log)
    assert "b_hub" in nats.consumers(STREAM)
    # It consumes after the snapshot like any hub: a new push to a reaches it.
    push(phone, a, {"id": 5, "title": "After b came back", "done": 0})
    expected = todo_rows(phone)
    wait_for(lambda: todo_rows(b.path) == expected, what="a push to hub a to reach hub b again", show=b.log)


def test_a_hub_joining_from_the_snapshot_keeps_the_device_claims_made_elsewhere(tmp_path, nats, hub, hub_config, todo_rows):
    permissions = hub_config["databases"]["hub"]["permissions"]
    for action in ("sync-import", "insert-row", "update-row"):
        permissions[action]["id"] = [*permissions[action]["id"], "bob"]
    a = hub("a", snapshot_every=3)
    phone = todos_db(tmp_path / "phone.db")
    push(phone, a, {"id": 1, "title": "Buy milk", "done": 0})  # alice (no sync-relay) now owns the phone
    for i, name in ((2, "laptop"), (3, "tablet")):  # other devices' pushes: a snapshots, purges the phone's
        push(todos_db(tmp_path / f"{name}.db"), a, {"id": i, "title": name, "done": 0})
    wait_for(lambda: nats.stream_state(STREAM).first_seq > 1, what="hub a to snapshot and purge the phone's push")

    c = hub("c")
    expected = todo_rows(a.path)
    wait_for(lambda: todo_rows(c.path) == expected, what="hub c to join from the snapshot")
    # The join is committed whole (joined, nothing due), not rolled back by the next write.
    joined = lambda: cluster_values(c.path).get("joined") == 1 and "snapshot_due" not in cluster_values(c.path)  # noqa: E731
    wait_for(joined, what="hub c to record its join")
    assert "cannot start a transaction" not in c.log()
    # Bob pushes new operations of alice's phone to hub C: refused there as on hub A.
    stolen = sqlite_utils.Database(phone)
    stolen["todos"].insert({"id": 4, "title": "Not yours", "done": 0})
    bundle = tmp_path / "stolen.bundle"
    export_bundle(stolen, bundle, since=sync_status(sqlite_utils.Database(c.path))["clock"])
    headers = {"Authorization": f"Bearer {actor_token('bob')}"}
    answer = httpx.post(c.db_url + "/-/sync/import", content=bundle.read_bytes(), headers=headers, timeout=30)
    assert (answer.status_code, answer.json().get("reason")) == (403, "device_owned"), answer.text
    assert todo_rows(c.path) == expected
    stop_cleanly(c, signal.SIGINT)  # (SIGTERM: the test above)


def test_a_consumer_made_before_forget_after_existed_gets_it_when_the_hub_starts(tmp_path, nats, hub, todo_rows):
    from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

    async def made_before(js):  # the stream and consumer as a hub of the previous version made them
        await js.add_stream(StreamConfig(name=STREAM, subjects=[f"{STREAM}.>"], duplicate_window=120))
        config = ConsumerConfig(
            durable_name="a_hub", filter_subject=f"{STREAM}.hub.bundles", ack_policy=AckPolicy.EXPLICIT,
            ack_wait=20, max_ack_pending=1000,
        )
        await js.add_consumer(STREAM, config)

    async def threshold(js):
        return (await js.consumer_info(STREAM, "a_hub")).config.inactive_threshold

    nats.ask(made_before)
    assert nats.ask(threshold) is None
    a = hub("a")  # default forget_after
    wait_for(lambda: nats.ask(threshold) == 7 * 24 * 3600, timeout=20, what="the hub to set forget_after on its consumer")
    phone = todos_db(tmp_path / "phone.db")
    push(phone, a, {"id": 1, "title": "One", "done": 0})
    assert todo_rows(a.path) == todo_rows(phone)
    assert "forget_after not set" not in a.log()


@pytest.mark.parametrize("value", [0, -5, 1.5, True, "7d"])
def test_forget_after_must_be_whole_seconds(value):
    from datasette_sync.cluster import parse_settings

    with pytest.raises(ValueError) as caught:
        parse_settings({"servers": ["nats://127.0.0.1:4222"], "hub": "a", "forget_after": value})
    assert str(caught.value) == f"cluster forget_after must be a whole number at least 1, got {value!r}"


def test_forget_after_defaults_to_a_week():
    from datasette_sync.cluster import parse_settings

    assert parse_settings({"servers": ["nats://127.0.0.1:4222"], "hub": "a"}).forget_after == 7 * 24 * 3600


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"{not json", "are not JSON"),
        (b"null", "are not [device, actor, since] rows"),
        (b"[[{}, 1, 2]]", "are not [device, actor, since] rows"),
        (b'[["dev", "alice"]]', "are not [device, actor, since] rows"),
    ],
)
def test_claims_stored_with_a_snapshot_that_are_not_claims_stop_the_join_with_one_line(data, problem):
    """A joining hub refuses to join (its status shows why) rather than join without claims
    and take pushes the other hubs refuse."""
    from datasette_sync.cluster import parse_claims

    assert parse_claims(b'[["dev", "alice", "2026-12-05T00:00:00Z"], ["d2", "bob", null]]')[1] == ["d2", "bob", None]
    with pytest.raises(ValueError) as caught:
        parse_claims(data)
    assert str(caught.value) == f"the device claims stored with the snapshot {problem}"


def test_retention_waits_while_a_hub_holds_a_message_it_has_not_acknowledged(tmp_path, nats, hub, todo_rows):
    """A purge drops a delivered, unacknowledged message from its consumer's pending list
    (nats-server 2.9), so a hub stopped while importing it would never be given it again and
    would refuse every later message built on it. Here a consumer takes the first message, then
    holds the second as a stopped hub would: hub a, due a snapshot, waits, and purges once it
    is acknowledged; the held message is never lost to its consumer."""
    import asyncio

    import nats as nats_client

    from datasette_sync.cluster import token

    a = hub("a", snapshot_every=3)
    phone = todos_db(tmp_path / "phone.db")
    subject = f"{STREAM}.{token('hub')}.bundles"

    async def scenario():
        nc = await nats_client.connect(servers=nats.urls)
        try:
            stuck = await nc.jetstream().pull_subscribe(subject, durable="stuck", stream=STREAM)
            await asyncio.to_thread(push, phone, a, {"id": 1, "title": "One", "done": 0})
            await (await stuck.fetch(1, timeout=30))[0].ack()
            await asyncio.to_thread(push, phone, a, {"id": 2, "title": "Two", "done": 0})
            held = (await stuck.fetch(1, timeout=30))[0]
            for i in (3, 4, 5):  # pushes and a's ticks: a snapshot is due
                await asyncio.to_thread(push, phone, a, {"id": i, "title": f"Row {i}", "done": 0})
            await asyncio.to_thread(wait_for, lambda: "retention waits" in a.log(), 60, "hub a to wait", a.log)
            await asyncio.sleep(3)  # time enough for a snapshot and a purge, were they made
            assert (await asyncio.to_thread(nats.stream_state, STREAM)).first_seq == 1
            assert (await stuck.consumer_info()).num_ack_pending == 1
            await held.ack()
            await asyncio.to_thread(push, phone, a, {"id": 6, "title": "Six", "done": 0})
        finally:
            await nc.close()

    asyncio.run(scenario())
    wait_for(lambda: nats.stream_state(STREAM).first_seq > 1, 60, "hub a to purge once it is acknowledged", a.log)
    assert todo_rows(a.path) == todo_rows(phone)
