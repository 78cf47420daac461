#!/usr/bin/env python3
"""bench_peers.py -- the same workload through this project and through its alternatives.

Usage::

    pip install -r bench/requirements-peers.txt   # the peers; never dependencies of the package
    python bench/bench_peers.py                   # 20k rows, median of 3 runs
    python bench/bench_peers.py --rows 5000 --reps 5 --results bench/RESULTS.md

The workload, on ``todos(id INTEGER PRIMARY KEY, title TEXT, done INTEGER, note TEXT, score REAL)``
in a real file (WAL, ``synchronous=NORMAL``), each step one transaction:

1. insert N rows (``executemany``);
2. update N/5 rows one by one (``executemany`` of ``UPDATE … WHERE id = ?``);
3. one ``UPDATE`` of every row;
4. delete N/10 rows;
5. apply all of it on a second copy that has the empty table.

Engines:

- **plain SQLite** (stdlib ``sqlite3``): steps 1-4 without capture; step 5 replays the same
  statements on the second copy. Every ratio is to this (1.0).
- **datasette-sync** (this project): capture by its triggers; step 5 is ``export_bundle`` +
  ``import_bundle``.
- **SQLite session extension** through ``apsw`` (its own, newer SQLite: the ``apsw plain`` line
  is the same workload without capture on that SQLite, for a fair reading): a session attached
  to the table on the writing connection; step 5 is ``changeset()`` + ``Changeset.apply``.
- **sqlite-sync-core 0.7.1** (the package this project re-imagines, AGPL, installed only for this
  bench): its triggers through its engine's connection; step 5 is ``generate_bundle`` +
  ``import_bundle``, and where that fails, its ``apply_batch`` of the same operations.

After step 5 the second copy's table must equal the first's; a peer that gets it wrong is
marked ``WRONG`` in the table. Timings are medians of ``--reps`` runs, engines interleaved so
machine noise hits all alike. Nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench_sync import write_section  # noqa: E402  (this script's directory is on the path)
from sqlite_utils_sync import enable_sync, export_bundle, import_bundle  # noqa: E402

try:
    import apsw
except ImportError:
    apsw = None
try:
    import sqlite_sync as ssc
except ImportError:
    ssc = None

SCHEMA = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, note TEXT, score REAL)"
INSERT = "INSERT INTO todos (id, title, done, note, score) VALUES (?, ?, ?, ?, ?)"
UPDATE_ONE = "UPDATE todos SET title = ? WHERE id = ?"
UPDATE_ALL = "UPDATE todos SET done = 1 - done"
DELETE = "DELETE FROM todos WHERE id % 10 = 0"
STEPS = ["insert", "update per row", "update all", "delete", "apply on a second copy"]
now = time.perf_counter


def make_rows(n: int) -> list[tuple]:
    return [(i, f"todo item number {i}", i % 2, None if i % 10 == 0 else f"note {i}", i * 0.25) for i in range(1, n + 1)]


def workload(n: int) -> list[tuple[str, list]]:
    """The statements of steps 1-4 with their parameter lists ([] = run once)."""
    updates = [(f"renamed {i}", i) for i in range(1, n + 1, 5)]
    return [(INSERT, make_rows(n)), (UPDATE_ONE, updates), (UPDATE_ALL, []), (DELETE, [])]


def run_step(execute: Callable, executemany: Callable, sql: str, params: list) -> None:
    if params:
        executemany(sql, params)
    else:
        execute(sql)


def table_of(path: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT * FROM todos ORDER BY id").fetchall()
    finally:
        conn.close()


def fresh_sqlite(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def timed_steps(conn, steps: list[tuple[str, list]], begin="BEGIN", commit="COMMIT") -> list[float]:
    times = []
    for sql, params in steps:
        start = now()
        conn.execute(begin)
        run_step(conn.execute, conn.executemany, sql, params)
        conn.execute(commit)
        times.append(now() - start)
    return times


# -- engines: each returns (times of steps 1-5, first copy's table, second copy's table, note) -----


def plain(work: str, n: int):
    a, b = os.path.join(work, "plain-a.db"), os.path.join(work, "plain-b.db")
    times = []
    for path in (a, b):
        conn = fresh_sqlite(path)
        conn.execute(SCHEMA)
        times.append(timed_steps(conn, workload(n)))
        conn.close()
    return times[0] + [sum(times[1])], table_of(a), table_of(b), ""


def datasette_sync(work: str, n: int):
    a, b = os.path.join(work, "sync-a.db"), os.path.join(work, "sync-b.db")
    conns = []
    for path in (a, b):
        conn = fresh_sqlite(path)
        conn.execute(SCHEMA)
        enable_sync(conn, ["todos"])
        conns.append(conn)
    times = timed_steps(conns[0], workload(n))
    bundle = os.path.join(work, "sync.bundle")
    start = now()
    exported = export_bundle(conns[0], bundle)
    import_bundle(conns[1], bundle)
    times.append(now() - start)
    for conn in conns:
        conn.close()
    return times, table_of(a), table_of(b), f"{exported.bytes / exported.operations:.0f} B/op bundle (zstd, the default)"


def apsw_connection(path: str):
    conn = apsw.Connection(path)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(SCHEMA)
    return conn


def apsw_steps(conn, steps) -> list[float]:
    times = []
    for sql, params in steps:
        start = now()
        with conn:
            run_step(conn.execute, conn.executemany, sql, params)
        times.append(now() - start)
    return times


def apsw_plain(work: str, n: int):
    a, b = os.path.join(work, "apsw-plain-a.db"), os.path.join(work, "apsw-plain-b.db")
    times = []
    for path in (a, b):
        conn = apsw_connection(path)
        times.append(apsw_steps(conn, workload(n)))
        conn.close()
    return times[0] + [sum(times[1])], table_of(a), table_of(b), ""


def apsw_session(work: str, n: int):
    a, b = os.path.join(work, "apsw-a.db"), os.path.join(work, "apsw-b.db")
    first, second = apsw_connection(a), apsw_connection(b)
    session = apsw.Session(first, "main")
    session.attach("todos")
    times = apsw_steps(first, workload(n))
    start = now()
    changeset = session.changeset()
    with second:
        apsw.Changeset.apply(changeset, second)
    times.append(now() - start)
    ops = first.execute("SELECT count(*) FROM todos").fetchone()[0]
    first.close()
    second.close()
    return times, table_of(a), table_of(b), f"changeset {len(changeset) / max(ops, 1):.0f} B per final row (net changes only)"


def first_line(ex: Exception) -> str:
    return str(ex).split("[")[0].strip()[:80]


@contextlib.contextmanager
def quiet():
    """sqlite-sync-core prints debug lines from its library code."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def sqlite_sync_core(work: str, n: int):
    a, b = os.path.join(work, "ssc-a.db"), os.path.join(work, "ssc-b.db")
    engines = []
    with quiet():
        for path in (a, b):
            engine = ssc.SyncEngine(path)
            engine.initialize()
            engine.connection.execute(SCHEMA)
            engine.enable_sync_for_table("todos")
            engines.append(engine)
        times = timed_steps(engines[0].connection, workload(n))
        bundle = os.path.join(work, "ssc.bundle")
        start = now()
        engines[0].generate_bundle(engines[1].device_id, bundle)
        try:
            engines[1].import_bundle(bundle)
            note = "bundle imported"
        except Exception as ex:  # the peer's own error, reported as it is
            note = f"import_bundle fails ({getattr(ex, 'reason', None) or type(ex).__name__})"
            try:
                engines[1].apply_batch(engines[0].get_new_operations(), engines[0].device_id)
                note += "; timed instead: apply_batch of the same operations"
            except Exception as again:
                note += f"; apply_batch of the same operations fails too ({first_line(again)})"
                start = None
        times.append(None if start is None else now() - start)
        for engine in engines:
            engine.close()
    return times, table_of(a), table_of(b), note


ENGINES: list[tuple[str, Callable, bool]] = [
    ("plain SQLite", plain, True),
    ("datasette-sync", datasette_sync, True),
    ("apsw plain (its SQLite)", apsw_plain, apsw is not None),
    ("SQLite session (apsw)", apsw_session, apsw is not None),
    ("sqlite-sync-core 0.7.1", sqlite_sync_core, ssc is not None),
]


def measure(n: int, reps: int, work: str) -> dict[str, dict]:
    results: dict[str, dict] = {name: {"times": [], "ok": True, "note": ""} for name, _, on in ENGINES if on}
    for rep in range(reps):
        for name, engine, on in ENGINES:
            if not on:
                continue
            folder = tempfile.mkdtemp(dir=work)
            times, first, second, note = engine(folder, n)
            shutil.rmtree(folder)
            entry = results[name]
            entry["times"].append(times)
            entry["note"] = note
            # Correct means: the second copy holds exactly what the first does, and the first what
            # the workload makes (n - n/10 rows).
            entry["ok"] = entry["ok"] and first == second and len(first) == n - n // 10
    for entry in results.values():
        entry["median"] = [median([run[i] for run in entry["times"]]) for i in range(len(STEPS))]
    return results


def median(values: list[float | None]) -> float | None:
    """None when any run failed the step: a step that fails sometimes has no time."""
    return None if None in values else statistics.median(values)


def cell(seconds: float | None, base: float) -> str:
    return "fails" if seconds is None else f"{seconds:.3f} s ({seconds / base:.1f}×)"


def versions() -> str:
    parts = [
        f"Python {platform.python_version()}",
        f"SQLite {sqlite3.sqlite_version}",
        f"{os.cpu_count()} cores, {platform.machine()}",
    ]
    if apsw:
        parts.append(f"apsw {apsw.apsw_version()} (SQLite {apsw.sqlite_lib_version()})")
    if ssc:
        parts.append("sqlite-sync-core 0.7.1")
    return ", ".join(parts)


def table(results: dict[str, dict]) -> str:
    base = results["plain SQLite"]["median"]
    lines = [
        "| engine | " + " | ".join(STEPS) + " | correct | note |",
        "|---|" + "---|" * len(STEPS) + "---|---|",
    ]
    for name, entry in results.items():
        cells = [cell(t, b) for t, b in zip(entry["median"], base)]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {'ok' if entry['ok'] else 'WRONG'} | {entry['note']} |")
    missing = [name for name, _, on in ENGINES if not on]
    if missing:
        lines.append("")
        lines.append("Not installed, so not measured: " + ", ".join(missing) + " (pip install -r bench/requirements-peers.txt).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--results", help="also write the table to this Markdown file")
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench-peers-")
    try:
        results = measure(args.rows, args.reps, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = (
        f"Peers, {args.rows} rows, median of {args.reps} runs; each cell: seconds (ratio to plain SQLite).\n"
        f"Machine: {versions()}.\n\n{table(results)}\n"
    )
    print(text)
    if args.results:
        written = f"Written by `python bench/bench_peers.py --results {args.results}`.\n\n"
        write_section(args.results, "Peers: the same workload through each engine", written + text)


if __name__ == "__main__":
    main()
