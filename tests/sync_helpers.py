"""Shared helpers for the core tests: real SQLite files, real bundles."""

from __future__ import annotations

import pathlib
import sqlite3
from typing import Any

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, list_conflicts, sync_status

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
