#!/usr/bin/env python3
"""bench_sync.py -- what sync costs, as ratios to plain SQLite measured in the same run.

Usage::

    python bench/bench_sync.py            # 100k rows, 1M-op log (about two minutes)
    python bench/bench_sync.py --quick    # 20k rows, 100k-op log (well under a minute)

Stdlib plus this project only. Every database is a real file opened with
``sqlite3.connect(path, isolation_level=None)`` in WAL mode with ``synchronous=NORMAL``; each
measured write is one transaction; the table is a plain todo list with one column of each
common type::

    todos(id INTEGER PRIMARY KEY, title TEXT, done INTEGER, note TEXT, score REAL)

Each timing is the best of ``--reps`` (default 3) runs, and the plain and synced runs of one
measurement are interleaved (plain, synced, plain, synced, ...) so that a noisy machine hits
both alike. Setup (creating files, enabling sync, building templates) is never timed. The
figures that matter are the ratios; absolute times depend on the machine.

Targets are printed next to each figure with ``ok`` or ``MISSED``; nothing is asserted about
timings. Correctness of what is measured (row and operation counts, table contents after an
import) *is* checked, so a fast but wrong run cannot pass unnoticed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from sqlite_utils_sync import compact_log, enable_sync, export_bundle, import_bundle, sync_status

SCHEMA = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, note TEXT, score REAL)"
INSERT = "INSERT INTO todos (id, title, done, note, score) VALUES (?, ?, ?, ?, ?)"
UPDATE_ALL = "UPDATE todos SET done = 1 - done"
UPDATE_ONE = "UPDATE todos SET done = ? WHERE id = ?"
now = time.perf_counter


# -- helpers ---------------------------------------------------------------------------------


def make_row(i: int) -> tuple:
    note = None if i % 10 == 0 else f"note {i} " + "x" * (i % 30)
    return (i, f"todo item number {i}", i % 2, note, i * 0.25)


def make_rows(n: int, start: int = 1) -> list[tuple]:
    return [make_row(i) for i in range(start, start + n)]


def remove_db(path: str) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass


def connect(path: str, fresh: bool = True) -> sqlite3.Connection:
    if fresh:
        remove_db(path)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def new_db(path: str, synced: bool) -> sqlite3.Connection:
    conn = connect(path)
    conn.execute(SCHEMA)
    if synced:
        enable_sync(conn, ["todos"])
    return conn


def close_checkpointed(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def copy_db(template: str, path: str) -> sqlite3.Connection:
    remove_db(path)
    shutil.copyfile(template, path)
    return connect(path, fresh=False)


def timed(fn) -> float:
    gc.collect()
    gc.disable()
    try:
        start = now()
        fn()
        return now() - start
    finally:
        gc.enable()


def in_transaction(conn: sqlite3.Connection, fn) -> None:
    conn.execute("BEGIN")
    fn()
    conn.execute("COMMIT")


def local_ops(conn: sqlite3.Connection) -> int:
    """Operations in the log, not counting knowledge ticks."""
    return conn.execute("SELECT count(*) FROM _sync_ops WHERE kind != 3 AND tid != 0").fetchone()[0]


def checksum(conn: sqlite3.Connection) -> tuple:
    return conn.execute(
        "SELECT count(*), sum(id), sum(length(title)), sum(done), sum(note IS NULL), sum(length(note)), "
        "total(score) FROM todos"
    ).fetchone()


def write_section(path: str, section: str, text: str) -> None:
    """Replace the ``## section`` of a results file (or append it), keeping every other section:
    each bench script writes its own."""
    old = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    pattern = re.compile(re.escape(f"## {section}") + r".*?(?=^## |\Z)", re.S | re.M)
    new = f"## {section}\n\n{text}\n"
    old = pattern.sub(lambda _: new, old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + new
    with open(path, "w") as f:
        f.write(old)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError("benchmark sanity check failed: " + message)


def best_pair(reps: int, plain_fn, synced_fn) -> tuple[float, float]:
    """Interleave plain and synced runs; return the best time of each."""
    plain, synced = [], []
    for _ in range(reps):
        plain.append(plain_fn())
        synced.append(synced_fn())
    return min(plain), min(synced)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


class Report:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.results: dict[str, tuple[float, float, bool]] = {}

    def line(self, text: str) -> None:
        self.lines.append(text)
        print(text, flush=True)

    def ratio(self, key: str, label: str, n: int, unit: str, plain: float, synced: float, target: float) -> float:
        ratio = synced / plain
        ok = ratio <= target
        self.results[key] = (ratio, target, ok)
        self.line(
            f"{label:<30} {n:>7} {unit:<4}  plain {plain:.3f}s  synced {synced:.3f}s  "
            f"ratio {ratio:.2f}x  (target <= {target:g}x)  {verdict(ok)}"
        )
        return ratio


# -- measurements ----------------------------------------------------------------------------


def bench_capture_insert(rep: Report, work: str, rows: list[tuple], reps: int) -> None:
    n = len(rows)

    def run(synced: bool) -> float:
        path = os.path.join(work, f"capture-{'synced' if synced else 'plain'}.db")
        conn = new_db(path, synced)
        t = timed(lambda: in_transaction(conn, lambda: conn.executemany(INSERT, rows)))
        check(conn.execute("SELECT count(*) FROM todos").fetchone()[0] == n, "rows inserted")
        if synced:
            check(local_ops(conn) == n, "one insert op per row")
        conn.close()
        return t

    plain, synced = best_pair(reps, lambda: run(False), lambda: run(True))
    rep.ratio("capture_insert", "(a) capture insert", n, "rows", plain, synced, 2.5)


def build_templates(work: str, rows: list[tuple]) -> tuple[str, str]:
    """A plain and a synced database holding ``rows`` (the synced one with its n insert ops)."""
    plain_path = os.path.join(work, "template-plain.db")
    synced_path = os.path.join(work, "template-synced.db")
    for path, synced in ((plain_path, False), (synced_path, True)):
        conn = new_db(path, synced)
        in_transaction(conn, lambda conn=conn: conn.executemany(INSERT, rows))
        close_checkpointed(conn)
    return plain_path, synced_path


def bench_capture_update(rep: Report, work: str, rows: list[tuple], templates: tuple[str, str], reps: int) -> None:
    n = len(rows)
    params = [(1 - r[2], r[0]) for r in rows]

    def run(synced: bool, per_row: bool) -> float:
        path = os.path.join(work, f"update-{'synced' if synced else 'plain'}.db")
        conn = copy_db(templates[synced], path)
        before = local_ops(conn) if synced else 0
        if per_row:
            t = timed(lambda: in_transaction(conn, lambda: conn.executemany(UPDATE_ONE, params)))
        else:
            t = timed(lambda: in_transaction(conn, lambda: conn.execute(UPDATE_ALL)))
        check(conn.execute("SELECT sum(done) FROM todos").fetchone()[0] == n - sum(r[2] for r in rows), "rows updated")
        if synced:
            check(local_ops(conn) - before == n, "one update op per row")
        conn.close()
        return t

    plain, synced = best_pair(reps, lambda: run(False, False), lambda: run(True, False))
    rep.ratio("capture_update", "(b) capture update 1 stmt", n, "rows", plain, synced, 3)
    plain, synced = best_pair(reps, lambda: run(False, True), lambda: run(True, True))
    rep.ratio("capture_update_em", "(b) capture update per row", n, "rows", plain, synced, 3)


def bench_import(rep: Report, work: str, rows: list[tuple], templates: tuple[str, str], reps: int) -> str:
    n = len(rows)
    source = connect(templates[1], fresh=False)
    bundle = os.path.join(work, f"inserts-{n}.bundle")
    export_times = []
    for _ in range(reps):
        if os.path.exists(bundle):
            os.remove(bundle)
        export_times.append(timed(lambda: export_bundle(source, bundle)))
    result = export_bundle(source, bundle)
    expected = checksum(source)
    source.close()
    check(result.operations == n, "bundle holds one op per row")
    plain_path = os.path.join(work, "import-plain.db")
    synced_path = os.path.join(work, "import-synced.db")

    def run_plain() -> float:
        conn = new_db(plain_path, False)
        t = timed(lambda: in_transaction(conn, lambda: conn.executemany(INSERT, rows)))
        conn.close()
        return t

    def run_synced() -> float:
        conn = new_db(synced_path, True)
        outcome = {}
        t = timed(lambda: outcome.setdefault("r", import_bundle(conn, bundle)))
        check(outcome["r"].applied == n and outcome["r"].conflicts == 0, "every op applied, no conflict")
        check(checksum(conn) == expected, "imported table equals the source table")
        conn.close()
        return t

    plain, synced = best_pair(reps, run_plain, run_synced)
    rep.ratio("import", "(c) import bundle", n, "ops", plain, synced, 2)
    rate = n / synced
    rep.results["import_rate"] = (rate, 300_000, rate >= 300_000)
    rep.line(f"{'(c) import rate':<30} {n:>7} ops   {rate:,.0f} ops/s  (target >= 300,000 ops/s)  {verdict(rate >= 300_000)}")
    rep.line(f"{'    (info) full export':<30} {n:>7} ops   {min(export_times):.3f}s  {n / min(export_times):,.0f} ops/s")
    size = os.path.getsize(bundle)
    per_op = size / n
    rep.results["bytes_per_op"] = (per_op, 100, per_op <= 100)
    rep.line(
        f"{'(e) bundle size':<30} {n:>7} ops   {size:,} bytes  {per_op:.1f} B/op  (target <= 100 B/op)  "
        f"{verdict(per_op <= 100)}"
    )
    return bundle


def bench_delta(rep: Report, work: str, log_size: int, reps: int) -> None:
    """A 1-op delta export from a large log, and a 1-op delta import into a copy holding it."""
    big_path = os.path.join(work, "big-log.db")
    peer_path = os.path.join(work, "big-peer.db")
    big = new_db(big_path, True)
    started = now()
    in_transaction(big, lambda: big.executemany(INSERT, (make_row(i) for i in range(1, log_size + 1))))
    build = now() - started
    check(local_ops(big) == log_size, "log size")
    rep.line(f"{'    (info) build log':<30} {log_size:>7} ops   {build:.2f}s (executemany into the synced table)")

    full = os.path.join(work, "big-full.bundle")
    started = now()
    export_bundle(big, full)
    export_time = now() - started
    peer = new_db(peer_path, True)
    started = now()
    imported = import_bundle(peer, full)
    import_time = now() - started
    check(imported.applied == log_size, "peer received the whole log")
    os.remove(full)
    rep.line(
        f"{'    (info) full export':<30} {log_size:>7} ops   {export_time:.2f}s  {log_size / export_time:,.0f} ops/s"
    )
    rep.line(
        f"{'    (info) full import':<30} {log_size:>7} ops   {import_time:.2f}s  {log_size / import_time:,.0f} ops/s"
    )

    state = {"clock": sync_status(peer)["clock"], "next": log_size + 1}
    delta = os.path.join(work, "delta.bundle")

    def one_delta() -> tuple[float, float]:
        """One more write on the big log, exported for the peer and imported there (ms, ms)."""
        big.execute(INSERT, make_row(state["next"]))
        state["next"] += 1
        if os.path.exists(delta):
            os.remove(delta)
        box = {}
        export_ms = 1000 * timed(lambda: box.setdefault("e", export_bundle(big, delta, since=state["clock"])))
        check(box["e"].operations == 1, "delta carries exactly the one new op")
        import_ms = 1000 * timed(lambda: box.setdefault("i", import_bundle(peer, delta)))
        check(box["i"].applied == 1, "delta applied")
        state["clock"] = box["i"].clock
        return export_ms, import_ms

    export_ms, import_ms = zip(*[one_delta() for _ in range(reps)])
    # Diagnostic: the same import with SQLite's automatic indexes off on the peer's connection.
    # When this is much faster, a query of the import builds a throw-away index over the whole
    # log (see bench/README.md).
    peer.execute("PRAGMA automatic_index = OFF")
    _, import_no_autoindex_ms = zip(*[one_delta() for _ in range(reps)])
    peer.execute("PRAGMA automatic_index = ON")
    check(checksum(big) == checksum(peer), "peer matches after the deltas")
    best = min(export_ms)
    rep.results["delta_export"] = (best, 20, best < 20)
    rep.line(
        f"{'(d) 1-op delta export':<30} {log_size:>7} log   {best:.1f} ms  (target < 20 ms)  {verdict(best < 20)}"
    )
    rep.line(
        f"{'    (info) 1-op delta import':<30} {log_size:>7} log   {min(import_ms):.1f} ms  "
        f"(into the peer holding the log; no target given)"
    )
    rep.line(
        f"{'    (diag) same, no auto-index':<30} {log_size:>7} log   {min(import_no_autoindex_ms):.1f} ms  "
        f"(PRAGMA automatic_index = OFF on the peer's connection)"
    )
    big.close()
    peer.close()


def file_mb(path: str) -> float:
    return sum(os.path.getsize(path + s) for s in ("", "-wal") if os.path.exists(path + s)) / 1e6


def bench_compaction(rep: Report, work: str, n: int) -> None:
    """An edit-heavy log (every row inserted, then its score updated nine times): what compaction
    removes, how long it takes, and the file size before and after ``VACUUM``, next to the same
    table without sync."""
    path, plain_path = os.path.join(work, "edited.db"), os.path.join(work, "edited-plain.db")
    conn, plain = new_db(path, True), new_db(plain_path, False)
    for target in (conn, plain):
        in_transaction(target, lambda t=target: t.executemany(INSERT, make_rows(n)))
        for round_ in range(9):
            in_transaction(
                target,
                lambda t=target, r=round_: t.executemany(
                    "UPDATE todos SET score = ? WHERE id = ?", ((-1.5 - r, i) for i in range(1, n + 1))
                ),
            )
    ops = local_ops(conn)
    check(ops == 10 * n, "ten operations per row")
    for target in (conn, plain):
        target.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    before, plain_mb = file_mb(path), file_mb(plain_path)
    started = now()
    result = compact_log(conn)
    took = now() - started
    # Per row: the insert (latest writer of the other columns) and the last update.
    check(local_ops(conn) == 2 * n, "two operations left per row")
    check(checksum(conn) == checksum(plain), "compaction changed no row")
    conn.execute("VACUUM")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    rep.line(
        f"{'(g) compaction':<30} {ops:>7} ops   removed {result.removed:,} in {took:.2f}s  "
        f"({ops / took:,.0f} ops/s); file {before:.1f} MB -> {file_mb(path):.1f} MB after VACUUM "
        f"(the table alone: {plain_mb:.1f} MB)"
    )
    conn.close()
    plain.close()


def proc_status(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status, in bytes (Linux only)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_growth(fn) -> int:
    """How far the resident set size peaked above its level before ``fn()``.

    Uses VmHWM after resetting it through /proc/self/clear_refs: ``ru_maxrss`` is not usable in
    a subprocess because Linux carries the parent's high-water mark across fork and exec.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = proc_status("VmRSS")
    fn()
    peak = proc_status("VmHWM")
    if before is None or peak is None:  # not Linux: a rough figure
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak - before


def memory_child(bundle: str, db_path: str, mode: str) -> None:
    """Run in a subprocess: import ``bundle`` into a fresh synced database, print memory use."""
    conn = new_db(db_path, True)
    gc.collect()
    if mode == "tracemalloc":
        tracemalloc.start()
        result = import_bundle(conn, bundle)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        value = peak
    else:
        box = {}
        value = peak_rss_growth(lambda: box.setdefault("r", import_bundle(conn, bundle)))
        result = box["r"]
    conn.close()
    print(json.dumps({"ops": result.applied, "bytes": value}))


def bench_memory(rep: Report, work: str, big_bundle: str, n: int) -> None:
    small_n = n // 5
    small_rows = make_rows(small_n)
    source = new_db(os.path.join(work, "mem-source.db"), True)
    in_transaction(source, lambda: source.executemany(INSERT, small_rows))
    small_bundle = os.path.join(work, f"inserts-{small_n}.bundle")
    export_bundle(source, small_bundle)
    source.close()
    measured = {}
    for size, bundle in ((small_n, small_bundle), (n, big_bundle)):
        for mode in ("tracemalloc", "rss"):
            out = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--memory-child", bundle,
                 os.path.join(work, "mem-target.db"), mode],
                check=True, capture_output=True, text=True,
            ).stdout
            value = json.loads(out.strip().splitlines()[-1])
            check(value["ops"] == size, "memory child imported every op")
            measured[(size, mode)] = value["bytes"]
    mb = 1024 * 1024
    for mode, label in (("tracemalloc", "Python heap peak"), ("rss", "max RSS growth")):
        small, big = measured[(small_n, mode)], measured[(n, mode)]
        growth = (big - small) / (n - small_n)
        rep.line(
            f"{'(f) import memory':<30} {label:<16}  {small_n:>6} ops {small / mb:6.1f} MB  "
            f"{n:>6} ops {big / mb:6.1f} MB  ({big / max(small, 1):.1f}x for {n // small_n}x the ops, "
            f"{growth:+.0f} B per extra op)"
        )


# -- main ------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k rows and a 100k-op log")
    parser.add_argument("--reps", type=int, default=3, help="runs per measurement (best is kept)")
    parser.add_argument("--work", help="directory for the scratch databases (default: a temp dir)")
    parser.add_argument("--memory-child", nargs=3, metavar=("BUNDLE", "DB", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return 0
    n, log_size = (20_000, 100_000) if args.quick else (100_000, 1_000_000)
    work = args.work or tempfile.mkdtemp(prefix="bench-sync-")
    os.makedirs(work, exist_ok=True)
    rep = Report()
    started = now()
    rep.line(
        f"bench_sync: {n} rows, {log_size}-op log, best of {args.reps}; Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs, WAL + synchronous=NORMAL"
    )
    rep.line("ratios are synced / plain, measured side by side in this process")
    try:
        rows = make_rows(n)
        bench_capture_insert(rep, work, rows, args.reps)
        templates = build_templates(work, rows)
        bench_capture_update(rep, work, rows, templates, args.reps)
        bundle = bench_import(rep, work, rows, templates, args.reps)
        bench_delta(rep, work, log_size, args.reps)
        bench_memory(rep, work, bundle, n)
        bench_compaction(rep, work, n)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    missed = [k for k, (_, _, ok) in rep.results.items() if not ok]
    rep.line(f"done in {now() - started:.1f}s; targets missed: {', '.join(missed) if missed else 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
