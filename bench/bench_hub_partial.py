#!/usr/bin/env python3
"""bench_hub_partial.py -- what a pull by permission costs on a real hub.

Usage::

    python bench/bench_hub_partial.py            # 300k operations over three tables
    python bench/bench_hub_partial.py --quick    # 60k

A hub database holds N operations over three tables (todos, notes, tags), written in turns of
100 operations per table (``bench_partial.py`` interleaves single operations, the worst case
for chunk count), served by a real ``datasette serve`` on 127.0.0.1. ``one`` may view only todos
(``view-table`` on the other two is denied in the config), ``all`` may view every table.
Measured, best of ``--reps``, each a whole ``GET /hub/-/sync/export`` (everything: no
``since``) read to the end with httpx:

* ``all``: the unfiltered pull (today's full bundle);
* ``one``: the pull filtered by permission to todos (the others' operations withheld);
* ``one, small``: the same actor pulling a delta of the last 300 operations (the permission
  checks are the whole difference from an unfiltered delta);
* ``sql``: reading todos' operations with one SQL query on the hub's file, every value: what
  the filtered pull is compared with (no full-log read per request).

Stdlib, httpx and this project only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import httpx  # noqa: E402

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, sync_status  # noqa: E402

TABLES = ("todos", "notes", "tags")
RUN = 100  # operations of one table in a row: a bundle chunk is a run of one device on one table
SECRET = "bench-hub-partial"
now = time.perf_counter


def build(path: str, n: int) -> None:
    """The hub's log as a hub gets it: the operations of a device, pushed to it (a hub's own
    unsettled local writes would add a scan of them to every read-only export)."""
    device = path + ".device.db"
    source = write_device(device, n)
    bundle = path + ".bundle"
    export_bundle(source, bundle)
    source.close()
    hub = sqlite3.connect(path, isolation_level=None)
    import_bundle(hub, bundle, alter=True)
    hub.close()
    os.remove(bundle)
    os.remove(device)


def write_device(path: str, n: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    for table in TABLES:
        conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, title TEXT, body TEXT, score REAL)")
    enable_sync(conn, list(TABLES))
    conn.execute("BEGIN")
    for start in range(0, n // 3, RUN):
        for table in TABLES:
            for i in range(start, min(start + RUN, n // 3)):
                conn.execute(f"INSERT INTO {table} VALUES (?, ?, ?, ?)", [i, f"{table} {i}", "x" * (i % 50), i * 0.5])
    conn.execute("COMMIT")
    return conn


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_hub(work: str, hub: str) -> tuple[subprocess.Popen, str]:
    config = {
        "databases": {
            "hub": {
                "permissions": {"sync-export": {"id": ["one", "all"]}},
                "tables": {name: {"allow": {"id": "all"}} for name in TABLES if name != "todos"},
            }
        }
    }
    config_path = os.path.join(work, "datasette.json")
    with open(config_path, "w") as fp:
        json.dump(config, fp)
    port = free_port()
    datasette = os.path.join(os.path.dirname(sys.executable), "datasette")
    args = [datasette if os.path.exists(datasette) else "datasette", "serve", hub, "-c", config_path]
    args += ["--host", "127.0.0.1", "--port", str(port), "--secret", SECRET]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/-/versions.json", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError("datasette did not start")


def token(actor: str) -> str:
    datasette = os.path.join(os.path.dirname(sys.executable), "datasette")
    result = subprocess.run(
        [datasette if os.path.exists(datasette) else "datasette", "create-token", actor, "--secret", SECRET],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[0]


def pull(client: httpx.Client, url: str, bearer: str, since: dict | None = None) -> tuple[float, int, str]:
    params = {"since": json.dumps(since)} if since else None
    start = now()
    response = client.get(url + "/hub/-/sync/export", params=params, headers={"Authorization": f"Bearer {bearer}"})
    elapsed = now() - start
    if response.status_code != 200:
        raise RuntimeError(f"pull failed: {response.status_code} {response.text[:200]}")
    return elapsed, len(response.content), response.headers.get("x-sync-scope", "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60k operations")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    n = 60_000 if args.quick else 300_000
    work = tempfile.mkdtemp(prefix="bench-hub-partial-")
    proc = None
    try:
        hub = os.path.join(work, "hub.db")
        build(hub, n)
        clock = sync_status(sqlite3.connect(hub))["clock"]
        recent = {device: max(0, seq - 300) for device, seq in clock.items()}
        proc, url = start_hub(work, hub)
        tokens = {actor: token(actor) for actor in ("one", "all")}
        results: dict[str, list[tuple[float, int, str]]] = {"all": [], "one": [], "one, small": [], "all, small": []}
        sql = []
        with httpx.Client(timeout=600) as client:
            for _ in range(args.reps):
                results["all"].append(pull(client, url, tokens["all"]))
                results["one"].append(pull(client, url, tokens["one"]))
                results["all, small"].append(pull(client, url, tokens["all"], recent))
                results["one, small"].append(pull(client, url, tokens["one"], recent))
                conn = sqlite3.connect(f"file:{hub}?mode=ro", uri=True)
                tid = conn.execute("SELECT tid FROM _sync_tables WHERE name = 'todos'").fetchone()[0]
                start = now()
                conn.execute("SELECT * FROM _sync_ops WHERE tid = ?", [tid]).fetchall()
                sql.append(now() - start)
                conn.close()
        best = {key: min(values) for key, values in results.items()}
        if json.loads(best["one"][2]) != ["todos"] or json.loads(best["all"][2]) is not None:
            raise RuntimeError("benchmark sanity check failed: the pulls' scopes are wrong")
        print(f"bench_hub_partial: {n} operations over {len(TABLES)} tables, best of {args.reps}; SQLite {sqlite3.sqlite_version}")
        print(f"pull, may view every table  {best['all'][0]:.3f}s  {best['all'][1] / 1e6:.1f} MB")
        print(f"pull, may view todos only   {best['one'][0]:.3f}s  {best['one'][1] / 1e6:.1f} MB  "
              f"({best['one'][0] / best['all'][0]:.2f}x the unfiltered pull)")
        print(f"SQL: todos' operations      {min(sql):.3f}s  (filtered pull = {best['one'][0] / min(sql):.1f}x)")
        print(f"delta of 300 ops, all       {best['all, small'][0] * 1000:.1f} ms")
        print(f"delta of 300 ops, todos     {best['one, small'][0] * 1000:.1f} ms  (permission checks included)")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
