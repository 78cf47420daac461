"""Copies and hubs running an older datasette-sync: the version before compressed bundles
(format ``datasette-sync-bundle/2``), run from this repository's history.

A hub of that version refuses a compressed bundle as a format it does not know; a device of
this version then pushes the same operations uncompressed, so devices may be upgraded before
their hub. ``export-bundle --uncompressed`` writes a file such a copy reads.
"""

from __future__ import annotations

import io
import json
import pathlib
import sqlite3
import subprocess
import sys
import tarfile
import time

import httpx
import pytest

from sqlite_utils_sync import export_bundle

ROOT = pathlib.Path(__file__).resolve().parent.parent
OLD = "b33f2de443d12070f3b12ce57b318d191b30aae2"
"""A commit that reads and writes format 2 only (before compression)."""
SECRET = "older-versions-secret"


@pytest.fixture(scope="module")
def old_code(tmp_path_factory) -> pathlib.Path:
    """The packages as they were at :data:`OLD`, from git; skipped where the checkout has no history."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", OLD, "sqlite_utils_sync", "datasette_sync"],
        capture_output=True,
    )
    if archive.returncode != 0:
        pytest.skip(f"this checkout does not hold commit {OLD[:7]} (no git history)")
    folder = tmp_path_factory.mktemp("old-code")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder)
    return folder


def old_python(old_code: pathlib.Path, source: str, clean_env) -> str:
    """Run ``source`` with the old packages first on the path (and not this checkout, which
    ``python -c`` would put first when run from it); its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, env=clean_env(PYTHONPATH=str(old_code)),
        cwd=old_code, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.fixture
def old_hub(tmp_path, old_code, clean_env, free_port, executable):
    """A real ``datasette serve`` running the old plugin on a hub database the old code made."""
    hub = tmp_path / "hub.db"
    old_python(old_code, f"""
import sqlite3, sqlite_utils_sync as s
conn = sqlite3.connect({str(hub)!r}, isolation_level=None)
conn.execute("CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)")
conn.execute("INSERT INTO todos VALUES (1, 'from the old hub', 0)")
s.enable_sync(conn, ["todos"])
""", clean_env)
    config = tmp_path / "datasette.json"
    actions = ("sync-export", "sync-import", "insert-row", "update-row", "delete-row")
    config.write_text(json.dumps({"databases": {"hub": {"permissions": {a: {"id": "alice"} for a in actions}}}}))
    port = free_port()
    log = open(tmp_path / "old-hub.log", "wb")
    proc = subprocess.Popen(
        [executable("datasette"), "serve", str(hub), "-c", str(config), "--host", "127.0.0.1", "--port", str(port),
         "--secret", SECRET],
        stdout=log, stderr=subprocess.STDOUT, env=clean_env(PYTHONPATH=str(old_code)), cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/-/versions.json", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise AssertionError((tmp_path / "old-hub.log").read_text())
        token = subprocess.run(
            [executable("datasette"), "create-token", "alice", "--secret", SECRET], capture_output=True, text=True
        ).stdout.strip()
        yield hub, url + "/hub", token
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def test_a_device_pushes_uncompressed_to_a_hub_from_before_compression(tmp_path, old_hub, run, run_json):
    hub, url, token = old_hub
    device = tmp_path / "device.db"
    run_json(["sqlite-utils", "sync", device, url, "--token", token, "--json"])
    run(["sqlite-utils", "query", device, "UPDATE todos SET title = 'edited on a new device' WHERE id = 1"])
    run(["sqlite-utils", "query", device, "INSERT INTO todos VALUES (2, 'added on a new device', 0)"])

    # The hub is as old as it claims: the bundle this version writes by default is refused.
    conn = sqlite3.connect(device)
    export_bundle(conn, tmp_path / "compressed.bundle")
    conn.close()
    refused = httpx.post(
        url + "/-/sync/import", content=(tmp_path / "compressed.bundle").read_bytes(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/vnd.sqlite3"}, timeout=30,
    )
    assert refused.status_code == 400 and refused.json()["reason"] == "unsupported_format"

    result = run_json(["sqlite-utils", "sync", device, url, "--token", token, "--json"])
    assert result["pushed"]["applied"] == 2
    conn = sqlite3.connect(hub)
    assert conn.execute("SELECT id, title FROM todos ORDER BY id").fetchall() == [
        (1, "edited on a new device"), (2, "added on a new device"),
    ]
    conn.close()


def test_export_bundle_uncompressed_is_read_by_a_copy_from_before_compression(tmp_path, old_code, make_todos_db, run, clean_env):
    laptop = make_todos_db(tmp_path / "laptop.db", [{"id": 1, "title": "milk", "done": 0}])
    run(["sqlite-utils", "export-bundle", laptop, tmp_path / "plain.bundle", "--uncompressed"])
    run(["sqlite-utils", "export-bundle", laptop, tmp_path / "compressed.bundle"])
    out = old_python(old_code, f"""
import sqlite3, sqlite_utils_sync as s
conn = sqlite3.connect({str(tmp_path / "old.db")!r}, isolation_level=None)
conn.execute("CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER)")
s.enable_sync(conn, ["todos"])
try:
    s.import_bundle(conn, {str(tmp_path / "compressed.bundle")!r})
except s.SyncError as ex:
    print(ex.reason)
s.import_bundle(conn, {str(tmp_path / "plain.bundle")!r})
print(conn.execute("SELECT id, title, done FROM todos").fetchall())
""", clean_env)
    assert out.splitlines() == ["unsupported_format", "[(1, 'milk', 0)]"]
