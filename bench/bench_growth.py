#!/usr/bin/env python3
"""bench_growth.py -- how capture, import and delta export grow with the size of a database.

Usage::

    python bench/bench_growth.py                      # 10k, 100k and 1M rows (a few minutes)
    python bench/bench_growth.py --sizes 10000 100000 # a quicker run
    python bench/bench_growth.py --results bench/RESULTS.md   # also write the table there

For each size N, on real files in WAL mode (the setup of ``bench_sync.py``), with the todos
table of ``bench_sync.py``:

* capture: ``executemany`` INSERT of N rows into a synced table, next to a plain one;
* import: the N-insert bundle into a new synced copy (the bulk path), next to the plain insert;
* update import: one ``UPDATE`` of every row, exported as a delta and imported into the copy
  holding the rows (N single-operation rows: the set-based path);
* second copy: the whole log (every row inserted then updated: 2N operations, two per row)
  imported into a new copy (rows with several operations of one device);
* edited log: N operations on N/10 rows (each inserted, then updated nine times) imported
  into a new copy;
* delta export and import of one new operation from and into copies holding N rows (best
  of 7: they take milliseconds, which a busy machine easily adds to);
* memory: the peak resident set size (VmHWM, the whole process: interpreter, SQLite's caches,
  Python objects) of a fresh subprocess importing the N-insert bundle, the edited log, and
  the 2N-op log of the second copy.

Per-row (or per-operation) costs are printed for each size. Verdicts, printed as ``ok`` or
``MISSED``, never asserted: each per-row cost at the largest size stays within 1.5x of the
same cost at the smallest size times the growth of plain SQLite's own insert over that range
(nothing grows faster than linearly in its work beyond what SQLite's B-trees do); the 1-op
delta export stays under 20 ms at the largest size; peak RSS importing a bundle of at most 1M
operations stays under 150 MB. What is measured is checked: operation counts, and the copies'
tables equal the source's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bench_sync import (  # noqa: E402  (the bench directory is put on the path above)
    INSERT,
    UPDATE_ALL,
    check,
    checksum,
    connect,
    in_transaction,
    make_row,
    new_db,
    proc_status,
    remove_db,
    timed,
    write_section,
)
from sqlite_utils_sync import export_bundle, import_bundle, sync_status  # noqa: E402

MB = 1_000_000
RSS_TARGET_MB = 150
DELTA_TARGET_MS = 20
GROWTH_SLACK = 1.5


def rows_of(n: int):
    return (make_row(i) for i in range(1, n + 1))


def fresh_bundle(path: str) -> str:
    if os.path.exists(path):
        os.remove(path)
    return path


def memory_child(bundle: str, db_path: str) -> None:
    """Run in a subprocess: import ``bundle`` into a new synced database; print the process's
    peak RSS (VmHWM) and the operations applied."""
    conn = new_db(db_path, True)
    result = import_bundle(conn, bundle)
    conn.close()
    print(json.dumps({"ops": result.applied, "peak": proc_status("VmHWM")}))


def peak_rss(bundle: str, db_path: str, expected_ops: int) -> float:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--memory-child", bundle, db_path],
        check=True, capture_output=True, text=True,
    ).stdout
    value = json.loads(out.strip().splitlines()[-1])
    check(value["ops"] == expected_ops, "memory child imported every op")
    remove_db(db_path)
    return (value["peak"] or 0) / MB


def edited_log(work: str, n: int) -> tuple[str, tuple]:
    """A bundle of n operations on n/10 rows: each inserted, then its score updated nine
    times (the edit-heavy log of bench_sync's compaction); and the table's checksum."""
    rows = n // 10
    path = os.path.join(work, f"edited-{n}.db")
    conn = new_db(path, True)
    in_transaction(conn, lambda: conn.executemany(INSERT, rows_of(rows)))
    for round_ in range(9):
        in_transaction(conn, lambda r=round_: conn.executemany(
            "UPDATE todos SET score = ? WHERE id = ?", ((-1.5 - r, i) for i in range(1, rows + 1))))
    bundle = fresh_bundle(os.path.join(work, f"edited-{n}.bundle"))
    check(export_bundle(conn, bundle).operations == n, "ten operations per row")
    expected = checksum(conn)
    conn.close()
    remove_db(path)
    return bundle, expected


def timed_import(bundle: str, db_path: str, ops: int, expected: tuple) -> float:
    conn = new_db(db_path, True)
    box = {}
    took = timed(lambda: box.setdefault("r", import_bundle(conn, bundle)))
    check(box["r"].applied == ops and checksum(conn) == expected, "the copy equals the source")
    conn.close()
    remove_db(db_path)
    return took


def median_of(reps: int, fn) -> float:
    return statistics.median(fn() for _ in range(reps))


def measure(work: str, n: int, reps: int, memory: bool) -> dict[str, float]:
    """Every figure for one size, in seconds (or MB)."""
    out: dict[str, float] = {}
    src_path, plain_path = os.path.join(work, f"src-{n}.db"), os.path.join(work, f"plain-{n}.db")

    def plain_insert() -> float:
        conn = new_db(plain_path, False)
        t = timed(lambda: in_transaction(conn, lambda: conn.executemany(INSERT, rows_of(n))))
        conn.close()
        return t

    def synced_insert() -> float:
        conn = new_db(src_path, True)
        t = timed(lambda: in_transaction(conn, lambda: conn.executemany(INSERT, rows_of(n))))
        check(conn.execute("SELECT count(*) FROM _sync_ops WHERE kind != 3").fetchone()[0] == n, "one op per row")
        conn.close()
        return t

    out["plain_insert"] = median_of(reps, plain_insert)
    out["capture"] = median_of(reps, synced_insert)  # the last run's database is the source
    src = connect(src_path, fresh=False)
    expected = checksum(src)

    inserts = fresh_bundle(os.path.join(work, f"inserts-{n}.bundle"))
    out["full_export"] = timed(lambda: export_bundle(src, inserts))
    peer_path = os.path.join(work, f"peer-{n}.db")

    def import_new() -> float:
        conn = new_db(peer_path, True)
        box = {}
        t = timed(lambda: box.setdefault("r", import_bundle(conn, inserts)))
        check(box["r"].applied == n and checksum(conn) == expected, "the copy equals the source after import")
        conn.close()
        return t

    out["import"] = median_of(reps, import_new)
    peer = connect(peer_path, fresh=False)  # holds the N rows now

    # One UPDATE of every row, sent as a delta to the copy holding them.
    in_transaction(src, lambda: src.execute(UPDATE_ALL))
    expected = checksum(src)
    updates = fresh_bundle(os.path.join(work, f"updates-{n}.bundle"))
    box, since = {}, sync_status(peer)["clock"]
    out["delta_export_all"] = timed(lambda: box.setdefault("e", export_bundle(src, updates, since=since)))
    check(box["e"].operations == n, "the update delta carries one op per row")
    out["update_import"] = timed(lambda: box.setdefault("i", import_bundle(peer, updates)))
    check(box["i"].applied == n and checksum(peer) == expected, "the copy equals the source after the update delta")

    # One new operation, exported for the copy and imported there.
    state = {"next": n + 1}
    delta = os.path.join(work, f"delta-{n}.bundle")

    def one_delta() -> tuple[float, float]:
        src.execute(INSERT, make_row(state["next"]))
        state["next"] += 1
        fresh_bundle(delta)
        result, since = {}, sync_status(peer)["clock"]
        export_s = timed(lambda: result.setdefault("e", export_bundle(src, delta, since=since)))
        check(result["e"].operations == 1, "the delta carries exactly the one new op")
        import_s = timed(lambda: result.setdefault("i", import_bundle(peer, delta)))
        check(result["i"].applied == 1, "the delta was applied")
        return export_s, import_s

    # Best of 7, as bench_sync.py does: a few milliseconds are easily lost to a busy machine.
    pairs = [one_delta() for _ in range(7)]
    out["delta1_export"] = min(p[0] for p in pairs)
    out["delta1_import"] = min(p[1] for p in pairs)
    check(checksum(src) == checksum(peer), "the copy equals the source after the 1-op deltas")
    peer.close()

    # A second copy from the whole log: two or more operations on every row.
    log = fresh_bundle(os.path.join(work, f"log-{n}.bundle"))
    log_ops = export_bundle(src, log).operations
    expected = checksum(src)
    second_path = os.path.join(work, f"second-{n}.db")
    second = new_db(second_path, True)
    box = {}
    out["second_copy"] = timed(lambda: box.setdefault("r", import_bundle(second, log)))
    check(box["r"].applied == log_ops and checksum(second) == expected, "the second copy equals the source")
    out["second_copy_ops"] = log_ops
    second.close()
    src.close()
    edited = edited_log(work, n)
    out["edited_ops"] = n
    out["edited_import"] = timed_import(edited[0], os.path.join(work, "edited-copy.db"), n, edited[1])
    if memory:
        out["rss_import"] = peak_rss(inserts, os.path.join(work, "mem.db"), n)
        out["rss_second_copy"] = peak_rss(log, os.path.join(work, "mem.db"), log_ops)
        out["rss_edited"] = peak_rss(edited[0], os.path.join(work, "mem.db"), n)
    for path in (src_path, plain_path, peer_path, second_path):
        remove_db(path)
    for path in (inserts, updates, delta, log, edited[0]):
        if os.path.exists(path):
            os.remove(path)
    return out


# (key, label, unit of the per-item cost, items at size n)
ROWS = [
    ("plain_insert", "plain insert (baseline)", "us/row", lambda n, m: n),
    ("capture", "capture insert", "us/row", lambda n, m: n),
    ("import", "import N inserts, new copy", "us/op", lambda n, m: n),
    ("update_import", "import N updates (delta)", "us/op", lambda n, m: n),
    ("second_copy", "second copy, 2 ops per row", "us/op", lambda n, m: m["second_copy_ops"]),
    ("edited_import", "new copy, 10 ops per row", "us/op", lambda n, m: m["edited_ops"]),
    ("delta_export_all", "delta export, N updates", "us/op", lambda n, m: n),
    ("full_export", "full export (info)", "us/op", lambda n, m: n),
]


def report(results: dict[int, dict[str, float]]) -> tuple[list[str], list[str]]:
    """The table's lines, and the targets missed."""
    sizes = sorted(results)
    small, big = sizes[0], sizes[-1]
    lines = ["| measurement | " + " | ".join(f"{n:,} rows" for n in sizes) + " | growth | verdict |",
             "|---|" + "---|" * len(sizes) + "---|---|"]
    missed = []
    per = {key: {n: 1e6 * results[n][key] / items(n, results[n]) for n in sizes} for key, _, _, items in ROWS}
    plain_growth = per["plain_insert"][big] / per["plain_insert"][small]
    for key, label, unit, _ in ROWS:
        growth = per[key][big] / per[key][small]
        verdict = ""
        if key not in ("plain_insert", "full_export"):
            ok = growth <= GROWTH_SLACK * max(plain_growth, 1.0)
            verdict = "ok" if ok else "MISSED"
            if not ok:
                missed.append(key)
        cells = " | ".join(f"{per[key][n]:.2f} {unit}" for n in sizes)
        lines.append(f"| {label} | {cells} | {growth:.2f}x | {verdict} |")
    for key, label in (("delta1_export", "1-op delta export (best of 7)"), ("delta1_import", "1-op delta import (best of 7, info)")):
        cells = " | ".join(f"{1000 * results[n][key]:.1f} ms" for n in sizes)
        verdict = ""
        if key == "delta1_export":
            ok = 1000 * results[big][key] < DELTA_TARGET_MS
            verdict = f"{'ok' if ok else 'MISSED'} (< {DELTA_TARGET_MS} ms)"
            if not ok:
                missed.append(key)
        lines.append(f"| {label} | {cells} | {results[big][key] / results[small][key]:.2f}x | {verdict} |")
    for key, label, ops in (("rss_import", "peak RSS, import N inserts", lambda n: n),
                            ("rss_edited", "peak RSS, N ops on N/10 rows", lambda n: n),
                            ("rss_second_copy", "peak RSS, second copy (2N ops)", lambda n: results[n]["second_copy_ops"])):
        if key not in results[big]:
            continue
        cells = " | ".join(f"{results[n][key]:.0f} MB" for n in sizes)
        judged = [n for n in sizes if ops(n) <= 1_000_000]
        ok = all(results[n][key] < RSS_TARGET_MB for n in judged)
        if not ok:
            missed.append(key)
        lines.append(f"| {label} | {cells} | | {'ok' if ok else 'MISSED'} (< {RSS_TARGET_MB} MB up to 1M ops) |")
    return lines, missed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--reps", type=int, default=3, help="runs of each step at sizes below 1M (median kept)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak RSS subprocesses")
    parser.add_argument("--work", help="directory for the scratch files (default: a temp dir)")
    parser.add_argument("--results", help="also write the table into this Markdown file")
    parser.add_argument("--memory-child", nargs=2, metavar=("BUNDLE", "DB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        memory_child(*args.memory_child)
        return 0
    work = args.work or tempfile.mkdtemp(prefix="bench-growth-")
    os.makedirs(work, exist_ok=True)
    machine = (f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} cores, "
               f"{platform.machine()}; WAL + synchronous=NORMAL")
    print(f"bench_growth: sizes {args.sizes}; {machine}", flush=True)
    results = {}
    try:
        for n in sorted(args.sizes):
            results[n] = measure(work, n, args.reps if n < 1_000_000 else 1, not args.no_memory)
            print(f"  {n:>9,} rows: " + ", ".join(f"{k} {v:.4g}" for k, v in results[n].items()), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    lines, missed = report(results)
    print("\n".join(lines))
    print(f"targets missed: {', '.join(missed) if missed else 'none'}")
    if args.results:
        reps = f"median of {args.reps} runs below 1M rows, one run at 1M"
        text = (f"Written by `python bench/bench_growth.py --results {args.results}`; {reps}.\n"
                f"Machine: {machine}.\n\n" + "\n".join(lines) + "\n")
        write_section(args.results, "Growth: capture, import and deltas at each size", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
