"""Waiting pulls woken by one write share the hub's export, through a real ``datasette serve``:
pulls that ask for the same operations (same table scope, same ``since`` once lowered to what
the hub holds) get one bundle, made once; the others get bundles of their own; every answer
imports correctly and the hub's temporary bundle files are all gone afterwards.

That a bundle was shared is seen from the outside: the same bundle id (the download's file
name) in several answers.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import httpx

from sqlite_utils_sync.protocol import EXPORT_PATH, encode_clock

from test_live_hub import CLIENT_TIMEOUT, CONFIG, LONG_WAIT, clock_of, device_id, import_response, wait_until
from test_live_hub import waiting_devices

EDIT = {"id": 9, "title": "For everyone", "done": 0}


def lowered(since: dict, hub_clock: dict) -> tuple:
    return tuple(sorted((d, min(s, hub_clock[d]) if d in hub_clock else s) for d, s in since.items()))


async def pulls(server, requests: list[dict], started: threading.Event, results: list):
    async with httpx.AsyncClient(timeout=CLIENT_TIMEOUT + 20) as client:
        url = server.url + "/hub" + EXPORT_PATH
        waiting = [client.get(url, params=params) for params in requests]
        started.set()
        results.extend(await asyncio.gather(*waiting, return_exceptions=True))


def bundle_id(response: httpx.Response) -> str:
    return response.headers["content-disposition"].split('filename="')[1].rstrip('"')


def test_pulls_woken_by_one_push_share_one_export_and_each_imports_it(
    tmp_path, monkeypatch, datasette_server, make_todos_db, hub_sync, upsert, todo_rows
):
    temp = tmp_path / "hub-temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))  # the hub's bundle files go here
    hub_path = make_todos_db(tmp_path / "hub.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    hub = datasette_server([hub_path], CONFIG)
    laptop = make_todos_db(tmp_path / "laptop.db")
    watchers = [make_todos_db(tmp_path / f"watcher{i}.db") for i in range(8)]
    for _ in range(2):  # the second round brings everyone every other device's knowledge
        for path in [laptop, *watchers]:
            hub_sync(path, hub, None)
    # Two watchers hold an edit the hub has not seen yet: they are ahead on their own device.
    for i in (0, 1):
        upsert(watchers[i], {"id": 100 + i, "title": f"Only on watcher {i}", "done": 0})
    hub_clock = clock_of(hub_path)
    requests = []
    for i, path in enumerate(watchers):
        params = {"since": encode_clock(clock_of(path)), "wait": str(LONG_WAIT), "device": device_id(path)}
        if i == 7:
            params["table"] = "todos"  # another scope: a bundle of its own
        requests.append(params)
    # A new copy's pull (no since): it answers at once, with everything, in a bundle of its own.
    requests.append({"since": encode_clock({}), "wait": str(LONG_WAIT), "device": "f" * 32})

    results: list = []
    started = threading.Event()
    runner = threading.Thread(target=lambda: asyncio.run(pulls(hub, requests, started, results)), daemon=True)
    runner.start()
    started.wait(30)
    devices = {params["device"] for params in requests[:-1]}
    wait_until(lambda: devices <= waiting_devices(hub), "every watcher's pull to wait")

    upsert(laptop, EDIT)
    hub_sync(laptop, hub, None)
    runner.join(CLIENT_TIMEOUT + 30)
    assert len(results) == len(requests)
    for response in results:
        assert isinstance(response, httpx.Response) and response.status_code == 200, response

    ids = [bundle_id(response) for response in results]
    # The six watchers that asked the same (lowered to the hub's clock) got one bundle ...
    same = [lowered(clock_of(path), hub_clock) for path in watchers[:7]]
    assert len(set(same)) == 1, same
    assert len(set(ids[:7])) == 1, ids
    # ... the other scope and the one behind got bundles of their own.
    assert len({ids[0], ids[7], ids[8]}) == 3, ids
    assert int(results[8].headers["x-sync-operations"]) > int(results[0].headers["x-sync-operations"])

    for path, response in zip(watchers, results):
        import_response(response, path, tmp_path)
    expected = todo_rows(hub_path)
    assert EDIT in expected
    for i, path in enumerate(watchers):
        rows = todo_rows(path)
        assert EDIT in rows
        # Each keeps its own unpushed edit, and has everything the hub has.
        assert [row for row in rows if row["id"] < 100] == expected
        assert len(rows) == len(expected) + (1 if i < 2 else 0)
    behind_copy = make_todos_db(tmp_path / "behind.db")
    import_response(results[8], behind_copy, tmp_path)
    assert todo_rows(behind_copy) == [row for row in expected if row != EDIT]  # answered before the push

    # Every bundle file (and its directory) is gone once the answers were sent.
    wait_until(lambda: not list(temp.glob("datasette-sync-*")), "the hub's bundle files to be removed")
    assert sqlite3.connect(str(hub_path)).execute("SELECT count(*) FROM todos").fetchone()[0] == len(expected)
