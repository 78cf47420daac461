"""``sqlite-utils sync DB URL URL ...``: several hubs of one cluster, tried in order.

A hub that cannot be reached, fails or stays busy is skipped for the next one (one line says
so); a refusal is final. One real ``datasette serve`` with two databases stands for two hubs
(no NATS needed: what is tested is the client's choice of hub); tests/test_cluster_faults.py
kills real hubs of a real cluster.
"""

from __future__ import annotations

import json
import sqlite3

import pytest
import sqlite_utils

from sqlite_utils_sync.client import HubError, sync_with_hub


@pytest.fixture
def hubs(tmp_path, datasette_server, hub_config, make_todos_db):
    """One server with the databases ``hub`` and ``hub2`` (same permissions): ``(server, url1, url2)``."""
    config = hub_config
    config["databases"]["hub2"] = json.loads(json.dumps(config["databases"]["hub"]))
    paths = [make_todos_db(tmp_path / "hub.db"), make_todos_db(tmp_path / "hub2.db")]
    server = datasette_server(paths, config)
    server.paths = paths
    return server, server.url + "/hub", server.url + "/hub2"


def dead_url(free_port) -> str:
    return f"http://127.0.0.1:{free_port()}/hub"


def count(path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM todos").fetchone()[0]
    finally:
        conn.close()


def test_an_unreachable_hub_is_skipped_for_the_next(tmp_path, hubs, free_port, make_todos_db, run, todo_rows):
    server, url1, _ = hubs
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}])
    dead = dead_url(free_port)
    result = run(["sqlite-utils", "sync", device, dead, url1, "--token", server.token("alice")])
    lines = result.stderr.splitlines()
    assert lines[0] == f"cannot connect to {dead}: connection refused: trying {url1}"
    assert lines[1].startswith(f"Synced with {url1}. "), result.stderr
    assert todo_rows(server.paths[0]) == [{"id": 1, "title": "x", "done": 0}]


def test_a_hub_busy_through_its_retries_is_skipped_for_the_next(tmp_path, hubs, make_todos_db, run, run_json):
    server, url1, url2 = hubs
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}])
    locker = sqlite3.connect(server.paths[0], isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # the first hub answers 503 busy after its lock timeout
    try:
        args = ["sqlite-utils", "sync", device, url1, url2, "--token", server.token("alice"), "--retries", "0", "--json"]
        result = run(args)
    finally:
        locker.close()
    assert result.stderr.splitlines() == [
        f"hub {url1} could not do the export (pull) now (503): "
        f"Database hub is busy: another connection holds a lock on it. Retry in a few seconds: trying {url2}"
    ]
    answer = json.loads(result.stdout)
    assert answer["hub"]["url"] == url2 and answer["pushed"]["applied"] == 1
    assert (count(server.paths[0]), count(server.paths[1])) == (0, 1)


def test_a_refusal_is_final_and_the_next_hub_is_not_tried(tmp_path, hubs, make_todos_db, run, file_bytes):
    server, url1, url2 = hubs
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}])
    before = file_bytes(server.paths[1])
    # bob may pull but not push: the first hub refuses the push, and so would every hub.
    result = run(["sqlite-utils", "sync", device, url1, url2, "--token", server.token("bob")], check=False)
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: hub {url1} does not allow import (push) (403)"), result.stderr
    assert result.stderr.count("\n") == 1 and "trying" not in result.stderr
    assert file_bytes(server.paths[1]) == before


def test_every_hub_failing_is_one_error_naming_the_last(tmp_path, free_port, make_todos_db, run, file_bytes):
    device = make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}])
    before = file_bytes(device)
    first, second = dead_url(free_port), dead_url(free_port).replace("/hub", "/data")
    result = run(["sqlite-utils", "sync", device, first, second], check=False)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"cannot connect to {first}: connection refused: trying {second}",
        f"Error: cannot connect to {second}: connection refused (and the 1 hub before it failed too)",
    ]
    assert file_bytes(device) == before


def test_sync_with_hub_takes_a_list_of_urls(tmp_path, hubs, free_port, make_todos_db):
    server, url1, _ = hubs
    device = sqlite_utils.Database(make_todos_db(tmp_path / "d.db", [{"id": 1, "title": "x", "done": 0}]))
    dead = dead_url(free_port)
    calls = []
    result = sync_with_hub(device, [dead, url1 + "/"], token=server.token("alice"), on_failover=lambda *a: calls.append(a))
    assert result["hub"]["url"] == url1 and result["pushed"]["applied"] == 1
    [(failed, error, next_url)] = calls
    assert (failed, error.reason, next_url) == (dead, "connection_failed", url1)
    with pytest.raises(HubError) as raised:
        sync_with_hub(device, [])
    assert raised.value.reason == "invalid_url"
