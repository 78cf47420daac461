"""``sqlite-utils sync DB URL --watch``: devices that stay in sync live through a real hub.

Everything is real: ``datasette serve`` subprocesses, ``sqlite-utils sync --watch``
subprocesses, edits made with Python's sqlite3 on the device files (another program than the
watcher). Nothing is timed: each check waits, up to a generous deadline, until the devices
agree. The hubs hold a waiting pull at most 2 s (``max_wait``), so knowledge ticks, which wake
no one, reach every device soon after the last edit and the clocks become equal too.
"""

from __future__ import annotations

import pathlib
import signal
import sqlite3
import subprocess
import threading
import time

import httpx
import pytest

from sqlite_utils_sync import list_conflicts, sync_status

DEADLINE = 90.0  # seconds: generous, the machine may be busy; never an assertion on speed


class Watcher:
    """A ``sqlite-utils sync PATH URL --watch`` subprocess, its output in a log file."""

    def __init__(self, path, url, token, executable, clean_env, log):
        self.path, self.log = pathlib.Path(path), pathlib.Path(log)
        args = [executable("sqlite-utils"), "sync", str(path), url, "--watch", "--token", token]
        with open(log, "ab") as out:
            # PYTHONFAULTHANDLER: a watcher sent SIGABRT prints where each of its threads is.
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=clean_env(PYTHONFAULTHANDLER="1"))

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, count: int = 1) -> None:
        wait_until(lambda: self.output().count(text) >= count, lambda: f"{text!r} in the output of {self.path.name}:\n{self.output()}")

    def stacks(self) -> str:
        """Stop a watcher that did not do what it should, and return its output, which then
        ends with the stack of each of its threads."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGABRT)
            self.proc.wait(timeout=DEADLINE)
        return self.output()

    def stop(self, sig=signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=DEADLINE)


def wait_until(condition, what) -> None:
    """Wait for ``condition()``; ``what`` (text, or a function that tells it when the wait
    fails) says what was awaited."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what() if callable(what) else what}")
        time.sleep(0.05)


def edit(path, sql: str, *params) -> None:
    """Another program writes the device's database (its own connection and transaction)."""
    conn = sqlite3.connect(path, timeout=30)
    with conn:
        conn.execute(sql, params)
    conn.close()


def state(path) -> tuple:
    """What must be equal on converged copies: the rows, the conflict records, the clock."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        conn.execute("BEGIN")  # one snapshot: a watcher may be importing meanwhile
        rows = conn.execute("SELECT id, title, done FROM todos ORDER BY id").fetchall()
        conflicts = sorted(
            (c["id"], tuple(sorted(v["op"] for v in c["versions"])), c["resolved"])
            for c in list_conflicts(conn, include_resolved=True)
        )
        status = sync_status(conn)
        return rows, conflicts, status["clock"], status["operations"]
    finally:
        conn.close()


def converged(paths) -> bool:
    try:
        states = [state(p) for p in paths]
    except sqlite3.OperationalError:  # a table not created yet, a lock held too long
        return False
    return all(s == states[0] for s in states)


def wait_converged(paths, watchers=()) -> tuple:
    wait_until(lambda: converged(paths), lambda: f"{', '.join(pathlib.Path(p).name for p in paths)} to converge\n{diverged(paths, watchers)}")
    return state(paths[0])


def diverged(paths, watchers) -> str:
    """What each copy holds, each watcher's output and threads, and the hub's log."""
    lines = []
    for path in paths:
        try:
            lines.append(f"{pathlib.Path(path).name}: {state(path)}")
        except sqlite3.Error as ex:
            lines.append(f"{pathlib.Path(path).name}: unreadable ({ex})")
    lines += [f"{w.path.name}:\n{w.stacks()}" for w in watchers]
    for log in sorted(pathlib.Path(paths[0]).parent.glob("datasette-*.log")):
        lines.append(f"{log.name} (end):\n" + "\n".join(log.read_text(errors="replace").splitlines()[-40:]))
    return "\n".join(lines)


@pytest.fixture
def live_hub(request, tmp_path, datasette_server, hub_config, make_db):
    """A hub holding two todos, its waiting pulls capped at 2 s (or the parameter: 0 makes it
    answer at once, like a hub without long-poll); alice's token in ``hub.alice``."""
    hub_path = tmp_path / "hub.db"
    conn = make_db(hub_path, "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)")
    conn.execute("INSERT INTO todos VALUES (1, 'Buy milk', 0), (2, 'Walk dog', 0)")
    conn.close()
    hub_config["plugins"] = {"datasette-sync": {"max_wait": getattr(request, "param", 2)}}
    server = datasette_server([hub_path], hub_config)
    server.path = hub_path
    server.alice = server.token("alice")
    return server


@pytest.fixture
def watchers(tmp_path, live_hub, executable, clean_env):
    """``start(name)``: a watcher of ``<name>.db`` (made by its first sync); every watcher
    still running at teardown is killed."""
    started = []

    def start(name: str) -> Watcher:
        watcher = Watcher(tmp_path / f"{name}.db", live_hub.url + "/hub", live_hub.alice, executable, clean_env, tmp_path / f"{name}.log")
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        if watcher.proc.poll() is None:
            watcher.proc.kill()
            watcher.proc.wait()


def assert_clean(watcher: Watcher) -> None:
    assert "Traceback" not in watcher.output()
    assert "Error" not in watcher.output()


def test_two_then_five_watchers_converge_with_edits_and_conflicts(live_hub, watchers):
    a, b = watchers("a"), watchers("b")
    for w in (a, b):
        w.wait_for("Watching")
    edit(a.path, "INSERT INTO todos (id, title, done) VALUES (10, 'From A', 0)")
    edit(b.path, "INSERT INTO todos (id, title, done) VALUES (20, 'From B', 0)")
    edit(b.path, "UPDATE todos SET done = 1 WHERE id = 2")
    rows, conflicts, _, _ = wait_converged([a.path, b.path, live_hub.path], [a, b])
    assert rows == [(1, "Buy milk", 0), (2, "Walk dog", 1), (10, "From A", 0), (20, "From B", 0)]
    assert conflicts == []
    # One line per sync that moved rows: b's edits arriving at a, a's leaving.
    assert "Applied " in a.output().split("Watching")[1] and "Sent " in a.output().split("Watching")[1]

    # b goes offline (SIGTERM: exit 0, "stopped"); both change todo 1; b comes back.
    assert b.stop() == 0
    assert b.output().splitlines()[-1] == "stopped"
    edit(b.path, "UPDATE todos SET title = 'Buy soy milk' WHERE id = 1")
    edit(a.path, "UPDATE todos SET title = 'Buy oat milk' WHERE id = 1")
    wait_until(lambda: state(live_hub.path)[0][0][1] == "Buy oat milk", "a's edit to reach the hub")
    b = watchers("b")
    rows, conflicts, _, _ = wait_converged([a.path, b.path, live_hub.path], [a, b])
    assert rows[0][1] in ("Buy oat milk", "Buy soy milk")
    assert len(conflicts) == 1 and not conflicts[0][2]

    # Three more devices join; all five edit at once, also the same row.
    others = [watchers(name) for name in ("c", "d", "e")]
    for w in others:
        w.wait_for("Watching")
    everyone = [a, b, *others]
    for number, w in enumerate(everyone):
        edit(w.path, "INSERT INTO todos (id, title, done) VALUES (?, ?, 0)", 100 + number, f"From {w.path.stem}")
        edit(w.path, "UPDATE todos SET title = ? WHERE id = 2", f"Walk dog ({w.path.stem})")
    paths = [w.path for w in everyone] + [live_hub.path]
    rows, conflicts, clock, operations = wait_converged(paths, everyone)
    assert [r[0] for r in rows] == [1, 2, 10, 20, 100, 101, 102, 103, 104]
    assert rows[1][1] in {f"Walk dog ({w.path.stem})" for w in everyone}
    assert len(clock) >= 6  # the hub and the five devices
    for w in everyone:
        assert w.stop(signal.SIGINT) == 0
        assert w.output().splitlines()[-1] == "stopped"
        assert_clean(w)


def test_hub_killed_and_restarted_watchers_catch_up(live_hub, watchers, executable, clean_env):
    a, b = watchers("a"), watchers("b")
    for w in (a, b):
        w.wait_for("Watching")
    edit(a.path, "INSERT INTO todos (id, title, done) VALUES (10, 'Before', 0)")
    wait_converged([a.path, b.path, live_hub.path], [a, b])

    live_hub.proc.kill()
    live_hub.proc.wait()
    for w in (a, b):
        w.wait_for("unreachable")
    # Edits while the hub is away are kept, and sent when it is back.
    edit(a.path, "INSERT INTO todos (id, title, done) VALUES (11, 'While down A', 0)")
    edit(b.path, "INSERT INTO todos (id, title, done) VALUES (21, 'While down B', 0)")
    edit(b.path, "UPDATE todos SET done = 1 WHERE id = 1")

    with open(live_hub.log, "ab") as out:
        hub = subprocess.Popen(
            [executable("datasette"), *live_hub.args, "--port", str(live_hub.port)],
            stdout=out, stderr=subprocess.STDOUT, env=clean_env(), cwd=live_hub.cwd,
        )
    try:
        for w in (a, b):
            w.wait_for("back after")
        rows, _, _, _ = wait_converged([a.path, b.path, live_hub.path], [a, b])
        assert [r[0] for r in rows] == [1, 2, 10, 11, 21] and rows[0][2] == 1
        for w in (a, b):
            lines = w.output().splitlines()
            assert sum("unreachable" in line for line in lines) == 1, w.output()  # one line, not one per retry
            assert sum("back after" in line for line in lines) == 1, w.output()
            assert w.stop() == 0
            assert_clean(w)
    finally:
        hub.kill()
        hub.wait()


@pytest.mark.parametrize("live_hub", [600], indirect=True)
def test_a_watcher_finds_its_hub_back_with_a_pull_that_answers_at_once(live_hub, watchers, executable, clean_env):
    """A waiting pull on an idle hub is held for the whole wait: were the pull that finds the
    hub back such a pull, the catch-up exchange (and the "back after" line) would wait for it."""
    a = watchers("a")
    a.wait_for("Watching")
    live_hub.proc.kill()
    live_hub.proc.wait()
    a.wait_for("unreachable")
    before = len(live_hub.output())
    with open(live_hub.log, "ab") as out:
        hub = subprocess.Popen(
            [executable("datasette"), *live_hub.args, "--port", str(live_hub.port)],
            stdout=out, stderr=subprocess.STDOUT, env=clean_env(), cwd=live_hub.cwd,
        )
    try:
        a.wait_for("back after")
        pulls = [line for line in live_hub.output()[before:].splitlines() if "/-/sync/export?" in line and "device=" in line]
        assert pulls and "&wait=0&" in pulls[0], pulls
        assert a.stop() == 0
        assert_clean(a)
    finally:
        hub.kill()
        hub.wait()


def test_a_pull_that_failed_before_the_hub_came_back_adds_no_status_line(tmp_path, make_db):
    # The order of one hub restart, step by step: the poller's pull fails while the hub is
    # down, the main thread's push finds it back, and only then is that failure handled. The
    # watcher must not say "unreachable" (and later "back after") a second time.
    import threading

    from sqlite_utils_sync import errors
    from sqlite_utils_sync.client import HubError
    from sqlite_utils_sync.watch import _Watcher

    lines = []
    watcher = _Watcher(
        make_db(tmp_path / "a.db"), "http://127.0.0.1:9/hub", None, None, False, False, 60.0, lines.append,
        threading.Event(), 2.0, 0.1, lambda result: None, 5.0,
    )
    down = HubError(errors.CONNECTION_FAILED, "cannot connect to http://127.0.0.1:9/hub: connection refused")
    watcher.failed(down)
    stale = ("failed", down, time.monotonic())  # the pull sent just before the hub was back
    watcher.reached()
    watcher.handle(stale)
    watcher.reached()
    assert len(lines) == 2, lines
    assert lines[0].startswith("hub http://127.0.0.1:9/hub unreachable: cannot connect")
    assert lines[1].startswith("hub http://127.0.0.1:9/hub back after ")
    assert watcher.poll_due is not None  # pulling again at once


def test_watcher_says_once_that_its_database_is_locked_and_syncs_after(live_hub, watchers):
    a = watchers("a")
    a.wait_for("Watching")
    # Another program holds the device's database past the busy timeout: even reads wait.
    holder = sqlite3.connect(a.path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        edit(live_hub.path, "INSERT INTO todos (id, title, done) VALUES (30, 'From the hub', 0)")
        a.wait_for("a.db is locked by another connection: waiting for it")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    rows, _, _, _ = wait_converged([a.path, live_hub.path], [a])
    assert [r[0] for r in rows] == [1, 2, 30]
    assert a.output().count("is locked by another connection") == 1
    assert a.stop() == 0
    assert_clean(a)


def test_a_watcher_whose_device_commits_all_the_time_still_takes_what_others_push(live_hub, watchers):
    a = watchers("a")
    a.wait_for("Watching")
    stop = threading.Event()

    def busy_app():  # commits every 50 ms, each one a push due
        n = 1000
        while not stop.is_set():
            n += 1
            edit(a.path, "INSERT INTO todos (id, title, done) VALUES (?, 'busy', 0)", n)
            time.sleep(0.05)

    editor = threading.Thread(target=busy_app)
    editor.start()
    try:
        # Each hub edit needs a pull started after the one before it returned.
        for todo in (40, 41, 42):
            edit(live_hub.path, "INSERT INTO todos (id, title, done) VALUES (?, 'From the hub', 0)", todo)
            wait_until(lambda: holds(a.path, todo), lambda: f"todo {todo} on a.db while it is busy\n{a.stacks()}")
    finally:
        stop.set()
        editor.join()
    wait_converged([a.path, live_hub.path], [a])
    assert a.stop() == 0
    assert_clean(a)


def holds(path, todo: int) -> bool:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute("SELECT 1 FROM todos WHERE id = ?", [todo]).fetchone() is not None
    finally:
        conn.close()


def test_watcher_killed_and_restarted_loses_nothing(tmp_path, live_hub, watchers, executable, clean_env):
    a, b = watchers("a"), watchers("b")
    for w in (a, b):
        w.wait_for("Watching")
    edit(a.path, "INSERT INTO todos (id, title, done) VALUES (10, 'Live', 0)")
    wait_converged([a.path, b.path, live_hub.path], [a, b])

    a.proc.kill()
    a.proc.wait()
    for number in range(5):  # made while a's watcher is dead
        edit(a.path, "INSERT INTO todos (id, title, done) VALUES (?, 'Offline', 0)", 30 + number)
    edit(b.path, "UPDATE todos SET title = 'Walk the dog' WHERE id = 2")
    a = watchers("a")
    rows, conflicts, _, operations = wait_converged([a.path, b.path, live_hub.path], [a, b])
    assert [r[0] for r in rows] == [1, 2, 10, 30, 31, 32, 33, 34]
    assert rows[1][1] == "Walk the dog" and conflicts == []
    assert a.stop() == 0 and b.stop() == 0
    for w in (a, b):
        assert_clean(w)

    # A refusal is final: one line, exit 1, no retrying.
    refused = subprocess.run(
        [executable("sqlite-utils"), "sync", str(a.path), live_hub.url + "/hub", "--watch", "--token", "dstok_wrong"],
        capture_output=True, text=True, env=clean_env(), timeout=DEADLINE,
    )
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("Error: hub ")
    assert "refused the token" in refused.stderr and "Traceback" not in refused.stderr

    # So is a hub's 409 for a retired device: not "unreachable", retried for ever.
    retired = sync_status(sqlite3.connect(a.path))["device_id"]
    subprocess.run([executable("sqlite-utils"), "sync-retire", str(live_hub.path), retired], check=True, env=clean_env())
    edit(a.path, "INSERT INTO todos (id, title, done) VALUES (40, 'From a retired device', 0)")
    refused = subprocess.run(
        [executable("sqlite-utils"), "sync", str(a.path), live_hub.url + "/hub", "--watch", "--token", live_hub.alice],
        capture_output=True, text=True, env=clean_env(), timeout=DEADLINE,
    )
    assert refused.returncode == 1, refused.stderr
    assert "retired" in refused.stderr.strip().splitlines()[-1]
    assert "unreachable" not in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.parametrize("live_hub", [0], indirect=True)
def test_hub_that_answers_at_once_is_polled_not_spun_on(live_hub, watchers):
    a, b = watchers("a"), watchers("b")
    for w in (a, b):
        w.wait_for("Watching")
    edit(a.path, "INSERT INTO todos (id, title, done) VALUES (10, 'From A', 0)")
    edit(b.path, "INSERT INTO todos (id, title, done) VALUES (20, 'From B', 0)")
    rows, _, _, _ = wait_converged([a.path, b.path, live_hub.path], [a, b])
    assert [r[0] for r in rows] == [1, 2, 10, 20]
    for w in (a, b):
        w.wait_for("does not hold pulls open: pulling every 2 s")
        assert w.output().count("does not hold pulls open") == 1
        assert w.stop() == 0
        assert_clean(w)


def test_a_partial_copy_takes_what_it_withholds_and_goes_on_waiting(tmp_path, live_hub, watchers, run):
    # A copy of todos only: an edit of notes wakes its waiting pull, which answers with the
    # edit as withheld. The watcher must take it (its clock reaches the hub's), not leave its
    # clock behind so that every waiting pull answers at once, and not take the hub for one
    # that does not hold pulls open.
    edit(live_hub.path, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    run(["sqlite-utils", "enable-sync", live_hub.path, "notes"])
    a_path = tmp_path / "a.db"
    run(["sqlite-utils", "sync", a_path, live_hub.url + "/hub", "--token", live_hub.alice, "--table", "todos"])
    a = watchers("a")
    a.wait_for("Watching")
    edit(live_hub.path, "INSERT INTO notes VALUES (1, 'not for a')")
    hub_clock = sync_status(sqlite3.connect(live_hub.path))["clock"]
    reached = lambda: all(state(a_path)[2].get(device, 0) >= seq for device, seq in hub_clock.items())  # noqa: E731
    wait_until(reached, lambda: f"a's clock to reach the hub's {hub_clock}\n{a.output()}")
    edit(live_hub.path, "INSERT INTO todos VALUES (3, 'for a', 0)")
    wait_until(lambda: [r[0] for r in state(a_path)[0]] == [1, 2, 3], lambda: f"a to get todo 3\n{a.output()}")
    assert sync_status(sqlite3.connect(a_path))["withheld"] == 1
    assert "does not hold pulls open" not in a.output()
    assert a.stop() == 0
    assert_clean(a)
