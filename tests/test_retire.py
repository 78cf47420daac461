"""Copies and lost devices (issue 12, item 4): sync-new-device run twice replaces the id that
never left, and sync-retire retires a device that will never sync again."""

from __future__ import annotations

import shutil
import sqlite3

import pytest


def status(run_json, path) -> dict:
    return run_json(["sqlite-utils", "sync-status", path, "--json"])


def exchange(run, source, target, bundle) -> None:
    run(["sqlite-utils", "export-bundle", source, bundle])
    run(["sqlite-utils", "import-bundle", target, bundle])


def compact(run_json, path) -> dict:
    return run_json(["sqlite-utils", "sync-compact", path, "--json"])


def copy_with_new_id(run, source, target, times: int = 1):
    shutil.copy(source, target)
    for _ in range(times):
        run(["sqlite-utils", "sync-new-device", target])
    return target


def edit_four_times(upsert, path) -> None:
    for title in ("one", "two", "three", "four"):
        upsert(path, {"id": 1, "title": title, "done": 0})


@pytest.mark.parametrize("times", [1, 2, 3])
def test_new_device_again_replaces_the_id_that_never_left(tmp_path, times, make_todos_db, run, run_json, upsert):
    laptop = make_todos_db(tmp_path / "laptop.db", [{"id": 1, "title": "a", "done": 0}, {"id": 2, "title": "b", "done": 0}])
    phone = copy_with_new_id(run, laptop, tmp_path / "phone.db", times)
    edit_four_times(upsert, laptop)
    exchange(run, laptop, phone, tmp_path / "l.bundle")
    exchange(run, phone, laptop, tmp_path / "p.bundle")
    devices = set(status(run_json, laptop)["clock"])
    assert devices == {status(run_json, laptop)["device_id"], status(run_json, phone)["device_id"]}
    # The same as a single run: the three superseded edits of row 1 go.
    assert compact(run_json, laptop)["removed"] == 3


def test_an_id_that_left_is_kept(tmp_path, make_todos_db, run, run_json):
    laptop = make_todos_db(tmp_path / "laptop.db", [{"id": 1, "title": "a", "done": 0}])
    phone = copy_with_new_id(run, laptop, tmp_path / "phone.db")
    first = status(run_json, phone)["device_id"]
    run(["sqlite-utils", "export-bundle", phone, tmp_path / "p.bundle"])  # the id left in this bundle
    run(["sqlite-utils", "sync-new-device", phone])
    exchange(run, phone, laptop, tmp_path / "q.bundle")
    assert first in status(run_json, laptop)["clock"]


@pytest.fixture
def lost_phone(tmp_path, make_todos_db, run, run_json, upsert):
    """laptop.db (named laptop) and phone.db (named phone) in sync; then laptop edits row 1
    four times, which phone never sees."""
    laptop = make_todos_db(tmp_path / "laptop.db", [{"id": 1, "title": "a", "done": 0}])
    run(["sqlite-utils", "sync-name", laptop, "laptop"])
    phone = copy_with_new_id(run, laptop, tmp_path / "phone.db")
    run(["sqlite-utils", "sync-name", phone, "phone"])
    upsert(phone, {"id": 2, "title": "from phone", "done": 0})
    exchange(run, phone, laptop, tmp_path / "p.bundle")
    exchange(run, laptop, phone, tmp_path / "l.bundle")
    exchange(run, phone, laptop, tmp_path / "p2.bundle")
    edit_four_times(upsert, laptop)
    return laptop, phone


def test_compaction_stops_waiting_for_a_retired_device(tmp_path, lost_phone, run, run_json):
    laptop, phone = lost_phone
    assert compact(run_json, laptop)["removed"] == 0  # phone might still write concurrently
    phone_id = status(run_json, phone)["device_id"]
    retired = run_json(["sqlite-utils", "sync-retire", laptop, "phone", "--json"])
    assert retired["device_id"] == phone_id
    assert compact(run_json, laptop)["removed"] == 3


def test_compaction_waits_for_a_retired_device_until_every_copy_heard_of_it(tmp_path, lost_phone, run, run_json, upsert, todo_rows):
    # The phone's last edit reaches the desktop, not the laptop, which then retires the phone.
    # Had the laptop compacted away the edits the phone never saw, that last edit, which the
    # desktop passes on, could not be merged there any more.
    laptop, phone = lost_phone
    desktop = copy_with_new_id(run, laptop, tmp_path / "desktop.db")
    exchange(run, desktop, laptop, tmp_path / "d1.bundle")
    upsert(phone, {"id": 2, "title": "the phone's last edit", "done": 0})
    exchange(run, phone, desktop, tmp_path / "p.bundle")
    run(["sqlite-utils", "sync-retire", laptop, "phone"])
    assert compact(run_json, laptop)["removed"] == 0  # the desktop has not heard of it yet
    exchange(run, desktop, laptop, tmp_path / "d2.bundle")
    assert [row["title"] for row in todo_rows(laptop) if row["id"] == 2] == ["the phone's last edit"]
    exchange(run, laptop, desktop, tmp_path / "l.bundle")  # the desktop hears of the retirement
    assert compact(run_json, laptop)["removed"] == 0  # ...and the laptop doesn't know yet
    exchange(run, desktop, laptop, tmp_path / "d3.bundle")
    assert compact(run_json, laptop)["removed"] == 3  # the laptop's first three edits of row 1
    assert todo_rows(laptop) == todo_rows(desktop)


def test_the_retirement_travels_and_the_device_is_refused_everywhere(tmp_path, lost_phone, run, run_json, upsert, file_bytes, todo_rows):
    laptop, phone = lost_phone
    desktop = copy_with_new_id(run, laptop, tmp_path / "desktop.db")
    run(["sqlite-utils", "sync-retire", laptop, status(run_json, phone)["device_id"][:8]])
    exchange(run, laptop, desktop, tmp_path / "to-desktop.bundle")  # the retirement syncs like an edit
    upsert(phone, {"id": 3, "title": "found the phone", "done": 0})
    late = tmp_path / "late.bundle"
    run(["sqlite-utils", "export-bundle", phone, late])
    for path in (laptop, desktop):
        before = file_bytes(path)
        result = run(["sqlite-utils", "import-bundle", path, late], check=False)
        assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
        assert "it carries operations of device phone (" in result.stderr
        assert "written after it was retired" in result.stderr and "by laptop (" in result.stderr
        assert file_bytes(path) == before
        assert 3 not in [row["id"] for row in todo_rows(path)]
    # The retired device itself is told, when the retirement reaches it.
    result = run(["sqlite-utils", "import-bundle", phone, tmp_path / "to-desktop.bundle"], check=False)
    assert result.returncode == 1 and "this database's device phone (" in result.stderr
    assert "sync-new-device --recover" in result.stderr
    # ...and can go on under a new id, keeping its edit.
    run(["sqlite-utils", "sync-new-device", "--recover", phone])
    exchange(run, phone, desktop, tmp_path / "recovered.bundle")
    assert [row["title"] for row in todo_rows(desktop) if row["id"] == 3] == ["found the phone"]


def test_retiring_this_device_or_an_unknown_one_is_refused(tmp_path, lost_phone, run, file_bytes):
    laptop, _ = lost_phone
    before = file_bytes(laptop)
    for device, message in (
        ("laptop", "is this database's own device: retire it from another copy"),
        ("ffffffffffffffffffffffffffffffff", "No device ffffffffffffffffffffffffffffffff is known here"),
        ("tablet", "No device here is named 'tablet'"),
    ):
        result = run(["sqlite-utils", "sync-retire", laptop, device], check=False)
        assert result.returncode == 1 and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert file_bytes(laptop) == before


def test_a_bundle_with_bad_retirement_records_is_refused(tmp_path, lost_phone, run, craft, file_bytes):
    laptop, phone = lost_phone
    bundle = tmp_path / "x.bundle"
    run(["sqlite-utils", "export-bundle", phone, bundle])

    def tamper(conn):
        craft.edit_header(conn, lambda header: header.__setitem__("retired", {"0" * 32: [-1, "0" * 32, 1]}))
        craft.reseal(conn)

    craft.rewrite(bundle, tamper)
    before = file_bytes(laptop)
    result = run(["sqlite-utils", "import-bundle", laptop, bundle], check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: Bundle x.bundle: retired-device records are invalid"
    assert file_bytes(laptop) == before


def test_a_hub_refuses_a_retired_devices_push(tmp_path, datasette_server, hub_config, make_todos_db, hub_sync, run, run_json, upsert, file_bytes, todo_rows):
    hub_path = make_todos_db(tmp_path / "hub.db")
    server = datasette_server([hub_path], hub_config)
    token = server.token("alice")
    laptop = make_todos_db(tmp_path / "laptop.db", [{"id": 1, "title": "a", "done": 0}])
    phone = copy_with_new_id(run, laptop, tmp_path / "phone.db")
    run(["sqlite-utils", "sync-name", phone, "phone"])
    for path in (laptop, phone, laptop):
        hub_sync(path, server, token)
    # The phone's last edit reaches the hub, not the laptop, before the laptop retires it:
    # the laptop's next sync still takes it (it was written before the retirement).
    upsert(phone, {"id": 4, "title": "last from phone", "done": 0})
    hub_sync(phone, server, token)
    run(["sqlite-utils", "sync-retire", laptop, "phone"])
    hub_sync(laptop, server, token)
    assert 4 in [row["id"] for row in todo_rows(laptop)]
    upsert(phone, {"id": 5, "title": "late", "done": 0})
    hub_clock = status(run_json, hub_path)["clock"]
    late = tmp_path / "late.bundle"
    run(["sqlite-utils", "export-bundle", phone, late, "--since", str(hub_clock).replace("'", '"')])
    before = file_bytes(hub_path)
    response = server.post(
        "/hub/-/sync/import", content=late.read_bytes(), headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 409
    body = response.json()
    assert body["reason"] == "device_retired" and "written after it was retired" in body["error"]
    assert file_bytes(hub_path) == before
    # The phone's own sync stops at the pull, saying why in one line.
    result = hub_sync(phone, server, token, check=False)
    assert result.returncode == 1 and "was retired by" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_copy_writes_one_tick_when_it_hears_of_a_retirement_and_none_when_its_seq_rises(tmp_path, lost_phone, run, craft):
    # The tick tells the others it heard (they wait for that before compacting); a record's
    # seq raised again and again (a pusher may) is no news.
    laptop, phone = lost_phone
    desktop = copy_with_new_id(run, laptop, tmp_path / "desktop.db")
    run(["sqlite-utils", "sync-retire", laptop, "phone"])
    bundle = tmp_path / "l.bundle"
    run(["sqlite-utils", "export-bundle", laptop, bundle])
    ticks = "SELECT count(*) FROM _sync_ops WHERE kind = 3 AND op >> 40 = 4194303"  # the desktop's own
    before = sqlite3.connect(desktop).execute(ticks).fetchone()[0]
    run(["sqlite-utils", "import-bundle", desktop, bundle])
    assert sqlite3.connect(desktop).execute(ticks).fetchone()[0] == before + 1
    for seq in (100, 200):
        craft.rewrite(bundle, lambda b: (
            craft.edit_header(b, lambda h: [record.__setitem__(0, seq) for record in h["retired"].values()]),
            craft.reseal(b),
        ))
        run(["sqlite-utils", "import-bundle", desktop, bundle])
        assert sqlite3.connect(desktop).execute("SELECT seq FROM _sync_retired").fetchone() == (seq,)
    assert sqlite3.connect(desktop).execute(ticks).fetchone()[0] == before + 1


def test_a_copy_writes_a_tick_when_it_hears_of_a_retirement_by_another_copy_that_held_more(tmp_path, make_db, sync, everyone_syncs):
    # The phone's last operation is a knowledge tick only the tablet holds. The laptop retires
    # the phone, the desktop hears it; then the tablet retires it too, with a higher seq. The
    # desktop must say it heard that one as well (no data comes with it): copies wait for
    # every other to have heard of the record they hold before compacting.
    from sqlite_utils_sync import retire_device

    laptop, phone, desktop, tablet = (make_db(tmp_path / f"{name}.db") for name in ("laptop", "phone", "desktop", "tablet"))
    copies = (laptop, phone, desktop, tablet)
    laptop.execute("INSERT INTO todos VALUES (1, 'a', 0, 0)")
    everyone_syncs(copies, tmp_path)
    laptop.execute("UPDATE todos SET title = 'b' WHERE id = 1")
    sync(laptop, phone, tmp_path)  # the phone's last operation: the tick of that import
    sync(phone, tablet, tmp_path)
    sync(laptop, tablet, tmp_path)
    sync(laptop, desktop, tmp_path)
    ticks = "SELECT count(*) FROM _sync_ops WHERE kind = 3 AND op >> 40 = 4194303"
    phone_id = phone.execute("SELECT device_id FROM _sync_devices WHERE idx = 4194303").fetchone()[0]
    retire_device(laptop, phone_id)
    before = desktop.execute(ticks).fetchone()[0]
    sync(laptop, desktop, tmp_path)
    assert desktop.execute(ticks).fetchone()[0] == before + 1
    retire_device(tablet, phone_id)
    sync(tablet, desktop, tmp_path)
    assert desktop.execute(ticks).fetchone()[0] == before + 2
    assert desktop.execute("SELECT retired_by FROM _sync_retired").fetchone() == (
        tablet.execute("SELECT device_id FROM _sync_devices WHERE idx = 4194303").fetchone()[0],
    )


def test_a_retired_device_is_told_so_by_a_copy_that_compacted_since(tmp_path, make_db, sync, file_bytes, everyone_syncs):
    # Not compacted_history, whose way on (a new database) would lose the phone's unsent edit:
    # device_retired, whose way on (--recover) keeps it.
    from sqlite_utils_sync import BundleError, compact_log, retire_device, sync_status

    laptop, desktop, phone = (make_db(tmp_path / f"{name}.db") for name in ("laptop", "desktop", "phone"))
    laptop.execute("INSERT INTO todos VALUES (1, 'a', 0, 0), (2, 'a', 0, 0)")
    everyone_syncs([laptop, desktop, phone], tmp_path)
    phone.execute("UPDATE todos SET title = 'phone edit' WHERE id = 2")  # never sent
    retire_device(laptop, sync_status(phone)["device_id"])
    laptop.execute("UPDATE todos SET title = 'x1' WHERE id = 1")
    laptop.execute("UPDATE todos SET title = 'x2' WHERE id = 1")
    everyone_syncs([laptop, desktop], tmp_path)
    assert compact_log(laptop).removed
    before = file_bytes(tmp_path / "phone.db")
    with pytest.raises(BundleError) as refused:
        sync(laptop, phone, tmp_path)
    assert refused.value.reason == "device_retired"
    assert "run 'sqlite-utils sync-new-device --recover' on it" in str(refused.value)
    assert file_bytes(tmp_path / "phone.db") == before
