"""A new device in one command: ``import-bundle`` and ``sync`` on a database that does not exist
yet create it with the sender's tables (declared types, primary key, WITHOUT ROWID) and sync
them; ``--alter`` creates tables the same way; every result says what it did.

Real files, the real ``sqlite-utils`` CLI, a real ``datasette serve`` hub.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from sqlite_utils_sync import import_bundle
from sqlite_utils_sync.declared import canonical_literal, is_default_literal, is_type_name
from sqlite_utils_sync.errors import BundleError

SCHEMA = (
    "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL, tag VARCHAR(20));"
    "CREATE TABLE notes (book TEXT, page INTEGER, body, PRIMARY KEY (book, page)) WITHOUT ROWID"
)


@pytest.fixture
def laptop(tmp_path, make_db):
    conn = make_db(tmp_path / "laptop.db", SCHEMA, ("todos", "notes"))
    conn.executemany("INSERT INTO todos VALUES (?, ?, ?, ?, ?)", [(i, f"todo {i}", i % 2, i / 4, "t") for i in range(1, 5)])
    conn.execute("INSERT INTO notes VALUES ('b', 1, x'00ff')")
    return conn


def declared(conn: sqlite3.Connection, table: str) -> list[tuple]:
    """(name, declared type, position in the primary key) of each column."""
    return [(r[1], r[2], r[5]) for r in conn.execute(f"PRAGMA table_info({table})")]


def without_rowid(conn: sqlite3.Connection, table: str) -> bool:
    return bool(conn.execute("SELECT wr FROM pragma_table_list WHERE name = ?", [table]).fetchone()[0])


def same_tables(a: sqlite3.Connection, b: sqlite3.Connection, rows) -> None:
    for table in ("todos", "notes"):
        assert declared(b, table) == declared(a, table)
        assert without_rowid(b, table) == without_rowid(a, table)
        assert rows(b, table) == rows(a, table)


def test_import_bundle_creates_a_missing_database_with_the_senders_tables(tmp_path, laptop, run, run_json, rows):
    run(["sqlite-utils", "export-bundle", tmp_path / "laptop.db", tmp_path / "first.bundle"])
    phone_path = tmp_path / "phone.db"
    result = run_json(["sqlite-utils", "import-bundle", phone_path, tmp_path / "first.bundle", "--json"])
    assert result["tables_created"] == ["todos", "notes"]
    assert result["applied_by_table"] == {"todos": 4, "notes": 1}
    assert result["applied"] == 5 and result["skipped"] is False and result["columns_added"] == {}
    phone = sqlite3.connect(phone_path, isolation_level=None)
    same_tables(laptop, phone, rows)
    status = run_json(["sqlite-utils", "sync-status", phone_path, "--json"])
    assert sorted(status["tables"]) == ["notes", "todos"]
    # The new device's own edits sync back.
    phone.execute("UPDATE todos SET title = 'from the phone' WHERE id = 2")
    run(["sqlite-utils", "export-bundle", phone_path, tmp_path / "back.bundle"])
    run(["sqlite-utils", "import-bundle", tmp_path / "laptop.db", tmp_path / "back.bundle"])
    assert rows(laptop) == rows(phone)


def test_a_synced_table_with_no_rows_yet_reaches_a_new_copy(tmp_path, laptop, run, run_json, rows):
    # A full export names every synced table, those nobody wrote to yet too.
    laptop.execute("CREATE TABLE tags (name TEXT PRIMARY KEY, colour VARCHAR(7))")
    run(["sqlite-utils", "enable-sync", tmp_path / "laptop.db", "tags"])
    run(["sqlite-utils", "export-bundle", tmp_path / "laptop.db", tmp_path / "first.bundle"])
    phone_path = tmp_path / "phone.db"
    result = run_json(["sqlite-utils", "import-bundle", phone_path, tmp_path / "first.bundle", "--json"])
    assert result["tables_created"] == ["todos", "notes", "tags"]
    assert result["applied_by_table"] == {"todos": 4, "notes": 1}
    phone = sqlite3.connect(phone_path, isolation_level=None)
    assert declared(phone, "tags") == declared(laptop, "tags") == [("name", "TEXT", 1), ("colour", "VARCHAR(7)", 0)]
    # It is synced there: the phone's first tag reaches the laptop without --alter.
    phone.execute("INSERT INTO tags VALUES ('home', '#00ff00')")
    run(["sqlite-utils", "export-bundle", phone_path, tmp_path / "back.bundle"])
    run(["sqlite-utils", "import-bundle", tmp_path / "laptop.db", tmp_path / "back.bundle"])
    assert rows(laptop, "tags") == rows(phone, "tags") == [("home", "text", "#00ff00", "text")]


def test_import_bundle_says_what_it_created(tmp_path, laptop, run):
    run(["sqlite-utils", "export-bundle", tmp_path / "laptop.db", tmp_path / "first.bundle"])
    out = run(["sqlite-utils", "import-bundle", tmp_path / "phone.db", tmp_path / "first.bundle"]).stderr
    assert out == "Created tables todos, notes, synced from now on. Applied 5 operations: todos 4, notes 1.\n"
    again = run(["sqlite-utils", "import-bundle", tmp_path / "phone.db", tmp_path / "first.bundle", "--json"])
    assert json.loads(again.stdout)["skipped"] is True  # nothing at all happened


def test_an_empty_database_is_new_too_and_an_unsynced_one_is_not(tmp_path, laptop, run, rows):
    run(["sqlite-utils", "export-bundle", tmp_path / "laptop.db", tmp_path / "first.bundle"])
    run(["sqlite-utils", "create-database", tmp_path / "empty.db"])
    run(["sqlite-utils", "import-bundle", tmp_path / "empty.db", tmp_path / "first.bundle"])
    same_tables(laptop, sqlite3.connect(tmp_path / "empty.db"), rows)
    # A database of its own tables creates nothing without --alter: the operations are kept.
    run(["sqlite-utils", "create-table", tmp_path / "own.db", "other", "id", "integer", "--pk", "id"])
    result = json.loads(run(["sqlite-utils", "import-bundle", tmp_path / "own.db", tmp_path / "first.bundle", "--json"]).stdout)
    assert result["tables_created"] == [] and result["not_applied"] == {"todos": 4, "notes": 1}


def test_a_failed_import_into_a_missing_file_leaves_no_file(tmp_path, laptop, run, craft):
    bundle = tmp_path / "first.bundle"
    run(["sqlite-utils", "export-bundle", tmp_path / "laptop.db", bundle])
    craft.rewrite(bundle, lambda c: (c.execute("UPDATE bundle_meta SET value = 'x' WHERE key = 'sha256'")))
    for path in (bundle, tmp_path / "missing.bundle"):
        result = run(["sqlite-utils", "import-bundle", tmp_path / "phone.db", path], check=False)
        assert result.returncode == 1 and result.stderr.startswith("Error: Bundle ") and result.stderr.count("\n") == 1
        assert not (tmp_path / "phone.db").exists()
        assert not (tmp_path / "phone.db-journal").exists()


@pytest.mark.parametrize(
    "declared_type",
    [
        "TEXT NOT NULL",
        "TEXT DEFAULT 1",
        "TEXT COLLATE NOCASE",
        "TEXT UNIQUE",
        "INTEGER REFERENCES todos",
        "TEXT GENERATED ALWAYS AS (1)",
        "TEXT) WITHOUT ROWID; --",
        "TEXT, x TEXT",
        'TEXT "quoted"',
        "T" * 65,
        5,
        None,
    ],
)
def test_hostile_declared_types_are_refused_and_change_nothing(tmp_path, laptop, run, craft, file_bytes, declared_type):
    check_header_edit_refused(
        tmp_path, run, craft, file_bytes,
        lambda h: h["column_types"]["todos"].__setitem__("title", declared_type),
        "column 'title' of table 'todos' has an invalid declared type",
    )


@pytest.mark.parametrize("strict", [["todos"], "todos", [1]])
def test_a_hostile_strict_list_is_refused_and_changes_nothing(tmp_path, laptop, run, craft, file_bytes, strict):
    # todos declares VARCHAR(20), which a STRICT table cannot have; the list must be of names.
    error = "table 'todos' is declared STRICT with a type a STRICT table cannot have" if strict == ["todos"] else "strict list is invalid"
    check_header_edit_refused(tmp_path, run, craft, file_bytes, lambda h: h.__setitem__("strict", strict), error)


@pytest.mark.parametrize("unaliased", ["todos", [None], {"todos": 1}])
def test_a_hostile_unaliased_keys_list_is_refused_and_changes_nothing(tmp_path, laptop, run, craft, file_bytes, unaliased):
    check_header_edit_refused(
        tmp_path, run, craft, file_bytes, lambda h: h.__setitem__("unaliased_keys", unaliased), "unaliased_keys list is invalid"
    )


def test_an_unaliased_keys_entry_for_a_table_without_an_integer_key_changes_nothing(tmp_path, make_db, run, craft):
    # Only a one-column INTEGER key of a rowid table can be no alias; elsewhere the entry is moot.
    make_db(tmp_path / "a.db", "CREATE TABLE t (id TEXT PRIMARY KEY, v)", ("t",)).execute("INSERT INTO t VALUES ('k', 1)")
    bundle = tmp_path / "a.bundle"
    run(["sqlite-utils", "export-bundle", tmp_path / "a.db", bundle])

    def tamper(conn):
        craft.edit_header(conn, lambda h: h.__setitem__("unaliased_keys", ["t"]))
        craft.reseal(conn)

    craft.rewrite(bundle, tamper)
    run(["sqlite-utils", "import-bundle", tmp_path / "b.db", bundle])
    b = sqlite3.connect(tmp_path / "b.db")
    assert b.execute("SELECT * FROM t").fetchall() == [("k", 1)]
    assert [r[1:3] + r[5:] for r in b.execute("PRAGMA table_info(t)")] == [("id", "TEXT", 1), ("v", "", 0)]


def check_header_edit_refused(tmp_path, run, craft, file_bytes, edit, error: str) -> None:
    """A laptop bundle whose header ``edit`` changed (and resealed) is refused with ``error``:
    no new database is made, and an existing one is left byte for byte as it was, also with
    --alter."""
    bundle = tmp_path / "first.bundle"
    run(["sqlite-utils", "export-bundle", tmp_path / "laptop.db", bundle])

    def tamper(conn):
        craft.edit_header(conn, edit)
        craft.reseal(conn)

    craft.rewrite(bundle, tamper)
    result = run(["sqlite-utils", "import-bundle", tmp_path / "phone.db", bundle], check=False)
    assert result.returncode == 1
    assert result.stderr == f"Error: Bundle first.bundle: {error}\n"
    assert not (tmp_path / "phone.db").exists()
    run(["sqlite-utils", "create-database", tmp_path / "other.db"])
    run(["sqlite-utils", "create-table", tmp_path / "other.db", "t", "id", "integer", "--pk", "id"])
    before = file_bytes(tmp_path / "other.db")
    with pytest.raises(BundleError) as raised:
        import_bundle(sqlite3.connect(tmp_path / "other.db"), bundle, alter=True)
    assert raised.value.reason == "invalid_metadata"
    assert file_bytes(tmp_path / "other.db") == before


@pytest.mark.parametrize(
    "default",
    [
        "'x'); DROP TABLE todos; --",
        "'a' || 'b'",
        "CURRENT_TIMESTAMP",
        "(1)",
        "1 COLLATE NOCASE",
        "'unterminated",
        "'nul\x00'",
        "x'0'",
        "0x11111111111111111",  # SQLite: hex literal too big
        "TRUE",  # senders send it as 1
        "'" + "x" * 1000 + "'",
        "",
        7,
        None,
    ],
)
def test_hostile_not_null_defaults_are_refused_and_change_nothing(tmp_path, laptop, run, craft, file_bytes, default):
    check_header_edit_refused(
        tmp_path, run, craft, file_bytes,
        lambda h: h.__setitem__("not_null_defaults", {"todos": {"title": default}}),
        "column 'title' of table 'todos' has an invalid NOT NULL default",
    )


def test_defaults_as_sqlite_keeps_them_are_sent_as_literals_of_the_same_value():
    conn = sqlite3.connect(":memory:")
    forms = ["TRUE", "false", '"it""s"', "(('x'))", "- 1", "+ 'x'", "abc", "0x00000000000000001", "X'00ff'", "-2.5e3"]
    for form in forms:
        literal = canonical_literal(form)
        assert literal is not None and is_default_literal(literal), form
        conn.execute(f"CREATE TABLE t (id INTEGER PRIMARY KEY, a NOT NULL DEFAULT {form}, b NOT NULL DEFAULT {literal})")
        conn.execute("INSERT INTO t (id) VALUES (1)")
        kept = conn.execute("SELECT a, typeof(a) FROM t").fetchone()
        assert kept == conn.execute("SELECT b, typeof(b) FROM t").fetchone(), form
        conn.execute("DROP TABLE t")
    for expression in ("CURRENT_TIMESTAMP", "NULL", "(1 + 2)", "'a' || 'b'", "random()"):
        assert canonical_literal(expression) is None, expression


def test_default_literals_senders_use_are_accepted():
    for good in ("0", "-1", "+2.5", "1e10", ".5", "0x1F", "''", "'it''s'", "'two\nlines'", "X'00ff'", "x''"):
        assert is_default_literal(good), good


def test_type_names_senders_use_are_accepted():
    for good in ("", "INTEGER", "TEXT", "REAL", "BLOB", "NUMERIC", "VARCHAR(20)", "DECIMAL(10, 2)", "DECIMAL(10,2)",
                 "unsigned big int", "DOUBLE PRECISION", "DATETIME", "BOOLEAN", "JSON", "CHARACTER (20)"):
        assert is_type_name(good), good


def test_a_bundle_without_types_creates_untyped_columns(tmp_path, laptop, run, craft, rows):
    """Bundles from senders before the types travelled still start a new device."""
    bundle = tmp_path / "old.bundle"
    run(["sqlite-utils", "export-bundle", tmp_path / "laptop.db", bundle])

    def strip(conn):
        craft.edit_header(conn, lambda h: (h.pop("column_types"), h.pop("without_rowid")))
        craft.reseal(conn)

    craft.rewrite(bundle, strip)
    run(["sqlite-utils", "import-bundle", tmp_path / "phone.db", bundle])
    phone = sqlite3.connect(tmp_path / "phone.db")
    assert declared(phone, "todos") == [("id", "", 1), ("title", "", 0), ("done", "", 0), ("score", "", 0), ("tag", "", 0)]
    assert rows(phone) == rows(laptop)


def test_alter_creates_typed_tables_and_adds_typed_columns_and_says_so(tmp_path, laptop, make_db, run, run_json, rows):
    """The issue's case: a table kept for later, then created by --alter, reported truthfully."""
    run(["sqlite-utils", "export-bundle", tmp_path / "laptop.db", tmp_path / "first.bundle"])
    other = make_db(tmp_path / "other.db", "CREATE TABLE notes (book TEXT, page INTEGER, body, PRIMARY KEY (book, page))", ("notes",))
    kept = run_json(["sqlite-utils", "import-bundle", tmp_path / "other.db", tmp_path / "first.bundle", "--json"])
    assert kept["not_applied"] == {"todos": 4} and kept["applied_by_table"] == {"notes": 1}
    altered = run_json(["sqlite-utils", "import-bundle", tmp_path / "other.db", tmp_path / "first.bundle", "--alter", "--json"])
    assert altered["skipped"] is False
    assert altered["tables_created"] == ["todos"] and altered["applied"] == 4
    assert altered["applied_by_table"] == {"todos": 4}
    assert declared(other, "todos") == declared(laptop, "todos")
    assert rows(other) == rows(laptop)
    # A column the sender added arrives with its type.
    laptop.execute("ALTER TABLE todos ADD COLUMN due DATE")
    laptop.execute("UPDATE todos SET due = '2026-12-24' WHERE id = 1")
    run(["sqlite-utils", "export-bundle", tmp_path / "laptop.db", tmp_path / "second.bundle"])
    added = run(["sqlite-utils", "import-bundle", tmp_path / "other.db", tmp_path / "second.bundle", "--alter"]).stderr
    assert added.startswith("Added column todos.due. Applied ")
    assert ("due", "DATE", 0) in declared(other, "todos")
    assert rows(other) == rows(laptop)


@pytest.fixture
def typed_hub(tmp_path, datasette_server, hub_config, make_db, laptop):
    """A hub database ``hub`` holding the laptop's tables, typed, and the laptop's rows."""
    hub = make_db(tmp_path / "hub.db", SCHEMA, ("todos", "notes"))
    hub.close()
    server = datasette_server([tmp_path / "hub.db"], hub_config)
    server.path = tmp_path / "hub.db"
    return server


def test_sync_creates_the_hubs_tables_with_no_rows_yet_in_a_new_copy(tmp_path, datasette_server, hub_config, make_db, run, rows):
    make_db(tmp_path / "hub.db", SCHEMA + ";CREATE TABLE tags (name TEXT PRIMARY KEY, colour TEXT)", ("todos", "notes", "tags")).close()
    hub = datasette_server([tmp_path / "hub.db"], hub_config)
    url, token = hub.url + "/hub", hub.token("alice")
    out = run(["sqlite-utils", "sync", tmp_path / "phone.db", url, "--token", token]).stderr
    assert out.startswith(f"Synced with {url}. Created tables notes, tags, todos, synced from now on.")
    phone = sqlite3.connect(tmp_path / "phone.db", isolation_level=None)
    phone.execute("INSERT INTO tags VALUES ('home', 'green')")
    run(["sqlite-utils", "sync", tmp_path / "phone.db", url, "--token", token])
    hub_conn = sqlite3.connect(tmp_path / "hub.db")
    assert rows(hub_conn, "tags") == [("home", "text", "green", "text")]


def test_sync_creates_a_missing_database_from_a_hub(tmp_path, typed_hub, laptop, run, rows):
    token = typed_hub.token("alice")
    url = typed_hub.url + "/hub"
    run(["sqlite-utils", "sync", tmp_path / "laptop.db", url, "--token", token])
    phone_path = tmp_path / "phone.db"
    out = run(["sqlite-utils", "sync", phone_path, url, "--token", token]).stderr
    assert out.startswith(f"Synced with {url}. Created tables todos, notes, synced from now on. Applied 5 operations: todos 4, notes 1.")
    assert out.count("\n") == 1
    phone = sqlite3.connect(phone_path, isolation_level=None)
    same_tables(laptop, phone, rows)
    phone.execute("INSERT INTO todos VALUES (9, 'phone', 0, 0.5, 'p')")
    run(["sqlite-utils", "sync", phone_path, url, "--token", token])
    run(["sqlite-utils", "sync", tmp_path / "laptop.db", url, "--token", token])
    assert rows(laptop) == rows(phone)
    # A failed sync into a missing file leaves no file.
    failed = run(["sqlite-utils", "sync", tmp_path / "tablet.db", url, "--token", "dstok_wrong"], check=False)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1
    assert not (tmp_path / "tablet.db").exists()


def test_a_default_a_strict_column_cannot_store_is_refused_and_changes_nothing(tmp_path, make_db, run, file_bytes):
    # SQLite takes it in ALTER TABLE; then every row holds 'abc' in an INTEGER column.
    make_db(tmp_path / "a.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, e INTEGER NOT NULL DEFAULT 'abc')", ("t",)).execute(
        "INSERT INTO t VALUES (1, 7)"
    )
    make_db(tmp_path / "b.db", "CREATE TABLE t (id INTEGER PRIMARY KEY) STRICT", ("t",)).execute("INSERT INTO t VALUES (2)")
    run(["sqlite-utils", "export-bundle", tmp_path / "a.db", tmp_path / "a.bundle"])
    before = file_bytes(tmp_path / "b.db")
    result = run(["sqlite-utils", "import-bundle", tmp_path / "b.db", tmp_path / "a.bundle", "--alter"], check=False)
    assert result.returncode == 1
    assert result.stderr == "Error: Bundle a.bundle: column 'e' of table 't' has a default its STRICT type INTEGER cannot store\n"
    assert file_bytes(tmp_path / "b.db") == before


def test_a_strict_table_is_created_as_declared_even_with_a_default_its_type_cannot_store(tmp_path, make_db, run):
    # Creating it so harms nothing (no row holds the default); only ALTER TABLE on rows that
    # exist would store it.
    make_db(tmp_path / "a.db", "CREATE TABLE t (id INTEGER PRIMARY KEY, n INTEGER NOT NULL DEFAULT '') STRICT", ("t",)).execute(
        "INSERT INTO t VALUES (1, 5)"
    )
    run(["sqlite-utils", "export-bundle", tmp_path / "a.db", tmp_path / "a.bundle"])
    run(["sqlite-utils", "import-bundle", tmp_path / "b.db", tmp_path / "a.bundle"])
    assert sqlite3.connect(tmp_path / "b.db").execute("SELECT * FROM t").fetchall() == [(1, 5)]


def test_a_failed_import_into_a_symlink_leaves_the_link(tmp_path, run):
    link = tmp_path / "phone.db"
    link.symlink_to(tmp_path / "not-yet" / "phone.db")  # where the user means to mount a disk, say
    bad = tmp_path / "bad.bundle"
    bad.write_bytes(b"not a bundle at all")
    result = run(["sqlite-utils", "import-bundle", link, bad], check=False)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert link.is_symlink()
