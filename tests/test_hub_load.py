"""A hub under concurrent pushes and pulls.

A hub answers a pull with ``export_bundle(read connection, repair=False)`` while Datasette's
write connection imports other devices' pushes. The export must be one snapshot: a push that
commits while it runs is wholly in the bundle or not at all, otherwise the bundle carries the
hub's knowledge tick without the operations that tick names, and the client refuses it with
``missing_dependencies``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sqlite3
import subprocess
import sys

import pytest

from sqlite_utils_sync import export_bundle, import_bundle, sync_status

from conftest import clean_env
from sync_helpers import conflict_records, make_db, rows, sync

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "bench_hub_load.py"
OPS_READ = "SELECT max(op) FROM _sync_ops"  # the export has listed the devices and reads their tops


def hub_with_a_pending_push(tmp_path: pathlib.Path, journal_mode: str):
    """A hub with rows, a client level with it, and a push from a new device ready to import."""
    hub = make_db(tmp_path / "hub.db")
    hub.execute(f"PRAGMA journal_mode = {journal_mode}")
    hub.executemany("INSERT INTO todos (id, title) VALUES (?, ?)", [(i, f"hub {i}") for i in range(1, 6)])
    client = make_db(tmp_path / "client.db")
    sync(hub, client, tmp_path)
    pusher = make_db(tmp_path / "pusher.db")
    pusher.executemany("INSERT INTO todos (id, title) VALUES (?, ?)", [(i, f"pusher {i}") for i in range(10, 13)])
    export_bundle(pusher, tmp_path / "push.bundle")
    return hub, client


def export_while_pushing(tmp_path: pathlib.Path, hub_path: pathlib.Path, since: dict) -> str:
    """Export from a read connection like Datasette's; once the export has read the hub's devices,
    a second connection (Datasette's write connection) imports the push. Returns what the
    push did: ``committed``, or ``busy`` when the export's lock kept it out."""
    read = sqlite3.connect(f"file:{hub_path}?mode=ro", uri=True)
    writer = sqlite3.connect(hub_path, isolation_level=None, timeout=0.05)
    outcome = []

    def push_once(sql: str) -> None:
        if outcome or OPS_READ not in sql:
            return
        try:
            import_bundle(writer, str(tmp_path / "push.bundle"))
            outcome.append("committed")
        except sqlite3.OperationalError as ex:
            outcome.append("busy" if "locked" in str(ex) else repr(ex))

    read.set_trace_callback(push_once)
    try:
        export_bundle(read, tmp_path / "pull.bundle", since=since, repair=False)
    finally:
        read.close()
        writer.close()
    return outcome[0]


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_a_push_committing_during_an_export_is_wholly_in_the_pull_or_not_at_all(tmp_path, journal_mode):
    hub, client = hub_with_a_pending_push(tmp_path, journal_mode)
    hub.close()
    hub_path = tmp_path / "hub.db"
    pushed = export_while_pushing(tmp_path, hub_path, sync_status(client)["clock"])
    # WAL lets the push commit beside the export's snapshot; a rollback journal makes it wait
    # for the export's lock (the hub answers 503 busy after its timeout and the client retries).
    assert pushed == ("committed" if journal_mode == "wal" else "busy")

    result = import_bundle(client, str(tmp_path / "pull.bundle"))  # missing_dependencies before the fix
    assert result.total_operations == 0  # the client was level with the hub before the push

    hub = sqlite3.connect(hub_path, isolation_level=None)
    if pushed == "busy":
        import_bundle(hub, str(tmp_path / "push.bundle"))
    sync(hub, client, tmp_path, "after.bundle")
    assert rows(client) == rows(hub)
    assert [r[0] for r in rows(hub)] == [1, 2, 3, 4, 5, 10, 11, 12]
    assert conflict_records(client) == conflict_records(hub)
