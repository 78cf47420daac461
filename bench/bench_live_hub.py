#!/usr/bin/env python3
"""bench_live_hub.py -- many idle watchers on one hub: what they cost it.

Usage::

    python bench/bench_live_hub.py                    # 200 watchers, 20 s idle
    python bench/bench_live_hub.py --watchers 500 --seconds 10 --json

A real ``datasette serve`` on 127.0.0.1 serves ``hub.db`` (a synced table of 1,000 rows).
``--watchers`` waiting pulls (``GET /-/sync/export?since=<the hub's clock>&wait=60&device=<id>``,
each its own device id and connection, as ``sqlite-utils sync --watch`` holds one) are opened
from this process (asyncio, so the client side costs little). The script measures:

- page latency: ``--pages`` requests of the overview page (``/hub/-/sync``) and the operations
  page, one after the other, first with no watcher, then while all the watchers wait
  (p50/p99 of each);
- the hub's CPU while the watchers wait and nothing happens, over ``--seconds``, from
  ``/proc/<pid>/stat`` (user + system time, as a percentage of one CPU), and its threads
  (``/proc/<pid>/status``) before and while they wait;
- wake-up: one row inserted through the hub's own write API, and the time until every
  watcher has its answer (p50/p99/max over the watchers).

Targets printed as ok/MISSED: pages while watching p99 < 500 ms, idle hub CPU < 5 %, threads
while watching no more than 5 above the count before.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import httpx  # noqa: E402

from sqlite_utils_sync import enable_sync, sync_status  # noqa: E402
from sqlite_utils_sync.protocol import EXPORT_PATH, encode_clock  # noqa: E402

BIN = os.path.dirname(sys.executable)
CONFIG = {"databases": {"hub": {"permissions": {"sync-export": True, "insert-row": True}}}}


def executable(name: str) -> str:
    candidate = os.path.join(BIN, name)
    return candidate if os.path.exists(candidate) else name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_hub(path: str) -> dict:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, note TEXT)")
    conn.executemany("INSERT INTO items VALUES (?, ?)", [(i, f"item {i}") for i in range(1, 1001)])
    enable_sync(conn, ["items"])
    clock = sync_status(conn)["clock"]
    conn.close()
    return clock


def start_hub(folder: str, path: str) -> tuple[subprocess.Popen, str]:
    config = os.path.join(folder, "datasette.json")
    with open(config, "w") as out:
        json.dump(CONFIG, out)
    port = free_port()
    log = open(os.path.join(folder, "datasette.log"), "wb")
    proc = subprocess.Popen(
        [executable("datasette"), "serve", path, "--host", "127.0.0.1", "--port", str(port), "-c", config],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/-/versions.json", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("datasette did not start")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("Threads:"))


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def page_latencies(client: httpx.AsyncClient, url: str, count: int) -> list[float]:
    times = []
    for index in range(count):
        path = "/hub/-/sync" if index % 2 == 0 else "/hub/-/sync/operations"
        start = time.perf_counter()
        response = await client.get(url + path)
        times.append(time.perf_counter() - start)
        assert response.status_code == 200, (path, response.status_code)
    return times


async def watch(client: httpx.AsyncClient, url: str, since: dict, answered: dict) -> None:
    device = uuid.uuid4().hex
    params = {"since": encode_clock(since), "wait": "60", "device": device}
    response = await client.get(url + "/hub" + EXPORT_PATH, params=params)
    answered[device] = (time.perf_counter(), response.status_code)


async def waiting_count(client: httpx.AsyncClient, url: str) -> int:
    return sum(1 for w in (await client.get(url + "/hub/-/sync.json")).json()["watching"] if w["waiting"])


async def run(args, url: str, pid: int, since: dict) -> dict:
    result: dict = {"watchers": args.watchers}
    limits = httpx.Limits(max_connections=args.watchers + 20, max_keepalive_connections=20)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await page_latencies(client, url, 10)  # warm up
        alone = await page_latencies(client, url, args.pages)
        result["threads_before"] = threads(pid)
        answered: dict = {}
        tasks = [asyncio.create_task(watch(client, url, since, answered)) for _ in range(args.watchers)]
        deadline = time.monotonic() + 120
        while await waiting_count(client, url) < args.watchers:
            if time.monotonic() > deadline:
                raise SystemExit("the watchers did not all wait")
            await asyncio.sleep(0.2)
        watching = await page_latencies(client, url, args.pages)
        result["threads_watching"] = threads(pid)
        await asyncio.sleep(1)
        cpu_start, wall_start = cpu_seconds(pid), time.monotonic()
        await asyncio.sleep(args.seconds)
        result["idle_cpu_percent"] = 100 * (cpu_seconds(pid) - cpu_start) / (time.monotonic() - wall_start)
        written = time.perf_counter()
        response = await client.post(url + "/hub/items/-/insert", json={"row": {"id": 5000, "note": "wake up"}})
        assert response.status_code == 201, response.text
        await asyncio.gather(*tasks)
        wakes = [at - written for at, status in answered.values()]
        result["answers_not_200"] = sum(1 for _, status in answered.values() if status != 200)
    for name, times in (("pages_alone", alone), ("pages_watching", watching)):
        result[name] = {
            "p50_ms": round(1000 * statistics.median(times), 1),
            "p99_ms": round(1000 * percentile(times, 0.99), 1),
        }
    result["wake_ms"] = {
        "p50": round(1000 * statistics.median(wakes), 1),
        "p99": round(1000 * percentile(wakes, 0.99), 1),
        "max": round(1000 * max(wakes), 1),
    }
    return result


def verdicts(result: dict) -> list[tuple[str, bool]]:
    return [
        (f"page p99 while {result['watchers']} watch < 500 ms", result["pages_watching"]["p99_ms"] < 500),
        ("idle hub CPU < 5 %", result["idle_cpu_percent"] < 5),
        ("no thread per watcher (<= 5 more)", result["threads_watching"] <= result["threads_before"] + 5),
        ("every watcher answered 200", result["answers_not_200"] == 0),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0, help="idle time to measure the hub's CPU over")
    parser.add_argument("--pages", type=int, default=40, help="page requests per latency measurement")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="bench-live-hub-")
    proc = None
    try:
        path = os.path.join(folder, "hub.db")
        since = make_hub(path)
        proc, url = start_hub(folder, path)
        result = asyncio.run(run(args, url, proc.pid, since))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)
    checks = verdicts(result)
    if args.json:
        print(json.dumps({**result, "targets": {name: ok for name, ok in checks}}, indent=2))
    else:
        print(f"watchers: {result['watchers']}")
        for name in ("pages_alone", "pages_watching"):
            print(f"{name}: p50 {result[name]['p50_ms']} ms, p99 {result[name]['p99_ms']} ms")
        print(f"threads: {result['threads_before']} before, {result['threads_watching']} while watching")
        print(f"idle hub CPU: {result['idle_cpu_percent']:.2f} % of one CPU over {args.seconds:g} s")
        wake = result["wake_ms"]
        print(f"all woken by one write: p50 {wake['p50']} ms, p99 {wake['p99']} ms, max {wake['max']} ms")
        for name, ok in checks:
            print(f"{'ok' if ok else 'MISSED'}: {name}")
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
