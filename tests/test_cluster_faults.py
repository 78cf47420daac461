"""Cluster mode under faults: real ``nats-server`` clusters (tests/nats_cluster.py), real
``datasette serve`` hubs sharing bundles through JetStream, real ``sqlite-utils sync``.

Nodes and hubs are killed with SIGKILL, as a machine dying would. Convergence is
asynchronous: a test waits (``wait_for``) until what it asserts holds, with a generous
deadline, and asserts contents (rows, clocks, operation counts, exit codes), never times.
"""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest
import sqlite_utils

from nats_cluster import Cluster, Hub, cluster_config, missing, wait_for
from sqlite_utils_sync import sync_status
from sqlite_utils_sync.clocks import clock
from sqlite_utils_sync.client import sync_with_hub
from sqlite_utils_sync.oplog import op_device, op_seq

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")

SYNC_ACTIONS = ["sync-export", "sync-import", "view-database", "view-table", "insert-row", "update-row", "delete-row"]
STREAM = "datasette-sync"


@pytest.fixture
def cluster(tmp_path):
    """``cluster(size=3)``: a started JetStream cluster, stopped at teardown."""
    started = []

    def start(size: int = 3) -> Cluster:
        started.append(Cluster(tmp_path / f"nats-{len(started)}", size).start())
        return started[-1]

    yield start
    for each in started:
        each.stop()


@pytest.fixture
def hubs(tmp_path, hub_config, make_todos_db):
    """``hubs(cluster, names, config=None, make=make_todos_db, **settings)``: one started hub
    per name, each serving its own ``hub.db``, member of the cluster once its durable
    consumer exists. Stopped at teardown."""
    started: list[Hub] = []

    def start(nats: Cluster, names, config: dict | None = None, make=make_todos_db, **settings) -> list[Hub]:
        base = config or hub_config
        replicas = settings.pop("replicas", len(nats.nodes))
        new = []
        for name in names:
            folder = tmp_path / f"hub-{name}"
            folder.mkdir()
            path = make(folder / "hub.db")
            config = cluster_config(base, nats.urls, name, replicas=replicas, **settings)
            new.append(Hub(path, config, name).start())
        started.extend(new)
        wait_for(lambda: {f"{h.name}_hub" for h in new} <= nats.consumers(STREAM), what="the hubs' consumers")
        return new

    yield start
    for hub in started:
        hub.stop()


def token(hub: Hub, actor: str = "alice") -> str:
    return hub.token(actor, *[arg for action in SYNC_ACTIONS for arg in ("-d", "hub", action)])


def sync(run, path, *targets: Hub, token: str, check: bool = True):
    """``sqlite-utils sync PATH URL [URL ...] --json``: the parsed result, or the process."""
    args = ["sqlite-utils", "sync", path, *[hub.db_url for hub in targets], "--token", token, "--json"]
    result = run(args, check=check)
    return json.loads(result.stdout) if check else result


def api_sync(path, *targets: Hub, token: str) -> dict:
    """``sync_with_hub`` in this process (a CLI process per sync would double these tests' time)."""
    db = sqlite_utils.Database(path)
    try:
        return sync_with_hub(db, [hub.db_url for hub in targets], token=token)
    finally:
        db.close()


def state(path) -> tuple[list, dict, dict]:
    """What a copy holds: its todos rows, its clock, and its operation count per device."""
    conn = sqlite3.connect(path)  # not read-only: a killed hub's hot journal is rolled back
    try:
        rows = conn.execute("SELECT * FROM todos ORDER BY id").fetchall()
        devices = dict(conn.execute("SELECT idx, device_id FROM _sync_devices"))
        counts: dict[str, int] = {}
        for (op,) in conn.execute("SELECT op FROM _sync_ops"):
            if not op_seq(op):
                continue  # each copy's local sentinel, never synced
            device = devices[op_device(op)]
            counts[device] = counts.get(device, 0) + 1
        return rows, clock(conn), counts
    finally:
        conn.close()


def converged(hubs: list[Hub], rows: list | None = None) -> bool:
    """Every hub holds the same rows (``rows``, when given), clock and operations."""
    states = [state(hub.path) for hub in hubs]
    return all(s == states[0] for s in states) and (rows is None or states[0][0] == rows)


def hold(hubs: list[Hub], rows: list, device: str | None = None, ops: int | None = None) -> bool:
    """Every hub holds ``rows`` (and ``ops`` operations of ``device``: each exactly once)."""
    states = [state(hub.path) for hub in hubs]
    return all(s[0] == rows and (device is None or s[2].get(device) == ops) for s in states)


def show(hubs: list[Hub], *devices) -> str:
    """What each hub (and device) holds, and the end of each hub's log: why a wait failed."""
    lines = [f"{hub.name}: {state(hub.path)}\n{hub.log()[-1500:]}" for hub in hubs]
    return "\n".join(lines + [f"{device}: {state(device)}" for device in devices])


def insert(path, *ids: int, title: str = "todo") -> None:
    db = sqlite_utils.Database(path)
    db["todos"].insert_all([{"id": i, "title": f"{title} {i}", "done": 0} for i in ids])
    db.close()


def device_id(path) -> str:
    return sync_status(sqlite_utils.Database(path))["device_id"]


# (1) Clients pushing to different hubs converge with every hub --------------------------------


def test_clients_pushing_to_different_hubs_converge_with_every_hub(tmp_path, cluster, hubs, make_todos_db):
    a, b, c = all_hubs = hubs(cluster(3), "abc")
    alice = token(a)  # one secret for the whole cluster: a token works on every hub
    devices = [make_todos_db(tmp_path / f"d{i}.db", [{"id": 10 * i + j, "title": f"from {i}", "done": 0} for j in (1, 2)]) for i in range(3)]
    for device, hub in zip(devices, all_hubs):
        assert api_sync(device, hub, token=alice)["pushed"]["applied"] >= 2
    # Propagation is asynchronous: the devices pull row 11 only once their hubs hold it.
    wait_for(lambda: converged(all_hubs) and len(state(a.path)[0]) == 6, what="the first pushes to reach every hub", show=lambda: show(all_hubs))
    # The same row changed on two devices through two hubs: one conflict, the same everywhere.
    api_sync(devices[0], a, token=alice)
    api_sync(devices[1], b, token=alice)
    sqlite_utils.Database(devices[0])["todos"].update(11, {"title": "via a"})
    sqlite_utils.Database(devices[1])["todos"].update(11, {"title": "via b"})
    api_sync(devices[0], a, token=alice)
    api_sync(devices[1], b, token=alice)

    wait_for(lambda: converged(all_hubs) and len(state(a.path)[0]) == 6, what="the hubs to converge", show=lambda: show(all_hubs))
    # Pulls from each hub: every device ends with what every hub holds. The second round
    # carries the knowledge ticks the first one wrote (a pull that brings only ticks writes none).
    for _ in range(2):
        for device, hub in zip(devices, all_hubs):
            api_sync(device, hub, token=alice)
        wait_for(lambda: converged(all_hubs), what="the hubs to converge after the pulls", show=lambda: show(all_hubs, *devices))
    hub_rows, hub_clock, _ = state(a.path)
    assert [state(d)[:2] for d in devices] == [(hub_rows, hub_clock)] * 3
    assert {r[1] for r in hub_rows if r[0] == 11} <= {"via a", "via b"}


# (2) Killing one NATS node mid-run loses nothing, pushes keep being accepted ------------------


def test_killing_a_nats_node_mid_run_loses_nothing_and_pushes_keep_being_accepted(tmp_path, cluster, hubs, make_todos_db):
    nats = cluster(3)
    a, b = hubs(nats, "ab")
    alice = token(a)
    device = make_todos_db(tmp_path / "d.db")
    done: list[int] = []
    failures: list[BaseException] = []

    def pushes():
        try:
            for i in range(1, 13):
                insert(device, i)
                result = sync_with_hub(sqlite_utils.Database(device), [a.db_url, b.db_url], token=alice)
                assert result["pushed"]["applied"] >= 1, result
                done.append(i)
        except BaseException as ex:  # reported by the test thread
            failures.append(ex)

    worker = threading.Thread(target=pushes)
    worker.start()
    wait_for(lambda: len(done) >= 4 or failures, what="the first pushes")
    killed = nats.kill(0)  # while pushes are being made
    wait_for(lambda: len(done) >= 8 or failures, what="pushes with a node down")
    nats.restart(0)
    worker.join()
    assert not failures, failures
    assert done == list(range(1, 13)) and killed.running
    expected = [(i, f"todo {i}", 0) for i in range(1, 13)]
    me = device_id(device)
    wait_for(lambda: hold([a, b], expected, me, state(device)[2][me]), what="both hubs to hold every push once", show=lambda: show([a, b], device))


# (3) Killing a hub mid-push: the client retries another hub, nothing lost or applied twice ----


def test_a_hub_killed_mid_push_makes_the_client_retry_another_hub(tmp_path, cluster, hubs, make_todos_db, run):
    nats = cluster(3)
    a, b = hubs(nats, "ab")
    alice = token(a)
    device = make_todos_db(tmp_path / "d.db", [{"id": i, "title": f"todo {i}", "done": 0} for i in range(1, 6)])
    before = nats.stream_state(STREAM).last_seq
    # A reader holding hub A's file (rollback journal): A imports the push and stores it in
    # the stream, then waits for the reader to let it commit. Killed there, it never answers.
    reader = sqlite3.connect(a.path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM todos").fetchone()
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.update(sync=sync(run, device, a, b, token=alice, check=False)))
    worker.start()
    try:
        wait_for(lambda: nats.stream_state(STREAM).last_seq > before, what="hub A to store the push")
        a.kill()
    finally:
        reader.close()
    worker.join()
    result = outcome["sync"]
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith(f"import (push) with {a.db_url} failed: ") or lines[0].startswith(f"cannot connect to {a.db_url}"), lines
    assert lines[0].endswith(f": trying {b.db_url}") and len(lines) == 1, lines
    answer = json.loads(result.stdout)
    assert answer["hub"]["url"] == b.db_url
    expected = [(i, f"todo {i}", 0) for i in range(1, 6)]
    me = device_id(device)
    mine = state(device)[2][me]
    wait_for(lambda: hold([b], expected, me, mine), what="hub B to hold the push, each operation once", show=lambda: show([a, b], device))
    assert api_sync(device, b, token=alice)["pushed"]["total_operations"] == 0

    # (4) The killed hub comes back without the push it never committed, and catches up.
    assert state(a.path)[0] == []
    a.start()
    wait_for(lambda: hold([a, b], expected, me, mine), what="hub A to catch up", show=lambda: show([a, b], device))


# (4) A restarted hub catches up -----------------------------------------------------------------


def test_a_hub_that_was_down_catches_up_when_it_comes_back(tmp_path, cluster, hubs, make_todos_db, run):
    nats = cluster(3)
    a, b = hubs(nats, "ab")
    alice = token(a)
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "todo 1", "done": 0}])
    api_sync(device, a, token=alice)
    wait_for(lambda: hold([a, b], [(1, "todo 1", 0)]), what="the first push to reach hub B")
    b.kill()
    for i in range(2, 5):
        insert(device, i)
        assert api_sync(device, a, token=alice)["pushed"]["applied"] >= 1
    assert state(b.path)[0] == [(1, "todo 1", 0)]
    b.start()
    wait_for(lambda: hold([a, b], [(i, f"todo {i}", 0) for i in range(1, 5)]), what="hub B to catch up")
    # And a hub that was down serves the pushes it missed to a new device.
    fresh = tmp_path / "fresh.db"
    sync(run, fresh, b, token=alice)
    assert state(fresh)[0] == state(a.path)[0]


# (5) Permissions per database and per table hold the same on every hub --------------------------

NOTES = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER); CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"
WRITES = ("insert-row", "update-row", "delete-row")
PERMISSIONS = {
    "databases": {
        "hub": {
            "permissions": {"sync-export": {"id": ["alice", "bob", "carol"]}, "sync-import": {"id": ["alice", "bob"]}},
            "tables": {
                "todos": {"permissions": {action: {"id": ["alice", "bob"]} for action in WRITES}},
                "notes": {"permissions": {action: {"id": "alice"} for action in WRITES}},
            },
        }
    }
}


def test_permissions_per_database_and_per_table_hold_the_same_on_every_hub(tmp_path, cluster, hubs, make_db, run, file_bytes):
    def make(path):
        make_db(path, NOTES, ("todos", "notes")).close()
        return path

    nats = cluster(1)
    a, b = hubs(nats, "ab", config=PERMISSIONS, make=make)
    bob, carol, alice = a.token("bob"), a.token("carol"), a.token("alice")
    stored = nats.stream_state(STREAM).messages

    def refused(path, tok, message):
        """Refused the same way by each hub: one line, exit 1, hub files unchanged."""
        for hub in (a, b):
            before = file_bytes(hub.path)
            result = sync(run, path, hub, token=tok, check=False)
            assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
            assert result.stderr.startswith(f"Error: hub {hub.db_url} {message}"), result.stderr
            assert file_bytes(hub.path) == before

    # Per database: carol may pull, not push.
    carols = make(tmp_path / "carol.db")
    sqlite_utils.Database(carols)["todos"].insert({"id": 1, "title": "carol's", "done": 0})
    refused(carols, carol, "does not allow import (push) (403)")
    # Per table: bob may write todos, not notes.
    bobs = make(tmp_path / "bob.db")
    sqlite_utils.Database(bobs)["notes"].insert({"id": 1, "body": "bob's note"})
    refused(bobs, bob, "does not allow import (push) (403)")
    assert nats.stream_state(STREAM).messages == stored  # a refused bundle never enters the stream

    # What each may do, each may do through any hub, and every hub gets it.
    alices = make(tmp_path / "alice.db")
    sqlite_utils.Database(alices)["notes"].insert({"id": 2, "body": "alice's note"})
    api_sync(alices, b, token=alice)
    fine = make(tmp_path / "bob2.db")
    sqlite_utils.Database(fine)["todos"].insert({"id": 2, "title": "bob's", "done": 0})
    api_sync(fine, a, token=bob)
    def notes(hub) -> list:
        conn = sqlite3.connect(f"file:{hub.path}?mode=ro", uri=True)
        try:
            return conn.execute("SELECT * FROM notes").fetchall()
        finally:
            conn.close()

    # Each push reaches the other hub on its own time: wait for both.
    wait_for(
        lambda: hold([a, b], [(2, "bob's", 0)]) and all(notes(hub) == [(2, "alice's note")] for hub in (a, b)),
        what="the allowed pushes to reach both hubs",
    )


# (6) A new hub joining after retention purged old messages gets everything ----------------------


def test_a_new_hub_joining_after_old_messages_were_purged_starts_from_the_snapshot(tmp_path, cluster, hubs, make_todos_db):
    nats = cluster(1)
    a, b = hubs(nats, "ab", snapshot_every=4)
    alice = token(a)
    device = make_todos_db(tmp_path / "d.db")
    for i in range(1, 9):
        insert(device, i)
        api_sync(device, (a, b)[i % 2], token=alice)
    expected = [(i, f"todo {i}", 0) for i in range(1, 9)]
    wait_for(lambda: hold([a, b], expected), what="both hubs to hold every push")
    wait_for(lambda: nats.stream_state(STREAM).first_seq > 1, what="old messages to be purged")

    [c] = hubs(nats, "c", snapshot_every=4)
    wait_for(lambda: state(c.path)[0] == expected, what="the new hub to hold everything")
    insert(device, 9)
    api_sync(device, c, token=alice)
    wait_for(lambda: hold([a, b, c], [*expected, (9, "todo 9", 0)]), what="a push to the new hub to reach the others")
