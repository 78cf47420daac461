"""Partial copies: a copy that holds only some tables (``export-bundle --table``,
``enable-sync --partial``, ``sync --table``) converges on exactly those, never receives a
value of the others, and exchanging bundles with it never makes another copy lose, refuse
or mis-order the operations it withheld."""

from __future__ import annotations

import json
import sqlite3
from unittest import mock

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sqlite_utils_sync import BundleError, SyncError, bundle, export_bundle, import_bundle, sync_status
from sqlite_utils_sync.api import set_scope
from sqlite_utils_sync.bundle import WITHHELD_CHUNK, chunk_image
from sqlite_utils_sync.compaction import compact_log
from sqlite_utils_sync.oplog import SEQ_BITS, SEQ_MASK

from conftest import readable_bytes

SCHEMA = (
    "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT);"
    "CREATE TABLE salaries (id INTEGER PRIMARY KEY, who TEXT, amount INTEGER)"
)
TABLES = ("todos", "salaries")
SECRET = "SECRET-PAYROLL"


@pytest.fixture
def office(tmp_path, make_db):
    """A full copy whose log interleaves both tables: todos 1, salary 1, todos 2, salary 2, todos 3."""
    conn = make_db(tmp_path / "office.db", SCHEMA, TABLES)
    for i in (1, 2):
        conn.execute("INSERT INTO todos VALUES (?, ?)", [i, f"task {i}"])
        conn.execute("INSERT INTO salaries VALUES (?, ?, ?)", [i, f"{SECRET} {i}", 1000 * i])
    conn.execute("INSERT INTO todos VALUES (3, 'task 3')")
    return conn


def new_db(path) -> str:
    sqlite3.connect(path).close()
    return str(path)


def header(path) -> dict:
    conn = sqlite3.connect(path)
    try:
        return msgpack.unpackb(conn.execute("SELECT data FROM bundle_header").fetchone()[0])
    finally:
        conn.close()


def table_rows(path, table="todos"):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        conn.close()


def chunk_rows(path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT device, tbl, data FROM bundle_chunks ORDER BY id").fetchall()
    finally:
        conn.close()


def has_table(path, table) -> bool:
    conn = sqlite3.connect(path)
    try:
        return bool(conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", [table]).fetchone())
    finally:
        conn.close()


def test_export_one_table_gives_a_new_copy_that_table_only(tmp_path, office, run, run_json, file_bytes):
    bundle = tmp_path / "todos.bundle"
    run(["sqlite-utils", "export-bundle", tmp_path / "office.db", bundle, "--table", "todos"])
    data = readable_bytes(bundle)
    assert SECRET.encode() not in data and b"salaries" not in data and b"amount" not in data
    head = header(bundle)
    assert head["scope"] == ["todos"] and [t[0] for t in head["tables"]] == ["todos"]
    assert (head["operations"], head["withheld"]) == (3, 2)
    phone = new_db(tmp_path / "phone.db")
    result = run_json(["sqlite-utils", "import-bundle", phone, bundle, "--alter", "--json"])
    assert (result["applied"], result["withheld"]) == (3, 2)
    assert table_rows(phone) == [(1, "task 1"), (2, "task 2"), (3, "task 3")]
    assert not has_table(phone, "salaries")
    status = run_json(["sqlite-utils", "sync-status", phone, "--json"])
    assert status["scope"] == ["todos"] and status["withheld"] == 2
    assert status["clock"][sync_status(office)["device_id"]] == 5  # the withheld seqs count as held
    assert SECRET.encode() not in file_bytes(phone)


def test_a_full_copy_refuses_a_bundle_of_some_tables(tmp_path, office, make_db, run, file_bytes):
    make_db(tmp_path / "laptop.db", SCHEMA, TABLES).execute("INSERT INTO todos VALUES (9, 'mine')")
    bundle = tmp_path / "todos.bundle"
    run(["sqlite-utils", "export-bundle", tmp_path / "office.db", bundle, "--table", "todos"])
    before = file_bytes(tmp_path / "laptop.db")
    result = run(["sqlite-utils", "import-bundle", tmp_path / "laptop.db", bundle], check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: Bundle todos.bundle: it holds only tables todos (the others' operations are withheld); this "
        "database holds all tables, so it would miss operations: import a bundle exported without --table"
    ]
    assert file_bytes(tmp_path / "laptop.db") == before


def test_export_of_an_unknown_table_names_it(tmp_path, office, run):
    result = run(["sqlite-utils", "export-bundle", tmp_path / "office.db", tmp_path / "x.bundle", "--table", "nope"], check=False)
    assert result.returncode == 1
    assert "Table 'nope' is not synced here" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.bundle").exists()


def test_partial_copy_relays_to_a_full_copy_and_back(tmp_path, office, make_db, run_cli):
    office_db, phone, tablet = tmp_path / "office.db", new_db(tmp_path / "phone.db"), new_db(tmp_path / "tablet.db")
    office_id = sync_status(office)["device_id"]
    assert run_cli("export-bundle", office_db, tmp_path / "1.bundle", "--table", "todos").exit_code == 0
    assert run_cli("import-bundle", phone, tmp_path / "1.bundle", "--alter").exit_code == 0
    phone_conn = sqlite3.connect(phone, isolation_level=None)
    phone_conn.execute("INSERT INTO todos VALUES (10, 'from the phone')")
    # Phone to a new full copy over USB: office's operations only below the first withheld one
    # (seq 2, a salary), and none of the phone's, whose tick depends on all of office's.
    held = run_cli("export-bundle", phone, tmp_path / "2.bundle")
    assert header(tmp_path / "2.bundle")["clock"] == {office_id: 1}
    assert held.output.endswith(
        "Held back 1 edit of this copy, made after it heard of operations it holds no values of (a partial copy) "
        "that the receiver lacks too: export with --since the receiver's clock (or --for it) to send them to one "
        "that holds those\n"
    )
    assert run_cli("import-bundle", tablet, tmp_path / "2.bundle", "--alter").exit_code == 0
    tablet_conn = sqlite3.connect(tablet, isolation_level=None)
    assert sync_status(tablet_conn)["scope"] is None and sync_status(tablet_conn)["withheld"] == 0
    assert sync_status(tablet_conn)["clock"][office_id] == 1
    # The tablet's --since delta from the office brings the rest, salaries included.
    since = json.dumps(sync_status(tablet_conn))
    assert run_cli("export-bundle", office_db, tmp_path / "3.bundle", "--since", since).exit_code == 0
    assert run_cli("import-bundle", tablet, tmp_path / "3.bundle", "--alter").exit_code == 0
    # Now the phone's own edit can follow (nothing it withholds is missing there any more).
    sent = run_cli("export-bundle", phone, tmp_path / "4.bundle", "--since", json.dumps(sync_status(tablet_conn)))
    assert "Held back" not in sent.output
    assert run_cli("import-bundle", tablet, tmp_path / "4.bundle").exit_code == 0
    # And back to the office through the tablet, with --for.
    run_cli("export-bundle", tablet, tmp_path / "5.bundle", "--for", office_id)
    assert run_cli("import-bundle", office_db, tmp_path / "5.bundle").exit_code == 0
    assert table_rows(office_db) == table_rows(tablet) == table_rows(phone)
    assert table_rows(office_db, "salaries") == table_rows(tablet, "salaries")
    assert (10, "from the phone") in table_rows(office_db)
    # A later salary edit reaches the phone as withheld only.
    office.execute("UPDATE salaries SET amount = 1 WHERE id = 1")
    run_cli("export-bundle", office_db, tmp_path / "6.bundle", "--table", "todos", "--since", json.dumps(sync_status(phone_conn)))
    assert run_cli("import-bundle", phone, tmp_path / "6.bundle").exit_code == 0
    assert sync_status(phone_conn)["clock"] == sync_status(office)["clock"] | {sync_status(phone_conn)["device_id"]: 3}  # and a tick: it knows of them
    assert sync_status(phone_conn)["withheld"] == 3


def test_a_partial_copy_passes_on_its_withheld_ranges_to_a_copy_of_its_tables(tmp_path, office, run_cli):
    phone, watch = new_db(tmp_path / "phone.db"), new_db(tmp_path / "watch.db")
    run_cli("export-bundle", tmp_path / "office.db", tmp_path / "1.bundle", "--table", "todos")
    run_cli("import-bundle", phone, tmp_path / "1.bundle", "--alter")
    # The watch wants what the phone holds whole: everything goes, the salaries as withheld.
    run_cli("export-bundle", phone, tmp_path / "2.bundle", "--table", "todos")
    assert header(tmp_path / "2.bundle")["withheld"] == 2
    result = run_cli("import-bundle", watch, tmp_path / "2.bundle", "--alter", "--json")
    assert json.loads(result.stdout)["withheld"] == 2
    watch_conn = sqlite3.connect(watch)
    assert sync_status(watch_conn)["clock"][sync_status(office)["device_id"]] == 5
    assert table_rows(watch) == table_rows(tmp_path / "office.db")


def test_enable_sync_partial_narrows_and_widening_is_refused(tmp_path, office, make_db, run, run_cli, file_bytes):
    phone = make_db(tmp_path / "phone.db", SCHEMA, ("todos",))
    assert run_cli("enable-sync", tmp_path / "phone.db", "todos", "--partial").exit_code == 0
    assert sync_status(phone)["scope"] == ["todos"]
    export_bundle(office, tmp_path / "all.bundle")
    result = import_bundle(phone, tmp_path / "all.bundle")
    assert (result.applied, result.withheld) == (3, 2)
    assert phone.execute("SELECT count(*) FROM salaries").fetchone()[0] == 0
    before = file_bytes(tmp_path / "phone.db")
    refused = run(["sqlite-utils", "enable-sync", tmp_path / "phone.db", "salaries"], check=False)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "cannot add salaries" in refused.stderr and "Start a new copy" in refused.stderr
    assert file_bytes(tmp_path / "phone.db") == before


def test_compaction_keeps_withheld_ranges_and_the_cut(tmp_path, office, run_cli):
    phone, tablet = new_db(tmp_path / "phone.db"), new_db(tmp_path / "tablet.db")
    office_id = sync_status(office)["device_id"]
    run_cli("export-bundle", tmp_path / "office.db", tmp_path / "1.bundle", "--table", "todos")
    run_cli("import-bundle", phone, tmp_path / "1.bundle", "--alter")
    phone_conn = sqlite3.connect(phone, isolation_level=None)
    phone_conn.execute("UPDATE todos SET title = 'new' WHERE id = 1")
    assert run_cli("sync-compact", phone).exit_code == 0
    status = sync_status(phone_conn)
    assert status["withheld"] == 2 and status["clock"][office_id] == 5
    # A new full copy started from the compacted phone still gets nothing it cannot complete.
    run_cli("export-bundle", phone, tmp_path / "2.bundle")
    assert run_cli("import-bundle", tablet, tmp_path / "2.bundle", "--alter").exit_code == 0
    assert sync_status(sqlite3.connect(tablet))["clock"].get(office_id, 0) < 2


def test_authorize_sees_the_new_operations_actions_and_can_refuse(tmp_path, office, make_db, file_bytes):
    hub = make_db(tmp_path / "hub.db", SCHEMA, TABLES)
    export_bundle(office, tmp_path / "1.bundle")
    seen = []
    import_bundle(hub, tmp_path / "1.bundle", authorize=seen.append)
    assert seen == [{"todos": {"insert-row"}, "salaries": {"insert-row"}}]
    office.execute("UPDATE todos SET title = 'x' WHERE id = 1")
    office.execute("DELETE FROM salaries WHERE id = 2")
    export_bundle(office, tmp_path / "2.bundle")  # everything again: the first five are duplicates
    before = file_bytes(tmp_path / "hub.db")

    def refuse(actions):
        seen.append(actions)
        raise BundleError("forbidden", "no delete-row on salaries")

    with pytest.raises(BundleError, match="no delete-row on salaries"):
        import_bundle(hub, tmp_path / "2.bundle", authorize=refuse)
    assert seen[-1] == {"todos": {"update-row"}, "salaries": {"delete-row"}}
    assert file_bytes(tmp_path / "hub.db") == before
    seen.clear()
    # Relaying what the hub holds already needs nothing.
    import_bundle(hub, tmp_path / "1.bundle", authorize=refuse)
    assert seen == []


def test_no_digest_of_a_withheld_operation_goes_to_a_partial_copy(tmp_path, office, run_cli):
    office_id = sync_status(office)["device_id"]
    phone = new_db(tmp_path / "phone.db")
    office.execute(f"INSERT INTO salaries VALUES (3, '{SECRET} 3', 3000)")  # the phone's last office op
    run_cli("export-bundle", tmp_path / "office.db", tmp_path / "1.bundle", "--table", "todos")
    run_cli("import-bundle", phone, tmp_path / "1.bundle", "--alter")
    office.execute("INSERT INTO todos VALUES (4, 'task 4')")
    since = json.dumps(sync_status(sqlite3.connect(phone)))
    run_cli("export-bundle", tmp_path / "office.db", tmp_path / "2.bundle", "--table", "todos", "--since", since)
    assert office_id not in header(tmp_path / "2.bundle")["anchors"]
    # A full bundle to a full copy keeps its anchor.
    run_cli("export-bundle", tmp_path / "office.db", tmp_path / "3.bundle", "--since", since)
    assert office_id in header(tmp_path / "3.bundle")["anchors"]


def test_a_bundle_of_some_tables_that_withholds_nothing_is_a_full_bundle(tmp_path, make_db, run_cli):
    make_db(tmp_path / "a.db", SCHEMA, ("todos",)).execute("INSERT INTO todos VALUES (1, 'only todos here')")
    laptop = make_db(tmp_path / "laptop.db", SCHEMA, TABLES)
    run_cli("export-bundle", tmp_path / "a.db", tmp_path / "1.bundle", "--table", "todos")
    assert header(tmp_path / "1.bundle")["withheld"] == 0
    assert import_bundle(laptop, tmp_path / "1.bundle").applied == 1
    assert sync_status(laptop)["scope"] is None


# Hostile withheld ranges ----------------------------------------------------------------------


@pytest.fixture
def scoped_bundle(tmp_path, office):
    path = tmp_path / "todos.bundle"
    export_bundle(office, path, tables=["todos"])
    return path


def set_ranges(conn, ranges):
    """Replace the bundle's withheld chunk with ``ranges`` ([(lo, hi)]) of device 0."""
    conn.execute("DELETE FROM bundle_chunks WHERE tbl = ?", [WITHHELD_CHUNK])
    data = chunk_image([(lo, hi, 0, None, None) for lo, hi in ranges], 0)
    conn.execute("INSERT INTO bundle_chunks (device, tbl, data) VALUES (0, ?, ?)", [WITHHELD_CHUNK, data])


@pytest.mark.parametrize(
    "ranges, count, message",
    [
        ([(2, 4), (4, 4)], 4, "malformed or overlap"),
        ([(2, 3)], 2, "both withholds and sends"),  # seq 3 is a todo it carries
        ([(2, 2), (4, 9)], 7, "outside what it sends"),
        ([(2, 2), (4, 4)], 5, "header counts 5 withheld operations but it carries 2"),
    ],
)
def test_bad_withheld_ranges_are_refused(tmp_path, scoped_bundle, craft, file_bytes, ranges, count, message):
    def tamper(conn):
        set_ranges(conn, ranges)
        craft.edit_header(conn, lambda h: h.update(withheld=count))
        craft.reseal(conn)

    craft.rewrite(scoped_bundle, tamper)
    target = new_db(tmp_path / "phone.db")
    conn = sqlite3.connect(target, isolation_level=None)
    before = file_bytes(target)
    with pytest.raises(BundleError, match=message):
        import_bundle(conn, scoped_bundle, alter=True, adopt_scope=True)
    assert file_bytes(target) == before


def test_withheld_ranges_in_a_bundle_of_every_table_are_refused(tmp_path, scoped_bundle, craft, run, file_bytes):
    craft.rewrite(scoped_bundle, lambda conn: (craft.edit_header(conn, lambda h: h.update(scope=None)), craft.reseal(conn)))
    target = new_db(tmp_path / "phone.db")
    before = file_bytes(target)
    result = run(["sqlite-utils", "import-bundle", target, scoped_bundle, "--alter"], check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: Bundle todos.bundle: it withholds operations but says it holds every table"
    ]
    assert file_bytes(target) == before


def test_a_copy_of_no_table_is_refused_wherever_it_could_be_made(tmp_path, office, scoped_bundle, craft, make_db):
    # Storing no table reads back as a full copy: one made from a bundle withholding every
    # table would take later deltas as a full copy and miss what it withheld, silently.
    with pytest.raises(SyncError, match="No table to export: a bundle of some tables needs at least one"):
        export_bundle(office, tmp_path / "none.bundle", tables=[])
    assert not (tmp_path / "none.bundle").exists()
    craft.rewrite(scoped_bundle, lambda conn: (craft.edit_header(conn, lambda h: h.update(scope=[])), craft.reseal(conn)))
    phone = sqlite3.connect(tmp_path / "phone.db", isolation_level=None)
    with pytest.raises(BundleError, match="scope is invalid"):
        import_bundle(phone, str(scoped_bundle), create_tables=True, adopt_scope=True)
    assert phone.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    empty = make_db(tmp_path / "empty.db", SCHEMA, ())
    with pytest.raises(SyncError, match="A partial copy holds at least one table: none was named"):
        set_scope(empty, [])


def test_a_scope_that_omits_a_table_it_carries_is_refused(tmp_path, scoped_bundle, craft):
    craft.rewrite(scoped_bundle, lambda conn: (craft.edit_header(conn, lambda h: h.update(scope=["other"])), craft.reseal(conn)))
    with pytest.raises(BundleError, match="outside its scope"):
        import_bundle(sqlite3.connect(new_db(tmp_path / "p.db")), scoped_bundle, adopt_scope=True)


def test_an_export_costs_the_operations_held_not_the_seqs_a_withheld_range_spans(tmp_path, scoped_bundle, craft):
    # A bundle of a few KB may say it withholds seqs 1..2^40-1 of some device. The copy that
    # takes it holds one withheld range for them: its later exports must look at what it holds,
    # not walk the ids between (that took 43 s of CPU for a bundle of 4 operations).
    invented = "ab" * 16

    def tamper(conn):
        position = len(msgpack.unpackb(conn.execute("SELECT data FROM bundle_header").fetchone()[0])["devices"])
        data = chunk_image([(1, SEQ_MASK, 0, None, None)], 0)
        conn.execute("INSERT INTO bundle_chunks (device, tbl, data) VALUES (?, ?, ?)", [position, WITHHELD_CHUNK, data])
        craft.edit_header(conn, lambda h: (
            h["devices"].append(invented), h["clock"].update({invented: SEQ_MASK}), h.update(withheld=h["withheld"] + SEQ_MASK)
        ))
        craft.reseal(conn)

    craft.rewrite(scoped_bundle, tamper)
    phone = sqlite3.connect(new_db(tmp_path / "phone.db"), isolation_level=None)
    assert import_bundle(phone, str(scoped_bundle), alter=True, adopt_scope=True).withheld == 2 + SEQ_MASK
    statements = []

    def count(sql):
        statements.append(sql)
        if len(statements) > 1_000:  # it was walking 11 million windows of op ids: stop it here
            phone.interrupt()

    phone.set_trace_callback(count)
    export_bundle(phone, tmp_path / "watch.bundle", tables=["todos"])
    phone.set_trace_callback(None)
    assert len(statements) < 1_000
    assert header(tmp_path / "watch.bundle")["withheld"] == 2 + SEQ_MASK
    assert header(tmp_path / "watch.bundle")["clock"][invented] == SEQ_MASK
    watch = sqlite3.connect(new_db(tmp_path / "watch.db"), isolation_level=None)
    assert import_bundle(watch, str(tmp_path / "watch.bundle"), alter=True, adopt_scope=True).withheld == 2 + SEQ_MASK
    assert table_rows(tmp_path / "watch.db") == table_rows(tmp_path / "office.db")


# Through a hub ------------------------------------------------------------------------------------


def test_sync_with_table_keeps_a_partial_copy(tmp_path, make_db, datasette_server, hub_config, run, run_json):
    hub_conn = make_db(tmp_path / "hub.db", SCHEMA, TABLES)
    hub_conn.execute("INSERT INTO todos VALUES (1, 'shared')")
    hub_conn.execute(f"INSERT INTO salaries VALUES (1, '{SECRET}', 1)")
    hub_conn.execute("INSERT INTO todos VALUES (2, 'shared too')")
    hub = datasette_server([tmp_path / "hub.db"], hub_config)
    token = hub.token("alice")
    phone = new_db(tmp_path / "phone.db")
    url = hub.url + "/hub"
    first = run_json(["sqlite-utils", "sync", phone, url, "--table", "todos", "--alter", "--token", token, "--json"])
    assert first["pulled"]["withheld"] == 1
    status = run_json(["sqlite-utils", "sync-status", phone, "--json"])
    assert status["scope"] == ["todos"] and status["withheld"] == 1
    assert not has_table(phone, "salaries")
    run(["sqlite-utils", "insert", phone, "todos", "-", "--pk", "id"], input=json.dumps([{"id": 3, "title": "phone"}]))
    # Later syncs keep to the stored scope, and the phone's edits reach the hub.
    run_json(["sqlite-utils", "sync", phone, url, "--token", token, "--json"])
    assert table_rows(tmp_path / "hub.db") == table_rows(phone) == [(1, "shared"), (2, "shared too"), (3, "phone")]
    assert run_json(["sqlite-utils", "sync-status", phone, "--json"])["scope"] == ["todos"]
    # Asking for a table the phone withholds operations of would widen it: refused, one line.
    wider = run(["sqlite-utils", "sync", phone, url, "--table", "todos", "--table", "salaries", "--token", token], check=False)
    assert wider.returncode == 1 and len(wider.stderr.strip().splitlines()) == 1
    assert "Start a new copy" in wider.stderr


def test_a_partial_copy_says_which_of_its_edits_wait_for_another_copy(tmp_path, office, make_db, datasette_server, hub_config, run, run_json):
    """A partial copy that heard, by a bundle file, of operations the hub has not received yet
    holds back its edits made after that (the cut rule): each sync says so, and they go once the
    copy holding those operations syncs."""
    hub_path = tmp_path / "hub.db"
    make_db(hub_path, SCHEMA, TABLES).close()
    hub = datasette_server([hub_path], hub_config)
    token, url = hub.token("alice"), hub.url + "/hub"
    office_db = tmp_path / "office.db"
    run(["sqlite-utils", "sync", office_db, url, "--token", token])
    phone = new_db(tmp_path / "phone.db")
    run(["sqlite-utils", "sync", phone, url, "--table", "todos", "--alter", "--token", token])
    office.execute(f"INSERT INTO salaries VALUES (9, '{SECRET} 9', 9)")  # not on the hub yet
    since = run(["sqlite-utils", "sync-status", phone, "--json"]).stdout
    run(["sqlite-utils", "export-bundle", office_db, tmp_path / "usb.bundle", "--table", "todos", "--since", since])
    run(["sqlite-utils", "import-bundle", phone, tmp_path / "usb.bundle"])
    run(["sqlite-utils", "insert", phone, "todos", "-", "--pk", "id"], input=json.dumps([{"id": 30, "title": "phone"}]))
    synced = run(["sqlite-utils", "sync", phone, url, "--token", token])
    assert synced.stderr.endswith(
        "Held back 1 edit of this copy, made after it heard of operations it holds no values of (a partial copy) "
        "that the hub lacks too; they go once a copy holding those syncs with the hub.\n"
    ), synced.stderr
    assert "had everything" not in synced.stderr
    assert run_json(["sqlite-utils", "sync", phone, url, "--token", token, "--json"])["pushed"]["held_back"] == 1
    assert (30, "phone") not in table_rows(hub_path)
    run(["sqlite-utils", "sync", office_db, url, "--token", token])
    assert "Held back" not in run(["sqlite-utils", "sync", phone, url, "--token", token]).stderr
    assert (30, "phone") in table_rows(hub_path)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    runs=st.lists(st.tuples(st.sampled_from(TABLES), st.integers(1, 260)), min_size=1, max_size=8),
    window=st.integers(1, 700),
)
def test_a_bundle_of_some_tables_holds_the_same_whatever_the_interleaving(tmp_path_factory, make_db, runs, window):
    # Runs of each table, long and short, interleave in the log; the partial copy made from it
    # holds gaps where the other table's operations were. Each bundle of one table must be the
    # same chunk for chunk whether its stretches are found a few op ids at a time or all at
    # once, and the same as an export inside the caller's transaction (row by row).
    folder = tmp_path_factory.mktemp("stretches")
    office = make_db(folder / "office.db", SCHEMA, TABLES)
    office.execute("BEGIN")
    next_id = {table: 1 for table in TABLES}
    for table, count in [*runs, ("todos", 1)]:
        for i in range(next_id[table], next_id[table] + count):
            office.execute(f"INSERT INTO {table} (id) VALUES (?)", [i])
        next_id[table] += count
    office.execute("COMMIT")
    export_bundle(office, folder / "settles.bundle")
    salaries = sum(count for table, count in runs if table == "salaries")

    def same_whatever_the_window(conn, name):
        export_bundle(conn, folder / f"{name}.bundle", tables=["todos"])
        with mock.patch.object(bundle, "STRETCH_WINDOW", window):
            export_bundle(conn, folder / f"{name}-window.bundle", tables=["todos"])
        conn.execute("BEGIN")
        export_bundle(conn, folder / f"{name}-in-transaction.bundle", tables=["todos"])
        conn.execute("ROLLBACK")
        made = [chunk_rows(folder / f"{name}{kind}.bundle") for kind in ("", "-window", "-in-transaction")]
        assert made[0] == made[1] == made[2]
        return folder / f"{name}.bundle"

    phone = sqlite3.connect(new_db(folder / "phone.db"), isolation_level=None)
    assert import_bundle(phone, same_whatever_the_window(office, "office"), alter=True, adopt_scope=True).withheld == salaries
    watch = sqlite3.connect(new_db(folder / "watch.db"), isolation_level=None)
    assert import_bundle(watch, same_whatever_the_window(phone, "phone"), alter=True, adopt_scope=True).withheld == salaries
    assert table_rows(folder / "watch.db") == table_rows(folder / "office.db")
    if has_table(folder / "watch.db", "salaries"):
        assert table_rows(folder / "watch.db", "salaries") == []


def test_a_bundle_of_some_tables_withholds_only_operations_the_log_still_holds(tmp_path, make_db, sync):
    # Compaction leaves holes among the salaries' operations: the withheld ranges of a bundle of
    # the todos must skip them, or a partial copy would count operations that no longer exist.
    office, laptop = make_db(tmp_path / "office.db", SCHEMA, TABLES), make_db(tmp_path / "laptop.db", SCHEMA, TABLES)
    office.execute("BEGIN")
    for i in range(1, 201):
        office.execute("INSERT INTO salaries VALUES (?, 'x', 0)", [i])
        office.execute("INSERT INTO todos VALUES (?, 'task')", [i])
    office.execute("COMMIT")
    office.execute("UPDATE salaries SET who = 'y' WHERE id = 1")
    for amount in (1, 2):  # compaction removes the first 100 updates: a hole between salaries ops
        office.execute("UPDATE salaries SET amount = ? WHERE id % 2 = 0", [amount])
    for _ in range(2):
        sync(office, laptop, tmp_path)
        sync(laptop, office, tmp_path)
    assert compact_log(office).removed == 100
    held = office.execute("SELECT count(*) FROM _sync_ops WHERE tid = (SELECT tid FROM _sync_tables WHERE name = 'salaries')").fetchone()[0]
    export_bundle(office, tmp_path / "todos.bundle", tables=["todos"])
    assert header(tmp_path / "todos.bundle")["withheld"] == held == 301
    phone = sqlite3.connect(new_db(tmp_path / "phone.db"), isolation_level=None)
    assert import_bundle(phone, str(tmp_path / "todos.bundle"), alter=True, adopt_scope=True).withheld == held
    assert table_rows(tmp_path / "phone.db") == table_rows(tmp_path / "office.db")


def test_a_bundle_of_a_table_nobody_wrote_yet_carries_ticks_and_no_value(tmp_path, office, make_db, sync, file_bytes):
    # A hub asked for a table granted but never pushed wants no logged table: every operation
    # but the ticks goes withheld, including those right after a tick.
    laptop = make_db(tmp_path / "laptop.db", SCHEMA, TABLES)
    laptop.execute("INSERT INTO todos VALUES (10, 'from the laptop')")
    since = sync_status(office)["clock"]
    sync(laptop, office, tmp_path)  # the office's log now holds a tick, then:
    office.execute("INSERT INTO salaries VALUES (3, ?, 3000)", [f"{SECRET} 3"])
    path = tmp_path / "nothing.bundle"
    exported = export_bundle(office, path, since=since, tables=["granted_but_unpushed"], unknown_tables=True)
    assert SECRET.encode() not in file_bytes(path) and b"from the laptop" not in file_bytes(path)
    assert header(path)["withheld"] == 2 and exported.operations == 1  # the tick
    # The laptop's todo withheld; the office's tick, then its salary withheld.
    assert [table for _, table, _ in chunk_rows(path)] == [WITHHELD_CHUNK, -1, WITHHELD_CHUNK]


def test_compaction_holes_do_not_cut_a_bundle_of_some_tables_into_small_chunks(tmp_path, make_db, sync):
    office, laptop = make_db(tmp_path / "office.db", SCHEMA, TABLES), make_db(tmp_path / "laptop.db", SCHEMA, TABLES)
    office.execute("BEGIN")
    office.executemany("INSERT INTO todos VALUES (?, 'task')", [(i,) for i in range(1, 6001)])
    office.execute("COMMIT")
    office.execute("BEGIN")
    for i in range(1, 6001):
        for title in ("first", "second"):
            office.execute("UPDATE todos SET title = ? WHERE id = ?", [title, i])
    office.execute("COMMIT")
    for _ in range(2):
        sync(office, laptop, tmp_path)
        sync(laptop, office, tmp_path)
    assert compact_log(office).removed == 6000  # every first update: a hole between each pair
    office.execute("INSERT INTO salaries VALUES (1, ?, 1000)", [SECRET])
    export_bundle(office, tmp_path / "todos.bundle", tables=["todos"])
    assert len(chunk_rows(tmp_path / "todos.bundle")) <= 6  # 12,000 ops, 5,000 a chunk, ticks, withheld
    phone = sqlite3.connect(new_db(tmp_path / "phone.db"), isolation_level=None)
    assert import_bundle(phone, str(tmp_path / "todos.bundle"), alter=True, adopt_scope=True).withheld == 1
    assert table_rows(tmp_path / "phone.db") == table_rows(tmp_path / "office.db")


def test_an_operation_a_partial_copy_was_told_is_withheld_is_refused_not_dropped(tmp_path, office, craft, run, file_bytes):
    phone = new_db(tmp_path / "phone.db")
    conn = sqlite3.connect(phone, isolation_level=None)
    first = tmp_path / "first.bundle"
    export_bundle(office, first, tables=["todos"])
    import_bundle(conn, first, alter=True, adopt_scope=True)
    office.execute("INSERT INTO todos VALUES (4, 'task 4')")  # the office's seq 6
    real = tmp_path / "real.bundle"
    export_bundle(office, real, tables=["todos"], since=sync_status(conn)["clock"])
    conn.close()
    # A forged bundle says seqs 6 to 10 of the office's device are operations of another table.
    forged = tmp_path / "forged.bundle"
    forged.write_bytes(real.read_bytes())

    def forge(bundle_conn):
        bundle_conn.execute("DELETE FROM bundle_chunks")
        set_ranges(bundle_conn, [(6, 10)])
        craft.edit_header(bundle_conn, lambda h: h.update(withheld=5, operations=0, clock={h["devices"][0]: 10}))
        craft.reseal(bundle_conn)

    craft.rewrite(forged, forge)
    run(["sqlite-utils", "import-bundle", phone, forged])
    # The office's real seq 6 was then counted as a duplicate, and task 4 never reached the phone.
    before = file_bytes(phone)
    result = run(["sqlite-utils", "import-bundle", phone, real], check=False)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: Bundle real.bundle: it carries operation ")
    assert "which this partial copy was told by an earlier bundle is an operation of a table it does not hold" in result.stderr
    assert len(result.stderr.splitlines()) == 1 and file_bytes(phone) == before


def test_a_partial_copy_refuses_its_table_named_in_another_case(tmp_path, make_db, run, file_bytes):
    sender = make_db(tmp_path / "sender.db", "CREATE TABLE Todos (id INTEGER PRIMARY KEY, title TEXT)", ("Todos",))
    sender.execute("INSERT INTO Todos VALUES (1, 'from sender')")
    bundle = tmp_path / "case.bundle"
    export_bundle(sender, bundle)
    phone = make_db(tmp_path / "phone.db", "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT)", ("todos",))
    set_scope(phone, ["todos"])
    before = file_bytes(tmp_path / "phone.db")
    # As on a full copy: the partial copy took 'Todos' for a table it does not hold, and withheld its rows.
    result = run(["sqlite-utils", "import-bundle", tmp_path / "phone.db", bundle], check=False)
    assert result.returncode == 1
    assert result.stderr == (
        "Error: Bundle case.bundle: table 'Todos' is called 'todos' here; sync matches table names exactly, "
        "so rename one of them to match (ALTER TABLE ... RENAME TO ...)\n"
    )
    assert file_bytes(tmp_path / "phone.db") == before


def logged(conn, table: str) -> list[tuple]:
    """Every operation of ``table`` in a copy's log: device, seq, clock, kind, mask, keys."""
    return conn.execute(
        f"SELECT d.device_id, o.op & {SEQ_MASK}, o.hlc, o.kind, o.mask, o.rowkey, o.newkey FROM _sync_ops o "
        f"JOIN _sync_tables t ON t.tid = o.tid JOIN _sync_devices d ON d.idx = o.op >> {SEQ_BITS} "
        "WHERE t.name = ? ORDER BY 1, 2",
        [table],
    ).fetchall()


def test_tables_written_in_turn_make_a_bundle_of_some_tables_as_compact_as_a_full_one(tmp_path, make_db, rows):
    # An app writing a todo and a salary in turn (and updating them in turn): every run of todos
    # is one operation long, a salary withheld after each. The bundle of the todos fills its
    # chunks as a full export does: it made a chunk per operation (about 225 B/op, and an import
    # cost about 1 ms per operation, more the longer the log). The copy made from it, and the one
    # that copy makes in turn, hold exactly the todos and their log, every salary withheld.
    office = make_db(tmp_path / "office.db", SCHEMA, TABLES)
    office.execute("BEGIN")
    for i in range(1, 6001):
        office.execute("INSERT INTO todos VALUES (?, ?)", [i, f"task {i}"])
        office.execute("INSERT INTO salaries VALUES (?, ?, ?)", [i, f"{SECRET} {i}", 1000 * i])
    for i in range(1, 6001, 3):
        office.execute("UPDATE todos SET title = ? WHERE id = ?", [f"done {i}", i])
        office.execute("UPDATE salaries SET amount = amount + 1 WHERE id = ?", [i])
    office.execute("DELETE FROM todos WHERE id = 2")
    office.execute("COMMIT")
    full = export_bundle(office, tmp_path / "full.bundle")
    todos = export_bundle(office, tmp_path / "todos.bundle", tables=["todos"])
    salaries = [seq for _, seq, *_ in logged(office, "salaries")]
    assert todos.operations == len(logged(office, "todos")) == 8001 and len(salaries) == 8000
    assert todos.bytes / todos.operations < 2 * full.bytes / full.operations
    # Two chunks of todos (5,000 operations each at most), two of withheld ranges.
    assert sorted(table for _, table, _ in chunk_rows(tmp_path / "todos.bundle")) == [WITHHELD_CHUNK] * 2 + [0] * 2
    # Made row by row (in the caller's transaction), the chunks are the same.
    office.execute("BEGIN")
    export_bundle(office, tmp_path / "in-transaction.bundle", tables=["todos"])
    office.execute("ROLLBACK")
    assert chunk_rows(tmp_path / "in-transaction.bundle") == chunk_rows(tmp_path / "todos.bundle")

    phone = sqlite3.connect(new_db(tmp_path / "phone.db"), isolation_level=None)
    result = import_bundle(phone, str(tmp_path / "todos.bundle"), alter=True, adopt_scope=True)
    assert result.applied_by_table == {"todos": 8001} and result.withheld == 8000
    watch = sqlite3.connect(new_db(tmp_path / "watch.db"), isolation_level=None)
    relayed = export_bundle(phone, tmp_path / "relayed.bundle", tables=["todos"])
    assert relayed.bytes / relayed.operations < 2 * full.bytes / full.operations
    assert import_bundle(watch, str(tmp_path / "relayed.bundle"), alter=True, adopt_scope=True).withheld == 8000
    device = sync_status(office)["device_id"]
    for copy in (phone, watch):
        assert rows(copy) == rows(office)
        assert copy.execute("SELECT 1 FROM sqlite_master WHERE name = 'salaries'").fetchone() is None
        assert logged(copy, "todos") == logged(office, "todos")
        # Each salary's seq withheld, and nothing else: they alternate with the todos.
        withheld = copy.execute(
            "SELECT lo, hi FROM _sync_withheld w JOIN _sync_devices d ON d.idx = w.device WHERE d.device_id = ? ORDER BY lo",
            [device],
        ).fetchall()
        assert [seq for lo, hi in withheld for seq in range(lo, hi + 1)] == salaries
