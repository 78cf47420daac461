"""The README's two-device quickstart, run as written: its bash block in a fresh directory.

Only what a test can't take from a person is changed: the hub's port (a free one), and the
``sleep`` that gives the hub time to start becomes polling until it answers.
"""

from __future__ import annotations

import json
import pathlib
import re
import sqlite3

README = pathlib.Path(__file__).parent.parent / "README.md"


def quickstart_block() -> str:
    text = README.read_text()
    section = text[text.index("## Quickstart: two devices"):]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def runnable(block: str, port: int) -> str:
    lines = ["set -e", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for line in block.replace("8001", str(port)).splitlines():
        if line.startswith("sleep "):
            line = (
                "until python -c \"import urllib.request; "
                f"urllib.request.urlopen('http://127.0.0.1:{port}/-/versions.json')\" 2>/dev/null; do sleep 0.1; done"
            )
        lines.append(line)
    return "\n".join(lines) + "\n"


def todos(path: pathlib.Path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT id, title, done FROM todos ORDER BY id").fetchall()
    finally:
        conn.close()


def test_readme_quickstart_runs_as_written(tmp_path, run, run_json, clean_env, free_port):
    assert "sqlite-utils import-bundle phone.db first.bundle" in quickstart_block()
    script = tmp_path / "quickstart.sh"
    script.write_text(runnable(quickstart_block(), free_port()))
    result = run(["bash", script], check=False, cwd=tmp_path, env=clean_env())
    assert result.returncode == 0, result.stderr
    assert "1 unresolved conflict here" in result.stderr
    laptop, phone, hub = (tmp_path / f"{name}.db" for name in ("laptop", "phone", "hub"))
    assert todos(laptop) == todos(phone) == todos(hub)
    assert [row[0] for row in todos(laptop)] == [1, 2] and todos(laptop)[0][1] in ("Buy oat milk", "Buy soy milk")
    for path in (laptop, phone, hub):
        assert run_json(["sqlite-utils", "sync-conflicts", path, "--json"]) == []
    resolved = run_json(["sqlite-utils", "sync-conflicts", laptop, "--all", "--json"])
    assert len(resolved) == 1 and resolved[0]["resolved"]
    # The phone's table was created as the laptop declared it.
    columns = "SELECT name, type, pk FROM pragma_table_info('todos')"
    assert sqlite3.connect(phone).execute(columns).fetchall() == sqlite3.connect(laptop).execute(columns).fetchall()
    assert json.loads(run(["sqlite-utils", "sync-status", phone, "--json"]).stdout)["device_name"] == "phone"
