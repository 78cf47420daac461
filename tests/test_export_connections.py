"""A large export builds chunk images on two connections to the file (see *Speed* in the
README): the CLI's and the Python API's while holding the write lock, a hub's while a third
connection holds writers off until both read. Whatever the log, the timing of the two, and
the way the file is opened, the bundle is the one a single connection makes from the same
snapshot, chunk for chunk, and writers wait only for as long as they must.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from sqlite_utils_sync import api, bundle, compact_log, enable_sync, export_bundle, import_bundle, sync_status

from conftest import chunks


def test_a_large_export_builds_chunks_on_a_second_connection_with_the_same_result(
    tmp_path, make_db, rows, monkeypatch
):
    # An export that holds the write lock and wrote nothing builds chunks on a second
    # connection too, guessing where each starts; runs of two tables that end short of
    # CHUNK_OPS, and a second device's operations, make some guesses wrong. The bundle must be
    # the one a single connection makes (here: row by row, inside the caller's transaction).
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    for conn in (a, b):
        conn.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        enable_sync(conn, ["notes"])
    b.execute("BEGIN")
    b.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"from b {i}") for i in range(100_001, 107_001)])
    b.execute("COMMIT")
    export_bundle(b, tmp_path / "b.bundle")
    import_bundle(a, str(tmp_path / "b.bundle"))
    a.execute("BEGIN")
    next_id = 1
    for todos, notes in ((12_000, 300), (7_500, 50), (4_999, 5_001), (10_000, 0)):
        a.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(next_id, next_id + todos)])
        a.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"note {i}") for i in range(next_id, next_id + notes)])
        next_id += todos + notes
    a.execute("COMMIT")
    export_bundle(a, tmp_path / "settles.bundle")  # the first export settles the new clocks
    taken = []
    real_take = bundle.PeerBuilder.take
    monkeypatch.setattr(bundle.PeerBuilder, "take", lambda self, op, tid: taken.append(real_take(self, op, tid)) or taken[-1])
    exported = export_bundle(a, tmp_path / "two.bundle")
    built_there = sum(made is not None for made in taken)
    a.execute("BEGIN")
    export_bundle(a, tmp_path / "one.bundle")
    a.execute("ROLLBACK")
    assert built_there >= 3 and len(taken) > built_there  # some guesses were used, some were not
    assert chunks(tmp_path / "two.bundle") == chunks(tmp_path / "one.bundle")
    c = make_db(tmp_path / "c.db")
    c.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
    enable_sync(c, ["notes"])
    assert import_bundle(c, str(tmp_path / "two.bundle")).applied == exported.operations
    assert rows(c) == rows(a) and rows(c, "notes") == rows(a, "notes")


def second_connection_behind(monkeypatch, exporting: sqlite3.Connection) -> list[int]:
    """Make the second connection build nothing until ``exporting`` has built its own first
    chunk and one ahead; returns the first op of each image ``exporting`` builds, in order."""
    built_ahead, by_exporter, real_sql_image = threading.Event(), [], bundle.sql_image

    def sql_image(conn, columns, run, clock_fixes, **kwargs):
        if conn is exporting:
            by_exporter.append(run[0])
            if len(by_exporter) >= 2:
                built_ahead.set()
        else:
            assert built_ahead.wait(60)
        return real_sql_image(conn, columns, run, clock_fixes, **kwargs)

    monkeypatch.setattr(bundle, "sql_image", sql_image)
    return by_exporter


def test_while_the_second_connection_is_behind_the_exporting_one_builds_ahead_with_the_same_result(
    tmp_path, make_db, rows, monkeypatch
):
    # The second connection builds nothing until the exporting one has built a chunk ahead
    # (the one after those queued there): the exporting connection must then use its own
    # image when it gets there, and every chunk must still be the one a single connection makes.
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("BEGIN")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(1, 40_001)])
    a.execute("COMMIT")
    export_bundle(a, tmp_path / "settles.bundle")
    real_sql_image = bundle.sql_image
    by_exporter = second_connection_behind(monkeypatch, a)
    exported = export_bundle(a, tmp_path / "two.bundle")
    monkeypatch.setattr(bundle, "sql_image", real_sql_image)
    first = min(by_exporter)
    assert by_exporter[:2] == [first, first + 3 * bundle.CHUNK_OPS]  # its own chunk, then one ahead
    assert len(chunks(tmp_path / "two.bundle")) == 8 > len(by_exporter)
    a.execute("BEGIN")
    export_bundle(a, tmp_path / "one.bundle")
    a.execute("ROLLBACK")
    assert chunks(tmp_path / "two.bundle") == chunks(tmp_path / "one.bundle")
    assert import_bundle(b, str(tmp_path / "two.bundle")).applied == exported.operations == 40_000
    assert rows(b) == rows(a)


def peers_opened(monkeypatch) -> list:
    """What each export's ``PeerBuilder.open`` returned (None: refused), in order."""
    opened, real_open = [], bundle.PeerBuilder.open
    monkeypatch.setattr(bundle.PeerBuilder, "open", lambda conn, *args: opened.append(real_open(conn, *args)) or opened[-1])
    return opened


def settled_wal_log(tmp_path, make_db, n: int) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    """``a.db`` in WAL mode with ``n`` todos, exported once (which settles their clocks), and an
    empty ``b.db``."""
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("PRAGMA journal_mode = WAL")
    a.execute("BEGIN")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(1, n + 1)])
    a.execute("COMMIT")
    export_bundle(a, tmp_path / "settles.bundle")
    return a, b


def test_only_an_export_that_holds_the_write_lock_builds_on_a_second_connection(tmp_path, make_db, rows, monkeypatch):
    # A read-only connection's BEGIN IMMEDIATE takes no write lock: in WAL mode another
    # connection may commit (a compaction, say) between its snapshot and a second
    # connection's, so such an export must build every chunk itself.
    a, b = settled_wal_log(tmp_path, make_db, 12_000)
    opened = peers_opened(monkeypatch)
    export_bundle(a, tmp_path / "writable.bundle")
    assert len(opened) == 1 and opened[0] is not None
    read_only = sqlite3.connect(f"{(tmp_path / 'a.db').as_uri()}?mode=ro", uri=True, isolation_level=None)
    exported = export_bundle(read_only, tmp_path / "read-only.bundle")
    read_only.close()
    assert len(opened) == 1
    assert chunks(tmp_path / "read-only.bundle") == chunks(tmp_path / "writable.bundle")
    assert import_bundle(b, str(tmp_path / "read-only.bundle")).applied == exported.operations == 12_000
    assert rows(b) == rows(a)


def test_a_hub_export_on_a_read_only_connection_builds_on_two_and_lets_writers_in_once_both_read(
    tmp_path, make_db, rows, monkeypatch
):
    # A hub exports on a read-only connection, without repair. Writers are held off only until
    # the second connection has begun reading: a push that commits during the export goes in
    # at once and is not in the bundle, which is the one a single connection makes.
    a, b = settled_wal_log(tmp_path, make_db, 30_000)
    hub = sqlite3.connect(f"{(tmp_path / 'a.db').as_uri()}?mode=ro", uri=True, isolation_level=None)
    hub.row_factory = sqlite3.Row  # as Datasette's connections have it
    hub.execute("BEGIN")  # inside the caller's transaction: one connection, row by row
    export_bundle(hub, tmp_path / "one.bundle", repair=False)
    hub.execute("ROLLBACK")
    pusher = sqlite3.connect(tmp_path / "a.db", isolation_level=None, timeout=0)
    opened, pushed = [], []
    real_open, real_take = bundle.PeerBuilder.open, bundle.PeerBuilder.take

    def open_while_writers_wait(conn, *args):
        with pytest.raises(sqlite3.OperationalError, match="database is locked"):
            pusher.execute("INSERT INTO todos VALUES (30002, 'too early', 0, 0)")
        opened.append(real_open(conn, *args))
        return opened[-1]

    monkeypatch.setattr(bundle.PeerBuilder, "open", open_while_writers_wait)

    def take(self, op, tid):
        if not pushed:  # fails (database is locked) if writers are still held off
            pusher.execute("INSERT INTO todos VALUES (30001, 'pushed meanwhile', 0, 0)")
            pushed.append(op)
        return real_take(self, op, tid)

    monkeypatch.setattr(bundle.PeerBuilder, "take", take)
    exported = export_bundle(hub, tmp_path / "two.bundle", repair=False)
    assert len(opened) == 1 and opened[0] is not None and pushed
    assert exported.operations == 30_000
    assert chunks(tmp_path / "two.bundle") == chunks(tmp_path / "one.bundle")
    # While a writer is at work: no second connection, and no waiting for the writer.
    pusher.execute("BEGIN IMMEDIATE")
    assert export_bundle(hub, tmp_path / "busy.bundle", repair=False).operations == 30_001
    pusher.execute("ROLLBACK")
    assert len(opened) == 1
    hub.close()
    pusher.close()
    assert import_bundle(b, str(tmp_path / "two.bundle")).applied == 30_000
    assert rows(b) == rows(a)[:-1] and rows(a)[-1][2:4] == ("pushed meanwhile", "text")


def test_a_hub_export_looks_for_unsettled_clocks_after_letting_writers_in(tmp_path, make_db, rows, monkeypatch):
    # Local operations nobody settled yet (written past the engine, as Datasette's row API
    # does) are sent with settled clocks; finding them scans each of them, so writers must
    # not wait for it (it held them off for 0.53 s of a 0.80 s export of 1M ops).
    a, b = make_db(tmp_path / "a.db"), make_db(tmp_path / "b.db")
    a.execute("PRAGMA journal_mode = WAL")
    a.execute("BEGIN")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, ?)", [(i, f"todo {i}", i / 4) for i in range(1, 12_001)])
    a.execute("COMMIT")
    pusher = sqlite3.connect(tmp_path / "a.db", isolation_level=None, timeout=0)
    real_unsettled = api.unsettled_clocks

    def while_a_push_commits(conn):
        pusher.execute("INSERT INTO todos VALUES (20000, 'pushed meanwhile', 0, 0)")  # database is locked if held off
        return real_unsettled(conn)

    opened = peers_opened(monkeypatch)
    monkeypatch.setattr(api, "unsettled_clocks", while_a_push_commits)
    hub = sqlite3.connect(f"{(tmp_path / 'a.db').as_uri()}?mode=ro", uri=True, isolation_level=None)
    hub.row_factory = sqlite3.Row
    assert export_bundle(hub, tmp_path / "hub.bundle", repair=False).operations == 12_000
    hub.close()
    pusher.close()
    assert len(opened) == 1 and opened[0] is not None
    assert import_bundle(b, str(tmp_path / "hub.bundle")).applied == 12_000
    assert rows(b) == rows(a)[:-1]


def test_an_export_of_an_immutable_file_takes_no_lock_and_builds_on_two(tmp_path, make_db, rows, monkeypatch):
    # Datasette opens a file served with -i as immutable=1: nothing writes it, so no writer is
    # held off, and the second connection is opened the same way. A lock connection would
    # open it for writing: here, where a WAL was left beside it (its writer died), that
    # checkpointed the WAL into the file mid-export and deleted it.
    a, b = settled_wal_log(tmp_path, make_db, 12_000)
    a.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    a.execute("PRAGMA wal_autocheckpoint = 0")
    a.execute("INSERT INTO todos VALUES (12001, 'only in the WAL', 0, 0)")
    for suffix in ("", "-wal"):
        shutil.copyfile(tmp_path / f"a.db{suffix}", tmp_path / f"served.db{suffix}")
    a.close()
    files = lambda: {p.name: p.read_bytes() for p in tmp_path.glob("served.db*")}  # noqa: E731
    before = files()
    opened = peers_opened(monkeypatch)
    served = sqlite3.connect(f"{(tmp_path / 'served.db').as_uri()}?immutable=1", uri=True, isolation_level=None)
    served.row_factory = sqlite3.Row
    assert export_bundle(served, tmp_path / "served.bundle", repair=False, immutable=True).operations == 12_000
    served.execute("BEGIN")  # inside the caller's transaction: one connection
    export_bundle(served, tmp_path / "one.bundle", repair=False, immutable=True)
    served.execute("ROLLBACK")
    served.close()
    assert len(opened) == 1 and opened[0] is not None
    assert files() == before and "served.db-wal" in before
    # What the file holds, not its WAL: the second connection read what the first one did.
    assert chunks(tmp_path / "served.bundle") == chunks(tmp_path / "one.bundle")
    assert import_bundle(b, str(tmp_path / "served.bundle")).applied == 12_000
    assert rows(b)[-1][:2] == (12_000, "integer")


def test_a_guess_among_another_tables_operations_is_dropped_not_an_error(tmp_path, make_db, rows, monkeypatch):
    # While the second connection is behind, the exporting one builds the next guess itself.
    # After a run of todos comes a stretch of more than 5,000 notes: a guess inside it holds
    # no op of todos. It is dropped (it was a TypeError, a 500 on a hub), and the bundle is
    # still the one a single connection makes.
    schema = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT);CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)"
    a = make_db(tmp_path / "a.db", schema, ("todos", "notes"))
    b = make_db(tmp_path / "b.db", schema, ("todos", "notes"))
    a.execute("BEGIN")
    a.executemany("INSERT INTO todos VALUES (?, ?)", [(i, f"todo {i}") for i in range(1, 6_001)])
    a.executemany("INSERT INTO notes VALUES (?, ?)", [(i, f"note {i}") for i in range(1, 20_001)])
    a.executemany("INSERT INTO todos VALUES (?, ?)", [(i, f"todo {i}") for i in range(6_001, 7_001)])
    a.execute("COMMIT")
    export_bundle(a, tmp_path / "settles.bundle")
    a.execute("BEGIN")  # inside the caller's transaction: one connection
    export_bundle(a, tmp_path / "one.bundle", repair=False)
    a.execute("ROLLBACK")
    hub = sqlite3.connect(f"{(tmp_path / 'a.db').as_uri()}?mode=ro", uri=True, isolation_level=None)
    hub.row_factory = sqlite3.Row
    by_exporter = second_connection_behind(monkeypatch, hub)  # the one ahead lies among the notes
    assert export_bundle(hub, tmp_path / "two.bundle", repair=False).operations == 27_000
    hub.close()
    first = min(by_exporter)
    assert first + 6_000 < by_exporter[1] < first + 26_000  # a guess in the notes' stretch
    assert chunks(tmp_path / "two.bundle") == chunks(tmp_path / "one.bundle")
    assert import_bundle(b, str(tmp_path / "two.bundle")).applied == 27_000
    assert rows(b, "notes") == rows(a, "notes") and rows(b) == rows(a)


TABLES = ("todos", "notes", "tags")
SCHEMA = ";".join(f"CREATE TABLE {t} (id INTEGER PRIMARY KEY, body TEXT)" for t in TABLES)
STEP = st.tuples(st.sampled_from(TABLES), st.sampled_from(["insert", "update", "delete"]), st.integers(1, 90))


def write(conn: sqlite3.Connection, table: str, action: str, n: int, next_id: dict) -> None:
    if action == "insert":
        rows = [(i, f"{table} {i}") for i in range(next_id[table], next_id[table] + n)]
        conn.executemany(f"INSERT INTO {table} VALUES (?, ?)", rows)
        next_id[table] += n
    elif action == "update":
        conn.execute(f"UPDATE {table} SET body = body || '+' WHERE id IN (SELECT id FROM {table} ORDER BY id LIMIT ?)", [n])
    else:
        conn.execute(f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table} ORDER BY id DESC LIMIT ?)", [n])


@settings(max_examples=int(os.environ.get("CONNECTION_EXAMPLES", "30")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    theirs=st.lists(STEP, max_size=4),
    steps=st.lists(STEP, min_size=1, max_size=12),
    since_after=st.none() | st.integers(0, 11),
    compact=st.booleans(),
    tables=st.none() | st.sets(st.sampled_from(TABLES), min_size=1, max_size=2),
    slow=st.sampled_from(["peer", "exporting", None]),
    partial=st.booleans(),
)
def test_a_bundle_built_on_two_connections_is_the_one_one_connection_makes(
    tmp_path_factory, make_db, rows, theirs, steps, since_after, compact, tables, slow, partial
):
    # Chunks of 20 operations instead of 5,000, so that small logs have many chunks, guesses
    # and ahead builds: runs of several tables, long and short, updates and deletes, holes
    # that compaction leaves, another device's operations, deltas, bundles of some tables,
    # either connection the slower, and exports from a partial copy (which withholds tags).
    folder = tmp_path_factory.mktemp("connections")
    a, b = make_db(folder / "a.db", SCHEMA, TABLES), make_db(folder / "b.db", SCHEMA, TABLES)
    a.execute("PRAGMA journal_mode = WAL")
    their_ids = dict.fromkeys(TABLES, 10_000)
    for table, action, n in theirs:
        write(b, table, action, n, their_ids)
    export_bundle(b, folder / "theirs.bundle")
    import_bundle(a, str(folder / "theirs.bundle"))
    next_id, since = dict.fromkeys(TABLES, 1), None
    for position, (table, action, n) in enumerate(steps):
        if since_after == position:
            since = sync_status(a)["clock"]
        write(a, table, action, n, next_id)
    if compact:
        compact_log(a)
    export_bundle(a, folder / "settles.bundle")
    source = folder / "a.db"
    if partial:
        export_bundle(a, folder / "partial.bundle", tables=["todos", "notes"])
        a = sqlite3.connect(folder / "p.db", isolation_level=None)
        import_bundle(a, str(folder / "partial.bundle"), create_tables=True, adopt_scope=True)
        a.execute("PRAGMA journal_mode = WAL")
        export_bundle(a, folder / "settles.bundle")
        source, tables = folder / "p.db", tables and (set(tables) - {"tags"} or None)
    real_image, real_open, opened = bundle.sql_image, bundle.PeerBuilder.open, []

    def open_peer(conn, *args):
        opened.append(real_open(conn, *args))
        return opened[-1]

    def image(conn, *args, **kwargs):
        on_peer = threading.current_thread() is not threading.main_thread()
        if slow == ("peer" if on_peer else "exporting"):
            threading.Event().wait(0.002)
        return real_image(conn, *args, **kwargs)

    with mock.patch.object(bundle, "CHUNK_OPS", 20), mock.patch.object(api, "CHUNK_OPS", 20), \
            mock.patch.object(bundle, "SMALL_RUN", 4), mock.patch.object(bundle, "sql_image", image), \
            mock.patch.object(bundle.PeerBuilder, "open", open_peer):
        a.execute("BEGIN")  # inside the caller's transaction: one connection, row by row
        one = export_bundle(a, folder / "one.bundle", since=since, tables=tables, repair=False, unknown_tables=True)
        a.execute("ROLLBACK")
        export_bundle(a, folder / "locked.bundle", since=since, tables=tables, unknown_tables=True)
        hub = sqlite3.connect(f"{source.as_uri()}?mode=ro", uri=True, isolation_level=None)
        hub.row_factory = sqlite3.Row
        export_bundle(hub, folder / "hub.bundle", since=since, tables=tables, repair=False, unknown_tables=True)
        hub.close()
    made = chunks(folder / "one.bundle")
    if one.operations > 20:  # the locked export's and the hub's second connections both read
        assert len(opened) == 2 and None not in opened
    assert chunks(folder / "locked.bundle") == made
    assert chunks(folder / "hub.bundle") == made
    if since is None and tables is None and not partial:
        c = make_db(folder / "c.db", SCHEMA, TABLES)
        import_bundle(c, str(folder / "hub.bundle"))
        for table in TABLES:
            assert rows(c, table) == rows(a, table)
