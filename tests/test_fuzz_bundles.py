"""Hostile bundles, fuzzed: thousands of mutated bundles, each imported in a child process.

Raw mutations (bit flips, overwrites, truncations) mostly fail the hash; re-signed ones (the
hash recomputed the way the exporter does, which any sender can do) reach every check behind
it: chunk images with damaged pages or odd schemas and values, headers with missing keys or
wrong types, the bundle's own tables changed. Each must end in an import or in a one-line
error with the database byte-identical; none may crash the process or raise anything else.
The seed is fixed, so a failure names a bundle that can be made again.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import select
import shutil
import sqlite3
import subprocess
import sys

import msgpack
import pytest


from sqlite_utils_sync import BundleError, codec, export_bundle, sync_status

SEED = 20261204
RAW = int(os.environ.get("FUZZ_RAW", 700))
RESEALED = int(os.environ.get("FUZZ_RESEALED", 1400))
WORKER = pathlib.Path(__file__).with_name("bundle_worker.py")

SCHEMA = (
    "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL);"
    "CREATE TABLE notes (key TEXT PRIMARY KEY, body, data BLOB)"
)

# Values a hostile sender might put anywhere.
VALUES = [
    None, -1, 0, 1, 3, 7, 2**31, 2**62, 2**63 - 1, -(2**63), 1.5, float("inf"), "", "x", "NULL", "'a'",
    "1,2", "X'00'", '{"' + "e" * 32 + '": 5}', "{}", "[" * 500, b"", b"\xff", b"\x00" * 64,
]
SQL_VALUES = ["CAST(x'ff' AS TEXT)", "CAST(x'41ff42' AS TEXT)", "zeroblob(100000)", "char(0)", "'it''s'"]
CHUNK_SCHEMAS = [
    "UPDATE sqlite_master SET sql = CAST(x'4352454154452054414' || x'ff' AS TEXT) WHERE name = 'ops'",
    "UPDATE sqlite_master SET sql = substr(sql, 1, length(sql) - 1) || CAST(x'2cff' AS TEXT) || ')' WHERE name = 'ops'",
    "UPDATE sqlite_master SET sql = substr(sql, 1, length(sql) - 1) || ', g AS (zeroblob(100000000)))' WHERE name = 'ops'",
    "UPDATE sqlite_master SET sql = substr(sql, 1, length(sql) - 1) || ', d DEFAULT (zeroblob(100000000)))' WHERE name = 'ops'",
    "UPDATE sqlite_master SET sql = replace(sql, 'hlc', 'hlc AS (zeroblob(100000000))') WHERE name = 'ops'",
    "UPDATE sqlite_master SET sql = replace(sql, 'kind', 'kind CHECK (length(zeroblob(100000000)))') WHERE name = 'ops'",
    "UPDATE sqlite_master SET name = 'opz', tbl_name = 'opz', sql = replace(sql, 'ops', 'opz') WHERE name = 'ops'",
    "CREATE TRIGGER t AFTER INSERT ON ops BEGIN SELECT 1; END",
    "CREATE VIEW v AS SELECT * FROM ops",
    "CREATE INDEX i ON ops (hlc)",
    "CREATE TABLE extra (x)",
]
OUTER_SCHEMAS = [
    "UPDATE sqlite_master SET sql = replace(sql, 'data BLOB NOT NULL', 'data BLOB AS (zeroblob(300000000))') "
    "WHERE name = 'bundle_chunks'",
    "UPDATE sqlite_master SET sql = replace(sql, 'data BLOB NOT NULL', "
    "'data BLOB NOT NULL, more DEFAULT (zeroblob(300000000))') WHERE name = 'bundle_chunks'",
    "UPDATE sqlite_master SET sql = replace(sql, 'value', 'value AS (zeroblob(300000000))') WHERE name = 'bundle_meta'",
    "UPDATE sqlite_master SET sql = CAST(x'43524541544520' || x'ff' AS TEXT) WHERE name = 'bundle_header'",
    "CREATE INDEX ix ON bundle_chunks (device, tbl, data)",
    "CREATE TRIGGER tx AFTER INSERT ON bundle_meta BEGIN SELECT 1; END",
    "CREATE VIEW vx AS SELECT * FROM bundle_chunks",
]
HEADER_KEYS = ["anchors", "source", "created", "clock", "since", "horizon", "devices", "tables", "dropped", "operations"]
DEEP_MSGPACK = b"\x91" * 100_000 + b"\xc0"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_db, sync):
    """Two real bundles (a full export with a knowledge tick, moves, conflicts; and a delta) and
    the databases they go into (one that holds part of them, one that holds nothing)."""
    d = tmp_path_factory.mktemp("fuzz")
    a = make_db(d / "a.db", SCHEMA, ("todos", "notes"))
    b = make_db(d / "b.db", SCHEMA, ("todos", "notes"))
    a.executemany("INSERT INTO todos VALUES (?, ?, ?, ?)", [(i, f"t{i}", i % 2, i / 3) for i in range(1, 8)])
    a.execute("INSERT INTO notes VALUES ('k''1', 'body', x'00ff')")
    # TEXT that is not UTF-8 (FUZZ_PLAIN=1 leaves it out, to run this against versions that refused it)
    body = "'plain'" if os.environ.get("FUZZ_PLAIN") else "CAST(x'41ff42' AS TEXT)"
    a.execute(f"INSERT INTO notes VALUES ('k2', {body}, NULL)")
    sync(a, b, d)
    b.execute("UPDATE todos SET id = 100 WHERE id = 1")
    b.execute("UPDATE notes SET key = 'moved' WHERE key = 'k2'")
    b.execute("UPDATE todos SET title = 'b' WHERE id = 2")
    b.execute("DELETE FROM todos WHERE id = 3")
    a.execute("UPDATE todos SET title = 'a' WHERE id = 2")
    a.close()
    shutil.copyfile(d / "a.db", d / "target-a.db")
    fresh = make_db(d / "target-fresh.db", SCHEMA, ("todos", "notes"))
    fresh.close()
    export_bundle(b, d / "full.bundle")
    export_bundle(b, d / "delta.bundle", since=sync_status(sqlite3.connect(d / "a.db"))["clock"])
    b.close()
    return d


class Worker:
    """A long-lived child importing bundles; restarted after it dies, recording how."""

    def __init__(self, scratch: pathlib.Path):
        self.scratch = scratch
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(self.scratch)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def run(self, bundle: pathlib.Path, db: pathlib.Path, timeout: float = 60) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        proc = self.proc
        try:
            proc.stdin.write(json.dumps({"bundle": str(bundle), "db": str(db)}) + "\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if proc.poll() is None:  # no answer in time: a hang is a failure too
            proc.kill()
        code = proc.wait()
        stderr = proc.stderr.read()[-2000:]
        self.proc = None
        return {"outcome": "crash" if ready else "hang", "code": code, "message": stderr}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture
def worker(tmp_path):
    w = Worker(tmp_path)
    yield w
    w.stop()


# -- mutations ---------------------------------------------------------------------------------


def flip_bits(rng: random.Random, data: bytes, most: int = 8) -> bytes:
    data = bytearray(data)
    for _ in range(rng.randint(1, most)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return bytes(data)


def raw_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "flip", "overwrite", "truncate", "page-header"])
    if kind == "flip":
        return kind, flip_bits(rng, data)
    if kind == "overwrite":
        at = rng.randrange(len(data))
        return kind, data[:at] + rng.randbytes(rng.randint(1, 32)) + data[at + 32 :]
    if kind == "page-header":  # the database header: page size, page count, schema cookie...
        return kind, flip_bits(rng, data[:100], 3) + data[100:]
    return kind, data[: rng.randrange(len(data))]


def chunk_rows(conn: sqlite3.Connection) -> list[tuple[int, int, bytes]]:
    return conn.execute("SELECT id, tbl, data FROM bundle_chunks ORDER BY id").fetchall()


def edit_image(data: bytes, *sql: str, params=()) -> bytes:
    image = sqlite3.connect(":memory:")
    try:
        image.deserialize(data)
        image.execute("PRAGMA writable_schema = ON")
        for statement in sql:
            try:
                image.execute(statement, params)
            except sqlite3.Error:  # e.g. a text seq: that mutation just does not happen
                pass
        try:
            image.commit()
        except sqlite3.Error:  # a schema SQLite itself finds malformed: sent all the same
            pass
        return image.serialize()
    finally:
        image.close()


def mutate_chunk(rng: random.Random, conn: sqlite3.Connection) -> str:
    chunk_id, tbl, stored = rng.choice(chunk_rows(conn))
    how = rng.choice(["bytes", "bytes", "page-header", "value", "value", "value", "rows", "schema", "frame"])
    try:  # the image inside a compressed chunk, mutated and compressed again
        data = codec.unpack(stored, codec.ZSTD, "fuzzed")
    except BundleError:  # a frame damaged by an earlier mutation
        data, how = stored, "frame"
    compressed = data is not stored
    if how in ("value", "rows") and width_of(data) is None:  # damaged by an earlier mutation
        how = "bytes"
    if how == "frame":  # the stored bytes themselves: compressed ones must fail as cleanly
        data, compressed = flip_bits(rng, stored, 4), False
    elif how == "bytes":
        data = flip_bits(rng, data, 4)
    elif how == "page-header":
        data = bytearray(data)
        at = rng.choice([16, 17, 18, 20, 21, 28, 29, 30, 31, 32, 36, 40, 44, 52, 56, 92, 96])
        data[at] = rng.randrange(256)
        data = bytes(data)
    elif how == "value":
        image = sqlite3.connect(":memory:")
        image.deserialize(data)
        columns = [r[1] for r in image.execute("PRAGMA table_info(ops)")]
        image.close()
        column = rng.choice(columns)
        where = rng.choice(["", " WHERE seq = (SELECT min(seq) FROM ops)", " WHERE seq = (SELECT max(seq) FROM ops)"])
        if rng.random() < 0.3:
            value = rng.choice(SQL_VALUES)
            data = edit_image(data, f"UPDATE ops SET {column} = {value}{where}")
            how = f"value {column} = {value}{where}"
        else:
            value = rng.choice(VALUES)
            data = edit_image(data, f"UPDATE OR IGNORE ops SET {column} = ?{where}", params=[value])
            how = f"value {column} = {value!r:.40}{where}"
    elif how == "rows":
        statement = rng.choice(
            [
                "DELETE FROM ops WHERE seq = (SELECT min(seq) FROM ops)",
                "DELETE FROM ops WHERE seq = (SELECT max(seq) FROM ops)",
                "INSERT INTO ops SELECT seq + 1000, * FROM (SELECT hlc, kind, mask, moved"
                + "".join(f", v{i}" for i in range(width_of(data)))
                + " FROM ops LIMIT 1)",
                "UPDATE ops SET seq = seq + 1",
                "UPDATE ops SET seq = -seq",
            ]
        )
        data = edit_image(data, statement)
        how = f"rows {statement}"
    else:
        statement = rng.choice(CHUNK_SCHEMAS)
        data = edit_image(data, statement)
        how = f"schema {statement}"
    if compressed:
        data = codec.pack(data, codec.ZSTD)
    conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [data, chunk_id])
    return f"chunk {chunk_id} (tbl {tbl}): {how}"


def width_of(data: bytes) -> int | None:
    image = sqlite3.connect(":memory:")
    try:
        image.deserialize(data)
        return len(image.execute("PRAGMA table_info(ops)").fetchall()) - 5
    except (sqlite3.Error, UnicodeDecodeError):
        return None
    finally:
        image.close()


def mutate_header(rng: random.Random, conn: sqlite3.Connection) -> str:
    raw = conn.execute("SELECT data FROM bundle_header").fetchone()[0]
    how = rng.choice(["bytes", "deep", "drop", "set", "set", "tables", "devices"])
    if how == "bytes":
        raw = flip_bits(rng, raw, 4)
    elif how == "deep":
        raw = DEEP_MSGPACK
    else:
        try:
            raw, how = mutate_header_map(rng, msgpack.unpackb(raw), how)
        except Exception:  # no longer a header map (an earlier mutation): flip bits instead
            raw = flip_bits(rng, raw, 4)
    conn.execute("UPDATE bundle_header SET data = ?", [raw])
    return f"header: {how}"


def mutate_header_map(rng: random.Random, header: dict, how: str) -> tuple[bytes, str]:
    if True:
        if how == "drop":
            key = rng.choice(HEADER_KEYS)
            header.pop(key, None)
            how = f"drop {key}"
        elif how == "set":
            key = rng.choice(HEADER_KEYS)
            header[key] = rng.choice(VALUES + [[], {}, [[]], {"e" * 32: 2**62}, {"x": 1}, ["e" * 32], {"e" * 32: [1]}])
            how = f"set {key} = {header[key]!r:.40}"
        elif how == "tables" and header["tables"]:
            entry = rng.choice(header["tables"])
            change = rng.choice(["nul", "empty-pk", "pk-not-column", "many", "dup", "type", "internal"])
            if change == "nul":
                entry[1][0] = "id\0"
            elif change == "empty-pk":
                entry[2] = []
            elif change == "pk-not-column":
                entry[2] = ["nope"]
            elif change == "many":
                entry[1] = entry[1] + [f"c{i}" for i in range(100)]
            elif change == "dup":
                entry[1] = entry[1] + entry[1][:1]
            elif change == "type":
                entry[0] = 5
            else:
                entry[0] = "_sync_ops"
            how = f"tables {change}"
        else:
            header["devices"] = rng.choice([[], header["devices"] * 2, ["f" * 32] + header["devices"], ["x"]])
            how = "devices"
    return msgpack.packb(header), how


def mutate_outer(rng: random.Random, conn: sqlite3.Connection) -> str:
    how = rng.choice(["device", "tbl", "swap", "duplicate", "delete", "text", "meta"])
    rows = chunk_rows(conn)
    first, last = rows[0][0], rows[-1][0]
    if how in ("device", "tbl"):
        conn.execute(f"UPDATE bundle_chunks SET {how} = ? WHERE id = ?", [rng.choice([-2, -1, 0, 1, 2, 99, 2**40]), first])
    elif how == "swap":
        conn.execute(
            "UPDATE bundle_chunks SET data = (SELECT data FROM bundle_chunks WHERE id = ?) WHERE id = ?", [last, first]
        )
    elif how == "duplicate":
        conn.execute("INSERT INTO bundle_chunks (device, tbl, data) SELECT device, tbl, data FROM bundle_chunks LIMIT 1")
    elif how == "delete":
        conn.execute("DELETE FROM bundle_chunks WHERE id = ?", [rng.choice([first, last])])
    elif how == "text":
        conn.execute("UPDATE bundle_chunks SET data = CAST(data AS TEXT) WHERE id = ?", [first])
    else:
        conn.execute("INSERT OR REPLACE INTO bundle_meta VALUES (?, ?)", [rng.choice(["format", "x"]), rng.choice(VALUES)])
    return f"outer: {how}"


def resealed_mutation(rng: random.Random, path: pathlib.Path, craft) -> str:
    conn = sqlite3.connect(path)
    conn.text_factory = bytes  # a chunk may have become TEXT
    try:
        done = []
        for _ in range(rng.choice([1, 1, 1, 2])):
            mutate = rng.choice([mutate_chunk] * 6 + [mutate_header] * 3 + [mutate_outer])
            done.append(mutate(rng, conn))
        craft.reseal(conn)
        if rng.random() < 0.05:  # after the hash: what the reader must check before it reads
            statement = rng.choice(OUTER_SCHEMAS)
            conn.execute("PRAGMA writable_schema = ON")
            conn.execute(statement)
            done.append(f"outer schema {statement}")
        conn.commit()
        return "; ".join(done)
    finally:
        conn.close()


def make_bundles(corpus: pathlib.Path, out: pathlib.Path, seed: int, raw: int, resealed: int, craft):
    """Yield ``(label, bundle, target db)``, deterministically from ``seed``."""
    sources = [corpus / "full.bundle", corpus / "delta.bundle"]
    targets = [corpus / "target-a.db", corpus / "target-fresh.db"]
    for n in range(raw + resealed):
        rng = random.Random(seed * 100_000 + n)
        source, target = rng.choice(sources), rng.choice(targets)
        path = out / f"{n}.bundle"
        if n < raw:
            how, data = raw_mutation(rng, source.read_bytes())
            path.write_bytes(data)
        else:
            shutil.copyfile(source, path)
            how = resealed_mutation(rng, path, craft)
        yield f"#{n} {source.name} -> {target.name}: {how}", path, target


def problem_with(result: dict) -> str | None:
    """What is wrong with one import's outcome, or None."""
    outcome = result["outcome"]
    if outcome in ("crash", "hang", "exception"):
        return f"{outcome} {result.get('code', '')}: {result.get('message', '')}"
    if outcome == "error":
        message = result["message"]
        if "\n" in message or not message.startswith("Bundle ") or len(message) > 600:
            return f"error is not one line about the bundle: {message!r}"
        if not result["same"]:
            return f"refused ({message}) but the database changed"
        return None
    if result.get("integrity") != "ok":
        return f"imported, but integrity_check says {result.get('integrity')}"
    return None


def test_thousands_of_mutated_bundles_import_or_fail_cleanly(corpus, worker, tmp_path, craft):
    outcomes: dict[str, int] = {}
    failures = []
    for label, path, target in make_bundles(corpus, tmp_path, SEED, RAW, RESEALED, craft):
        result = worker.run(path, target)
        key = result["outcome"] if result["outcome"] != "error" else f"error {result['reason']}"
        outcomes[key] = outcomes.get(key, 0) + 1
        problem = problem_with(result)
        if problem:
            failures.append(f"{label}: {problem}")
        path.unlink()
    print(json.dumps(outcomes, indent=1, sort_keys=True))
    assert not failures, f"{len(failures)} of {RAW + RESEALED} bundles:\n" + "\n".join(failures[:20])
    # The mutations reach past the hash into every kind of check.
    assert sum(outcomes.values()) == RAW + RESEALED >= 2000
    assert outcomes.get("error hash_mismatch", 0) > 100
    assert sum(v for k, v in outcomes.items() if k.startswith("error") and "hash" not in k) > 500


def test_a_sample_through_the_real_cli_is_one_line_and_exit_1(corpus, worker, tmp_path, run, craft):
    refused: dict[bool, list] = {True: [], False: []}  # by: failed the hash?
    for label, path, target in make_bundles(corpus, tmp_path, SEED + 1, 40, 260, craft):
        result = worker.run(path, target)
        if result["outcome"] == "error":
            refused[result["reason"] == "hash_mismatch"].append((label, path, target))
    sample = refused[False][:25] + refused[True][:5]
    assert len(sample) == 30
    for label, path, target in sample:
        db = tmp_path / "cli.db"
        shutil.copyfile(target, db)
        before = db.read_bytes()
        result = run(["sqlite-utils", "import-bundle", db, path], check=False)
        assert result.returncode == 1, (label, result.returncode, result.stderr)
        assert result.stderr.startswith(f"Error: Bundle {path.name}") and len(result.stderr.splitlines()) == 1, (
            label,
            result.stderr,
        )
        assert "Traceback" not in result.stderr and db.read_bytes() == before, label


def test_a_hub_answers_hostile_bodies_with_4xx_and_stays_up(corpus, tmp_path, datasette_server, craft):
    import httpx

    hub = tmp_path / "hub.db"
    shutil.copyfile(corpus / "target-a.db", hub)
    writes = ("insert-row", "update-row", "delete-row")
    config = {"databases": {"hub": {"permissions": {action: {"id": "alice"} for action in ("sync-import", *writes)}}}}
    server = datasette_server([hub], config)
    # A syncing device views its tables: the hub compares a bundle's repeated operations with its own only then.
    actions = ("view-database", "view-table", "sync-import", *writes)
    token = server.token("alice", *[arg for action in actions for arg in ("-d", "hub", action)])
    statuses: dict[int, int] = {}
    failures = []
    with httpx.Client(timeout=60) as client:
        for label, path, _ in make_bundles(corpus, tmp_path, SEED + 2, 100, 200, craft):
            response = client.post(
                f"{server.url}/hub/-/sync/import",
                content=path.read_bytes(),
                headers={"Authorization": f"Bearer {token}"},
            )
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500 or response.status_code not in (200, 400):
                failures.append(f"{label}: {response.status_code} {response.text[:300]}")
            elif response.status_code == 400 and "\n" in response.json()["error"]:
                failures.append(f"{label}: error is not one line: {response.json()['error']!r}")
    print(statuses)
    assert server.proc.poll() is None, server.output()[-3000:]
    assert not failures, f"{len(failures)} bodies:\n" + "\n".join(failures[:20])
    assert statuses.get(400, 0) > 200
