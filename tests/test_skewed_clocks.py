"""Wall clocks that disagree or jump back: every copy still ends up with the same rows.

The clock of a write is moved with libfaketime (``faketime``) around the real ``sqlite3``
shell, so the capture triggers read the skewed time exactly as they would on that device.
"""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from sqlite_utils_sync import export_bundle


@pytest.fixture(scope="session")
def send(run, run_json):
    """``send(source, target, folder, name)``: export all of ``source``, import it into ``target`` (``--json``)."""

    def send(source, target, folder, name: str = "b.bundle") -> dict:
        bundle = folder / name
        if bundle.exists():
            bundle.unlink()
        run(["sqlite-utils", "export-bundle", source, bundle])
        return run_json(["sqlite-utils", "import-bundle", target, bundle, "--json"])

    return send


def test_an_edit_made_after_a_fast_clock_was_seen_wins_everywhere(tmp_path, conflicts, make_todos_db, shell, todo_rows, send):
    laptop, phone, server = (make_todos_db(tmp_path / f"{n}.db") for n in ("laptop", "phone", "server"))
    shell(phone, "INSERT INTO todos VALUES (1, 'buy milk', 0)", "+1d")  # the phone runs a day fast
    send(phone, laptop, tmp_path)
    # Seen the phone's row, the laptop edits it: a later edit, though its clock reads earlier.
    shell(laptop, "UPDATE todos SET title = 'buy oat milk' WHERE id = 1")
    send(laptop, phone, tmp_path)
    send(phone, server, tmp_path)  # the server meets both operations in one bundle
    expected = [{"id": 1, "title": "buy oat milk", "done": 0}]
    assert todo_rows(laptop) == todo_rows(phone) == todo_rows(server) == expected
    assert conflicts(laptop) == conflicts(phone) == conflicts(server) == []


def test_an_edit_made_after_the_clock_was_set_back_wins_everywhere(tmp_path, conflicts, make_todos_db, shell, todo_rows, send):
    laptop, phone = (make_todos_db(tmp_path / f"{n}.db") for n in ("laptop", "phone"))
    shell(laptop, "INSERT INTO todos VALUES (1, 'buy milk', 0)")
    shell(laptop, "UPDATE todos SET title = 'buy oat milk' WHERE id = 1", "-1d")  # clock set back a day
    shell(laptop, "INSERT INTO todos VALUES (2, 'call mum', 0)", "-1d")
    shell(laptop, "UPDATE todos SET done = 1 WHERE id = 2")  # and forward again
    send(laptop, phone, tmp_path)
    expected = [{"id": 1, "title": "buy oat milk", "done": 0}, {"id": 2, "title": "call mum", "done": 1}]
    assert todo_rows(laptop) == todo_rows(phone) == expected
    # The phone's own edit, made after it saw the laptop's, wins on both.
    shell(phone, "UPDATE todos SET title = 'buy soy milk' WHERE id = 1", "-2d")
    send(phone, laptop, tmp_path)
    assert todo_rows(laptop) == todo_rows(phone) == [{"id": 1, "title": "buy soy milk", "done": 0}, expected[1]]
    assert conflicts(laptop) == conflicts(phone) == []


def test_a_database_that_cannot_be_written_exports_settled_clocks(tmp_path, make_todos_db, run, run_json, shell, todo_rows):
    laptop = make_todos_db(tmp_path / "laptop.db")
    shell(laptop, "INSERT INTO todos VALUES (1, 'buy milk', 0)")
    shell(laptop, "UPDATE todos SET title = 'buy oat milk' WHERE id = 1", "-1d")
    before = (tmp_path / "laptop.db").read_bytes()
    read_only = sqlite3.connect(f"file:{laptop}?mode=ro", uri=True, isolation_level=None)
    export_bundle(read_only, tmp_path / "a.bundle")  # settling can't write here ...
    export_bundle(read_only, tmp_path / "b.bundle", repair=False)  # ... nor here
    assert (tmp_path / "laptop.db").read_bytes() == before
    # ... yet both carry the raised clock, the same a writable export sends.
    for name in ("a.bundle", "b.bundle"):
        phone = make_todos_db(tmp_path / f"phone-{name}.db")
        run(["sqlite-utils", "import-bundle", phone, tmp_path / name])
        assert todo_rows(phone) == [{"id": 1, "title": "buy oat milk", "done": 0}]
    # Once the file can be written, an export settles it, and sends the very same operations:
    # a copy holding them from the read-only export takes them as duplicates, not a clash.
    run(["sqlite-utils", "export-bundle", laptop, tmp_path / "c.bundle"])
    result = run_json(["sqlite-utils", "import-bundle", tmp_path / "phone-a.bundle.db", tmp_path / "c.bundle", "--json"])
    assert (result["applied"], result["duplicates"]) == (0, 2)


def test_a_copy_given_a_new_identity_orders_its_edits_after_the_original(tmp_path, conflicts, executable, make_todos_db, run, run_json, shell, todo_rows, send):
    laptop = make_todos_db(tmp_path / "laptop.db")
    shell(laptop, "INSERT INTO todos VALUES (1, 'buy milk', 0)")
    laptop_id = run_json(["sqlite-utils", "sync-status", laptop, "--json"])["device_id"]
    tablet = tmp_path / "tablet.db"
    # The copy's clock is an hour behind. Ties are broken by device id, so make the copy's sort
    # first, where a tie would lose (each new id is random: one in two does).
    for _ in range(64):
        shutil.copyfile(laptop, tablet)
        run(["faketime", "-f", "-1h", executable("sqlite-utils"), "sync-new-device", tablet])
        if run_json(["sqlite-utils", "sync-status", tablet, "--json"])["device_id"] < laptop_id:
            break
    shell(tablet, "UPDATE todos SET title = 'buy oat milk' WHERE id = 1", "-1h")
    send(tablet, laptop, tmp_path)
    server = make_todos_db(tmp_path / "server.db")
    send(laptop, server, tmp_path)
    expected = [{"id": 1, "title": "buy oat milk", "done": 0}]
    assert todo_rows(tablet) == todo_rows(laptop) == todo_rows(server) == expected
    assert conflicts(laptop) == conflicts(server) == []


@pytest.mark.parametrize("edited", [1, 20])  # one statement's operations share one clock
def test_one_edit_made_at_one_clock_on_two_devices_gives_every_copy_the_same_conflicts(tmp_path, make_db, shell, sync, rows, conflict_records, edited):
    copies = {name: make_db(tmp_path / f"{name}.db") for name in "abcdxz"}
    copies["a"].executemany("INSERT INTO todos VALUES (?, 'first', 0, 0)", [(i,) for i in range(1, edited + 1)])
    for name in "bcdxz":
        sync(copies["a"], copies[name], tmp_path)
    copies["d"].close()
    shell(tmp_path / "d.db", "INSERT INTO todos VALUES (1000, 'from d', 0, 0)", "+1h")  # d runs an hour fast
    a, b, c, x, z = (copies[name] for name in "abcxz")
    d = sqlite3.connect(tmp_path / "d.db", isolation_level=None)
    sync(d, a, tmp_path)
    sync(d, b, tmp_path)
    # a and b, both floored at d's clock, make the same edit with the same clock: twins.
    for copy in (a, b):
        copy.execute("UPDATE todos SET title = 'x' WHERE id <= ?", [edited])
    clock = "SELECT hlc FROM _sync_ops WHERE tid != 0 ORDER BY op DESC LIMIT 1"
    assert a.execute(clock).fetchone() == b.execute(clock).fetchone()
    sync(a, c, tmp_path)
    # z gets a's edit (through c), then b's, then c's; x gets a's and c's in one bundle, then b's.
    sync(c, z, tmp_path)
    sync(b, z, tmp_path)
    c.execute("UPDATE todos SET title = 'y' WHERE id = ?", [edited])  # c had seen a's 'x', so b's twin
    sync(c, z, tmp_path)
    sync(c, x, tmp_path)
    sync(b, x, tmp_path)
    everyone = [a, b, c, d, x, z]
    for _ in range(2):
        for i, copy in enumerate(everyone):
            sync(copy, everyone[(i + 1) % len(everyone)], tmp_path)
    # z, which had not read a's twin when c's edit came, recorded b against c as a conflict.
    assert all(rows(copy) == rows(a) for copy in everyone)
    assert [conflict_records(copy) for copy in everyone] == [[]] * len(everyone)
    assert [r[2] for r in rows(a)] == ["x"] * (edited - 1) + ["y", "from d"]
