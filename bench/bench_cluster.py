#!/usr/bin/env python3
"""bench_cluster.py -- cluster mode: syncs/s over 1, 2 and 3 hubs, and hub-to-hub propagation.

Usage::

    python bench/bench_cluster.py                       # 20 clients, 20 s per hub count, 3 NATS nodes
    python bench/bench_cluster.py --seconds 10 --hubs 1 3
    python bench/bench_cluster.py --nodes 1 --probes 100 --json

Needs ``nats-server`` (Debian: ``apt install nats-server``) and ``nats-py`` (``pip install -e
'.[cluster]'``). Everything runs on 127.0.0.1 with tests/nats_cluster.py: a ``--nodes``
JetStream cluster (the stream replicated ``--nodes`` times) and, for each hub count, that
many fresh ``datasette serve`` hubs (each its own SQLite file) sharing a fresh stream.

- **syncs/s**: ``--clients`` processes, client ``i`` syncing with hub ``i mod hubs`` (the
  others listed after it, for failover); each loops for ``--seconds``: insert one row of its
  own, then one ``sync_with_hub`` (pull, push). Afterwards every hub must hold every row:
  ``ok``/``MISSED``, with the time the last hub took to get there after the clients stopped.
- **propagation** (2 hubs or more): a probe device inserts a row and pushes it to hub A;
  from A's 200 the probe polls hub B's table (what B holds is what a pull from B gets) until
  the row is there: p50/p99 over ``--probes`` pushes, on otherwise idle hubs. Also until a
  device watching hub B (``sqlite-utils sync --watch``) holds the row in its own table. The
  probe's own sync with hub A (pull, then the push answered once A applied it at its place
  in the stream) is timed too: the push latency of an idle cluster.

The issue gives no numeric target for these; the script prints the numbers and checks that
nothing is lost. On a shared machine numbers are noisy: take the median of a few runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
for folder in (ROOT, ROOT / "tests"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import httpx  # noqa: E402

from nats_cluster import Cluster, Hub, cluster_config, missing, wait_for  # noqa: E402
from sqlite_utils_sync import enable_sync  # noqa: E402
from sqlite_utils_sync.client import sync_with_hub  # noqa: E402

SCHEMA = "CREATE TABLE items (id INTEGER PRIMARY KEY, owner TEXT, n INTEGER)"
ACTIONS = ("sync-export", "sync-import", "insert-row", "update-row", "delete-row")
CONFIG = {"databases": {"hub": {"permissions": {action: {"id": "bench"} for action in ACTIONS}}}}
OWN_ROWS = 1_000_000  # client i owns ids from (i + 1) * OWN_ROWS


def make_db(path: pathlib.Path) -> pathlib.Path:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(SCHEMA)
    enable_sync(conn, ["items"])
    conn.close()
    return path


def count(path: pathlib.Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT count(*) FROM items").fetchone()[0]
    finally:
        conn.close()


def start_hubs(nats: Cluster, folder: pathlib.Path, count_: int, stream: str) -> list[Hub]:
    hubs = []
    for i in range(count_):
        hub_folder = folder / f"hub-{i}"
        hub_folder.mkdir(parents=True)
        config = cluster_config(CONFIG, nats.urls, f"h{i}", stream=stream, replicas=len(nats.nodes))
        hubs.append(Hub(make_db(hub_folder / "hub.db"), config, f"h{i}").start())
    wait_for(lambda: {f"{h.name}_hub" for h in hubs} <= nats.consumers(stream), what="the hubs to join")
    return hubs


def client(index: int, folder: str, urls: list[str], token: str, seconds: float) -> dict:
    """One client process: insert a row, sync; until ``seconds`` have passed."""
    path = make_db(pathlib.Path(folder) / f"client-{index}.db")
    conn = sqlite3.connect(path, isolation_level=None)
    latencies, failed, n = [], {}, 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        n += 1
        conn.execute("INSERT INTO items VALUES (?, ?, ?)", [(index + 1) * OWN_ROWS + n, f"client-{index}", n])
        start = time.monotonic()
        try:
            sync_with_hub(conn, urls, token=token)
        except Exception as ex:  # counted, not fatal: the next sync retries everything
            reason = getattr(ex, "reason", type(ex).__name__)
            failed[reason] = failed.get(reason, 0) + 1
            continue
        latencies.append(time.monotonic() - start)
    for _ in range(3):  # leave nothing behind: the rows of a failed last sync too
        try:
            sync_with_hub(conn, urls, token=token)
            break
        except Exception:
            time.sleep(1)
    conn.close()
    return {"syncs": len(latencies), "latencies": latencies, "failed": failed, "rows": n}


def load(nats: Cluster, folder: pathlib.Path, hubs_count: int, args) -> dict:
    hubs = start_hubs(nats, folder, hubs_count, f"bench-{hubs_count}")
    try:
        token = hubs[0].token("bench")
        clients_folder = folder / "clients"
        clients_folder.mkdir()
        with concurrent.futures.ProcessPoolExecutor(args.clients) as pool:
            jobs = []
            for i in range(args.clients):
                order = [hubs[(i + k) % hubs_count].db_url for k in range(hubs_count)]
                jobs.append(pool.submit(client, i, str(clients_folder), order, token, args.seconds))
            results = [job.result() for job in jobs]
        stopped = time.monotonic()
        rows = sum(r["rows"] for r in results)
        try:
            wait_for(lambda: all(count(h.path) == rows for h in hubs), 120, "every hub to hold every row")
            converged, settle = True, time.monotonic() - stopped
        except AssertionError:
            converged, settle = False, None
        latencies = sorted(x for r in results for x in r["latencies"])
        failed: dict[str, int] = {}
        for r in results:
            for reason, n in r["failed"].items():
                failed[reason] = failed.get(reason, 0) + n
        return {
            "hubs": hubs_count,
            "syncs": len(latencies),
            "syncs_per_s": len(latencies) / args.seconds,
            "p50_ms": 1000 * statistics.median(latencies) if latencies else None,
            "p99_ms": 1000 * latencies[int(0.99 * (len(latencies) - 1))] if latencies else None,
            "failed": failed,
            "rows": rows,
            "converged": converged,
            "settle_s": settle,
            "propagation": propagation(hubs, folder, token, args.probes) if hubs_count > 1 else None,
        }
    finally:
        for hub in hubs:
            hub.stop()


def propagation(hubs: list[Hub], folder: pathlib.Path, token: str, probes: int) -> dict:
    """Push a row to hub A; time from A's answer until hub B holds it (polled over HTTP), and
    until a device watching hub B (``sqlite-utils sync --watch``) holds it in its table."""
    a, b = hubs[0], hubs[1]
    conn = sqlite3.connect(make_db(folder / "probe.db"), isolation_level=None)
    watcher_path = make_db(folder / "watcher.db")
    sync_with_hub(sqlite3.connect(watcher_path), b.db_url, token=token)
    watcher = subprocess.Popen(
        ["sqlite-utils", "sync", str(watcher_path), b.db_url, "--watch"],
        env={**os.environ, "DATASETTE_SYNC_TOKEN": token},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    watched = sqlite3.connect(f"file:{watcher_path}?mode=ro", uri=True)
    headers = {"Authorization": f"Bearer {token}"}
    times, watch_times, sync_times = [], [], []
    try:
        time.sleep(2)  # the watcher's first waiting pull
        with httpx.Client(headers=headers, timeout=10) as http:
            for n in range(1, probes + 1):
                conn.execute("INSERT INTO items VALUES (?, 'probe', ?)", [n, n])
                started = time.monotonic()
                sync_with_hub(conn, a.db_url, token=token)
                pushed = time.monotonic()
                sync_times.append(pushed - started)
                url = f"{b.db_url}/items.json?id={n}&_shape=array"
                at_hub = None
                while at_hub is None or not watched.execute("SELECT 1 FROM items WHERE id = ?", [n]).fetchone():
                    if at_hub is None and http.get(url).json():
                        at_hub = time.monotonic() - pushed
                    if time.monotonic() - pushed > 60:
                        raise SystemExit(f"probe {n} did not reach hub {b.name} and its watcher within 60 s")
                    time.sleep(0.002)
                times.append(at_hub)
                watch_times.append(time.monotonic() - pushed)
    finally:
        watcher.terminate()
        watcher.wait(timeout=30)
        watched.close()
        conn.close()
    return {"probes": probes, **percentiles(times), "watcher": percentiles(watch_times), "sync": percentiles(sync_times)}


def percentiles(times: list[float]) -> dict:
    times = sorted(times)
    return {
        "p50_ms": 1000 * statistics.median(times),
        "p99_ms": 1000 * times[int(0.99 * (len(times) - 1))],
        "max_ms": 1000 * times[-1],
    }


def report(results: list[dict], args) -> None:
    print(f"cluster: {args.nodes} NATS node(s), {args.clients} clients, {args.seconds:.0f} s per hub count")
    for r in results:
        check = "ok" if r["converged"] else "MISSED"
        settle = f"{r['settle_s']:.1f} s after the clients stopped" if r["settle_s"] is not None else "not within 120 s"
        failed = ", ".join(f"{k} {v}" for k, v in r["failed"].items()) or "none"
        print(
            f"  {r['hubs']} hub(s): {r['syncs_per_s']:.1f} syncs/s ({r['syncs']} syncs), sync p50 {r['p50_ms']:.0f} ms"
            f" p99 {r['p99_ms']:.0f} ms; failed: {failed}"
        )
        print(f"    every hub holds all {r['rows']} rows: {check} ({settle})")
        p = r["propagation"]
        if p:
            print(
                f"    propagation hub A -> hub B ({p['probes']} pushes, idle): p50 {p['p50_ms']:.0f} ms,"
                f" p99 {p['p99_ms']:.0f} ms, max {p['max_ms']:.0f} ms"
            )
            s = p["sync"]
            print(
                f"    the probe's own sync with hub A (pull, push of one row, answer): p50 {s['p50_ms']:.0f} ms,"
                f" p99 {s['p99_ms']:.0f} ms, max {s['max_ms']:.0f} ms"
            )
            w = p["watcher"]
            print(
                f"    a device watching hub B (sync --watch) holds the row pushed to A: p50 {w['p50_ms']:.0f} ms,"
                f" p99 {w['p99_ms']:.0f} ms, max {w['max_ms']:.0f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the clients sync per hub count")
    parser.add_argument("--hubs", type=int, nargs="+", default=[1, 2, 3], help="hub counts to measure (default 1 2 3)")
    parser.add_argument("--nodes", type=int, choices=[1, 3], default=3, help="NATS nodes (default 3)")
    parser.add_argument("--probes", type=int, default=50, help="propagation samples (default 50)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    why = missing()
    if why:
        raise SystemExit(why)
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as directory:
        folder = pathlib.Path(directory)
        nats = Cluster(folder / "nats", args.nodes).start()
        try:
            results = [load(nats, folder / f"run-{n}", n, args) for n in args.hubs]
        finally:
            nats.stop()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results, args)
    if not all(r["converged"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
