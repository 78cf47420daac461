#!/usr/bin/env python3
"""bench_export.py -- full export speed, bundle size per codec, import and new-device pull,
each beside plain SQLite doing the same work in the same process.

Usage::

    python bench/bench_export.py            # 1M-op log, 100k-row todos workload, 3 runs each
    python bench/bench_export.py --quick    # 100k-op log, 20k rows
    python bench/bench_export.py --no-hub   # without the pull through a real `datasette serve`
    python bench/bench_export.py --only import,pull   # some parts only (export, memory, codecs, import, pull, turns)

Lines:

- (2) full export of the whole log (one insert per row), ops/s; beside it a plain
  scan-and-write of the same rows into a new file (``ATTACH`` + ``INSERT … SELECT``); then the
  same export as a hub makes it (read-only connection, no repair) and with ``--table``;
- (2) new-device pull: ``sync_with_hub`` into a new file from a real ``datasette serve`` on
  127.0.0.1 holding the log, vs copying the synced table into a new file with plain SQL;
  then the floors of other designs (no log at all, a log without values, a clone of a device
  file the hub kept ready, with the checks a file from the network needs);
- (3) bytes per operation of the todos workload (inserts, a fifth updated one by one, one
  ``UPDATE`` of every row, a tenth deleted) for each codec: as the exporter writes them
  (none, zstd) and, for comparison, its chunk images recompressed with zstd level 3 and zlib;
- (3) import of an N-insert bundle (compressed, and not) vs a plain ``executemany`` insert;
- (4) peak RSS of a process exporting the whole log (VmHWM, the process, not the heap);
- tables written in turn (a list, then its item, N times: every run one operation long): a
  full export and its import into a new file, vs copying both tables with plain SQL, and the
  bundle's bytes per operation.

Every timing is the median of ``--reps`` runs, plain and synced interleaved. Targets are
printed with ``ok`` or ``MISSED``; what was measured is checked (operation counts, table
contents after an import or pull), never the timings.
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
import time
import zlib

import zstandard

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH), BENCH]

from bench_sync import INSERT, SCHEMA, checksum, close_checkpointed, connect, in_transaction, make_row, new_db, now, proc_status, timed  # noqa: E402

from sqlite_utils_sync import export_bundle, import_bundle  # noqa: E402

RESULTS: dict[str, bool] = {}
PARTS = ("export", "memory", "codecs", "import", "pull", "turns")


def line(label: str, text: str, ok: bool | None = None, key: str | None = None) -> None:
    if ok is not None:
        RESULTS[key or label] = ok
        text += f"  {'ok' if ok else 'MISSED'}"
    print(f"{label:<34} {text}", flush=True)


def median_pair(reps: int, plain_fn, synced_fn) -> tuple[float, float]:
    plain, synced = [], []
    for _ in range(reps):
        plain.append(plain_fn())
        synced.append(synced_fn())
    return statistics.median(plain), statistics.median(synced)


def fresh(path: str) -> str:
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.exists(path + suffix):
            os.remove(path + suffix)
    return path


def build_log(path: str, n: int) -> None:
    """A synced todos table of ``n`` rows, one insert operation each."""
    conn = new_db(fresh(path), True)
    in_transaction(conn, lambda: conn.executemany(INSERT, (make_row(i) for i in range(1, n + 1))))
    close_checkpointed(conn)


def plain_copy(source: str, target: str, log: bool | str = False) -> float:
    """Copy the synced table into a new file with plain SQL: what a full export or pull is
    compared with (``log``: and the operation log, ``_sync_ops``, as it is; ``"slim"``: its
    rows without their values, what a log that read values from the table would write)."""
    conn = connect(source, fresh=False)
    fresh(target)
    conn.execute(f"ATTACH '{target}' AS copy")
    ops_sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = '_sync_ops'").fetchone()[0]

    def copy():
        conn.execute("BEGIN")
        conn.execute(SCHEMA.replace("CREATE TABLE todos", "CREATE TABLE copy.todos"))
        conn.execute("INSERT INTO copy.todos SELECT * FROM todos")
        if log:
            conn.execute(ops_sql.replace("CREATE TABLE _sync_ops", "CREATE TABLE copy._sync_ops", 1))
            if log == "slim":
                columns = "op, hlc, tid, kind, mask, rowkey, newkey"
                conn.execute(f"INSERT INTO copy._sync_ops ({columns}) SELECT {columns} FROM _sync_ops")
            else:
                conn.execute("INSERT INTO copy._sync_ops SELECT * FROM _sync_ops")
        conn.execute("COMMIT")

    took = timed(copy)
    conn.execute("DETACH copy")
    conn.close()
    return took


def bench_full_export(work: str, log: str, n: int, reps: int) -> None:
    bundle = os.path.join(work, "full.bundle")
    conn = connect(log, fresh=False)
    results = []

    def export() -> float:
        fresh(bundle)
        box = {}
        took = timed(lambda: box.setdefault("r", export_bundle(conn, bundle)))
        results.append(box["r"])
        return took

    # The first export after capture settles the clocks of every captured op (clocks.py), once.
    first = export()
    plain, synced = median_pair(reps, lambda: plain_copy(log, os.path.join(work, "copy.db")), export)
    conn.close()
    assert all(r.operations == n for r in results), "every export holds every operation"
    rate = n / synced
    line("(2) full export", f"{n} ops  {synced:.2f}s  {rate:,.0f} ops/s (target >= 1,000,000)", rate >= 1_000_000, "export_rate")
    line("    plain scan-and-write", f"{n} rows {plain:.2f}s  {n / plain:,.0f} rows/s; export / plain {synced / plain:.2f}x")
    line("    bundle", f"{results[-1].bytes:,} bytes  {results[-1].bytes / n:.1f} B/op")
    line("    (info) first export", f"{first:.2f}s (it also settles the clocks of the {n} captured ops, once)")
    # A hub exports on a read-only connection without repair; a partial copy, or a hub answering
    # an actor granted some tables, exports with --table (here every table: the same operations).
    hub = sqlite3.connect(f"file:{log}?mode=ro", uri=True, isolation_level=None)
    conn = connect(log, fresh=False)
    for label, fn in (
        ("(info) hub's export", lambda: export_bundle(hub, bundle, repair=False)),
        ("(info) export --table todos", lambda: export_bundle(conn, bundle, tables=["todos"])),
    ):
        times = []
        for _ in range(reps):
            fresh(bundle)
            took = timed(lambda: results.append(fn()))
            times.append(took)
        assert results[-1].operations == n
        median = statistics.median(times)
        line("    " + label, f"{n} ops  {median:.2f}s  {n / median:,.0f} ops/s")
    hub.close()
    conn.close()


def bench_export_memory(work: str, log: str, n: int) -> None:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--export-child", log, os.path.join(work, "mem.bundle")],
        check=True, capture_output=True, text=True,
    ).stdout
    value = json.loads(out.strip().splitlines()[-1])
    assert value["operations"] == n, "the child exported every operation"
    mb = value["peak"] / 1e6
    line("(4) export peak RSS", f"{n} ops  {mb:.1f} MB (process VmHWM; before the export {value['before'] / 1e6:.1f} MB; "
         "target < 150 MB)", mb < 150, "export_rss")


def export_child(log: str, bundle: str) -> None:
    conn = connect(log, fresh=False)
    before = proc_status("VmRSS")
    result = export_bundle(conn, fresh(bundle))
    print(json.dumps({"operations": result.operations, "peak": proc_status("VmHWM"), "before": before}))


def todos_workload(path: str, n: int) -> sqlite3.Connection:
    conn = new_db(fresh(path), True)
    in_transaction(conn, lambda: conn.executemany(INSERT, (make_row(i) for i in range(1, n + 1))))
    in_transaction(conn, lambda: conn.executemany("UPDATE todos SET done = 1 - done WHERE id = ?", [(i,) for i in range(1, n + 1, 5)]))
    in_transaction(conn, lambda: conn.execute("UPDATE todos SET score = score + 1"))
    in_transaction(conn, lambda: conn.execute("DELETE FROM todos WHERE id % 10 = 0"))
    return conn


def stored_size(bundle: str, pack) -> int:
    """The bundle's size with its (uncompressed) chunk images stored as ``pack`` makes them."""
    conn = sqlite3.connect(bundle)
    chunks = [data for (data,) in conn.execute("SELECT data FROM bundle_chunks")]
    conn.close()
    return os.path.getsize(bundle) - sum(map(len, chunks)) + sum(len(pack(c)) for c in chunks)


def bench_codecs(work: str, n: int) -> None:
    conn = todos_workload(os.path.join(work, "todos.db"), n)
    plain_bundle, zstd_bundle = os.path.join(work, "todos-none.bundle"), os.path.join(work, "todos-zstd.bundle")
    took = {}
    export_bundle(conn, fresh(plain_bundle))  # settles the captured clocks, once (not timed)
    for path, codec in ((plain_bundle, None), (zstd_bundle, "zstd")):
        fresh(path)
        started = now()
        result = export_bundle(conn, path, codec=codec)
        took[codec] = now() - started
    ops = result.operations
    expected = checksum(conn)
    conn.close()
    copy = new_db(fresh(os.path.join(work, "todos-copy.db")), True)
    assert import_bundle(copy, zstd_bundle).applied == ops, "the compressed bundle imports whole"
    assert checksum(copy) == expected, "the copy holds what the source holds"
    copy.close()
    sizes = {
        "none (as written)": (os.path.getsize(plain_bundle), took[None]),
        "zstd level 1 (as written, default)": (os.path.getsize(zstd_bundle), took["zstd"]),
    }
    for name, pack in (
        ("zstd level 3", zstandard.ZstdCompressor(level=3).compress),
        ("zlib level 1", lambda d: zlib.compress(d, 1)),
        ("zlib level 6", lambda d: zlib.compress(d, 6)),
    ):
        started = now()
        size = stored_size(plain_bundle, pack)
        sizes[name] = (size, took[None] + now() - started)
    for name, (size, seconds) in sizes.items():
        per_op = size / ops
        target = name.startswith("zstd level 1")
        line(f"(3) bundle size, {name}" if target else f"    {name}",
             f"{ops} ops  {per_op:5.1f} B/op  export {seconds:.2f}s" + ("  (target <= 30 B/op)" if target else ""),
             per_op <= 30 if target else None, "bytes_per_op")


def bench_import(work: str, n: int, reps: int) -> None:
    source = new_db(fresh(os.path.join(work, "inserts.db")), True)
    rows = [make_row(i) for i in range(1, n + 1)]
    in_transaction(source, lambda: source.executemany(INSERT, rows))
    expected = checksum(source)
    bundles = {}
    for codec in ("zstd", None):
        bundles[codec] = fresh(os.path.join(work, f"inserts-{codec}.bundle"))
        export_bundle(source, bundles[codec], codec=codec)
    source.close()

    cpu: dict[str, list[tuple[float, float]]] = {"plain": [], "synced": []}

    def on_cpu(key: str, fn):
        """``fn`` with the CPU time of this thread and of the whole process kept in ``cpu``."""
        def run():
            thread, process = time.thread_time(), time.process_time()
            fn()
            cpu[key].append((time.thread_time() - thread, time.process_time() - process))
        return run

    def plain() -> float:
        conn = new_db(os.path.join(work, "import-plain.db"), False)
        took = timed(on_cpu("plain", lambda: in_transaction(conn, lambda: conn.executemany(INSERT, rows))))
        conn.close()
        return took

    def synced(codec):
        def run() -> float:
            conn = new_db(os.path.join(work, "import-synced.db"), True)
            box = {}
            took = timed(on_cpu("synced", lambda: box.setdefault("r", import_bundle(conn, bundles[codec]))))
            assert box["r"].applied == n and checksum(conn) == expected, "the import applied every row"
            conn.close()
            return took
        return run

    for codec in ("zstd", None):
        base, took = median_pair(reps, plain, synced(codec))
        ratio = took / base
        label = "(3) import, compressed" if codec else "    import, uncompressed"
        line(label, f"{n} ops  plain {base:.3f}s  synced {took:.3f}s  ratio {ratio:.2f}x"
             + ("  (target <= 2x)" if codec else ""), ratio <= 2 if codec else None, "import_ratio")
        # CPU time is steadier than wall time on a shared machine; the importer's chunk checks
        # run on a second thread, so the importing thread's and the process's are both shown.
        (thread, process), (plain_thread, plain_process) = (
            [statistics.median(c[i] for c in cpu[key]) for i in (0, 1)] for key in ("synced", "plain")
        )
        line("    (info) CPU", f"importing thread {thread / plain_thread:.2f}x, whole process "
             f"{process / plain_process:.2f}x the plain insert's CPU")
        cpu["plain"].clear()
        cpu["synced"].clear()


def bench_pull(work: str, log: str, n: int, reps: int) -> None:
    import sqlite_utils
    from bench_hub_load import start_hub, tokens

    from sqlite_utils_sync.client import sync_with_hub

    hub_dir = os.path.join(work, "hub")
    os.makedirs(hub_dir, exist_ok=True)
    hub = os.path.join(hub_dir, "hub.db")
    shutil.copyfile(log, hub)
    expected = checksum(connect(hub, fresh=False))
    proc, url, _ = start_hub(hub_dir, hub)
    try:
        (token,) = tokens(1)
        target = os.path.join(work, "device.db")

        def pull() -> float:
            fresh(target)
            db = sqlite_utils.Database(target)
            took = timed(lambda: sync_with_hub(db, url, token=token, create_tables=True))
            conn = db.conn
            assert checksum(conn) == expected, "the new device holds every row"
            conn.close()
            return took

        def download() -> float:
            path = fresh(os.path.join(work, "download.bundle"))
            return timed(lambda: fetch(url, token, path))

        def import_only() -> float:
            conn = sqlite3.connect(fresh(target), isolation_level=None)
            took = timed(lambda: import_bundle(conn, os.path.join(work, "download.bundle"), create_tables=True))
            conn.close()
            return took

        pull()  # the hub's first answer warms its caches
        plain, synced = median_pair(reps, lambda: plain_copy(hub, os.path.join(work, "copy.db")), pull)
        with_log = statistics.median(plain_copy(hub, os.path.join(work, "copy.db"), log=True) for _ in range(reps))
        slim_log = statistics.median(plain_copy(hub, os.path.join(work, "copy.db"), log="slim") for _ in range(reps))
        fetched, imported = median_pair(reps, download, import_only)
        pull()  # leaves the device a new pull makes: what a hub's prepared snapshot would hold
        clone = clone_floor(work, target, reps)
    finally:
        proc.terminate()
        proc.wait()
    ratio = synced / plain
    line("(2) new-device pull from a hub", f"{n} ops  plain copy {plain:.2f}s  pull {synced:.2f}s  ratio {ratio:.2f}x "
         "(target < 2x)", ratio < 2, "pull_ratio")
    line("    of which", f"download (hub export + HTTP) {fetched:.2f}s, import into a new file {imported:.2f}s")
    line("    plain copy of table and log", f"{with_log:.2f}s; pull / that {synced / with_log:.2f}x")
    floor = fetched + with_log
    line("    (info) floor", f"download + plain copy of table and log {floor:.2f}s = {floor / plain:.2f}x the plain copy "
         f"of the table; the import alone is {imported / with_log:.2f}x the plain copy of table and log")
    no_log = fetched + plain
    line("    (info) no log at all", f"download + plain copy of the table alone {no_log:.2f}s = {no_log / plain:.2f}x: "
         "even a device that kept no log would miss 2x while the hub exports on demand")
    line("    (info) log without values", f"plain copy of table and log rows without their values {slim_log:.2f}s = "
         f"{slim_log / plain:.2f}x the plain copy of the table: one log row per row costs about as much as the values")
    fetched_file, checked, compared = clone
    floor = fetched_file + checked
    line("    (info) clone floor", f"a new device that downloads a prepared device file ({fetched_file:.2f}s, 1 MB "
         f"blocks through uvicorn) and runs the least checks a file from the network needs (quick_check, one pass "
         f"over the log: {checked:.2f}s) {floor:.2f}s = {floor / plain:.2f}x, before making it its own; comparing its "
         f"table with its log (at least {compared:.2f}s) makes it {(floor + compared) / plain:.2f}x")


def clone_floor(work: str, device: str, reps: int) -> tuple[float, float, float]:
    """The least a new device cloned from a hub's prepared file would cost: the file sent in
    1 MB blocks by an ASGI app under uvicorn (what Datasette runs on; Datasette's own download
    of an immutable file is ten times slower), then ``PRAGMA quick_check`` and one pass over
    the log, as a file nobody checked must have before it is opened as a database (making it
    this device's own, and comparing its tables with its log, would come on top)."""
    from bench_hub_load import executable, free_port

    snapshot = os.path.join(work, "snapshot.db")
    shutil.copyfile(device, snapshot)
    port = free_port()
    env = dict(os.environ, BENCH_SNAPSHOT=snapshot)
    proc = subprocess.Popen([executable("uvicorn"), "bench_export:file_app", "--app-dir", BENCH, "--host",
                             "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=work)
    url = f"http://127.0.0.1:{port}/snapshot.db"
    got = os.path.join(work, "cloned.db")
    try:
        wait_for(url)

        def download() -> float:
            took = timed(lambda: fetch_file(url, fresh(got)))
            assert os.path.getsize(got) == os.path.getsize(snapshot)
            return took

        def check() -> float:
            return timed(lambda: least_checks(got))

        fetched, checked = median_pair(reps, download, check)
        compared = statistics.median(timed(lambda: compare_with_log(got)) for _ in range(reps))
        return fetched, checked, compared
    finally:
        proc.terminate()
        proc.wait()


def compare_with_log(path: str) -> None:
    """The cheapest comparison of a cloned table with its log: every row against the image of an
    operation (here each row has one, so no choosing of the latest one, which would cost more)."""
    conn = sqlite3.connect(path, isolation_level=None)
    differing = conn.execute("SELECT count(*) FROM (SELECT id, title, done, note, score FROM todos EXCEPT "
                             "SELECT c0, c1, c2, c3, c4 FROM _sync_ops WHERE kind = 0)").fetchone()[0]
    assert differing == 0
    conn.close()


async def file_app(scope, receive, send) -> None:
    """An ASGI app sending the file ``$BENCH_SNAPSHOT`` in 1 MB blocks (see :func:`clone_floor`)."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/octet-stream")]})
    with open(os.environ["BENCH_SNAPSHOT"], "rb") as fp:
        while block := fp.read(1 << 20):
            await send({"type": "http.response.body", "body": block, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


def wait_for(url: str) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with httpx.stream("GET", url, timeout=5) as r:
                if r.status_code == 200:
                    return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"datasette did not serve {url} within 60 s")


def fetch_file(url: str, path: str) -> None:
    import httpx

    with httpx.stream("GET", url, timeout=600) as r:
        r.raise_for_status()
        with open(path, "wb") as out:
            for block in r.iter_raw(1 << 20):
                out.write(block)


def least_checks(path: str) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA trusted_schema = OFF")
    assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)
    bad = conn.execute("SELECT count(*) FROM _sync_ops WHERE kind NOT BETWEEN 0 AND 7 OR typeof(mask) NOT IN "
                       "('integer', 'null') OR typeof(rowkey) NOT IN ('text', 'null') OR hlc < 0").fetchone()[0]
    assert bad == 0
    conn.close()


TURNS_SCHEMA = (
    "CREATE TABLE lists (id INTEGER PRIMARY KEY, name TEXT)",
    "CREATE TABLE items (id INTEGER PRIMARY KEY, list INTEGER, title TEXT, done INTEGER)",
)


def bench_turns(work: str, n: int, reps: int) -> None:
    """A list and its item, ``n`` times in one transaction: runs of one operation each."""
    from sqlite_utils_sync import enable_sync

    log = fresh(os.path.join(work, "turns.db"))
    conn = sqlite3.connect(log, isolation_level=None)
    for create in TURNS_SCHEMA:
        conn.execute(create)
    enable_sync(conn, ["lists", "items"])

    def write():
        for i in range(1, n + 1):
            conn.execute("INSERT INTO lists VALUES (?, ?)", [i, f"list {i}"])
            conn.execute("INSERT INTO items VALUES (?, ?, ?, 0)", [i, i, f"item {i}"])

    in_transaction(conn, write)
    bundle, copy, target = (os.path.join(work, name) for name in ("turns.bundle", "turns-copy.db", "turns-new.db"))
    export_bundle(conn, fresh(bundle))  # settles the clocks, once

    def copy_tables():
        for create, name in zip(TURNS_SCHEMA, ("lists", "items")):
            conn.execute(create.replace("CREATE TABLE ", "CREATE TABLE copy."))
            conn.execute(f"INSERT INTO copy.{name} SELECT * FROM {name}")

    def plain() -> float:
        conn.execute(f"ATTACH '{fresh(copy)}' AS copy")
        took = timed(lambda: in_transaction(conn, copy_tables))
        conn.execute("DETACH copy")
        return took

    def export() -> float:
        return timed(lambda: export_bundle(conn, fresh(bundle)))

    def import_new() -> float:
        new = sqlite3.connect(fresh(target), isolation_level=None)
        took = timed(lambda: import_bundle(new, bundle, create_tables=True))
        assert [new.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("lists", "items")] == [n, n]
        new.close()
        return took

    copied, exported = median_pair(reps, plain, export)
    imported = statistics.median(import_new() for _ in range(reps))
    conn.close()
    size = os.path.getsize(bundle)
    line("tables written in turn", f"{2 * n} ops  export {exported:.2f}s ({exported / copied:.1f}x)  import into a new "
         f"file {imported:.2f}s ({imported / copied:.1f}x)  plain copy of both tables {copied:.2f}s  {size / (2 * n):.1f} B/op")


def fetch(url: str, token: str, path: str) -> None:
    """GET the hub's whole export, streamed to ``path``, as the client does."""
    import httpx

    from sqlite_utils_sync import protocol

    with httpx.stream("GET", url + protocol.EXPORT_PATH, headers={"Authorization": f"Bearer {token}"}, timeout=600) as r:
        r.raise_for_status()
        with open(path, "wb") as out:
            for block in r.iter_bytes(1 << 16):
                out.write(block)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 100k-op log and 20k rows")
    parser.add_argument("--reps", type=int, default=3, help="runs per measurement (the median is kept)")
    parser.add_argument("--no-hub", action="store_true", help="skip the pull through datasette serve")
    parser.add_argument("--work", help="directory for the scratch files (default: a temp dir)")
    parser.add_argument("--only", help=f"comma-separated parts to run (default: all): {', '.join(PARTS)}")
    parser.add_argument("--export-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.export_child:
        export_child(*args.export_child)
        return 0
    log_size, n = (100_000, 20_000) if args.quick else (1_000_000, 100_000)
    work = args.work or tempfile.mkdtemp(prefix="bench-export-")
    os.makedirs(work, exist_ok=True)
    print(f"bench_export: {log_size}-op log, {n}-row todos workload, median of {args.reps}; Python "
          f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}, zstandard {zstandard.__version__}, "
          f"{os.cpu_count()} CPUs", flush=True)
    started = now()
    try:
        parts = set(PARTS if not args.only else args.only.split(","))
        if args.no_hub:
            parts.discard("pull")
        unknown = parts - set(PARTS)
        if unknown:
            parser.error(f"unknown part {', '.join(sorted(unknown))}: the parts are {', '.join(PARTS)}")
        log = os.path.join(work, "log.db")
        if parts & {"export", "memory", "pull"}:
            build_log(log, log_size)
        if "export" in parts:
            bench_full_export(work, log, log_size, args.reps)
        if "memory" in parts:
            bench_export_memory(work, log, log_size)
        if "codecs" in parts:
            bench_codecs(work, n)
        if "import" in parts:
            bench_import(work, n, args.reps)
        if "pull" in parts:
            bench_pull(work, log, log_size, args.reps)
        if "turns" in parts:
            bench_turns(work, n // 2, args.reps)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    missed = [k for k, ok in RESULTS.items() if not ok]
    print(f"done in {now() - started:.0f}s; targets missed: {', '.join(missed) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
