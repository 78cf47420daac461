"""Shared helpers for the core tests: real SQLite files, real bundles."""

from __future__ import annotations

import hashlib
import pathlib
import sqlite3
from typing import Any

import msgpack

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, list_conflicts, sync_status
from sqlite_utils_sync.bundle import FORMAT, chunk_prefix

TODOS = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL)"


def make_db(path: pathlib.Path | str, schema: str = TODOS, tables: tuple[str, ...] = ("todos",)) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    for statement in schema.split(";"):
        if statement.strip():
            conn.execute(statement)
    enable_sync(conn, list(tables))
    return conn


def rows(conn: sqlite3.Connection, table: str = "todos") -> list[tuple[Any, ...]]:
    """Every row with the SQLite type of every value, in primary key order."""
    t = quote(table)
    columns = [quote(r[1]) for r in conn.execute(f"PRAGMA table_info({t})")]
    select = ", ".join(f"{c}, typeof({c})" for c in columns)
    return [tuple(row) for row in conn.execute(f"SELECT {select} FROM {t} ORDER BY 1, 3")]


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sync(source: sqlite3.Connection, target: sqlite3.Connection, folder: pathlib.Path, name: str = "b.bundle"):
    """Send ``target`` what it lacks from ``source``; returns the import result."""
    path = folder / name
    export_bundle(source, path, since=sync_status(target)["clock"])
    return import_bundle(target, path)


def conflict_records(conn: sqlite3.Connection) -> list[tuple]:
    return sorted(
        (c["id"], c["table"], tuple(v["op"] for v in c["versions"]), c["resolved"])
        for c in list_conflicts(conn, include_resolved=True)
    )


def file_bytes(path: pathlib.Path | str) -> bytes:
    return pathlib.Path(path).read_bytes()


def knowledge(conn: sqlite3.Connection) -> list[tuple]:
    """Every device's knowledge epochs (what its ops from ``from_seq`` on had seen), by device id."""
    return sorted(
        tuple(row)
        for row in conn.execute(
            "SELECT d.device_id, k.from_seq, k.clock FROM _sync_knowledge k JOIN _sync_devices d ON d.idx = k.device"
        )
    )


# Tampering with bundles, as a hostile peer would -------------------------------------------


def rewrite(path, tamper):
    """Change a bundle in place with ``tamper(conn)``."""
    conn = sqlite3.connect(path)
    tamper(conn)
    conn.commit()
    conn.close()


def reseal(conn):
    """Recompute the hash after tampering: what a hostile peer (not a corrupted file) sends."""
    digest = hashlib.sha256(FORMAT.encode())
    for device, table, data in conn.execute("SELECT device, tbl, data FROM bundle_chunks ORDER BY id"):
        digest.update(chunk_prefix(device, table, data))
        digest.update(data)
    digest.update(conn.execute("SELECT data FROM bundle_header").fetchone()[0])
    sha = digest.hexdigest()
    conn.execute("UPDATE bundle_meta SET value = ? WHERE key = 'sha256'", [sha])
    conn.execute("UPDATE bundle_meta SET value = ? WHERE key = 'bundle_id'", [sha[:32]])


def edit_chunks(conn, sql, *params, first_only=True):
    """Run ``sql`` on the ``ops`` table inside chunk images (each one a SQLite database)."""
    chunks = conn.execute("SELECT id, data FROM bundle_chunks ORDER BY id").fetchall()
    for chunk_id, data in chunks[:1] if first_only else chunks:
        image = sqlite3.connect(":memory:")
        image.deserialize(data)
        image.execute(sql, params)
        image.commit()
        conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [image.serialize(), chunk_id])
        image.close()


def edit_header(conn, change):
    header = msgpack.unpackb(conn.execute("SELECT data FROM bundle_header").fetchone()[0])
    change(header)
    conn.execute("UPDATE bundle_header SET data = ?", [msgpack.packb(header)])
