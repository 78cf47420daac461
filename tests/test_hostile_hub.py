"""A hub's answers are as hostile as a bundle: the client reads a refusal's text only so far,
refuses a JSON answer that never ends, gives up a body that trickles, and shows no control
characters from a hub's error text. The hostile hub is a real HTTP server on 127.0.0.1 that
answers every request the way the test says; the client is the real ``sqlite-utils sync``
(or ``sync_with_hub``)."""

from __future__ import annotations

import gzip
import http.server
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import httpx
import pytest
import sqlite_utils

from sqlite_utils_sync.client import MAX_ERROR_BODY, HubError, sync_with_hub


class HostileHub(http.server.ThreadingHTTPServer):
    """Answers every request with ``answer(handler)``; counts the bytes it got out."""

    daemon_threads = True

    def __init__(self, answer):
        self.answer, self.sent = answer, 0
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hub"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        try:
            self.server.answer(self)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up, as it should

    do_POST = do_GET

    def log_message(self, *args):
        pass

    def start(self, status: int, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.end_headers()

    def send(self, data: bytes) -> None:
        self.wfile.write(data)
        self.wfile.flush()
        self.server.sent += len(data)


@pytest.fixture
def hostile_hub():
    started = []

    def start(answer) -> HostileHub:
        server = HostileHub(answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def endless(handler, status: int) -> None:
    handler.start(status)
    handler.send(b'{"error": "')
    block = b"x" * 65536
    for _ in range(200_000):  # 13 GB: a client reading it whole would not get to the end
        handler.send(block)


def test_a_refusal_that_never_ends_is_read_only_so_far(tmp_path, hostile_hub, make_todos_db, run):
    hub = hostile_hub(lambda handler: endless(handler, 403))
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}])
    result = run(["sqlite-utils", "sync", device, hub.url], check=False)
    assert result.returncode == 1
    assert result.stderr == f"Error: hub {hub.url} does not allow export (pull) (403); no token was sent: pass --token or set DATASETTE_SYNC_TOKEN\n"
    assert hub.sent < 100 * MAX_ERROR_BODY  # what the sockets held when it stopped reading


def pulls_from(real, push_answer):
    """An answer that sends pulls on to the ``real`` hub and answers pushes itself."""

    def answer(handler):
        if handler.command != "GET":
            push_answer(handler)
            return
        upstream = httpx.get(real.url + handler.path, headers={"Authorization": handler.headers["Authorization"]})
        handler.send_response(upstream.status_code)
        for name in ("Content-Type", "X-Sync-Clock", "X-Sync-Operations"):
            if name in upstream.headers:
                handler.send_header(name, upstream.headers[name])
        handler.end_headers()
        handler.send(upstream.content)

    return answer


def test_a_json_answer_that_never_ends_is_refused(tmp_path, hostile_hub, make_todos_db, datasette_server, hub_config):
    # A real hub takes the pull; the push's answer, JSON, comes from a hostile one that never
    # ends it: the client stops after MAX_ANSWER bytes.
    real = datasette_server([make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "x", "done": 0}])], hub_config)
    hub = hostile_hub(pulls_from(real, lambda handler: endless(handler, 200)))
    db = sqlite_utils.Database(make_todos_db(tmp_path / "d.db", [{"id": 2, "title": "y", "done": 0}]))
    with pytest.raises(HubError) as error:
        sync_with_hub(db, hub.url, token=real.token("alice"))
    assert error.value.reason == "invalid_response"
    assert error.value.message == f"hub {hub.url} answered the import (push) with more than 1,048,576 bytes"
    assert hub.sent < 100 * MAX_ERROR_BODY + (1 << 20)


def test_a_push_answered_with_json_that_is_no_import_result_is_not_taken_for_sent(
    tmp_path, hostile_hub, make_todos_db, datasette_server, hub_config, run
):
    real = datasette_server([make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "x", "done": 0}])], hub_config)

    def says_ok(handler):
        handler.start(200)
        handler.send(b'{"ok": true}')

    hub = hostile_hub(pulls_from(real, says_ok))
    device = make_todos_db(tmp_path / "d.db", [{"id": 2, "title": "never reached a hub", "done": 0}])
    result = run(["sqlite-utils", "sync", device, hub.url, "--token", real.token("alice")], check=False)
    assert (result.returncode, result.stderr) == (1, f"Error: hub {hub.url} answered the push with unexpected JSON\n")


def test_a_failed_sync_into_a_new_file_keeps_what_another_process_wrote_there(tmp_path, hostile_hub, run):
    # sync made the file; while it waits for the hub, another program writes its table there.
    # The failed sync must not take that with it.
    target = tmp_path / "shared.db"

    def another_program_then_refuse(handler):
        with sqlite3.connect(target) as other:
            other.execute("CREATE TABLE notes (body TEXT)")
            other.execute("INSERT INTO notes VALUES ('kept')")
        handler.start(400)
        handler.send(b'{"error": "no"}')

    hub = hostile_hub(another_program_then_refuse)
    result = run(["sqlite-utils", "sync", target, hub.url], check=False)
    assert (result.returncode, result.stderr) == (1, f"Error: hub {hub.url} rejected the request (400): no\n")
    assert sqlite3.connect(target).execute("SELECT body FROM notes").fetchall() == [("kept",)]


def test_a_body_that_trickles_is_given_up(tmp_path, hostile_hub, make_todos_db):
    def trickle(handler):
        handler.start(200, "application/octet-stream")
        for _ in range(120):
            handler.send(b"S")
            time.sleep(0.5)

    hub = hostile_hub(trickle)
    db = sqlite_utils.Database(make_todos_db(tmp_path / "d.db"))
    started = time.monotonic()
    with pytest.raises(HubError) as error:
        sync_with_hub(db, hub.url, timeout=2)
    assert error.value.reason == "timeout"
    assert "too slowly" in error.value.message
    assert time.monotonic() - started < 50  # the trickle runs for 60 s


def test_control_characters_in_a_hubs_error_text_do_not_reach_the_terminal(tmp_path, hostile_hub, make_todos_db, run):
    def refuse(handler):
        handler.start(400)
        handler.send(json.dumps({"error": "\x1b]0;owned\x07\x1b[2Jenter your token again\r\n" + "y" * 2000}).encode())

    hub = hostile_hub(refuse)
    device = make_todos_db(tmp_path / "d.db")
    result = run(["sqlite-utils", "sync", device, hub.url], check=False)
    assert result.returncode == 1
    line = result.stderr.rstrip("\n")
    assert "\n" not in line and "\r" not in line and "\x1b" not in line and "\x07" not in line
    assert "enter your token again" in line
    assert len(line) < 700  # the hub's text is cut at 500 characters


def test_a_compressed_answer_is_read(tmp_path, hostile_hub, make_todos_db, run):
    # Behind a proxy that compresses JSON (nginx gzip_types, say): the refusal's text arrives.
    def refuse(handler):
        body = gzip.compress(json.dumps({"ok": False, "error": "bad bundle, said gzip"}).encode())
        handler.send_response(400)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Encoding", "gzip")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.send(body)

    hub = hostile_hub(refuse)
    result = run(["sqlite-utils", "sync", make_todos_db(tmp_path / "d.db"), hub.url], check=False)
    assert result.returncode == 1
    assert result.stderr == f"Error: hub {hub.url} rejected the request (400): bad bundle, said gzip\n"


def test_a_sync_stopped_by_sigterm_while_it_waits_leaves_nothing_behind(tmp_path, hostile_hub):
    # A service manager, `timeout` or `kill` stops a sync into a new file while the hub is slow:
    # no half-made database and no downloaded bundle may stay behind.
    asked, release = threading.Event(), threading.Event()

    def hang(handler):
        asked.set()
        release.wait(30)

    hub = hostile_hub(hang)
    temp = tmp_path / "tmp"
    temp.mkdir()
    target = tmp_path / "new.db"
    env = {**os.environ, "TMPDIR": str(temp)}
    sync = subprocess.Popen(
        [sys.executable, "-m", "sqlite_utils", "sync", str(target), hub.url],
        stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert asked.wait(30)
        sync.send_signal(signal.SIGTERM)
        _, stderr = sync.communicate(timeout=30)
    finally:
        release.set()
        if sync.poll() is None:
            sync.kill()
    assert (sync.returncode, stderr) == (143, "stopped\n")
    assert list(temp.iterdir()) == []
    assert not target.exists()
