#!/usr/bin/env python3
"""bench_hub_load.py -- many devices syncing through one hub at once.

Usage::

    python bench/bench_hub_load.py                          # 20 clients for 60 seconds
    python bench/bench_hub_load.py --clients 4 --syncs 8    # 4 clients, 8 syncs each
    python bench/bench_hub_load.py --wal                    # the hub database in WAL mode
    python bench/bench_hub_load.py --cli                    # each sync runs `sqlite-utils sync`

A real ``datasette serve`` on 127.0.0.1 serves ``hub.db`` (left in SQLite's default rollback
journal mode unless ``--wal``). Each client is its own process with its own database file and
its own token (actor ``client-N``). It loops: a few edits in one transaction (insert, update
or delete one of its own rows, and half the time update one of a few rows every client
shares, so concurrent edits of one value make conflicts; now and then it resolves one), then
one sync with the hub, timed: ``sync_with_hub`` in that process, or with ``--cli`` the real
``sqlite-utils sync`` command. The loop runs until ``--seconds`` have passed, or ``--syncs``
times. A sync that ends in an error is a failed sync; a ``503 busy`` the client retried by
itself is counted as a retry, not a failure.

Afterwards every client syncs again, one at a time, until a round moves nothing; then the
hub and every client must hold identical tables (every value and its type) and identical
conflict records. The script prints syncs/s, p50/p99 sync latency, failed syncs by reason,
retries, and whether everything converged; it exits 1 when a sync failed, a copy differs or
the hub logged a server error. ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
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

from sqlite_utils_sync import enable_sync, list_conflicts, resolve_conflict
from sqlite_utils_sync.client import sync_with_hub
from sqlite_utils_sync.errors import SyncError

SCHEMA = "CREATE TABLE items (id INTEGER PRIMARY KEY, owner TEXT, n INTEGER, note TEXT)"
SECRET = "bench-hub-load-secret"
OWN_ROWS = 1_000_000  # client N owns ids from (N + 1) * OWN_ROWS; shared rows are 1..--shared
BIN = os.path.dirname(sys.executable)


def executable(name: str) -> str:
    candidate = os.path.join(BIN, name)
    return candidate if os.path.exists(candidate) else name


# -- the hub ---------------------------------------------------------------------------------


def make_hub(path: str, shared: int, wal: bool) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    if wal:
        conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(SCHEMA)
    conn.executemany("INSERT INTO items VALUES (?, 'shared', 0, NULL)", [(i,) for i in range(1, shared + 1)])
    enable_sync(conn, ["items"])
    conn.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_hub(workdir: str, hub_path: str) -> tuple[subprocess.Popen, str, str]:
    """``datasette serve`` with sync-export, sync-import and the row writes granted to every actor."""
    import httpx

    actions = ("sync-export", "sync-import", "insert-row", "update-row", "delete-row")
    config = {"databases": {"hub": {"permissions": {action: {"id": "*"} for action in actions}}}}
    config_path = os.path.join(workdir, "datasette.json")
    with open(config_path, "w") as fp:
        json.dump(config, fp)
    port = free_port()
    log_path = os.path.join(workdir, "datasette.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATASETTE_", "SQLITE_UTILS_"))}
    # The server must run this checkout's plugin, as this process runs its core (sys.path above).
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [env.get("PYTHONPATH")])])
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [executable("datasette"), "serve", hub_path, "-c", config_path, "--host", "127.0.0.1",
             "--port", str(port), "--secret", SECRET],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"datasette exited {proc.returncode}: see {log_path}")
        try:
            if httpx.get(url + "/-/versions.json", timeout=2).status_code == 200:
                check_plugin(proc, url)
                return proc, url + "/hub", log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.terminate()
    raise SystemExit(f"datasette did not answer within 60 s: see {log_path}")


def check_plugin(proc: subprocess.Popen, url: str) -> None:
    """Stop with one line when the server runs without datasette-sync (every sync would 404)."""
    import httpx

    names = [p["name"] for p in httpx.get(url + "/-/plugins.json", timeout=10).json()]
    if "datasette-sync" not in names:
        proc.terminate()
        proc.wait()
        raise SystemExit(
            f"datasette on {url} did not load the datasette-sync plugin (it has: {', '.join(names) or 'none'}): "
            f"install this checkout ('pip install -e {ROOT}') so that its entry point is registered"
        )


def tokens(count: int) -> list[str]:
    """Real Datasette API tokens, one actor per client, signed with the hub's secret."""
    from datasette.app import Datasette

    async def make():
        ds = Datasette(secret=SECRET)
        await ds.invoke_startup()
        return [await ds.create_token(f"client-{n}") for n in range(count)]

    return asyncio.run(make())


# -- a client --------------------------------------------------------------------------------


def make_client(path: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(SCHEMA)
    enable_sync(conn, ["items"])
    conn.close()


def edit(conn: sqlite3.Connection, rng: random.Random, me: int, shared: int, step: int) -> None:
    """A few writes in one transaction: one of this client's own rows, often a shared row."""
    base = (me + 1) * OWN_ROWS
    own = [r[0] for r in conn.execute("SELECT id FROM items WHERE id >= ? AND id < ?", [base, base + OWN_ROWS])]
    conn.execute("BEGIN IMMEDIATE")
    choice = rng.random()
    if not own or choice < 0.4:
        conn.execute("INSERT INTO items VALUES (?, ?, ?, ?)", [base + step, f"client-{me}", step, "new"])
    elif choice < 0.85:
        conn.execute("UPDATE items SET n = ?, note = ? WHERE id = ?", [step, f"edit {step}", rng.choice(own)])
    else:
        conn.execute("DELETE FROM items WHERE id = ?", [rng.choice(own)])
    if shared and rng.random() < 0.5:
        column = rng.choice(["n", "note"])
        conn.execute(f"UPDATE items SET {column} = ? WHERE id = ?", [f"client-{me} step {step}", rng.randint(1, shared)])
    conn.execute("COMMIT")
    if rng.random() < 0.05:
        unresolved = list_conflicts(conn)
        if unresolved:
            resolve_conflict(conn, unresolved[0]["id"])


def sync_once(conn, db_path: str, url: str, token: str, cli: bool) -> tuple[str | None, int]:
    """One sync: (None, retries) when it worked, else (one line saying why, retries)."""
    if cli:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DATASETTE_", "SQLITE_UTILS_"))}
        env["DATASETTE_SYNC_TOKEN"] = token
        done = subprocess.run(
            [executable("sqlite-utils"), "sync", db_path, url, "--json"], capture_output=True, text=True, env=env
        )
        retries = done.stderr.count("Hub is busy")
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            return (lines[-1] if lines else f"exit {done.returncode}"), retries
        return None, retries
    retried = []
    try:
        sync_with_hub(conn, url, token=token, on_retry=lambda *args: retried.append(args))
    except SyncError as ex:
        return f"{ex.reason}: {ex}", len(retried)
    return None, len(retried)


def warm_up() -> None:
    """What a process pays once, not per sync: importing httpx, making its TLS context."""
    import httpx  # noqa: F401

    from sqlite_utils_sync.client import _tls_context

    _tls_context()


def wait_for_start(workdir: str, me: int) -> tuple[float, float]:
    """Say this client is ready, then wait for the run's (start, until), set once all are."""
    open(os.path.join(workdir, f"ready-{me}"), "w").close()
    go = os.path.join(workdir, "go.json")
    while not os.path.exists(go):
        time.sleep(0.02)
    with open(go) as fp:
        times = json.load(fp)
    time.sleep(max(0.0, times["start"] - time.time()))  # every client starts together
    return times["start"], times["until"]


def worker(args) -> None:
    rng = random.Random(args.worker)
    conn = sqlite3.connect(args.db, isolation_level=None, timeout=30)
    stats = {"latencies": [], "failures": [], "retries": 0}
    if not args.cli:
        warm_up()
    start, until = wait_for_start(os.path.dirname(args.out), args.worker)
    step = 0
    while (args.syncs and step < args.syncs) or (not args.syncs and time.time() < until):
        step += 1
        if step > 1:  # the first sync pulls the shared rows
            edit(conn, rng, args.worker, args.shared, step)
        began = time.perf_counter()
        problem, retries = sync_once(conn, args.db, args.url, args.token, args.cli)
        stats["latencies"].append(time.perf_counter() - began)
        stats["retries"] += retries
        if problem:
            stats["failures"].append(problem)
    conn.close()
    with open(args.out, "w") as fp:
        json.dump(stats, fp)


# -- the run ---------------------------------------------------------------------------------


def table_rows(conn: sqlite3.Connection) -> list[tuple]:
    return [tuple(r) for r in conn.execute("SELECT id, owner, typeof(owner), n, typeof(n), note, typeof(note) FROM items ORDER BY id")]


def conflict_records(conn: sqlite3.Connection) -> list[tuple]:
    return sorted(
        (c["id"], c["table"], tuple(v["op"] for v in c["versions"]), c["resolved"])
        for c in list_conflicts(conn, include_resolved=True)
    )


def moved(result: dict) -> int:
    extra = result["pulled_after_push"]
    return (
        result["pulled"]["total_operations"]
        + (result["pushed"]["total_operations"] or 0)
        + (extra["total_operations"] if extra else 0)
    )


def settle(paths: list[str], url: str, keys: list[str]) -> tuple[int, list[str]]:
    """Sync every client in turn until a whole round moves nothing: (rounds, failures)."""
    failures = []
    for rounds in range(1, 11):
        total = 0
        for path, token in zip(paths, keys):
            conn = sqlite3.connect(path, isolation_level=None)
            try:
                total += moved(sync_with_hub(conn, url, token=token))
            except SyncError as ex:
                failures.append(f"{ex.reason}: {ex}")
            finally:
                conn.close()
        if total == 0:
            return rounds, failures
    return rounds, failures


def compare(hub_path: str, paths: list[str]) -> list[str]:
    """Where a client's table or conflicts differ from the hub's."""
    hub = sqlite3.connect(f"file:{hub_path}?mode=ro", uri=True)
    expected = table_rows(hub), conflict_records(hub)
    hub.close()
    differences = []
    for path in paths:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        got = table_rows(conn), conflict_records(conn)
        conn.close()
        if got[0] != expected[0]:
            differences.append(f"{os.path.basename(path)}: table items differs from the hub's")
        if got[1] != expected[1]:
            differences.append(f"{os.path.basename(path)}: conflicts differ from the hub's")
    return differences


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def start_together(workdir: str, workers: list[subprocess.Popen], seconds: float) -> float:
    """Once every client process is ready, tell them all when to start and stop."""
    ready = [os.path.join(workdir, f"ready-{n}") for n in range(len(workers))]
    while not all(os.path.exists(path) for path in ready):
        if any(w.poll() is not None for w in workers):
            break  # a client died while starting: the others still run, it is reported
        time.sleep(0.05)
    start = time.time() + 0.5
    with open(os.path.join(workdir, "go.json.tmp"), "w") as fp:
        json.dump({"start": start, "until": start + seconds}, fp)
    os.replace(os.path.join(workdir, "go.json.tmp"), os.path.join(workdir, "go.json"))
    return start


def run(args) -> dict:
    workdir = args.dir or tempfile.mkdtemp(prefix="bench-hub-load-")
    os.makedirs(workdir, exist_ok=True)
    if os.listdir(workdir):
        raise SystemExit(f"--dir {workdir} must be a new or empty directory")
    hub_path = os.path.join(workdir, "hub.db")
    make_hub(hub_path, args.shared, args.wal)
    keys = tokens(args.clients)
    paths = [os.path.join(workdir, f"client-{n}.db") for n in range(args.clients)]
    for path in paths:
        make_client(path)
    proc, url, log_path = start_hub(workdir, hub_path)
    try:
        workers = []
        for n, (path, token) in enumerate(zip(paths, keys)):
            command = [sys.executable, os.path.abspath(__file__), "--worker", str(n), "--db", path, "--url", url,
                       "--token", token, "--syncs", str(args.syncs or 0), "--shared", str(args.shared),
                       "--out", os.path.join(workdir, f"stats-{n}.json")]
            workers.append(subprocess.Popen(command + (["--cli"] if args.cli else [])))
        start = start_together(workdir, workers, args.seconds)
        crashed = [n for n, w in enumerate(workers) if w.wait() != 0]
        elapsed = time.time() - start
        stats = [json.load(open(os.path.join(workdir, f"stats-{n}.json"))) for n in range(args.clients) if n not in crashed]
        rounds, settle_failures = settle(paths, url, keys)
        differences = compare(hub_path, paths)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log_lines = open(log_path, errors="replace").readlines()
    server_errors = [line for line in log_lines if " 500 " in line or "Traceback" in line]
    busy_answers = sum(1 for line in log_lines if '" 503 ' in line)
    latencies = sorted(x for s in stats for x in s["latencies"])
    failures = [f for s in stats for f in s["failures"]]
    by_reason: dict[str, int] = {}
    for failure in failures + settle_failures:
        reason = failure.split(":", 1)[0]
        by_reason[reason] = by_reason.get(reason, 0) + 1
    hub = sqlite3.connect(f"file:{hub_path}?mode=ro", uri=True)
    conflicts = conflict_records(hub)
    operations = hub.execute("SELECT count(*) FROM _sync_ops").fetchone()[0]
    hub.close()
    result = {
        "clients": args.clients,
        "journal_mode": "wal" if args.wal else "delete",
        "client": "sqlite-utils sync" if args.cli else "sync_with_hub",
        "seconds": round(elapsed, 1),
        "syncs": len(latencies),
        "syncs_per_second": round(len(latencies) / elapsed, 1) if elapsed > 0 else 0.0,
        "latency_p50_ms": round(percentile(latencies, 50) * 1000, 1),
        "latency_p99_ms": round(percentile(latencies, 99) * 1000, 1),
        "latency_max_ms": round(latencies[-1] * 1000, 1) if latencies else 0.0,
        "failed_syncs": len(failures),
        "failed_by_reason": by_reason,
        "busy_retries": sum(s["retries"] for s in stats),
        "hub_503_answers": busy_answers,
        "crashed_clients": crashed,
        "settle_rounds": rounds,
        "settle_failures": len(settle_failures),
        "hub_operations": operations,
        "conflicts": len(conflicts),
        "unresolved_conflicts": sum(1 for c in conflicts if not c[3]),
        "differences": differences,
        "server_errors": server_errors[:10],
        "first_failures": (failures + settle_failures)[:5],
        "dir": workdir if args.dir else None,
    }
    if not args.dir:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def report(result: dict) -> str:
    lines = [
        f"{result['clients']} clients ({result['client']}), hub journal_mode={result['journal_mode']}, "
        f"{result['seconds']} s",
        f"syncs: {result['syncs']} ({result['syncs_per_second']}/s), "
        f"latency p50 {result['latency_p50_ms']} ms, p99 {result['latency_p99_ms']} ms, max {result['latency_max_ms']} ms",
        f"failed syncs: {result['failed_syncs']} {result['failed_by_reason'] or ''}".rstrip(),
        f"503 busy answers retried by the clients: {result['busy_retries']} (hub log: {result['hub_503_answers']})",
        f"hub: {result['hub_operations']} operations, {result['conflicts']} conflicts "
        f"({result['unresolved_conflicts']} unresolved)",
        f"settled in {result['settle_rounds']} round(s) of syncs; "
        + ("every client and the hub hold identical tables and conflicts" if not result["differences"] else
           "DIFFERENT: " + "; ".join(result["differences"])),
    ]
    for failure in result["first_failures"]:
        lines.append(f"  failure: {failure}")
    for line in result["server_errors"]:
        lines.append(f"  hub log: {line.rstrip()}")
    if result["crashed_clients"]:
        lines.append(f"  crashed clients: {result['crashed_clients']}")
    return "\n".join(lines)


def ok(result: dict) -> bool:
    return not (
        result["failed_syncs"] or result["settle_failures"] or result["differences"]
        or result["server_errors"] or result["crashed_clients"]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the clients sync (default 60)")
    parser.add_argument("--syncs", type=int, default=0, help="syncs per client instead of --seconds")
    parser.add_argument("--shared", type=int, default=5, help="rows every client edits (default 5)")
    parser.add_argument("--wal", action="store_true", help="put the hub database in WAL mode")
    parser.add_argument("--cli", action="store_true", help="run `sqlite-utils sync` for every sync")
    parser.add_argument("--dir", help="keep the databases here (default: a temporary directory)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    # A client process (started by the run itself).
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    for name in ("--db", "--url", "--token", "--out"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args)
        return
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else report(result))
    sys.exit(0 if ok(result) else 1)


if __name__ == "__main__":
    main()
