"""A disk that fills up mid-command: one line saying so, and every database as it was.

A limit on the size of the files the command's process may write (``RLIMIT_FSIZE``) stands
in for the full disk: it fails the same writes, with no mount and no root."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess

import pytest

from conftest import _make_db as make_db


def file_size_limit(limit: int):
    """For ``subprocess``: the child may write no file past ``limit`` bytes (Python ignores
    SIGXFSZ, so the write fails with EFBIG instead of killing it)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def test_a_pull_that_cannot_be_written_is_one_line_and_changes_nothing(
    tmp_path, datasette_server, hub_config, make_todos_db, file_bytes, run
):
    rows = [{"id": i, "title": os.urandom(24).hex(), "done": 0} for i in range(5_000)]  # no codec shrinks these
    hub = datasette_server([make_todos_db(tmp_path / "hub.db", rows)], hub_config)
    device = make_todos_db(tmp_path / "d.db", [{"id": 100_000, "title": "mine", "done": 0}])
    before = file_bytes(device)
    url = hub.url + "/hub"
    result = run(
        ["sqlite-utils", "sync", device, url, "--token", hub.token("alice")],
        check=False,
        preexec_fn=file_size_limit(os.path.getsize(device) + 16_384),
    )
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"Error: cannot write what {url} sent (export (pull)) to ")
    assert result.stderr.endswith(": File too large\n")
    assert file_bytes(device) == before


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: a disk that really fills (SQLite then rolls back by itself). Needs root
    and a machine that lets it mount; skipped elsewhere."""
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)


def logged_updates(path, rows: int) -> None:
    """A synced table whose log holds three updates of each of its ``rows`` rows, in values a
    codec shrinks by half at most (3,500 rows: 1.9 MB)."""
    conn = make_db(path, "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)", ("t",))
    with conn:
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t VALUES (?, ?)", ((i, "") for i in range(rows)))
        for _ in range(3):
            conn.execute("UPDATE t SET v = hex(randomblob(40))")
    conn.close()


@pytest.mark.parametrize("command", ["sync-compact", "sync-new-device"])
def test_a_log_rewrite_on_a_disk_that_fills_says_so_and_changes_nothing(tmp_path, small_disk, file_bytes, run, command):
    logged_updates(tmp_path / "data.db", 3_500)
    path = shutil.copy(tmp_path / "data.db", small_disk / "data.db")  # room for it, not for its journal
    before = file_bytes(path)
    result = run(["sqlite-utils", command, path], check=False)
    # Not "trigger ... already exists": SQLite rolled back, which brought the log's guards back.
    assert (result.returncode, result.stderr) == (1, "Error: SQLite error: database or disk is full\n")
    assert file_bytes(path) == before


def test_an_export_onto_a_disk_that_fills_names_the_bundle(tmp_path, small_disk, run):
    logged_updates(tmp_path / "data.db", 20_000)
    bundle = small_disk / "big.bundle"
    result = run(["sqlite-utils", "export-bundle", tmp_path / "data.db", bundle], check=False)
    assert (result.returncode, result.stderr) == (1, f"Error: Cannot write bundle {bundle}: database or disk is full\n")
    assert list(small_disk.iterdir()) == []
