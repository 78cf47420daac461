"""The hub side of live sync, through a real ``datasette serve``: pulls that wait for new
operations (``wait`` and ``device`` on the export endpoint), what wakes them and what does
not, 200 idle waiting pulls, the watching devices on the overview, and the pages updating
themselves in a real headless Chromium.

Whether a pull is waiting is read from the hub itself (the overview's JSON lists it), and
"it did not wake" is checked after ``/-/sync/changes`` has made the hub re-read its clocks.
Pulls wait longer than their client's read timeout, so a pull that is never woken fails the
test instead of answering at its timeout with the same bundle.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sqlite3
import sys
import threading
import time
import urllib.parse
import uuid

import httpx
import pytest

from sqlite_utils_sync import import_bundle, sync_status
from sqlite_utils_sync.protocol import CHANGES_PATH, EXPORT_PATH, encode_clock

CONFIG = {
    "databases": {
        "hub": {
            "permissions": {
                "sync-export": True,
                "sync-import": True,
                "insert-row": True,
                "update-row": True,
                "delete-row": True,
            }
        }
    },
    # A pull nobody wakes waits this long: far beyond the client's timeout, so such a pull
    # fails the test. Both are long so that a slow, shared machine doesn't.
    "plugins": {"datasette-sync": {"max_wait": 600}},
}
LONG_WAIT = 600
CLIENT_TIMEOUT = 150
DEADLINE = 30


def wait_until(check, what: str, deadline: float = DEADLINE):
    """Poll ``check`` until it returns something true; fail naming ``what`` after ``deadline``."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def hub(tmp_path, datasette_server, make_todos_db):
    path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    server = datasette_server([path], CONFIG)
    server.path = path
    return server


def status_of(path) -> dict:
    conn = sqlite3.connect(str(path))
    try:
        return sync_status(conn)
    finally:
        conn.close()


def device_id(path) -> str:
    return status_of(path)["device_id"]


def clock_of(path) -> dict:
    return status_of(path)["clock"]


class Pull(threading.Thread):
    """A waiting pull in a thread: ``GET export?since=&wait=&device=``; ``response`` when done."""

    def __init__(self, server, since: dict, device: str | None, wait=LONG_WAIT, headers=None):
        super().__init__(daemon=True)
        params = {"since": encode_clock(since), "wait": str(wait)}
        if device:
            params["device"] = device
        self.url = server.url + "/hub" + EXPORT_PATH + "?" + urllib.parse.urlencode(params)
        self.headers = headers or {}
        self.response = self.error = None
        self.start()

    def run(self):
        try:
            self.response = httpx.get(self.url, headers=self.headers, timeout=CLIENT_TIMEOUT)
        except Exception as ex:  # noqa: BLE001 - reported by result()
            self.error = ex

    def result(self) -> httpx.Response:
        self.join(CLIENT_TIMEOUT + 10)
        assert self.error is None, f"the waiting pull failed: {self.error!r}"
        assert self.response is not None and self.response.status_code == 200, self.response
        return self.response


def watching(server) -> list[dict]:
    return server.get("/hub/-/sync.json").json()["watching"]


def waiting_devices(server) -> set[str]:
    return {w["device_id"] for w in watching(server) if w["waiting"]}


def settle(server) -> None:
    """Make the hub re-read its clocks (and wake whoever that concerns) before going on."""
    assert server.get("/hub" + CHANGES_PATH).status_code == 200


def import_response(response: httpx.Response, path, tmp_path) -> None:
    bundle = tmp_path / f"pulled-{uuid.uuid4().hex}.bundle"
    bundle.write_bytes(response.content)
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        import_bundle(conn, str(bundle))
    finally:
        conn.close()


def test_a_waiting_pull_answers_when_a_push_lands_and_carries_it(tmp_path, hub, make_todos_db, hub_sync, upsert, todo_rows):
    laptop, phone = make_todos_db(tmp_path / "laptop.db"), make_todos_db(tmp_path / "phone.db")
    hub_sync(laptop, hub, None)
    hub_sync(phone, hub, None)
    pull = Pull(hub, clock_of(phone), device_id(phone))
    wait_until(lambda: device_id(phone) in waiting_devices(hub), "the phone's pull to wait")
    settle(hub)
    assert pull.is_alive(), "the pull answered with nothing new"

    upsert(laptop, {"id": 2, "title": "Walk dog", "done": 0})
    hub_sync(laptop, hub, None)
    import_response(pull.result(), phone, tmp_path)
    assert todo_rows(phone) == todo_rows(laptop) == todo_rows(hub.path)
    assert {"id": 2, "title": "Walk dog", "done": 0} in todo_rows(phone)


def test_ticks_and_the_callers_own_operations_do_not_wake_it(tmp_path, hub, make_todos_db, hub_sync, upsert, todo_rows):
    laptop, phone, tablet = (make_todos_db(tmp_path / f"{name}.db") for name in ("laptop", "phone", "tablet"))
    for path in (laptop, phone):
        hub_sync(path, hub, None)
    pull = Pull(hub, clock_of(phone), device_id(phone))
    wait_until(lambda: device_id(phone) in waiting_devices(hub), "the phone's pull to wait")

    # A new, empty copy's first sync pushes only a knowledge tick.
    assert hub_sync(tablet, hub, None)["pushed"]["total_operations"] >= 1
    settle(hub)
    assert pull.is_alive(), "a knowledge tick woke the pull"

    # The phone's own edit, pushed by another of its processes, is not news to the phone.
    upsert(phone, {"id": 3, "title": "Phone's own", "done": 0})
    assert hub_sync(phone, hub, None)["pushed"]["total_operations"] >= 1
    settle(hub)
    assert pull.is_alive(), "the phone's own operation woke its pull"

    upsert(laptop, {"id": 4, "title": "From the laptop", "done": 1})
    hub_sync(laptop, hub, None)
    import_response(pull.result(), phone, tmp_path)
    assert {"id": 4, "title": "From the laptop", "done": 1} in todo_rows(phone)


def test_a_write_by_another_process_to_the_hub_file_wakes_it(tmp_path, hub, make_todos_db, hub_sync, todo_rows):
    phone = make_todos_db(tmp_path / "phone.db")
    hub_sync(phone, hub, None)
    pull = Pull(hub, clock_of(phone), device_id(phone))
    wait_until(lambda: device_id(phone) in waiting_devices(hub), "the phone's pull to wait")
    # This test process is not the hub: like the sqlite3 shell on the hub's file.
    conn = sqlite3.connect(str(hub.path), isolation_level=None)
    conn.execute("INSERT INTO todos (id, title, done) VALUES (5, 'Typed in the shell', 0)")
    conn.close()
    import_response(pull.result(), phone, tmp_path)
    assert {"id": 5, "title": "Typed in the shell", "done": 0} in todo_rows(phone)

    # A write through Datasette's own JSON API wakes the next one.
    pull = Pull(hub, clock_of(phone), device_id(phone))
    wait_until(lambda: device_id(phone) in waiting_devices(hub), "the phone's next pull to wait")
    response = hub.post("/hub/todos/-/insert", json={"row": {"id": 6, "title": "Through Datasette", "done": 0}})
    assert response.status_code == 201, response.text
    import_response(pull.result(), phone, tmp_path)
    assert {"id": 6, "title": "Through Datasette", "done": 0} in todo_rows(phone)

async def test_a_commit_right_after_a_waiting_pull_read_the_clocks_wakes_it(tmp_path, make_db, monkeypatch):
    # Another process commits just after the waiting pull's first read of the clocks (made so
    # here by wrapping that read): the file poller must count it. It started after the read
    # and took the committed file as its starting point, so the pull waited it out.
    from datasette.app import Datasette

    from datasette_sync import live

    path = tmp_path / "hub.db"
    make_db(path).close()
    since = sync_status(sqlite3.connect(path))["clock"]
    datasette = Datasette([str(path)])
    await datasette.invoke_startup()
    real_read = live.read_clocks
    committed = []

    def read_then_commit(conn, scanned):
        clocks = real_read(conn, scanned)
        if not committed:
            shell = sqlite3.connect(path)
            with shell:
                shell.execute("INSERT INTO todos (id, title) VALUES (1, 'From the shell')")
            shell.close()
            committed.append(True)
        return clocks

    monkeypatch.setattr(live, "read_clocks", read_then_commit)
    assert await live.feed(datasette, "hub").wait(since, "d" * 32, 10)
    assert committed


def test_the_file_poller_sees_a_commit_within_one_clock_tick(tmp_path, make_db):
    # A commit that rewrites a page in place keeps the file's size, and one within the same
    # tick of the kernel's clock keeps its modification time: data_version moves.
    from datasette_sync.live import CommitWatch

    path = tmp_path / "hub.db"
    conn = make_db(path, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)", tables=())
    conn.execute("INSERT INTO notes VALUES (1, 'first')")
    watch = CommitWatch(str(path))
    before, stat = watch.state(), os.stat(path)
    conn.execute("UPDATE notes SET body = 'again' WHERE id = 1")
    conn.close()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (os.stat(path).st_size, os.stat(path).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert watch.state() != before
    watch.close()


def test_the_file_poller_sees_a_commit_that_starts_the_wal_over_within_one_clock_tick(tmp_path, make_db):
    # In WAL mode the database file does not change on commit; after a checkpoint the next
    # commit writes the -wal from its start, keeping its size.
    from datasette_sync.live import CommitWatch

    path = tmp_path / "hub.db"
    wal = tmp_path / "hub.db-wal"
    conn = make_db(path, "PRAGMA journal_mode = wal; CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)", tables=())
    conn.execute("INSERT INTO notes VALUES (1, 'first')")
    conn.execute("UPDATE notes SET body = 'second' WHERE id = 1")
    assert conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[0] == 0
    watch = CommitWatch(str(path))
    before, stat = watch.state(), os.stat(wal)
    conn.execute("UPDATE notes SET body = 'third' WHERE id = 1")
    os.utime(wal, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (os.stat(wal).st_size, os.stat(wal).st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert watch.state() != before
    watch.close()
    conn.close()


def other_process(path, code: str) -> subprocess.CompletedProcess:
    """``code`` run by another process on a connection ``c`` to ``path`` (timeout 0)."""
    source = f"import sqlite3, sys\nc = sqlite3.connect({str(path)!r}, timeout=0, isolation_level=None)\n" + code
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True)


def test_the_file_poller_never_drops_the_hubs_locks(tmp_path, make_db):
    """On POSIX, closing any descriptor of a file drops every lock the process holds on it,
    SQLite's included: a poller that opened the database file to read its header let another
    process write under the hub's open transaction (a corrupted hub). While this process holds
    the write lock and the poller looks, another process still cannot take it."""
    from datasette_sync.live import CommitWatch

    path = tmp_path / "hub.db"
    conn = make_db(path, "PRAGMA journal_mode = delete; CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)", tables=())
    take = "try:\n    c.execute('BEGIN IMMEDIATE')\nexcept sqlite3.OperationalError as ex:\n    sys.exit(str(ex))\n"
    conn.execute("BEGIN IMMEDIATE")
    conn.execute("INSERT INTO notes VALUES (1, 'being written')")
    assert other_process(path, take).stderr.strip() == "database is locked"
    watch = CommitWatch(str(path))
    for _ in range(3):
        watch.state()
    watch.close()
    assert other_process(path, take).stderr.strip() == "database is locked"
    conn.execute("COMMIT")
    assert other_process(path, take).returncode == 0
    conn.close()


def test_the_file_poller_never_lets_another_process_delete_the_hubs_wal(tmp_path, make_db):
    """In WAL mode every open connection holds a shared lock on the database file, so that the
    last one to close, alone, checkpoints and deletes the -wal. Were the poller to drop the
    hub's lock, another process closing its connection would delete the -wal under the hub."""
    from datasette_sync.live import CommitWatch

    path = tmp_path / "hub.db"
    conn = make_db(path, "PRAGMA journal_mode = wal; CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)", tables=())
    conn.execute("INSERT INTO notes VALUES (1, 'in the wal')")
    watch = CommitWatch(str(path))
    for _ in range(3):
        watch.state()
    watch.close()
    assert other_process(path, "print(c.execute('SELECT count(*) FROM notes').fetchone()[0])\nc.close()\n").stdout == "1\n"
    assert (tmp_path / "hub.db-wal").exists()
    assert conn.execute("SELECT body FROM notes").fetchall() == [("in the wal",)]
    conn.close()


def test_a_wait_that_runs_out_answers_like_a_plain_export(tmp_path, datasette_server, make_todos_db):
    path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    server = datasette_server([path], {**CONFIG, "plugins": {"datasette-sync": {"max_wait": 0.5}}})
    since = encode_clock(clock_of(path))
    export = "/hub" + EXPORT_PATH
    plain = server.get(export, params={"since": since})
    # Far above max_wait: capped, not refused; and it answers (the client's timeout is 30 s).
    waited = server.get(export, params={"since": since, "wait": "3600", "device": uuid.uuid4().hex})
    assert waited.status_code == plain.status_code == 200
    for header in ("content-type", "x-sync-clock", "x-sync-operations", "x-sync-scope"):
        assert waited.headers[header] == plain.headers[header]
    head = httpx.head(server.url + export, params={"since": since, "wait": "1"}, timeout=30)
    assert head.status_code == 200 and head.headers["x-sync-clock"] == plain.headers["x-sync-clock"]
    copy = make_todos_db(tmp_path / "copy.db")
    for response in (plain, waited):
        before = clock_of(copy)
        import_response(response, copy, tmp_path)
        assert {k: v for k, v in clock_of(copy).items() if k != device_id(copy)} == {
            k: v for k, v in before.items() if k != device_id(copy)
        }

    changes = server.get("/hub" + CHANGES_PATH, params={"since": since, "wait": "3600"})
    assert changes.status_code == 200
    assert changes.json() == {"clock": clock_of(path), "operations": 0, "changed": False}
    behind = server.get("/hub" + CHANGES_PATH, params={"since": "{}"}).json()
    assert behind["changed"] is True and behind["operations"] == sum(clock_of(path).values())


def test_a_wait_ends_when_the_callers_token_expires(tmp_path, datasette_server, make_todos_db, run):
    """A pull answered after its token expired would carry what was written after: the wait
    is cut at the expiry, and the answer holds only what the hub held then."""
    path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    server = datasette_server([path], {**CONFIG, "plugins": {"datasette-sync": {"max_wait": 120}}})
    token = server.token("alice", "--expires-after", "2")
    since = encode_clock(clock_of(path))
    later = threading.Timer(8, lambda: run(["sqlite-utils", "insert", path, "todos", "-", "--pk", "id"],
                                            input='{"id": 2, "title": "after the token expired", "done": 0}'))
    later.start()
    try:
        response = server.get("/hub" + EXPORT_PATH, params={"since": since, "wait": "60", "device": uuid.uuid4().hex},
                              headers={"Authorization": f"Bearer {token}"})
    finally:
        later.join()
    assert response.status_code == 200
    assert response.headers["x-sync-operations"] == "0"
    assert server.get("/hub" + EXPORT_PATH, headers={"Authorization": f"Bearer {token}"}).status_code == 401


@pytest.mark.parametrize("path", [EXPORT_PATH, CHANGES_PATH])
def test_bad_wait_values_are_refused(hub, path):
    for wait in ("-1", "soon", "nan", "inf", "1e999", "0x10"):
        response = hub.get("/hub" + path, params={"wait": wait})
        assert response.status_code == 400, (wait, response.text)
        assert response.json() == {
            "ok": False,
            "error": f"wait must be a number of seconds >= 0, got {wait!r}",
            "reason": "invalid_request",
        }
    bad_device = hub.get("/hub" + path, params={"wait": "1", "device": "my-laptop"})
    assert bad_device.status_code == 400
    assert bad_device.json()["error"] == "device must be a device id (32 hex digits), got 'my-laptop'"
    assert hub.get("/hub" + path, params={"wait": "0"}).status_code == 200


@pytest.mark.parametrize("setting, value", [("max_wait", "a minute"), ("send_timeout", 0), ("send_timeout", True)])
def test_a_bad_wait_setting_stops_the_hub_at_startup(tmp_path, datasette_server, make_todos_db, setting, value):
    path = make_todos_db(tmp_path / "hub.db")
    with pytest.raises(AssertionError, match=rf"{setting} \(datasette-sync plugin config\) must be a number of seconds"):
        datasette_server([path], {"plugins": {"datasette-sync": {setting: value}}})


def thread_count(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def many_pulls(server, since: dict, devices: list[str], started: threading.Event, results: list):
    limits = httpx.Limits(max_connections=len(devices) + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT + 20, limits=limits) as client:
        url = server.url + "/hub" + EXPORT_PATH
        pulls = [
            client.get(url, params={"since": encode_clock(since), "wait": str(LONG_WAIT), "device": device})
            for device in devices
        ]
        started.set()
        results.extend(await asyncio.gather(*pulls, return_exceptions=True))


def test_200_idle_waiting_pulls_hold_no_thread_each_and_pages_still_answer(tmp_path, hub, make_todos_db, hub_sync, upsert):
    laptop, phone = make_todos_db(tmp_path / "laptop.db"), make_todos_db(tmp_path / "phone.db")
    hub_sync(laptop, hub, None)
    hub_sync(phone, hub, None)
    since = clock_of(phone)  # every pull waits as the phone would
    pid = hub.proc.pid
    # Warm up what a busy hub has anyway: read threads, the write thread, a feed with its poller.
    warm = Pull(hub, since, uuid.uuid4().hex)
    wait_until(lambda: waiting_devices(hub), "a first pull to wait")
    for _ in range(5):
        assert hub.get("/hub/-/sync").status_code == 200
    threads_before, fds_before = thread_count(pid), open_fds(pid)

    devices = [uuid.uuid4().hex for _ in range(200)]
    results: list = []
    started = threading.Event()
    runner = threading.Thread(target=lambda: asyncio.run(many_pulls(hub, since, devices, started, results)), daemon=True)
    runner.start()
    started.wait(30)
    wait_until(lambda: set(devices) <= waiting_devices(hub), "200 pulls to wait", deadline=60)

    page = hub.get("/hub/-/sync")
    assert page.status_code == 200 and "Watching now" in page.text
    assert hub.get("/hub/-/sync/operations").status_code == 200
    threads = thread_count(pid)
    # A thread each would be 200 more; the hub's pools may start a couple more when busy.
    assert threads <= threads_before + 3, (threads_before, threads)
    # Each pull holds its socket, and no database connection (a file descriptor each).
    assert open_fds(pid) <= fds_before + 200 + 5, (fds_before, open_fds(pid))

    upsert(laptop, {"id": 7, "title": "For everyone", "done": 0})
    hub_sync(laptop, hub, None)
    runner.join(CLIENT_TIMEOUT + 30)
    warm.result()
    assert len(results) == 200
    for response in results:
        assert isinstance(response, httpx.Response) and response.status_code == 200, response
        assert int(response.headers["x-sync-operations"]) > 0
    import_response(results[123], phone, tmp_path)
    assert sqlite3.connect(str(phone)).execute("SELECT title FROM todos WHERE id = 7").fetchone() == ("For everyone",)
    # Answering them used the hub's bounded pools (bundle files are read off the event loop).
    assert thread_count(pid) < threads_before + 50


def hang_up_pull(server, since: dict, device: str) -> socket.socket:
    """A waiting pull on a raw socket, so the test can hang up mid-wait."""
    query = urllib.parse.urlencode({"since": encode_clock(since), "wait": str(LONG_WAIT), "device": device})
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(f"GET /hub{EXPORT_PATH}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return sock


def test_watching_devices_are_listed_on_the_overview_and_gone_when_they_stop(tmp_path, hub, make_todos_db, hub_sync, run):
    laptop, phone = make_todos_db(tmp_path / "laptop.db"), make_todos_db(tmp_path / "phone.db")
    hub_sync(laptop, hub, None)
    hub_sync(phone, hub, None)
    run(["sqlite-utils", "sync-name", laptop, "laptop"])
    hub_sync(laptop, hub, None)  # the hub learns the laptop's name
    overview = hub.get("/hub/-/sync")
    assert "Watching now" in overview.text and "No device is watching" in overview.text
    assert watching(hub) == []

    laptop_id, phone_id = device_id(laptop), device_id(phone)
    since = clock_of(hub.path)
    laptop_pull, phone_pull = hang_up_pull(hub, since, laptop_id), hang_up_pull(hub, since, phone_id)
    wait_until(lambda: waiting_devices(hub) == {laptop_id, phone_id}, "both pulls to wait")
    listed = {w["device_id"]: w for w in watching(hub)}
    assert listed[laptop_id]["actor"] is None and listed[laptop_id]["clock"] == since
    assert listed[laptop_id]["connected_since"].endswith("Z")
    text = hub.get("/hub/-/sync").text
    assert "No device is watching" not in text
    assert f"laptop ({laptop_id[:8]})" in text and phone_id[:8] in text and "(anonymous)" in text

    laptop_pull.close()
    wait_until(lambda: [w["device_id"] for w in watching(hub)] == [phone_id], "the laptop to be gone")
    phone_pull.close()
    wait_until(lambda: watching(hub) == [], "the phone to be gone")
    assert "No device is watching" in hub.get("/hub/-/sync").text


def test_the_operations_page_shows_new_operations_without_a_reload(tmp_path, hub, make_todos_db, hub_sync, upsert):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    from test_browser import ARGS, CHROMIUM

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    laptop = make_todos_db(tmp_path / "laptop.db")
    hub_sync(laptop, hub, None)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            for path in ("/hub/-/sync/operations", "/hub/-/sync"):
                page.goto(hub.url + path, wait_until="load")
                assert "Buy milk" in page.inner_text("body")
                page.evaluate("window.notReloaded = true")
                title = f"Live {uuid.uuid4().hex[:6]}"
                wait_until(lambda: hub.get("/hub" + CHANGES_PATH).status_code == 200, "the hub")
                upsert(laptop, {"id": 8, "title": title, "done": 0})
                hub_sync(laptop, hub, None)
                page.wait_for_function(
                    "title => document.body.innerText.includes(title)", arg=title, timeout=DEADLINE * 1000
                )
                assert page.evaluate("window.notReloaded") is True, f"{path} was reloaded"
            assert errors == []
        finally:
            browser.close()
    # Without JavaScript the page is as before: the new operations are there on a reload.
    assert "Live " in hub.get("/hub/-/sync/operations").text
    assert json.loads(hub.get("/hub/-/sync/operations.json").text)["operations"]


def test_stopping_the_hub_answers_waiting_pulls_so_it_exits_promptly(tmp_path, hub, make_todos_db, hub_sync):
    phone = make_todos_db(tmp_path / "phone.db")
    hub_sync(phone, hub, None)
    pull = Pull(hub, clock_of(phone), device_id(phone))
    wait_until(lambda: device_id(phone) in waiting_devices(hub), "the phone's pull to wait")
    hub.proc.terminate()
    # Without ending the waits, uvicorn would hold the exit until the pull's wait ran out.
    wait_until(lambda: hub.proc.poll() is not None, "the hub to exit")
    assert pull.result().headers["x-sync-clock"]
    assert "Traceback" not in hub.output()


def test_a_pull_lists_no_device_under_another_actor_nor_clocks_of_made_up_devices(tmp_path, hub, make_todos_db, hub_sync, upsert):
    laptop = make_todos_db(tmp_path / "laptop.db")
    upsert(laptop, {"id": 2, "title": "From the laptop", "done": 0})
    alice, bob = ({"Authorization": f"Bearer {hub.token(actor)}"} for actor in ("alice", "bob"))
    hub_sync(laptop, hub, alice["Authorization"].split()[1])  # alice owns the laptop's device now
    laptop_id, since = device_id(laptop), clock_of(hub.path)
    # bob names the laptop, with a clock of 200 made-up devices, before or after alice: his
    # pulls wait, but the laptop is listed as alice's only, with her clock.
    forged = {**since, **{uuid.uuid4().hex: 1 for _ in range(200)}}
    bobs = [Pull(hub, forged, laptop_id, headers=bob)]
    time.sleep(1)
    assert watching(hub) == []
    alices = Pull(hub, since, laptop_id, headers=alice)
    wait_until(lambda: waiting_devices(hub) == {laptop_id}, "alice's pull to wait")
    bobs.append(Pull(hub, forged, laptop_id, headers=bob))
    time.sleep(1)
    # A device nobody owns is listed as its puller's, with the clock of devices held here.
    stranger = uuid.uuid4().hex
    strangers = Pull(hub, forged, stranger, headers=bob)
    wait_until(lambda: waiting_devices(hub) == {laptop_id, stranger}, "the stranger's pull to wait")
    listed = {w["device_id"]: (w["actor"], w["clock"]) for w in watching(hub)}
    assert listed == {laptop_id: ("alice", since), stranger: ("bob", since)}
    # Named by another actor too, a device nobody owns is listed once, as the newest puller's.
    anonymous = Pull(hub, since, stranger)
    wait_until(lambda: None in [w["actor"] for w in watching(hub) if w["device_id"] == stranger],
               "the anonymous pull to wait")
    assert [w["device_id"] for w in watching(hub)].count(stranger) == 1, watching(hub)
    phone = make_todos_db(tmp_path / "phone.db")  # another device's edit wakes them all
    upsert(phone, {"id": 3, "title": "Wakes them", "done": 0})
    hub_sync(phone, hub, alice["Authorization"].split()[1])
    for pull in (alices, *bobs, strangers, anonymous):
        pull.result()
