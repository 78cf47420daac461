"""A hub under concurrent pushes and pulls.

A hub answers a pull with ``export_bundle(read connection, repair=False)`` while Datasette's
write connection imports other devices' pushes. The export must be one snapshot: a push that
commits while it runs is wholly in the bundle or not at all, otherwise the bundle carries the
hub's knowledge tick without the operations that tick names, and the client refuses it with
``missing_dependencies``.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import sqlite_utils

from sqlite_utils_sync import export_bundle, import_bundle, sync_status
from sqlite_utils_sync.client import sync_with_hub


ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_hub_load.py"
OPS_READ = "SELECT max(op) FROM _sync_ops"  # the export has listed the devices and reads their tops


@pytest.fixture(scope="session")
def hub_with_a_pending_push(make_db, sync):
    """A hub with rows, a client level with it, and a push from a new device ready to import."""

    def hub_with_a_pending_push(tmp_path: pathlib.Path, journal_mode: str):
        hub = make_db(tmp_path / "hub.db")
        hub.execute(f"PRAGMA journal_mode = {journal_mode}")
        hub.executemany("INSERT INTO todos (id, title) VALUES (?, ?)", [(i, f"hub {i}") for i in range(1, 6)])
        client = make_db(tmp_path / "client.db")
        sync(hub, client, tmp_path)
        pusher = make_db(tmp_path / "pusher.db")
        pusher.executemany("INSERT INTO todos (id, title) VALUES (?, ?)", [(i, f"pusher {i}") for i in range(10, 13)])
        export_bundle(pusher, tmp_path / "push.bundle")
        return hub, client

    return hub_with_a_pending_push


def export_while_pushing(tmp_path: pathlib.Path, hub_path: pathlib.Path, since: dict) -> str:
    """Export from a read connection like Datasette's; once the export has read the hub's devices,
    a second connection (Datasette's write connection) imports the push. Returns what the
    push did: ``committed``, or ``busy`` when the export's lock kept it out."""
    read = sqlite3.connect(f"file:{hub_path}?mode=ro", uri=True)
    writer = sqlite3.connect(hub_path, isolation_level=None, timeout=0.05)
    outcome = []

    def push_once(sql: str) -> None:
        # Inside the export's read transaction (a large export estimates its size before).
        if outcome or OPS_READ not in sql or not read.in_transaction:
            return
        try:
            import_bundle(writer, str(tmp_path / "push.bundle"))
            outcome.append("committed")
        except sqlite3.OperationalError as ex:
            outcome.append("busy" if "locked" in str(ex) else repr(ex))

    read.set_trace_callback(push_once)
    try:
        export_bundle(read, tmp_path / "pull.bundle", since=since, repair=False)
    finally:
        read.close()
        writer.close()
    # No outcome: no statement of the export had OPS_READ, so the push never happened mid-export.
    return outcome[0] if outcome else f"never pushed: no statement had {OPS_READ!r}"


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_a_push_committing_during_an_export_is_wholly_in_the_pull_or_not_at_all(tmp_path, journal_mode, conflict_records, rows, sync, hub_with_a_pending_push):
    hub, client = hub_with_a_pending_push(tmp_path, journal_mode)
    hub.close()
    hub_path = tmp_path / "hub.db"
    pushed = export_while_pushing(tmp_path, hub_path, sync_status(client)["clock"])
    # WAL lets the push commit beside the export's snapshot; a rollback journal makes it wait
    # for the export's lock (the hub answers 503 busy after its timeout and the client retries).
    assert pushed == ("committed" if journal_mode == "wal" else "busy")

    result = import_bundle(client, str(tmp_path / "pull.bundle"))  # missing_dependencies if the export saw half the push
    assert result.total_operations == 0  # the client was level with the hub before the push

    hub = sqlite3.connect(hub_path, isolation_level=None)
    if pushed == "busy":
        import_bundle(hub, str(tmp_path / "push.bundle"))
    sync(hub, client, tmp_path, "after.bundle")
    assert rows(client) == rows(hub)
    assert [r[0] for r in rows(hub)] == [1, 2, 3, 4, 5, 10, 11, 12]
    assert conflict_records(client) == conflict_records(hub)


# A real hub under real load ------------------------------------------------------------------


def test_a_large_pull_from_a_real_hub_while_rows_are_written_there_is_one_snapshot(tmp_path, datasette_server, make_db, rows):
    """A pull of more than 5,000 operations is built on two read connections, and writers are
    held off, without failing, until both read: rows written on the hub meanwhile are in a new
    device's copy in the order they were written, with no hole, and it ends level with the hub.
    (That both connections read one snapshot is pinned in test_export_connections.py.)"""
    hub = make_db(tmp_path / "hub.db")
    hub.execute("PRAGMA journal_mode = wal")  # a writer commits beside a reader's snapshot
    hub.execute("BEGIN")
    hub.executemany("INSERT INTO todos (id, title) VALUES (?, ?)", [(i, f"hub {i}") for i in range(1, 12_001)])
    hub.execute("COMMIT")
    hub.close()
    server = datasette_server([tmp_path / "hub.db"], HUB_CONFIG)
    token = server.token("alice")
    written, errors, stop = [], [], threading.Event()

    def write_on_the_hub() -> None:
        writer = sqlite3.connect(tmp_path / "hub.db", isolation_level=None, timeout=30)
        try:
            while not stop.is_set():
                row = 100_001 + len(written)
                writer.execute("INSERT INTO todos (id, title) VALUES (?, ?)", [row, f"meanwhile {row}"])
                written.append(row)
        except sqlite3.Error as ex:
            errors.append(repr(ex))
        finally:
            writer.close()

    thread = threading.Thread(target=write_on_the_hub)
    thread.start()
    devices = []
    try:
        for n in range(3):
            db = sqlite_utils.Database(tmp_path / f"device-{n}.db")
            sync_with_hub(db, server.url + "/hub", token=token, create_tables=True)
            ids = [row[0] for row in rows(db.conn)]
            meanwhile = ids[12_000:]
            assert ids[:12_000] == list(range(1, 12_001))
            assert meanwhile == list(range(100_001, 100_001 + len(meanwhile)))  # no hole: one snapshot
            devices.append(db)
    finally:
        stop.set()
        thread.join()
    assert errors == [] and len(written) > 0
    hub = sqlite3.connect(tmp_path / "hub.db")
    for db in devices:
        sync_with_hub(db, server.url + "/hub", token=token)
        assert rows(db.conn) == rows(hub)



@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_clients_syncing_at_once_never_fail_and_end_identical(tmp_path, journal_mode, clean_env, conflict_records, rows):
    """4 client processes, 8 syncs each, through one ``datasette serve``: an export that is not
    one snapshot makes a few of them fail with missing_dependencies in every such run."""
    work = tmp_path / "run"
    args = [sys.executable, str(BENCH), "--clients", "4", "--syncs", "8", "--dir", str(work), "--json"]
    if journal_mode == "wal":
        args.append("--wal")
    done = subprocess.run(args, capture_output=True, text=True, env=clean_env(), timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result["syncs"] == 32
    assert result["failed_syncs"] == 0, result["first_failures"]
    assert result["server_errors"] == [] and result["crashed_clients"] == []

    hub = sqlite3.connect(work / "hub.db")
    assert hub.execute("PRAGMA journal_mode").fetchone()[0] == journal_mode
    expected_rows, expected_conflicts = rows(hub, "items"), conflict_records(hub)
    assert len(expected_rows) > 5  # the shared rows and the clients' own
    for n in range(4):
        client = sqlite3.connect(work / f"client-{n}.db")
        assert rows(client, "items") == expected_rows
        assert conflict_records(client) == expected_conflicts


def test_a_large_pull_from_a_hub_serving_its_file_immutable_leaves_the_file_alone(tmp_path, datasette_server, make_db, rows):
    # datasette serve -i: Datasette opens the file immutable=1, so the export takes no lock
    # (a lock connection would write the -wal and -shm files beside it, or checkpoint one).
    hub = make_db(tmp_path / "hub.db")
    hub.execute("PRAGMA journal_mode = wal")
    hub.execute("BEGIN")
    hub.executemany("INSERT INTO todos (id, title) VALUES (?, ?)", [(i, f"hub {i}") for i in range(1, 12_001)])
    hub.execute("COMMIT")
    export_bundle(hub, tmp_path / "settles.bundle")
    hub.close()
    before = (tmp_path / "hub.db").read_bytes()
    server = datasette_server([], HUB_CONFIG, "-i", str(tmp_path / "hub.db"))
    pulled = server.get("/hub/-/sync/export", headers={"Authorization": f"Bearer {server.token('alice')}"})
    assert pulled.status_code == 200, pulled.text
    (tmp_path / "pulled.bundle").write_bytes(pulled.content)
    device = sqlite3.connect(tmp_path / "device.db", isolation_level=None)
    assert import_bundle(device, str(tmp_path / "pulled.bundle"), create_tables=True).applied == 12_000
    assert rows(device) == rows(sqlite3.connect(f"file:{tmp_path / 'hub.db'}?immutable=1", uri=True))
    assert (tmp_path / "hub.db").read_bytes() == before
    assert not (tmp_path / "hub.db-wal").exists() and not (tmp_path / "hub.db-shm").exists()


# The client retries a busy hub -----------------------------------------------------------------

HUB_CONFIG = {
    "databases": {
        "hub": {
            "permissions": {
                action: {"id": "alice"} for action in ("sync-export", "sync-import", "insert-row", "update-row", "delete-row")
            }
        }
    }
}


@pytest.fixture
def hub(tmp_path, datasette_server, make_todos_db):
    """A hub in SQLite's default rollback-journal mode, where a lock keeps others waiting."""
    path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "on the hub", "done": 0}])
    server = datasette_server([path], HUB_CONFIG)
    server.path = path
    server.alice = server.token("alice")
    return server


@pytest.fixture(scope="session")
def sync_process(executable, clean_env):
    """``sync_process(client, hub, *options)``: ``sqlite-utils sync --json`` with the hub, started, not awaited."""

    def sync_process(client, hub, *options: str) -> subprocess.Popen:
        return subprocess.Popen(
            [executable("sqlite-utils"), "sync", str(client), hub.url + "/hub", "--token", hub.alice, "--json", *options],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )

    return sync_process


def test_a_push_the_hub_answers_busy_is_sent_again_by_itself_and_lands(tmp_path, hub, make_todos_db, rows, sync_process):
    client = make_todos_db(tmp_path / "client.db", [{"id": 2, "title": "from the client", "done": 1}])
    # A reader holding its lock: the hub's import cannot commit, waits, then answers 503.
    reader = sqlite3.connect(hub.path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM todos").fetchone()
    proc = sync_process(client, hub, "--retries", "3")
    first_line = proc.stderr.readline()  # written when the client meets the 503
    reader.execute("ROLLBACK")
    out, err = proc.communicate(timeout=300)
    assert first_line.startswith("Hub is busy: retrying the import (push) in "), first_line + err
    assert first_line.rstrip().endswith("(retry 1 of 3)")
    assert proc.returncode == 0, err
    result = json.loads(out)
    assert result["pushed"]["applied"] >= 1  # the body was sent whole again
    hub_conn, client_conn = sqlite3.connect(hub.path), sqlite3.connect(client)
    assert rows(hub_conn) == rows(client_conn)
    assert [r[0] for r in rows(hub_conn)] == [1, 2]


def test_a_hub_busy_for_longer_than_the_retries_is_one_line_and_changes_nothing(tmp_path, hub, make_todos_db, sync_process):
    client = make_todos_db(tmp_path / "client.db", [{"id": 2, "title": "from the client", "done": 1}])
    before = (client).read_bytes()
    writer = sqlite3.connect(hub.path, isolation_level=None)
    writer.execute("BEGIN EXCLUSIVE")  # keeps the hub's readers out: the pull answers 503
    try:
        proc = sync_process(client, hub, "--retries", "1")
        out, err = proc.communicate(timeout=300)
    finally:
        writer.execute("ROLLBACK")
    lines = err.strip().splitlines()
    assert proc.returncode == 1
    assert lines[0].startswith("Hub is busy: retrying the export (pull) in ")
    assert len(lines) == 2 and lines[1].startswith("Error: hub ")
    assert "could not do the export (pull) now (503)" in lines[1] and lines[1].endswith("gave up after 1 retry")
    assert "Traceback" not in err and out == ""
    assert client.read_bytes() == before


def test_retry_after_is_honoured_and_bounded():
    from sqlite_utils_sync.client import MAX_RETRY_DELAY, retry_after_seconds, retry_delay

    assert retry_after_seconds("5") == 5.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past
    assert retry_after_seconds("soon") is None
    assert 5.0 <= retry_delay(1, 5.0) <= 6.25  # never sooner than the hub asked
    assert 2.0 <= retry_delay(3, None) <= 2.5  # 0.5 s doubled per retry
    assert retry_delay(20, None) <= MAX_RETRY_DELAY * 1.25
    assert retry_delay(1, MAX_RETRY_DELAY + 1) is None  # the hub wants longer than a sync waits


def test_a_client_that_stops_reading_a_pull_is_cut_off_and_the_hub_goes_on(tmp_path, datasette_server, make_db):
    # A bundle of several MB that does not compress; the client asks for it, reads nothing,
    # and keeps the connection open. After send_timeout the hub gives up the answer (and the
    # bundle file it made) and closes the connection; other pulls are answered as ever.
    hub = make_db(tmp_path / "hub.db")
    hub.execute("BEGIN")
    hub.executemany("INSERT INTO todos (id, title) VALUES (?, hex(randomblob(400)))", [(i,) for i in range(1, 20_001)])
    hub.execute("COMMIT")
    hub.close()
    config = json.loads(json.dumps(HUB_CONFIG))
    config.setdefault("plugins", {})["datasette-sync"] = {"send_timeout": 1}
    server = datasette_server([tmp_path / "hub.db"], config)
    token = server.token("alice")
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", server.port))
    stalled.sendall(f"GET /hub/-/sync/export HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    time.sleep(5)
    stalled.settimeout(30)
    received = b""
    while chunk := stalled.recv(1 << 16):  # b"" once the hub has closed the connection
        received += chunk
    stalled.close()
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    assert length > 5_000_000 and len(body) < length
    db = sqlite_utils.Database(tmp_path / "device.db")
    sync_with_hub(db, server.url + "/hub", token=token, create_tables=True)
    assert db.execute("SELECT count(*) FROM todos").fetchone() == (20_000,)


def test_a_push_that_trickles_is_given_up_and_leaves_nothing(tmp_path, datasette_server, make_db, file_bytes):
    # A client declares a large bundle and sends a byte now and then: past send_timeout the hub
    # answers 408 and drops the connection and the temporary file, instead of holding them
    # for as long as the trickle goes on (a few hundred such pushes would use up the hub's files).
    make_db(tmp_path / "hub.db").close()
    config = json.loads(json.dumps(HUB_CONFIG))
    config.setdefault("plugins", {})["datasette-sync"] = {"send_timeout": 1}
    server = datasette_server([tmp_path / "hub.db"], config)
    token = server.token("alice")
    before = file_bytes(tmp_path / "hub.db")
    trickle = socket.socket()
    trickle.connect(("127.0.0.1", server.port))
    trickle.sendall(
        f"POST /hub/-/sync/import HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
        "Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n".encode()
    )
    trickle.settimeout(60)
    answer = b""
    try:
        for _ in range(300):  # a minute at most
            if b"\r\n\r\n" in answer:
                break
            trickle.sendall(b"S")
            time.sleep(0.2)
            with contextlib.suppress(BlockingIOError):
                answer += trickle.recv(1 << 16, socket.MSG_DONTWAIT)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the hub answered and closed the connection while a byte was on its way
    with contextlib.suppress(OSError):
        while chunk := trickle.recv(1 << 16):  # the rest of the answer, until the hub closes
            answer += chunk
    trickle.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"reason": "too_slow"' in answer
    assert file_bytes(tmp_path / "hub.db") == before
