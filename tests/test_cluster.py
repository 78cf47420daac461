"""Cluster mode (NATS JetStream): real ``nats-server`` processes on loopback ports (one node
with JetStream is enough here; tests/test_cluster_faults.py kills nodes of a three-node
cluster), real ``datasette serve`` hubs and the real ``sqlite-utils`` CLI.

Convergence is asynchronous: a test waits (``wait_for``) until what it asserts holds, with a
generous deadline, and asserts contents, never how long it took.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time

import httpx
import pytest
import sqlite_utils

from conftest import _clean_env, _executable, _free_port
from nats_cluster import actor_token, wait_for
from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, sync_status
from sqlite_utils_sync.protocol import encode_clock

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
pytestmark = pytest.mark.skipif(not shutil.which(NATS_SERVER), reason="nats-server is not installed")
nats = pytest.importorskip("nats")

STREAM = "datasette-sync"
SUBJECT = "datasette-sync.hub.bundles"


class Nats:
    """One ``nats-server -js`` on a free loopback port, with its store in a temporary folder."""

    def __init__(self, folder, config: str = ""):
        self.folder = folder
        self.config = config
        self.port = _free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> "Nats":
        self.folder.mkdir(exist_ok=True)
        args = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.folder / "store")]
        if self.config:
            path = self.folder / "nats.conf"
            path.write_text(self.config)
            args += ["-c", str(path)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.answers(), what="nats-server to accept connections")
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def ask(self, coro_fn):
        """Run ``coro_fn(js)`` with a fresh client connection (the test's view of the stream)."""

        async def main():
            nc = await nats.connect(self.url)
            try:
                return await coro_fn(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(main())


@pytest.fixture
def nats_server(tmp_path):
    servers = []

    def start(config: str = "") -> Nats:
        server = Nats(tmp_path / f"nats-{len(servers)}", config).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def todos_db(path, rows: list[dict] | None = None):
    """A database with a synced ``todos (id, title, done)``, made in process (fast: a test
    here already starts several servers)."""
    db = sqlite_utils.Database(path)
    db["todos"].create({"id": int, "title": str, "done": int}, pk="id")
    db["todos"].insert_all(rows or [])
    enable_sync(db, ["todos"])
    db.close()
    return path


def cluster_config(hub_config, nats_url: str, hub: str, **extra) -> dict:
    config = json.loads(json.dumps(hub_config))
    config["plugins"] = {"datasette-sync": {"cluster": {"servers": [nats_url], "hub": hub, **extra}}}
    return config


@pytest.fixture
def start_hub(tmp_path, datasette_server, hub_config):
    """``start_hub(nats, name, **cluster_settings)``: a hub serving its own ``hub.db``."""

    def start(server: Nats, name: str, prepare=None, **extra):
        folder = tmp_path / name
        folder.mkdir()
        path = todos_db(folder / "hub.db")
        if prepare is not None:
            prepare(path)
        hub = datasette_server([path], cluster_config(hub_config, server.url, name, **extra))
        hub.path = path
        hub.alice = actor_token()
        return hub

    return start





def stream_messages(server: Nats) -> list:
    """Every message stored for database ``hub``: (stream sequence, headers, body)."""

    async def read(js):
        info = await js.stream_info(STREAM)
        found = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            try:
                msg = await js.get_msg(STREAM, seq)
            except nats.js.errors.NotFoundError:
                continue
            if msg.subject == SUBJECT:
                found.append((seq, msg.headers or {}, msg.data))
        return found

    return server.ask(read)


def publish(server: Nats, path, msg_id: str) -> None:
    data = path.read_bytes() if hasattr(path, "read_bytes") else path
    server.ask(lambda js: js.publish(SUBJECT, data, headers={"Nats-Msg-Id": msg_id}))


def waiting_pull(hub, copy):
    """A pull of ``copy``'s device waiting at ``hub`` (in a thread); ``.result()`` is the answer."""
    status = sync_status(sqlite_utils.Database(copy))
    params = {"since": encode_clock(status["clock"]), "wait": "600", "device": status["device_id"]}
    headers = {"Authorization": f"Bearer {hub.alice}"}
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(httpx.get, hub.url + "/hub/-/sync/export", params=params, headers=headers, timeout=45)
    pool.shutdown(wait=False)
    wait_for(lambda: status["device_id"] in [w["device_id"] for w in hub.get("/hub/-/sync.json", headers=headers).json()["watching"]],
               what="the pull to wait")
    return future


def test_pushes_and_writes_on_one_hub_reach_the_other(tmp_path, nats_server, start_hub, hub_sync, todo_rows):
    # Hub A held a device's row before it joined the cluster: it publishes what it held once.
    old = todos_db(tmp_path / "old.db", [{"id": 9, "title": "Before the cluster", "done": 1}])
    export_bundle(sqlite_utils.Database(old), tmp_path / "old.bundle")
    server = nats_server()
    a = start_hub(server, "a", prepare=lambda path: import_bundle(sqlite_utils.Database(path), tmp_path / "old.bundle"))
    b = start_hub(server, "b")
    phone = todos_db(tmp_path / "phone.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    result = hub_sync(phone, a, a.alice)
    assert result["pushed"]["applied"] >= 1
    expected = [{"id": 1, "title": "Buy milk", "done": 0}, {"id": 9, "title": "Before the cluster", "done": 1}]
    wait_for(lambda: todo_rows(b.path) == expected)
    # A pull from B gives a new device what was pushed to A.
    laptop = todos_db(tmp_path / "laptop.db")
    hub_sync(laptop, b, b.alice)
    assert todo_rows(laptop) == expected

    # A device watching hub B hears of a push made to hub A: B's import from the stream wakes
    # its waiting pull (unwoken, it would wait the 60 s of max_wait, past the client's timeout).
    waiting = waiting_pull(b, laptop)
    upsert_row = {"id": 3, "title": "Pushed to A", "done": 0}
    sqlite_utils.Database(phone)["todos"].insert(upsert_row)
    hub_sync(phone, a, a.alice)
    answer = waiting.result(timeout=60)
    assert answer.status_code == 200 and int(answer.headers["x-sync-operations"]) >= 1
    bundle = tmp_path / "woken.bundle"
    bundle.write_bytes(answer.content)
    import_bundle(sqlite_utils.Database(laptop), str(bundle))
    expected.insert(1, upsert_row)
    assert todo_rows(laptop) == expected

    # A write through Datasette on hub B is hub B's own operation: it leaves through B's outbox.
    headers = {"Authorization": f"Bearer {b.alice}"}
    response = b.post("/hub/todos/-/insert", json={"row": {"id": 5, "title": "From the web", "done": 0}}, headers=headers)
    assert response.status_code == 201, response.text
    expected.insert(2, {"id": 5, "title": "From the web", "done": 0})
    wait_for(lambda: todo_rows(a.path) == expected)
    assert wait_for(lambda: a.get("/hub/-/sync.json", headers=headers).json()["cluster"]["behind"] == 0)
    cluster = a.get("/hub/-/sync.json", headers=headers).json()["cluster"]
    assert (cluster["stream"], cluster["hub"], cluster["connected"]) == (STREAM, "a", True)
    page = a.get("/hub/-/sync", headers=headers).text
    assert "stream datasette-sync, this hub a," in page and "messages behind: 0" in page
    # Both hubs hold the same operations, and the exchange came to rest.
    wait_for(lambda: sync_status(sqlite_utils.Database(a.path))["clock"] == sync_status(sqlite_utils.Database(b.path))["clock"])


def test_a_device_a_push_claimed_on_one_hub_is_owned_on_every_hub(tmp_path, nats_server, start_hub, hub_config, hub_sync, todo_rows):
    permissions = hub_config["databases"]["hub"]["permissions"]
    for action in ("sync-import", "insert-row", "update-row"):
        permissions[action]["id"] = [*permissions[action]["id"], "bob"]
    server = nats_server()
    a, b = start_hub(server, "a"), start_hub(server, "b")
    phone = todos_db(tmp_path / "phone.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    hub_sync(phone, a, a.alice)  # alice (no sync-relay) now owns the phone's device
    wait_for(lambda: todo_rows(b.path) == todo_rows(phone))
    # Bob pushes new operations of alice's phone to hub B: refused there as on hub A.
    shutil.copy(phone, tmp_path / "stolen.db")
    stolen = sqlite_utils.Database(tmp_path / "stolen.db")
    stolen["todos"].insert({"id": 2, "title": "Not yours", "done": 0})
    bundle = tmp_path / "stolen.bundle"
    export_bundle(stolen, bundle, since=sync_status(sqlite_utils.Database(b.path))["clock"])
    answers = [
        hub.post("/hub/-/sync/import", content=bundle.read_bytes(), headers={"Authorization": f"Bearer {actor_token('bob')}"})
        for hub in (a, b)
    ]
    assert [(r.status_code, r.json()["reason"]) for r in answers] == [(403, "device_owned")] * 2
    assert todo_rows(b.path) == [{"id": 1, "title": "Buy milk", "done": 0}]


def test_a_push_is_refused_when_the_cluster_cannot_store_it(tmp_path, nats_server, start_hub, todo_rows):
    server = nats_server()
    a = start_hub(server, "a")
    wait_for(lambda: a.get("/hub/-/sync.json", headers={"Authorization": f"Bearer {a.alice}"}).json()["cluster"]["connected"])
    server.stop()
    phone = todos_db(tmp_path / "phone.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    bundle = tmp_path / "phone.bundle"
    export_bundle(sqlite_utils.Database(phone), bundle)
    before = sync_status(sqlite_utils.Database(a.path))["clock"]
    response = a.post("/hub/-/sync/import", content=bundle.read_bytes(), headers={"Authorization": f"Bearer {a.alice}"})
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "2"
    assert response.json()["reason"] == "cluster_unavailable"
    assert "nothing was imported into hub" in response.json()["error"]
    # The import rolled back: the hub holds nothing of the push.
    assert todo_rows(a.path) == []
    assert sync_status(sqlite_utils.Database(a.path))["clock"] == before


def test_a_bundle_larger_than_a_message_goes_through_the_object_store(tmp_path, nats_server, start_hub, hub_sync, todo_rows):
    server = nats_server("max_payload: 65536\n")
    a, b = start_hub(server, "a"), start_hub(server, "b")
    # Random text: compressed, each row's hex still takes about half its length (80 kB in all).
    rows = [{"id": i, "title": os.urandom(15000).hex(), "done": 0} for i in range(1, 7)]
    phone = todos_db(tmp_path / "phone.db", rows)
    hub_sync(phone, a, a.alice)
    wait_for(lambda: todo_rows(b.path) == rows)
    assert any("Datasette-Sync-Object" in headers and not body for _, headers, body in stream_messages(server))


def test_a_refusals_message_is_shown_only_to_who_may_push_and_view_every_table(tmp_path, nats_server, start_hub, hub_config):
    # A refusal recorded as the consumer records one: its message quotes a table only alice may view.
    message = "Bundle upload.bundle cannot be applied: UNIQUE constraint failed: salaries.name ('Ann', 91000)"

    def prepare(path):
        from datasette_sync.cluster import record_refusal
        from sqlite_utils_sync import SyncError

        sqlite_utils.Database(path)["salaries"].insert({"id": 1, "name": "Ann", "pay": 91000}, pk="id")
        conn = sqlite3.connect(path)
        with conn:
            record_refusal(conn, 7, "pushed", SyncError("constraint_failed", message))
        conn.close()

    permissions = hub_config["databases"]["hub"]["permissions"]
    permissions["sync-import"]["id"] = ["alice", "carol"]
    hub_config["databases"]["hub"]["tables"] = {"salaries": {"permissions": {"view-table": {"id": "alice"}}}}
    hub = start_hub(nats_server(), "a", prepare=prepare)

    def cluster(actor=None):
        headers = {"Authorization": f"Bearer {actor_token(actor)}"} if actor else {}
        return hub.get("/hub/-/sync.json", headers=headers).json()["cluster"]

    wait_for(lambda: cluster("alice")["refused"] == 1, what="the hub to read its refusals")
    assert cluster("alice")["latest_refused"][0]["message"] == message
    assert "salaries.name" in hub.get("/hub/-/sync", headers={"Authorization": f"Bearer {hub.alice}"}).text
    # Anonymous, bob (pulls only) and carol (pushes, but may not view salaries) see the reason alone.
    for actor in (None, "bob", "carol"):
        refused = cluster(actor)["latest_refused"]
        assert [(r["seq"], r["reason"], r["message"]) for r in refused] == [(7, "constraint_failed", None)], actor
        headers = {"Authorization": f"Bearer {actor_token(actor)}"} if actor else {}
        page = hub.get("/hub/-/sync", headers=headers).text
        assert "stream seq 7, constraint_failed" in page and "salaries" not in page and "91000" not in page, actor


def test_a_bundle_after_a_gap_and_a_bad_one_are_refused_in_stream_order_and_recorded(tmp_path, nats_server, start_hub, todo_rows):
    server = nats_server()
    a = start_hub(server, "a")
    phone_path = todos_db(tmp_path / "phone.db", [{"id": 1, "title": "First", "done": 0}])
    phone = sqlite_utils.Database(phone_path)
    export_bundle(phone, tmp_path / "first.bundle")
    after_first = sync_status(phone)["clock"]
    phone["todos"].insert({"id": 2, "title": "Second", "done": 0})
    export_bundle(phone, tmp_path / "second.bundle", since=after_first)
    # The stream orders the second bundle before the first: every hub refuses it alike (a hub
    # publishes a push only once it holds what the push builds on, so this only comes from
    # outside), and the later messages are still applied.
    publish(server, b"not a bundle", "junk")
    publish(server, tmp_path / "second.bundle", "second")
    publish(server, tmp_path / "first.bundle", "first")
    wait_for(lambda: todo_rows(a.path) == [{"id": 1, "title": "First", "done": 0}])
    headers = {"Authorization": f"Bearer {a.alice}"}
    cluster = wait_for(lambda: (c := a.get("/hub/-/sync.json", headers=headers).json()["cluster"])["refused"] == 2 and c)
    assert [(r["bundle_id"], r["reason"]) for r in cluster["latest_refused"]] == [
        ("second", "missing_operations"),
        ("junk", "invalid_bundle"),
    ]
    assert "Refused messages" in a.get("/hub/-/sync", headers=headers).text
    # Recorded in the database: the hub shows them after a restart too.
    conn = sqlite3.connect(f"file:{a.path}?mode=ro", uri=True)
    assert [row[0] for row in conn.execute("SELECT reason FROM _sync_cluster_refused ORDER BY seq")] == [
        "invalid_bundle",
        "missing_operations",
    ]
    conn.close()


def test_retention_keeps_a_snapshot_a_new_hub_starts_from(tmp_path, nats_server, start_hub, hub_sync, todo_rows, upsert):
    server = nats_server()
    a = start_hub(server, "a", snapshot_every=3)
    phone = todos_db(tmp_path / "phone.db", [{"id": 1, "title": "One", "done": 0}])
    hub_sync(phone, a, a.alice)
    upsert(phone, {"id": 2, "title": "Two", "done": 0})
    hub_sync(phone, a, a.alice)  # two pushes and hub a's two knowledge ticks: four messages
    expected = todo_rows(phone)
    assert todo_rows(a.path) == expected

    async def first_seq(js):
        return (await js.stream_info(STREAM)).state.first_seq

    # The first push (sequence 1, the only message with row 1) is gone from the stream.
    wait_for(lambda: server.ask(first_seq) > 1, what="hub a to snapshot and purge the stream")
    c = start_hub(server, "c")
    wait_for(lambda: todo_rows(c.path) == expected)


def test_before_commit_sees_the_result_and_can_refuse(tmp_path, todo_rows):
    phone = todos_db(tmp_path / "phone.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    export_bundle(sqlite_utils.Database(phone), tmp_path / "phone.bundle")
    hub = todos_db(tmp_path / "hub.db")
    before = (tmp_path / "hub.db").read_bytes()

    def refuse(result):
        raise RuntimeError(f"no quorum for {result.bundle_id}")

    with pytest.raises(RuntimeError):
        import_bundle(sqlite_utils.Database(hub), tmp_path / "phone.bundle", before_commit=refuse)
    assert (tmp_path / "hub.db").read_bytes() == before
    seen = []
    result = import_bundle(sqlite_utils.Database(hub), tmp_path / "phone.bundle", before_commit=seen.append)
    assert seen == [result] and todo_rows(hub) == [{"id": 1, "title": "Buy milk", "done": 0}]
    # A bundle held already brings nothing new: no call.
    import_bundle(sqlite_utils.Database(hub), tmp_path / "phone.bundle", before_commit=seen.append)
    assert len(seen) == 1


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"servers": ["nats://127.0.0.1:4222"]}, "cluster hub must be a name of letters, digits, - and _, got None"),
        ({"servers": "localhost", "hub": "a"}, "cluster servers must be a list of nats:// URLs, got ['localhost']"),
        ({"servers": ["nats://127.0.0.1:4222"], "hub": "a", "replicas": 0}, "cluster replicas must be a whole number from 1 to 5, got 0"),
        ({"servers": ["nats://127.0.0.1:4222"], "hub": "a", "stream": "a.b"}, "cluster stream must be a name of letters"),
        ({"servers": ["nats://127.0.0.1:4222"], "hub": "a", "snapshot_every": True}, "cluster snapshot_every must be a whole number at least 1"),
        ({"servers": ["nats://127.0.0.1:4222"], "hub": "a", "color": 1}, "cluster has unknown keys ['color']"),
        ("nats://127.0.0.1:4222", "cluster must be a mapping with servers and hub"),
    ],
)
def test_a_bad_cluster_setting_says_what_is_wrong(setting, message):
    from datasette_sync.cluster import parse_settings

    with pytest.raises(ValueError) as caught:
        parse_settings(setting)
    assert str(caught.value).startswith(message)


def test_a_bad_cluster_setting_is_one_line_at_startup(tmp_path):
    setting = {"servers": ["nats://127.0.0.1:4222"], "hub": "a b"}
    (tmp_path / "c.json").write_text(json.dumps({"databases": {"hub": {"plugins": {"datasette-sync": {"cluster": setting}}}}}))
    sqlite_utils.Database(tmp_path / "hub.db")["t"].insert({"id": 1})
    result = subprocess.run(
        [_executable("datasette"), "serve", str(tmp_path / "hub.db"), "-c", str(tmp_path / "c.json"), "--get", "/"],
        capture_output=True, text=True, env=_clean_env(), timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip() == (
        "Error: cluster hub must be a name of letters, digits, - and _, got 'a b' "
        "(datasette-sync plugin config for database hub)"
    )


def test_a_hub_without_the_setting_never_imports_nats(tmp_path):
    sqlite_utils.Database(tmp_path / "hub.db")["t"].insert({"id": 1})
    script = (
        "import asyncio, sys\n"
        "from datasette.app import Datasette\n"
        f"ds = Datasette([{str(tmp_path / 'hub.db')!r}])\n"
        "asyncio.run(ds.invoke_startup())\n"
        "print('nats' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_clean_env(), timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_a_hub_without_the_nats_client_says_once_how_to_install_it(tmp_path, datasette_server, hub_config, monkeypatch):
    """A plain ``pip install .`` lacks nats-py: the hub logs one line saying how to install it
    (not the ImportError every second), shows it on its status, and refuses pushes with a 503."""
    fake = tmp_path / "fake"
    (fake / "nats").mkdir(parents=True)
    (fake / "nats" / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'nats'\", name='nats')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    path = todos_db(tmp_path / "hub.db")
    hub = datasette_server([path], cluster_config(hub_config, "nats://127.0.0.1:1", "a"))
    headers = {"Authorization": f"Bearer {actor_token()}"}
    phone = todos_db(tmp_path / "phone.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    export_bundle(sqlite_utils.Database(phone), tmp_path / "phone.bundle")
    response = hub.post("/hub/-/sync/import", content=(tmp_path / "phone.bundle").read_bytes(), headers=headers)
    assert (response.status_code, response.json()["reason"]) == (503, "cluster_unavailable")
    assert "this hub cannot import the NATS client" in response.json()["error"]
    wait_for(lambda: "pip install 'datasette-sync[cluster]'" in hub.output(), what="the hub to say what to install")
    time.sleep(2.5)  # the outbox would have failed on the import twice by now
    lines = [line for line in hub.output().splitlines() if "datasette-sync cluster" in line]
    assert lines == [
        "datasette-sync cluster (hub): cluster mode needs the NATS client (nats-py), which cannot be imported "
        "(No module named 'nats'): pip install 'datasette-sync[cluster]' in the hub's environment, then start the hub again"
    ]
    assert hub.get("/hub/-/sync.json", headers=headers).json()["cluster"]["error"] == lines[0].split(": ", 1)[1]
