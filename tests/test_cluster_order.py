"""Cluster hubs apply every push in stream order, so a push one hub accepts and another must
refuse gets the same outcome on every hub (a real nats-server from tests/nats_cluster.py,
real hubs). Pushes go to two hubs at the same moment (threads and a barrier): whichever
order the stream gives them, exactly one is taken and both hubs agree. A write made on a hub
itself commits there first and leaves through its outbox, so it can clash with a push the
stream ordered before it: that heals once the row is changed on that hub."""

from __future__ import annotations

import shutil
import sqlite3
import threading

import httpx
import pytest
import sqlite_utils

from nats_cluster import Cluster, actor_token, cluster_config, missing, wait_for
from sqlite_utils_sync import enable_sync, export_bundle, sync_status

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")
SUBJECT = "datasette-sync.hub.bundles"



def tags_db(path):
    """A synced ``todos`` whose title is UNIQUE."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT UNIQUE, done INTEGER)")
    conn.close()
    enable_sync(sqlite_utils.Database(path), ["todos"])
    return path


@pytest.fixture
def nats(tmp_path):
    cluster = Cluster(tmp_path / "nats", size=1).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def two_hubs(tmp_path, nats, datasette_server, hub_config):
    def start(config=hub_config):
        hubs = []
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            path = tags_db(tmp_path / name / "hub.db")
            hub = datasette_server([path], cluster_config(config, nats.urls, name))
            hub.path, hub.name = path, name
            hubs.append(hub)
        for hub in hubs:
            wait_for(lambda: cluster_status(hub)["connected"], what=f"hub {hub.name} to join")
        return hubs

    return start


def cluster_status(hub) -> dict:
    return hub.get("/hub/-/sync.json", headers={"Authorization": f"Bearer {actor_token()}"}).json()["cluster"]


def at_once(pushes) -> list[httpx.Response]:
    """POST each (hub, bundle path, actor) push from its own thread, released together."""
    barrier = threading.Barrier(len(pushes))
    answers = [None] * len(pushes)
    tokens = {actor: actor_token(actor) for _, _, actor in pushes}

    def push(index, hub, bundle, actor):
        body, headers = bundle.read_bytes(), {"Authorization": f"Bearer {tokens[actor]}"}
        barrier.wait()
        answers[index] = hub.post("/hub/-/sync/import", content=body, headers=headers)

    threads = [threading.Thread(target=push, args=(i, *p)) for i, p in enumerate(pushes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return answers


def table(path, sql="SELECT * FROM todos ORDER BY id") -> list:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def settled(hubs) -> list[dict]:
    """Once every hub has handled every message and holds the same rows: their refusals."""

    def same():
        statuses = [cluster_status(hub) for hub in hubs]
        return all(s["behind"] == 0 for s in statuses) and len({repr(table(h.path)) for h in hubs}) == 1

    wait_for(same, what="both hubs to handle every message", show=lambda: [(cluster_status(h), table(h.path)) for h in hubs])
    keys = ("seq", "bundle_id", "reason", "message")
    refused = [[{k: r[k] for k in keys} for r in cluster_status(hub)["latest_refused"]] for hub in hubs]
    assert refused[0] == refused[1]
    return refused[0]


def test_a_unique_value_pushed_to_two_hubs_at_once_is_taken_once_everywhere(tmp_path, nats, two_hubs, hub_sync):
    a, b = two_hubs()
    # Two clashing bundles straight into the stream (no hub checked them): both hubs take the
    # first and record the second as refused, alike.
    for name in ("first", "second"):
        phone = tags_db(tmp_path / f"{name}.db")
        sqlite_utils.Database(phone)["todos"].insert({"id": 100 + len(name), "title": "in the stream", "done": 0})
        export_bundle(sqlite_utils.Database(phone), tmp_path / f"{name}.bundle")
        data = (tmp_path / f"{name}.bundle").read_bytes()
        nats.ask(lambda js: js.publish(SUBJECT, data, headers={"Nats-Msg-Id": name}))
    losers = [tmp_path / "second.db"]
    for n in range(3):
        pushes = []
        for hub in (a, b):
            phone = tags_db(tmp_path / f"{hub.name}-{n}.db")
            sqlite_utils.Database(phone)["todos"].insert({"id": 10 * n + ord(hub.name), "title": f"same {n}", "done": 0})
            export_bundle(sqlite_utils.Database(phone), tmp_path / f"{hub.name}-{n}.bundle")
            pushes.append((hub, tmp_path / f"{hub.name}-{n}.bundle", "alice"))
        answers = at_once(pushes)
        codes = sorted(answer.status_code for answer in answers)
        assert codes == [200, 400], [answer.text for answer in answers]  # a single hub's status for it
        refused = next(answer for answer in answers if answer.status_code == 400).json()
        assert refused["reason"] == "constraint_failed"
        assert "UNIQUE constraint failed: todos.title" in refused["error"]
        losers.append(tmp_path / f"{'b' if answers[0].status_code == 200 else 'a'}-{n}.db")
        assert refused["error"].startswith("Bundle upload.bundle cannot be applied: UNIQUE constraint failed: todos.title")
    refusals = settled([a, b])
    assert refusals[-1]["bundle_id"] == "second" and all(r["reason"] == "constraint_failed" for r in refusals)
    assert sorted(title for _, title, _ in table(a.path)) == ["in the stream", "same 0", "same 1", "same 2"]

    # A refused push blocks nothing: each losing device renames its row and syncs (with either hub).
    for n, loser in enumerate(losers):
        sqlite_utils.Database(loser)["todos"].update(table(loser)[0][0], {"title": f"other {n}"})
        assert hub_sync(loser, (a, b)[n % 2], actor_token())["pushed"]["applied"] >= 1
    assert settled([a, b]) == refusals
    titles = sorted(title for _, title, _ in table(b.path))
    assert titles == ["in the stream", "other 0", "other 1", "other 2", "other 3", "same 0", "same 1", "same 2"]
    page = a.get("/hub/-/sync", headers={"Authorization": f"Bearer {actor_token()}"}).text
    assert "Refused messages" in page and "UNIQUE constraint failed: todos.title" in page


async def old_consumer(js):
    from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

    await js.add_stream(StreamConfig(name="datasette-sync", subjects=["datasette-sync.>"], duplicate_window=120))
    config = ConsumerConfig(durable_name="b_hub", filter_subject=SUBJECT, ack_policy=AckPolicy.EXPLICIT, max_ack_pending=1000)
    await js.add_consumer("datasette-sync", config)


def test_one_device_claimed_by_two_actors_on_two_hubs_at_once_has_one_owner(tmp_path, nats, two_hubs, hub_config):
    permissions = hub_config["databases"]["hub"]["permissions"]
    for action in ("sync-import", "insert-row", "update-row"):
        permissions[action]["id"] = [*permissions[action]["id"], "bob"]
    nats.ask(old_consumer)  # hub b's consumer from before ordering: it is made to take one at a time
    a, b = two_hubs(hub_config)
    assert nats.ask(lambda js: js.consumer_info("datasette-sync", "b_hub")).config.max_ack_pending == 1
    winners, kept = {}, []
    for n in range(3):  # a device each time: three chances for the pushes to overlap
        phone = tags_db(tmp_path / f"phone-{n}.db")
        sqlite_utils.Database(phone)["todos"].insert({"id": 10 * n, "title": f"Buy milk {n}", "done": 0})
        shutil.copy(phone, tmp_path / f"copy-{n}.db")  # the same device id, written on by bob
        sqlite_utils.Database(phone)["todos"].insert({"id": 10 * n + 1, "title": f"Alice's {n}", "done": 0})
        sqlite_utils.Database(tmp_path / f"copy-{n}.db")["todos"].insert({"id": 10 * n + 2, "title": f"Bob's {n}", "done": 0})
        export_bundle(sqlite_utils.Database(phone), tmp_path / f"alice-{n}.bundle")
        export_bundle(sqlite_utils.Database(tmp_path / f"copy-{n}.db"), tmp_path / f"bob-{n}.bundle")
        answers = at_once([(a, tmp_path / f"alice-{n}.bundle", "alice"), (b, tmp_path / f"bob-{n}.bundle", "bob")])
        codes = sorted(answer.status_code for answer in answers)
        assert codes[0] == 200 and codes[1] in (400, 403), [answer.text for answer in answers]
        winner = "alice" if answers[0].status_code == 200 else "bob"
        assert answers[1 if winner == "alice" else 0].json()["reason"] in ("device_id_clash", "device_owned")
        winners[sync_status(sqlite_utils.Database(phone))["device_id"]] = winner
        kept += [f"Buy milk {n}", f"{'Alice' if winner == 'alice' else 'Bob'}'s {n}"]
    settled([a, b])
    owners = [dict(table(hub.path, "SELECT device_id, actor FROM _sync_device_actors")) for hub in (a, b)]
    assert owners == [winners, winners]
    assert [title for _, title, _ in table(a.path)] == kept


def refused(hub) -> list[str]:
    return [r["reason"] for r in cluster_status(hub)["latest_refused"]]


def test_a_hub_write_clashing_with_an_earlier_push(tmp_path, nats, two_hubs):
    a, b = two_hubs()
    # Hub a's write commits while its consumer waits on the lock: the push to b is in the
    # stream first, hub a's outbox message after it.
    writer = sqlite3.connect(a.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO todos VALUES (1, 'Buy milk', 0)")
    phone = tags_db(tmp_path / "phone.db")
    sqlite_utils.Database(phone)["todos"].insert({"id": 2, "title": "Buy milk", "done": 0})
    export_bundle(sqlite_utils.Database(phone), tmp_path / "phone.bundle")
    answer = b.post("/hub/-/sync/import", content=(tmp_path / "phone.bundle").read_bytes(),
                    headers={"Authorization": f"Bearer {actor_token()}"})
    assert answer.status_code == 200, answer.text
    writer.execute("COMMIT")
    show = lambda: [(cluster_status(h), table(h.path)) for h in (a, b)]  # noqa: E731
    # Hub b refuses hub a's outbox message (the title is taken); hub a refused the push (it
    # held its own row then) and shows that b refused its writes.
    wait_for(lambda: "constraint_failed" in refused(b), what="hub b to refuse hub a's write", show=show)
    wait_for(lambda: any("Hub b refused" in r["message"] for r in cluster_status(a)["latest_refused"]),
             what="hub a to show the refusal", show=show)
    assert table(a.path) == [(1, "Buy milk", 0)] and table(b.path) == [(2, "Buy milk", 0)]

    # Changing the clashing row on hub a sends the refused write again with the change.
    write(a.path, "UPDATE todos SET title = 'Buy oat milk' WHERE id = 1")
    both = [(1, "Buy oat milk", 0), (2, "Buy milk", 0)]
    wait_for(lambda: table(a.path) == table(b.path) == both, what="the hubs to converge", show=show)
    write(a.path, "INSERT INTO todos VALUES (3, 'Later', 0)")
    wait_for(lambda: table(b.path) == [*both, (3, "Later", 0)], what="a later write on a to reach b", show=show)
    assert table(a.path) == table(b.path)
    assert cluster_status(a)["behind"] == cluster_status(b)["behind"] == 0
    # Hub a applied on retry the push it had refused (its line goes once the retry is
    # recorded, just after the row is written); the line about b's refusal stays.
    wait_for(lambda: [r["message"].startswith("Hub b refused") for r in cluster_status(a)["latest_refused"]] == [True],
             what="hub a to forget the push it applied on retry", show=show)
    page = a.get("/hub/-/sync", headers={"Authorization": f"Bearer {actor_token()}"}).text
    assert "Hub b refused this hub&#39;s own writes" in page or "Hub b refused this hub's own writes" in page


def write(path, sql: str) -> None:
    """Another process writing the hub's file."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(sql)
    finally:
        conn.close()
