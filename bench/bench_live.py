#!/usr/bin/env python3
"""bench_live.py -- live sync through a real hub: how soon an edit is everywhere, and what
watching costs.

Usage::

    python bench/bench_live.py                    # 10 watchers, 50 edits, 20 s idle, 10,000-edit burst
    python bench/bench_live.py --watchers 4 --edits 20 --idle 5 --burst 2000   # a quick run

A real ``datasette serve`` on 127.0.0.1 serves ``hub.db``. Each device is a file made by one
plain ``sqlite-utils sync`` and then watched by its own ``sqlite-utils sync DEVICE URL
--watch`` process. Edits are made with the ``sqlite3`` shell (the CLI binary) on device 0.

- **latency**: one ``INSERT`` per shell run, ``--edits`` times; the clock starts before the
  shell starts and stops when the row is in the table of *every* other device (each file
  polled read-only every 2 ms). p50 and p99 over the edits (targets: < 300 ms, < 1 s).
- **idle CPU**: each watcher's user + system time from ``/proc/<pid>/stat`` over ``--idle``
  seconds while nothing is edited (target: under 1% of a CPU each; the highest is shown).
- **burst**: ``--burst`` inserts in one shell run on device 0, until every other device holds
  them all; against the time of one plain ``sqlite-utils sync`` of the same number of edits
  from a device that is not watching, made after the watchers stopped (target: < 3x).

The script prints ``ok`` or ``MISSED`` per target, checks that every device ends with the same
rows, and exits 1 when a watcher printed a traceback or a copy differs. It never asserts
timings in tests: numbers depend on the machine (see bench/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sqlite_utils_sync import enable_sync

SECRET = "bench-live-secret"
BIN = os.path.dirname(sys.executable)
BURST_FIRST_ID = 1_000_000
BASELINE_FIRST_ID = 2_000_000


def executable(name: str) -> str:
    candidate = os.path.join(BIN, name)
    return candidate if os.path.exists(candidate) else name


def env() -> dict[str, str]:
    # PYTHONPATH is kept: the watchers run this checkout's code.
    return {k: v for k, v in os.environ.items() if not k.startswith(("DATASETTE_", "SQLITE_UTILS_"))}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_hub(workdir: str) -> tuple[subprocess.Popen, str]:
    import httpx

    hub_path = os.path.join(workdir, "hub.db")
    conn = sqlite3.connect(hub_path, isolation_level=None)
    conn.execute("CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT)")
    enable_sync(conn, ["todos"])
    conn.execute("INSERT INTO todos VALUES (1, 'first')")
    conn.close()
    actions = ("sync-export", "sync-import", "insert-row", "update-row", "delete-row")
    config = {"databases": {"hub": {"permissions": {action: {"id": "*"} for action in actions}}}}
    config_path = os.path.join(workdir, "datasette.json")
    with open(config_path, "w") as fp:
        json.dump(config, fp)
    port = free_port()
    with open(os.path.join(workdir, "datasette.log"), "wb") as log:
        proc = subprocess.Popen(
            [executable("datasette"), "serve", hub_path, "-c", config_path, "--host", "127.0.0.1",
             "--port", str(port), "--secret", SECRET],
            stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=workdir,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/-/versions.json", timeout=2).status_code == 200:
                return proc, url + "/hub"
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.terminate()
    raise SystemExit("datasette did not answer within 60 s")


def token(workdir: str) -> str:
    result = subprocess.run([executable("datasette"), "create-token", "bench", "--secret", SECRET],
                            capture_output=True, text=True, check=True, cwd=workdir, env=env())
    return result.stdout.strip().splitlines()[0]


def plain_sync(path: str, url: str, tok: str) -> float:
    started = time.perf_counter()
    subprocess.run([executable("sqlite-utils"), "sync", path, url, "--token", tok],
                   check=True, capture_output=True, env=env())
    return time.perf_counter() - started


def start_watcher(path: str, url: str, tok: str) -> tuple[subprocess.Popen, str]:
    log_path = path + ".log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([executable("sqlite-utils"), "sync", path, url, "--watch", "--token", tok],
                                stdout=log, stderr=subprocess.STDOUT, env=env())
    return proc, log_path


def wait_for(condition, what: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(0.002)


def shell(path: str, sql: str) -> None:
    # The timeout: a watcher may be importing (a write lock) just then, as with any two programs.
    subprocess.run(["sqlite3", "-bail", "-cmd", ".timeout 30000", path, sql], check=True, capture_output=True)


def readers(paths: list[str]) -> list[sqlite3.Connection]:
    return [sqlite3.connect(f"file:{p}?mode=ro", uri=True, isolation_level=None, timeout=30) for p in paths]


def count_from(conn: sqlite3.Connection, first: int) -> int:
    try:
        return conn.execute("SELECT count(*) FROM todos WHERE id >= ? AND id < ?", [first, first + 1_000_000]).fetchone()[0]
    except sqlite3.OperationalError:  # locked longer than the timeout: ask again
        return -1


def measure_latency(source: str, others: list[sqlite3.Connection], edits: int) -> list[float]:
    latencies = []
    for n in range(edits):
        row_id = 10_000 + n
        started = time.perf_counter()
        shell(source, f"INSERT INTO todos (id, title) VALUES ({row_id}, 'edit {n}')")
        wait_for(lambda: all(count_from(c, row_id) == 1 for c in others), f"edit {n} on every device")
        latencies.append(time.perf_counter() - started)
        time.sleep(0.2)  # the devices' knowledge ticks go out between edits, as between keystrokes
    return latencies


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fp:
        fields = fp.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def measure_idle(pids: list[int], seconds: float) -> list[float]:
    before = [cpu_seconds(pid) for pid in pids]
    time.sleep(seconds)
    return [100.0 * (cpu_seconds(pid) - b) / seconds for pid, b in zip(pids, before)]


def measure_burst(source: str, others: list[sqlite3.Connection], count: int) -> float:
    sql = (f"WITH RECURSIVE n(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM n WHERE x < {count - 1}) "
           f"INSERT INTO todos (id, title) SELECT {BURST_FIRST_ID} + x, 'burst ' || x FROM n")
    started = time.perf_counter()
    shell(source, sql)
    wait_for(lambda: all(count_from(c, BURST_FIRST_ID) == count for c in others), "the burst on every device", 600)
    return time.perf_counter() - started


def measure_plain(path: str, url: str, tok: str, count: int) -> float:
    sql = (f"WITH RECURSIVE n(x) AS (SELECT 0 UNION ALL SELECT x + 1 FROM n WHERE x < {count - 1}) "
           f"INSERT INTO todos (id, title) SELECT {BASELINE_FIRST_ID} + x, 'plain ' || x FROM n")
    started = time.perf_counter()
    shell(path, sql)
    return time.perf_counter() - started + plain_sync(path, url, tok)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def verdict(good: bool) -> str:
    return "ok" if good else "MISSED"


def run(args) -> int:
    workdir = args.work or tempfile.mkdtemp(prefix="bench-live-")
    os.makedirs(workdir, exist_ok=True)
    hub, url = start_hub(workdir)
    watchers: list[subprocess.Popen] = []
    try:
        tok = token(workdir)
        paths = [os.path.join(workdir, f"device-{n}.db") for n in range(args.watchers)]
        baseline = os.path.join(workdir, "baseline.db")
        for path in [*paths, baseline]:
            plain_sync(path, url, tok)
        logs = []
        for path in paths:
            proc, log = start_watcher(path, url, tok)
            watchers.append(proc)
            logs.append(log)
        wait_for(lambda: all("Watching" in open(log).read() for log in logs), "every watcher to start", 120)
        others = readers(paths[1:])

        cpu_before = [cpu_seconds(p.pid) for p in [hub, *watchers]]
        latencies = measure_latency(paths[0], others, args.edits)
        cpu = [cpu_seconds(p.pid) - b for p, b in zip([hub, *watchers], cpu_before)]
        time.sleep(5)  # the last knowledge ticks go out (TICK_QUIET) before the idle measurement
        idle = measure_idle([p.pid for p in watchers], args.idle)
        burst = measure_burst(paths[0], others, args.burst)
        for proc in watchers:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(timeout=120) for proc in watchers]
        plain = measure_plain(baseline, url, tok, args.burst)

        p50, p99 = statistics.median(latencies), percentile(latencies, 0.99)
        print(f"watchers: {args.watchers}; hub {url}; the machine may be shared: take medians of several runs")
        print(f"latency of one sqlite3-shell edit to all {args.watchers - 1} other devices over {args.edits} edits: "
              f"p50 {p50 * 1000:.0f} ms [{verdict(p50 < 0.3)}: < 300 ms], p99 {p99 * 1000:.0f} ms [{verdict(p99 < 1.0)}: < 1 s], "
              f"max {max(latencies) * 1000:.0f} ms")
        print(f"(info) CPU per edit during the latency run: hub {1000 * cpu[0] / args.edits:.0f} ms, "
              f"the edited device's watcher {1000 * cpu[1] / args.edits:.0f} ms, "
              f"each other watcher {1000 * statistics.mean(cpu[2:]) / args.edits:.0f} ms (mean)")
        print(f"idle watcher CPU over {args.idle:g} s: highest {max(idle):.2f}%, mean {statistics.mean(idle):.2f}% "
              f"[{verdict(max(idle) < 1.0)}: < 1%]")
        print(f"burst of {args.burst} edits to all other devices: {burst:.2f} s; one plain sqlite-utils sync of "
              f"{args.burst} edits (edit + sync): {plain:.2f} s; {burst / plain:.2f}x [{verdict(burst < 3 * plain)}: < 3x]")
        problems = check(paths, logs, codes)
        for problem in problems:
            print("PROBLEM:", problem)
        return 1 if problems else 0
    finally:
        for proc in watchers:
            if proc.poll() is None:
                proc.kill()
        hub.terminate()
        hub.wait()
        if not args.work:
            shutil.rmtree(workdir, ignore_errors=True)


def check(paths: list[str], logs: list[str], codes: list[int]) -> list[str]:
    problems = []
    tables = []
    for conn in readers(paths):
        tables.append(conn.execute("SELECT id, title FROM todos ORDER BY id").fetchall())
        conn.close()
    if any(t != tables[0] for t in tables):
        problems.append("the devices' tables differ")
    for log, code in zip(logs, codes):
        text = open(log).read()
        if "Traceback" in text or code != 0 or not text.rstrip().endswith("stopped"):
            problems.append(f"watcher {log} exited {code}: {text[-500:]}")
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--watchers", type=int, default=10)
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of idle CPU measurement")
    parser.add_argument("--burst", type=int, default=10_000)
    parser.add_argument("--work", help="keep the files here")
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
