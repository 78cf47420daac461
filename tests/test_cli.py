"""The sqlite-utils commands as a user meets them: the ``--json`` shapes, the progress bar on
a terminal, and one-line errors on a database that does not sync or a bundle that is missing."""

from __future__ import annotations

import json
import os
import pty
import sqlite3
import subprocess

import sqlite_utils


def test_export_import_cli_json_contract(tmp_path, pair, rows, run_cli):
    a, b = pair
    out = run_cli("export-bundle", tmp_path / "a.db", tmp_path / "x.bundle", "--json")
    exported = json.loads(out.output)
    assert set(exported) == {"bundle_id", "device_id", "operations", "bytes", "held_back"}
    assert exported["operations"] == 7
    result = json.loads(run_cli("import-bundle", tmp_path / "b.db", tmp_path / "x.bundle", "--json").output)
    assert {k: result[k] for k in ("applied", "conflicts", "duplicates", "skipped")} == {
        "applied": 7,
        "conflicts": 0,
        "duplicates": 0,
        "skipped": False,
    }
    assert result["source_device_id"] == exported["device_id"]
    assert result["bundle_id"] == exported["bundle_id"]
    assert result["total_operations"] == 7
    assert rows(b) == rows(a)


def run_on_a_terminal(*args):
    """Run a real sqlite-utils command with its stderr on a pseudo-terminal; return that output."""
    leader, follower = pty.openpty()
    process = subprocess.run(["sqlite-utils", *map(str, args)], stderr=follower, stdout=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return process.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_bar_on_a_terminal_and_silent_hides_it(tmp_path, make_db, rows):
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, 't', 0, 0)", [(i,) for i in range(12000)])
    code, output = run_on_a_terminal("export-bundle", tmp_path / "a.db", tmp_path / "x.bundle")
    assert code == 0 and "Exporting" in output and "100%" in output
    code, output = run_on_a_terminal("import-bundle", tmp_path / "b.db", tmp_path / "x.bundle", "--silent")
    assert code == 0 and "Importing" not in output
    assert "Applied 12000 operations: todos 12000." in output
    assert rows(b) == rows(a)


def test_commands_on_a_database_without_sync_or_with_an_empty_device_id_are_one_line(tmp_path, pair, file_bytes, run_cli):
    plain = tmp_path / "plain.db"
    sqlite3.connect(plain).execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    before = file_bytes(plain)
    for args, message in (
        (("sync-resolve", plain, "abc"), "Error: This database has no synced tables"),
        (("export-bundle", tmp_path / "a.db", tmp_path / "x.bundle", "--for", ""), "Error: --for takes a device id"),
    ):
        result = run_cli(*args)
        assert result.exit_code == 1 and result.output.startswith(message) and result.output.count("\n") == 1
    assert file_bytes(plain) == before
    assert not (tmp_path / "x.bundle").exists()


def test_enable_sync_cli_and_status_json(tmp_path, run_cli):
    path = tmp_path / "data.db"
    sqlite_utils.Database(path)["todos"].insert({"id": 1, "title": "x"}, pk="id")
    result = run_cli("enable-sync", str(path), "todos")
    assert result.exit_code == 0
    status = json.loads(run_cli("sync-status", str(path), "--json").output)
    assert set(status) >= {"device_id", "clock", "tables", "operations", "unresolved_conflicts"}
    assert len(status["device_id"]) == 32
    assert status["clock"] == {status["device_id"]: 1}
    assert status["operations"] == 1
    assert list(status["tables"]) == ["todos"]


def test_status_text_shows_named_devices_by_name(tmp_path, pair, run_cli):
    """Names show wherever an id is shown: in the clock too, as laptop (19cecc3d)."""
    run_cli("sync-name", tmp_path / "a.db", "laptop")
    run_cli("export-bundle", tmp_path / "a.db", tmp_path / "x.bundle")
    run_cli("import-bundle", tmp_path / "b.db", tmp_path / "x.bundle")
    a, b = (json.loads(run_cli("sync-status", tmp_path / f"{n}.db", "--json").output) for n in "ab")
    output = run_cli("sync-status", tmp_path / "b.db").output
    clock = output[output.index("Clock:\n"):].splitlines()[1:]
    assert sorted(clock) == sorted([f"  laptop ({a['device_id'][:8]}): {b['clock'][a['device_id']]}",
                                    f"  {b['device_id']}: {b['clock'][b['device_id']]}"])


def test_cli_import_of_missing_file_is_one_line(tmp_path, make_db, run_cli):
    make_db(tmp_path / "a.db").close()
    result = run_cli("import-bundle", tmp_path / "a.db", tmp_path / "nope.bundle")
    assert result.exit_code == 1
    assert result.output == "Error: Bundle nope.bundle: file not found\n"


def test_status_json_on_a_database_without_sync(tmp_path, run_cli):
    sqlite_utils.Database(tmp_path / "plain.db")["t"].insert({"id": 1}, pk="id")
    status = json.loads(run_cli("sync-status", tmp_path / "plain.db", "--json").output)
    assert status["enabled"] is False and status["operations"] == 0


def test_import_says_once_what_it_applied_and_what_it_kept_for_later_and_why(tmp_path, make_db, run_cli):
    """One summary, no 'Applied 2' followed by a warning that some were not applied."""
    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL); CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"
    a = make_db(tmp_path / "a.db", schema, ("todos", "notes"))
    a.executemany("INSERT INTO todos VALUES (?, 't', 0, 0)", [(1,), (2,)])
    a.execute("INSERT INTO notes VALUES (1, 'n')")
    run_cli("export-bundle", tmp_path / "a.db", tmp_path / "x.bundle")
    make_db(tmp_path / "b.db", schema, ("todos",)).close()  # has notes, does not sync it
    make_db(tmp_path / "c.db").close()  # has no notes table
    b = tmp_path / "b.db"
    assert run_cli("import-bundle", b, tmp_path / "x.bundle").output == (
        f"Applied 2 operations: todos 2. Kept 1 operation of table 'notes' for later: it is not synced here "
        f"('sqlite-utils enable-sync {b} notes' applies it).\n"
    )
    assert run_cli("import-bundle", tmp_path / "c.db", tmp_path / "x.bundle").output == (
        "Applied 2 operations: todos 2. Kept 1 operation of table 'notes' for later: this database lacks it "
        "(import again with --alter to create it).\n"
    )
    assert run_cli("import-bundle", tmp_path / "c.db", tmp_path / "x.bundle", "--alter").output == (
        "Created table notes, synced from now on. Applied 1 operation kept from an earlier import: notes 1.\n"
    )
    assert run_cli("import-bundle", tmp_path / "c.db", tmp_path / "x.bundle").output == (
        "Bundle " + json.loads(run_cli("import-bundle", b, tmp_path / "x.bundle", "--json").output)["bundle_id"]
        + " was already imported: nothing to do\n"
    )


def test_import_summary_names_duplicates_and_conflicts(tmp_path, pair, run_cli):
    a, b = pair
    run_cli("export-bundle", tmp_path / "a.db", tmp_path / "all.bundle")
    run_cli("import-bundle", tmp_path / "b.db", tmp_path / "all.bundle")
    a.execute("UPDATE todos SET title = 'from a' WHERE id = 1")
    b.execute("UPDATE todos SET title = 'from b' WHERE id = 1")
    run_cli("export-bundle", tmp_path / "b.db", tmp_path / "b.bundle")  # all of a's 7 again, b's tick and edit
    assert run_cli("import-bundle", tmp_path / "a.db", tmp_path / "b.bundle").output == (
        f"Applied 1 operation: todos 1. 7 operations of the bundle's 9 were here already. "
        f"1 unresolved conflict: see 'sqlite-utils sync-conflicts {tmp_path / 'a.db'}'.\n"
    )
    # A bundle of nothing new changes no table, and says that.
    run_cli("export-bundle", tmp_path / "a.db", tmp_path / "a.bundle")
    out = run_cli("import-bundle", tmp_path / "b.db", tmp_path / "a.bundle").output
    assert out.startswith("Applied 1 operation: todos 1.")
    device = json.loads(run_cli("sync-status", tmp_path / "a.db", "--json").output)["device_id"]
    run_cli("export-bundle", tmp_path / "a.db", tmp_path / "a2.bundle", "--since", json.dumps({device: 5}))
    assert run_cli("import-bundle", tmp_path / "b.db", tmp_path / "a2.bundle").output == (
        "No table changed: the bundle's 6 operations were here already.\n"
    )


def test_a_database_another_connection_keeps_locked_is_named(tmp_path, make_db, run):
    path = tmp_path / "data.db"
    make_db(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = run(["sqlite-utils", "sync-compact", path], check=False)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert (result.returncode, result.stderr) == (
        1,
        f"Error: {path} is locked: another connection is writing to it; try again once it is done\n",
    )
