"""Compaction: the log shrinks, nothing anyone needs goes, and new devices start from a snapshot."""

from __future__ import annotations

import json
import sqlite3

import pytest

from sqlite_utils_sync import (
    BundleError,
    compact_log,
    export_bundle,
    import_bundle,
    list_conflicts,
    resolve_conflict,
    sync_status,
)


@pytest.fixture
def synced_trio(tmp_path, make_db, everyone_syncs):
    """Three devices that know each other, after a hundred edits of ten rows."""
    devices = [make_db(tmp_path / f"{name}.db") for name in "abc"]
    a, b, c = devices
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0)", [(i, f"todo {i}") for i in range(10)])
    everyone_syncs(devices, tmp_path)
    for round_ in range(10):
        for i, conn in enumerate(devices):
            conn.execute("UPDATE todos SET title = ?, done = ? WHERE id % 3 = ?", [f"v{round_}", round_ % 2, i])
        everyone_syncs(devices, tmp_path)
    return devices


def operations(conn):
    return conn.execute("SELECT count(*) FROM _sync_ops WHERE kind != 3").fetchone()[0]


def ticks(conn):
    """Knowledge operations, not counting the local sentinel (seq 0)."""
    return conn.execute("SELECT count(*) FROM _sync_ops WHERE kind = 3 AND op & ((1 << 40) - 1) > 0").fetchone()[0]


def seqs_held(conn, device_id):
    cursor = conn.execute(
        "SELECT op & ((1 << 40) - 1) FROM _sync_ops WHERE op >> 40 = (SELECT idx FROM _sync_devices WHERE device_id = ?)",
        [device_id],
    )
    return {seq for (seq,) in cursor}


def test_compaction_removes_overwritten_history_and_changes_no_table(tmp_path, synced_trio, rows):
    a, b, c = synced_trio
    before_rows, before_ops = rows(a), operations(a)
    result = compact_log(a)
    assert result.removed > 0.5 * before_ops
    assert operations(a) == before_ops - result.removed
    assert rows(a) == before_rows
    assert sync_status(a)["clock"] == sync_status(b)["clock"]
    # Every row keeps its latest operation: a second compaction finds nothing more.
    assert compact_log(a).removed == 0


def test_compacted_and_uncompacted_copies_keep_converging(tmp_path, synced_trio, conflict_records, rows, everyone_syncs):
    a, b, c = synced_trio
    compact_log(a)
    compact_log(b)
    a.execute("UPDATE todos SET title = 'from a' WHERE id = 1")
    c.execute("UPDATE todos SET title = 'from c' WHERE id = 1")  # concurrent: a conflict
    c.execute("INSERT INTO todos VALUES (50, 'new on c', 0, 0)")
    b.execute("DELETE FROM todos WHERE id = 2")
    everyone_syncs(synced_trio, tmp_path)
    assert rows(a) == rows(b) == rows(c)
    assert conflict_records(a) == conflict_records(b) == conflict_records(c)
    assert len(list_conflicts(a)) == 1
    compact_log(c)
    resolve_conflict(c, list_conflicts(c)[0]["id"])
    everyone_syncs(synced_trio, tmp_path)
    assert rows(a) == rows(b) == rows(c)
    assert conflict_records(a) == conflict_records(b) == conflict_records(c)
    assert list_conflicts(a) == []


def test_versions_of_a_conflict_are_kept_until_and_after_it_is_resolved(tmp_path, synced_trio, everyone_syncs):
    a, b, c = synced_trio
    a.execute("UPDATE todos SET title = 'A' WHERE id = 4")
    b.execute("UPDATE todos SET title = 'B' WHERE id = 4")
    everyone_syncs(synced_trio, tmp_path)
    [conflict] = list_conflicts(a)
    a.execute("UPDATE todos SET title = 'later' WHERE id = 4")
    everyone_syncs(synced_trio, tmp_path)
    compact_log(a)
    kept = {v["op"]: v["values"] for v in list_conflicts(a)[0]["versions"]}
    assert kept == {v["op"]: v["values"] for v in conflict["versions"]}
    loser = next(op for op, values in kept.items() if values["title"] == "B")
    resolve_conflict(a, conflict["id"], keep=loser)
    assert a.execute("SELECT title FROM todos WHERE id = 4").fetchone() == ("B",)


def test_operations_a_device_has_not_seen_are_kept(tmp_path, synced_trio, rows, sync, everyone_syncs):
    a, b, c = synced_trio
    a.execute("UPDATE todos SET title = 'x' WHERE id = 7")
    a.execute("UPDATE todos SET title = 'y' WHERE id = 7")
    sync(a, b, tmp_path)  # c has not seen either
    seqs = sync_status(a)["clock"][sync_status(a)["device_id"]]
    compact_log(b)
    # The overwritten 'x' stays too: c might still clash with it.
    assert {seqs - 1, seqs} <= seqs_held(b, sync_status(a)["device_id"])
    everyone_syncs(synced_trio, tmp_path)
    assert rows(a) == rows(b) == rows(c)


def test_a_new_device_starts_from_a_compacted_export(tmp_path, synced_trio, conflict_records, make_db, rows, everyone_syncs):
    a, b, c = synced_trio
    compact_log(a)
    fresh = make_db(tmp_path / "fresh.db")
    export_bundle(a, tmp_path / "snapshot.bundle")
    result = import_bundle(fresh, tmp_path / "snapshot.bundle")
    assert result.duplicates == 0
    assert result.applied == operations(a) + ticks(a)
    assert rows(fresh) == rows(a)
    status = sync_status(fresh)
    assert {d: s for d, s in status["clock"].items() if d != status["device_id"]} == sync_status(a)["clock"]
    assert conflict_records(fresh) == conflict_records(a)
    # ...and from then on syncs like any other device, with those that kept their whole log too.
    fresh.execute("UPDATE todos SET done = 5 WHERE id = 3")
    everyone_syncs([a, b, c, fresh], tmp_path)
    assert rows(a) == rows(b) == rows(c) == rows(fresh)
    assert fresh.execute("SELECT done FROM todos WHERE id = 3").fetchone() == (5,)


def test_a_database_with_data_cannot_start_from_a_compacted_export(tmp_path, synced_trio, file_bytes, make_db, run_cli):
    a, b, c = synced_trio
    compact_log(a)
    other = make_db(tmp_path / "other.db")
    other.execute("INSERT INTO todos VALUES (99, 'mine', 0, 0)")
    export_bundle(a, tmp_path / "snapshot.bundle")
    before = file_bytes(tmp_path / "other.db")
    result = run_cli("import-bundle", tmp_path / "other.db", tmp_path / "snapshot.bundle")
    assert result.exit_code == 1
    assert "comes from a compacted log" in result.output and "into a new database" in result.output
    assert result.output.count("\n") == 1
    assert file_bytes(tmp_path / "other.db") == before


def test_edits_made_without_the_compacted_history_are_refused(tmp_path, synced_trio, file_bytes, make_db):
    a, b, c = synced_trio
    compact_log(a)
    stranger = make_db(tmp_path / "stranger.db")  # never synced, writes on its own
    stranger.execute("INSERT INTO todos VALUES (1, 'stranger', 1, 1)")
    export_bundle(stranger, tmp_path / "stranger.bundle")
    before = file_bytes(tmp_path / "a.db")
    with pytest.raises(BundleError) as error:
        import_bundle(a, tmp_path / "stranger.bundle")
    assert error.value.reason == "compacted_history"
    assert "without having seen device" in str(error.value) and "compacted away" in str(error.value)
    assert file_bytes(tmp_path / "a.db") == before


def test_cli_sync_compact_json(tmp_path, synced_trio, file_bytes, run_cli):
    a, b, c = synced_trio
    before = operations(a)
    result = run_cli("sync-compact", tmp_path / "a.db", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert set(data) == {"removed", "kept", "horizon"}
    assert data["removed"] > 0 and operations(a) == before - data["removed"]
    assert sync_status(a)["device_id"] in data["horizon"]
    missing = run_cli("sync-compact", tmp_path / "nope.db")
    assert missing.exit_code == 2 and "does not exist" in missing.output
    # Nothing left to remove: the file is left exactly as it was.
    before = file_bytes(tmp_path / "a.db")
    again = json.loads(run_cli("sync-compact", tmp_path / "a.db", "--json").output)
    assert again["removed"] == 0
    assert file_bytes(tmp_path / "a.db") == before


def test_a_compacted_copy_refusing_a_strangers_edits_starts_again_from_a_peer(tmp_path, synced_trio, file_bytes, make_db, rows, sync, everyone_syncs):
    a, b, c = synced_trio
    compact_log(a)
    a.execute("UPDATE todos SET title = 'unsent on a' WHERE id = 0")
    stranger = make_db(tmp_path / "stranger.db")
    stranger.execute("INSERT INTO todos VALUES (70, 'written before it ever synced', 0, 0)")
    # A row whose compacted history the stranger never saw: a would find other clashes than b.
    stranger.execute("INSERT INTO todos VALUES (1, 'stranger', 1, 1)")
    sync(b, stranger, tmp_path)  # b kept its whole log: the stranger can catch up from it
    sync(stranger, b, tmp_path)
    before = file_bytes(tmp_path / "a.db")
    with pytest.raises(BundleError, match=r"compacted away \(table 'todos', row 1 has history here\). Send this database's changes to a peer"):
        sync(b, a, tmp_path)
    assert file_bytes(tmp_path / "a.db") == before
    # The way on, as the message says: a's changes go to b, then a starts again from b.
    sync(a, b, tmp_path)
    restarted = make_db(tmp_path / "a2.db")
    sync(b, restarted, tmp_path)
    assert rows(restarted) == rows(b)
    assert restarted.execute("SELECT title FROM todos WHERE id IN (0, 70) ORDER BY id").fetchall() == [
        ("unsent on a",),
        ("written before it ever synced",),
    ]
    everyone_syncs([restarted, b, c, stranger], tmp_path)
    assert rows(restarted) == rows(b) == rows(c) == rows(stranger)


def test_holes_the_sender_does_not_vouch_for_are_refused_even_by_a_new_database(tmp_path, synced_trio, craft, file_bytes, make_db):
    a, b, c = synced_trio
    compact_log(a)
    path = tmp_path / "snapshot.bundle"
    export_bundle(a, path)
    craft.rewrite(path, lambda conn: (craft.edit_header(conn, lambda header: header.__setitem__("horizon", {})), craft.reseal(conn)))
    fresh = make_db(tmp_path / "fresh.db")
    before = file_bytes(tmp_path / "fresh.db")
    with pytest.raises(BundleError, match="it lacks operations? [0-9-]+ of device") as error:
        import_bundle(fresh, path)
    assert error.value.reason == "missing_operations"
    assert file_bytes(tmp_path / "fresh.db") == before


def test_twin_operations_are_removed_together_or_not_at_all(tmp_path, make_db, sync, everyone_syncs, shell, conflict_records, rows):
    # a and b make the same change of row 1 under the same clock (both took f's clock, an hour
    # fast): twins, one edit for finding clashes. f sees only b's. If a's compaction removed b's
    # twin alone, f's next edit would clash there with a's twin too, and nowhere else.
    a, b, f = (make_db(tmp_path / f"{name}.db") for name in "abf")
    a.execute("INSERT INTO todos VALUES (1, 'x', 0, 0)")
    a.execute("INSERT INTO todos VALUES (2, 'y', 0, 0)")
    everyone_syncs([a, b, f], tmp_path)
    f.close()
    shell(tmp_path / "f.db", "UPDATE todos SET done = 1 WHERE id = 2", "+1h")
    f = sqlite3.connect(tmp_path / "f.db", isolation_level=None)
    sync(f, a, tmp_path)
    sync(f, b, tmp_path)
    for twin in (a, b):
        twin.execute("UPDATE todos SET title = 'z' WHERE id = 1")
    sync(b, f, tmp_path)  # f has seen b's twin, not a's
    sync(f, a, tmp_path)
    sync(b, a, tmp_path)
    a.execute("UPDATE todos SET title = 'L' WHERE id = 1")  # supersedes both twins
    sync(a, b, tmp_path)
    sync(b, a, tmp_path)
    compact_log(a)
    f.execute("UPDATE todos SET title = 'n' WHERE id = 1")
    everyone_syncs([a, b, f], tmp_path)
    assert conflict_records(a) == conflict_records(b) == conflict_records(f)
    assert [sorted(v["values"]["title"] for v in c["versions"]) for c in list_conflicts(a)] == [["L", "n"]]
    assert rows(a) == rows(b) == rows(f)


def compacted_meanwhile(tmp_path, synced_trio, everyone_syncs):
    """c edits row 2 three times, everyone syncs, a compacts: its horizon covers c's first edits."""
    a, b, c = synced_trio
    for i in range(3):
        c.execute("UPDATE todos SET title = ? WHERE id = 2", [f"c {i}"])
        everyone_syncs(synced_trio, tmp_path)
    c_id = sync_status(c)["device_id"]
    assert compact_log(a).horizon.get(c_id, 0) >= sync_status(b)["clock"][c_id] - 1
    return c_id


def test_a_peer_relays_a_new_devices_first_edits_of_new_rows_to_a_compacted_copy(tmp_path, synced_trio, make_db, sync, rows, conflict_records, everyone_syncs):
    # The tablet writes before it ever syncs with a; b, which kept its whole log, relays its
    # edits. No operation a holds touches row 70, so none a removed did: it merges as on b.
    a, b, c = synced_trio
    tablet = make_db(tmp_path / "tablet.db")
    export_bundle(b, tmp_path / "first.bundle")
    import_bundle(tablet, tmp_path / "first.bundle")
    tablet.execute("INSERT INTO todos VALUES (70, 'tablet', 0, 0)")
    compacted_meanwhile(tmp_path, synced_trio, everyone_syncs)
    sync(tablet, b, tmp_path)
    b.execute("UPDATE todos SET done = 1 WHERE id = 70")  # b's own later edits go through too
    sync(b, a, tmp_path)
    assert a.execute("SELECT title, done FROM todos WHERE id = 70").fetchone() == ("tablet", 1)
    everyone_syncs([a, b, c], tmp_path)
    sync(b, tablet, tmp_path)  # from a copy with its whole log: a's holes are no database's to adopt
    assert rows(tablet) == rows(a) == rows(b) == rows(c)
    assert conflict_records(tablet) == conflict_records(a) == conflict_records(b) == conflict_records(c)


def test_a_copy_holding_data_does_not_adopt_a_horizon_that_removed_a_recovered_twin(tmp_path, make_db, sync, rows, conflict_records, file_bytes):
    # D's edit o reaches R and the hub; D then moves it to a new id (--recover: its twin o~)
    # and retires the old one. Y starts from D after that: it saw o~, not o, and edits the row.
    # The hub compacts o and o~ together. R, holding o but never o~, would find o concurrent
    # with Y's edit: a conflict the hub and a copy with its whole log do not have.
    from sqlite_utils_sync import new_device, retire_device

    def made_from(source, name):
        conn = make_db(tmp_path / f"{name}.db")
        export_bundle(source, tmp_path / f"{name}.first")
        import_bundle(conn, tmp_path / f"{name}.first")
        return conn

    hub = make_db(tmp_path / "hub.db")
    hub.execute("INSERT INTO todos (id, title) VALUES (1, 'a')")
    d = made_from(hub, "d")
    d.execute("UPDATE todos SET title = 'x' WHERE id = 1")
    d.execute("INSERT INTO todos (id, title) VALUES (2, 'second')")
    export_bundle(d, tmp_path / "d.bundle")
    r = make_db(tmp_path / "r.db")
    import_bundle(r, tmp_path / "d.bundle")
    import_bundle(hub, tmp_path / "d.bundle")
    old = sync_status(d)["device_id"]
    new_device(d, recover=True)
    retire_device(d, old)
    y = made_from(d, "y")
    y.execute("UPDATE todos SET title = 'z' WHERE id = 1")
    sync(d, hub, tmp_path)
    sync(y, hub, tmp_path)
    full = made_from(hub, "full")
    for _ in range(3):
        for device in (d, y):
            sync(hub, device, tmp_path)
            sync(device, hub, tmp_path)
    assert compact_log(hub).removed
    sync(hub, full, tmp_path)
    before = file_bytes(tmp_path / "r.db")
    with pytest.raises(BundleError) as refused:
        sync(hub, r, tmp_path)
    assert refused.value.reason == "compacted_history"
    assert "only a database with no synced data yet can start from it" in str(refused.value)
    assert file_bytes(tmp_path / "r.db") == before
    assert rows(hub) == rows(full) and conflict_records(hub) == conflict_records(full) == []
