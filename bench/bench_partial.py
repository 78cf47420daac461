#!/usr/bin/env python3
"""bench_partial.py -- what an export for a partial copy costs (``export-bundle --table``).

Usage::

    python bench/bench_partial.py            # 300k operations over three tables
    python bench/bench_partial.py --quick    # 60k

A log of N operations interleaves three tables (todos, notes, tags), in runs of BATCH.
Measured, best of ``--reps``:

* ``full``: an export of every table (today's bundle);
* ``filtered``: an export of todos only (``tables=["todos"]``: the other two go as withheld
  ranges, one per run of theirs);
* ``sql``: reading todos' operations with one SQL query, every value (the floor a filtered
  export is compared with);
* ``import``: importing the filtered bundle into a new copy (which adopts its scope).

The filtered export reads every op id and table id of the range (to find the withheld
ranges) but only the wanted table's values. Stdlib plus this project only.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sqlite3
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, sync_status

TABLES = ("todos", "notes", "tags")
# Rows are written BATCH at a time per table, in turn: the log interleaves the tables in runs.
# (A chunk is a run of one table, so a log alternating table by table makes one chunk per
# operation, with or without --table.)
BATCH = 100
now = time.perf_counter


def timed(fn) -> float:
    gc.collect()
    start = now()
    fn()
    return now() - start


def build(path: str, n: int) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for table in TABLES:
        conn.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, title TEXT, body TEXT, score REAL)")
    enable_sync(conn, list(TABLES))
    conn.execute("BEGIN")
    for start in range(0, n // 3, BATCH):
        for table in TABLES:
            conn.executemany(
                f"INSERT INTO {table} VALUES (?, ?, ?, ?)",
                [(i, f"{table} {i}", "x" * (i % 50), i * 0.5) for i in range(start, min(start + BATCH, n // 3))],
            )
    conn.execute("COMMIT")
    return conn


def capture_with_index(work: str, n: int, reps: int) -> tuple[float, float]:
    """What an index on (tid, op), which would let a filtered export read only its table's
    operations, would cost every captured write: best times with and without it."""
    results: dict[bool, list[float]] = {True: [], False: []}
    rows = [(i, f"todo {i}", "x" * (i % 50), i * 0.5) for i in range(n)]
    for _ in range(reps):
        for indexed in (False, True):
            path = os.path.join(work, f"capture-{indexed}.db")
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, body TEXT, score REAL)")
            enable_sync(conn, ["todos"])
            if indexed:
                conn.execute("CREATE INDEX _sync_ops_tid ON _sync_ops (tid, op)")

            def insert() -> None:
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO todos VALUES (?, ?, ?, ?)", rows)
                conn.execute("COMMIT")

            results[indexed].append(timed(insert))
            conn.close()
    return min(results[True]), min(results[False])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60k operations")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    n = 60_000 if args.quick else 300_000
    work = tempfile.mkdtemp(prefix="bench-partial-")
    try:
        conn = build(os.path.join(work, "source.db"), n)
        tid = conn.execute("SELECT tid FROM _sync_tables WHERE name = 'todos'").fetchone()[0]
        full = os.path.join(work, "full.bundle")
        filtered = os.path.join(work, "filtered.bundle")
        times: dict[str, list[float]] = {"full": [], "filtered": [], "sql": [], "scan": [], "import": []}
        for rep in range(args.reps):
            times["full"].append(timed(lambda: export_bundle(conn, full, repair=False)))
            times["filtered"].append(timed(lambda: export_bundle(conn, filtered, repair=False, tables=["todos"])))
            times["sql"].append(timed(lambda: conn.execute("SELECT * FROM _sync_ops WHERE tid = ?", [tid]).fetchall()))
            times["scan"].append(timed(lambda: conn.execute("SELECT op, tid FROM _sync_ops").fetchall()))
            target = os.path.join(work, f"copy{rep}.db")
            sqlite3.connect(target).close()
            copy = sqlite3.connect(target, isolation_level=None)
            times["import"].append(timed(lambda: import_bundle(copy, filtered, alter=True, adopt_scope=True)))
            status = sync_status(copy)
            if status["scope"] != ["todos"] or copy.execute("SELECT count(*) FROM todos").fetchone()[0] != n // 3:
                raise RuntimeError("benchmark sanity check failed: the filtered copy is wrong")
            copy.close()
        best = {key: min(values) for key, values in times.items()}
        sizes = {name: os.path.getsize(path) for name, path in (("full", full), ("filtered", filtered))}
        print(f"bench_partial: {n} operations over {len(TABLES)} tables, best of {args.reps}; SQLite {sqlite3.sqlite_version}")
        print(f"export, every table         {best['full']:.3f}s  {sizes['full'] / 1e6:.1f} MB")
        print(f"export, todos only          {best['filtered']:.3f}s  {sizes['filtered'] / 1e6:.1f} MB  "
              f"({best['filtered'] / best['full']:.2f}x the full export)")
        print(f"SQL: todos' operations      {best['sql']:.3f}s  (filtered export = {best['filtered'] / best['sql']:.1f}x)")
        print(f"SQL: every op id and table  {best['scan']:.3f}s  (what the filter reads beyond todos' operations)")
        print(f"import of the todos bundle  {best['import']:.3f}s  into a new copy")
        with_index, without = capture_with_index(work, n // 3, args.reps)
        print(f"capture of {n // 3} inserts     {without:.3f}s; with an index _sync_ops(tid, op) {with_index:.3f}s "
              f"({with_index / without:.2f}x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
