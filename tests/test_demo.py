"""The demo scripts run end to end: demo/story.py converges, demo/build_hub.py builds a hub."""

from __future__ import annotations

import pathlib
import sqlite3
import subprocess
import sys

DEMO = pathlib.Path(__file__).resolve().parent.parent / "demo"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=180, check=False)


def test_story_converges_after_conflict_and_resolution(tmp_path):
    out = tmp_path / "story"
    result = run_script(str(DEMO / "story.py"), str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("CONVERGED:") for line in lines), result.stdout
    assert not any("NOT CONVERGED" in line or "DIFFERENT" in line for line in lines), result.stdout
    # Both clashes were detected on the server, with a provisional winner each.
    detected = [line for line in lines if line.startswith("server:") and "detected conflict" in line]
    assert len(detected) == 2, result.stdout
    assert any("on todos [3] [title]" in line for line in detected)
    assert any("on notes [2] [update vs delete]" in line for line in detected)
    assert sum("provisional winner (latest clock" in line for line in lines) == 2
    assert any("provisional winner" in line and "title='Buy almond milk'" in line for line in lines)
    # Laptop and phone saw the very same records.
    assert sum("same ids and same provisional winners as the server" in line for line in lines) == 2
    # Resolved on the laptop, and every copy agrees that both records are resolved.
    assert sum(line.startswith("laptop:") and "sync-resolve" in line for line in lines) == 2
    assert any("2 conflict(s) resolved, 0 left unresolved" in line for line in lines)
    records = [line for line in lines if line.startswith("record:")]
    assert len(records) == 2 and all(line.endswith("resolved by laptop") for line in records), records
    for part in ("todos:", "notes:", "conflicts:"):
        assert any(line.startswith(part) and "identical on laptop, phone, server" in line for line in lines), part
    assert any(line.startswith("todo:") and "'Buy oat milk'" in line for line in lines)
    # Later the server compacts its log, and a tablet starting from its export matches it.
    compacted = next(line for line in lines if line.startswith("server:") and "sync-compact: removed" in line)
    assert "tables and conflict records unchanged" in compacted and "removed 0 " not in compacted
    assert any(line.startswith("tablet:") and "identical to the server" in line for line in lines), result.stdout
    # Real files were left behind for inspection.
    assert {p.name for p in out.glob("*.db")} == {"laptop.db", "phone.db", "server.db", "tablet.db"}


def test_build_hub(tmp_path):
    hub = tmp_path / "sub" / "hub.db"
    result = run_script(str(DEMO / "build_hub.py"), str(hub))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "from 3 devices" in result.stdout
    conn = sqlite3.connect(hub)
    try:
        devices = conn.execute(
            "SELECT count(DISTINCT op >> 40) FROM _sync_ops WHERE kind & 3 != 3 AND tid != 0"
        ).fetchone()[0]
        assert devices == 3
        assert conn.execute("SELECT count(*) FROM _sync_devices").fetchone()[0] == 3
        unresolved = conn.execute("SELECT count(*) FROM _sync_conflicts WHERE resolved_by IS NULL").fetchone()[0]
        resolved = conn.execute("SELECT count(*) FROM _sync_conflicts WHERE resolved_by IS NOT NULL").fetchone()[0]
        assert unresolved >= 1 and resolved >= 1
        assert conn.execute("SELECT count(*) FROM _sync_peers").fetchone()[0] == 2  # laptop and phone sent bundles
        assert conn.execute("SELECT title FROM todos WHERE id = 3").fetchone()[0] == "Buy oat milk"
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        names = dict(conn.execute("SELECT name, device_id FROM _sync_device_names"))
        assert set(names) == {"laptop", "phone", "server"}
    finally:
        conn.close()
    assert not (tmp_path / "sub" / "hub.db-wal").exists()
