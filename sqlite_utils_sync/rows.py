"""Reading and writing user-table rows while merging: one row at a time, by row key, and the
settling of rows whose UNIQUE values move from row to row."""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

from . import errors
from .capture import SyncedTable, secondary_unique_columns, table_info
from .errors import BundleError
from .oplog import RawText, marker, parse_rowkey
from .schema import quote_identifier
from .merge import Effect, all_effects, latest_writers
from .transaction import attempt


def key_values(rowkey: str) -> list[Any]:
    """A row key's primary-key values."""
    if isinstance(rowkey, RawText):
        raise BundleError(errors.INVALID_TEXT, "a primary key holds TEXT that is not valid UTF-8, which sync cannot match")
    return parse_rowkey(rowkey)


def key_slots(table: SyncedTable, rowkey: str) -> dict[int, Any]:
    """A row's primary-key values by slot: what a delete operation carries."""
    return {table.slots[c]: v for c, v in zip(table.pk, key_values(rowkey))}


def pk_where(table: SyncedTable) -> str:
    """``WHERE`` terms matching one row by its primary-key values."""
    return " AND ".join(f"{quote_identifier(c)} IS ?" for c in table.pk)


def fetch_row(conn: sqlite3.Connection, table: SyncedTable, rowkey: str) -> dict[str, Any] | None:
    cursor = conn.execute(f"SELECT * FROM {quote_identifier(table.name)} WHERE {pk_where(table)}", key_values(rowkey))
    row = cursor.fetchone()
    return None if row is None else dict(zip([d[0] for d in cursor.description], row))


def write_row(
    conn: sqlite3.Connection,
    table: SyncedTable,
    rowkey: str,
    exists: bool,
    values: dict[str, Any],
    present: bool,
    info: list[tuple] | None = None,
) -> None:
    """Make the table's row match: delete it, insert it, or update the given columns.

    :param info: the table's ``PRAGMA table_xinfo`` rows, when the caller has them (an import
        reads them once per table rather than once per row)
    """
    t = quote_identifier(table.name)
    pk_values = key_values(rowkey)
    where = pk_where(table)
    if not exists:
        if present:
            conn.execute(f"DELETE FROM {t} WHERE {where}", pk_values)
        return
    if present:
        # Primary-key columns are written too: 1 and 1.0 are one key, but the type must follow
        # the latest writer.
        if values:
            conn.execute(
                f"UPDATE {t} SET {', '.join(f'{quote_identifier(c)} = {marker(v)}' for c, v in values.items())} "
                f"WHERE {where}",
                [*values.values(), *pk_values],
            )
        return
    # Columns no operation wrote are NULL, never the DEFAULT: a copy that got the column later
    # (ALTER, import --alter) has NULL there, and so does what the log implies. A NOT NULL
    # column can't be, and takes its DEFAULT (copies must declare it alike).
    row = {
        column[1]: None
        for column in (info if info is not None else table_info(conn, table.name))
        if not (column[3] and column[4] is not None)
    }
    row.update(values)
    for column, value in zip(table.pk, pk_values):
        if row.get(column) is None:
            row[column] = value
    conn.execute(
        f"INSERT INTO {t} ({', '.join(quote_identifier(c) for c in row)}) "
        f"VALUES ({', '.join(marker(v) for v in row.values())})",
        list(row.values()),
    )


UNCHANGED: Any = object()


def apply_row(
    conn: sqlite3.Connection,
    table: SyncedTable,
    rowkey: str,
    effects: list[Effect],
    before: Any = UNCHANGED,
    info: list[tuple] | None = None,
) -> None:
    """Bring one row up to date given the new operations on it and the concurrent old ones.

    :param before: the row as it was before this import, when the table no longer shows it
        (after a replay, which may have written any new operation's value, the winner's or
        not); the row is then written whole
    :param info: the table's ``PRAGMA table_xinfo`` rows (see :func:`write_row`)
    """
    current = fetch_row(conn, table, rowkey)
    replayed = before is not UNCHANGED
    if not replayed:
        before = current
    columns = [column[1] for column in info] if info is not None else table.current_columns(conn)
    names = table.slot_names(columns)
    latest = effects[-1]
    exists = latest.write if latest.new else before is not None
    if not exists:
        write_row(conn, table, rowkey, False, {}, current is not None, info)
        return
    if before is None:
        # Coming (back) into existence: the row's history decides every column. A new effect
        # sorts after all the history left out of ``effects`` (its author had seen it); an old
        # concurrent one need not. So new effects decide alone where they are the latest writers.
        writers = latest_writers(effects)
        if any(slot not in writers or not writers[slot].new for slot in names):
            writers = latest_writers(all_effects(conn, table, rowkey))
        final = {names[s]: e.values[s] for s, e in writers.items() if s in names}
    else:
        final = dict(before) if replayed else {}
        final.update({names[s]: e.values[s] for s, e in latest_writers(effects).items() if e.new and s in names})
    if replayed and current is not None:
        final = {column: final.get(column) for column in columns}
    write_row(conn, table, rowkey, True, final, current is not None, info)


PendingWrite = tuple[SyncedTable, str, set[str], Callable[[], Any]]  # table, row key, columns it writes, the write


def settle(conn: sqlite3.Connection, writes: list[PendingWrite]) -> None:
    """Bring rows to their final state when their UNIQUE values may move from row to row.

    Unless they all go in at once, each write runs in its own savepoint, in rounds: one that
    meets a value another pending row still holds waits for the next round. When a round moves
    nothing, the pending rows hand values to each other in a cycle (a swap, a rotation, however
    it was logged): their UNIQUE values are set aside and the rounds go on. Fails with the first
    constraint error only when nothing is left to set aside, that is when the final state itself
    breaks a constraint. Call with capture muted: the values set aside are never operations.
    """
    if not attempt(conn, lambda: [write[3]() for write in writes]):
        return  # the common case: no value had to wait, and one savepoint did
    set_aside_rows: set[tuple[int, str]] = set()
    referring: list[tuple] = []  # rows a foreign key updated along with a value set aside
    pending = writes
    while pending:
        failures = [(write, attempt(conn, write[3])) for write in pending]
        blocked = [write for write, failure in failures if failure]
        if blocked and len(blocked) == len(pending):
            stuck = [w for w in blocked if (w[0].tid, w[1]) not in set_aside_rows]
            if not stuck:
                raise next(failure for _, failure in failures if failure)
            for table, rowkey, columns, _ in stuck:
                referring.extend(set_aside(conn, table, rowkey, columns))
                set_aside_rows.add((table.tid, rowkey))
        pending = blocked
    if referring:
        # ON UPDATE CASCADE passed the values set aside on to rows that refer to them. Those
        # rows' own operations decide them: put back what they held, then write every row of
        # this settling once more (each write is its row's final state; one that inserted a
        # row fails the second time, harmlessly).
        for child, rowid, columns, values in referring:
            assignments = ", ".join(f"{quote_identifier(c)} = ?" for c in columns)
            conn.execute(f"UPDATE {quote_identifier(child)} SET {assignments} WHERE rowid = ?", [*values, rowid])
        for write in writes:
            attempt(conn, write[3])


def referring_rows(conn: sqlite3.Connection, table: SyncedTable, rowkey: str, columns: set[str]) -> list[tuple]:
    """Rows of rowid tables whose foreign key cascades updates of ``columns`` of this row:
    ``(table, rowid, their key columns, the values they hold)``."""
    found = []
    # A WITHOUT ROWID table has no rowid to put its values back by: its rows are left out.
    tables = "SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'table' AND NOT wr"
    for (child,) in conn.execute(tables).fetchall():
        keys: dict[int, list[tuple[str, str]]] = {}
        for fk in conn.execute(f"PRAGMA foreign_key_list({quote_identifier(child)})").fetchall():
            if fk[2].lower() == table.name.lower() and fk[5].upper() == "CASCADE" and fk[4] is not None:
                keys.setdefault(fk[0], []).append((fk[3], fk[4]))
        for pairs in keys.values():
            if not columns & {to for _, to in pairs}:
                continue
            mine = fetch_row(conn, table, rowkey) or {}
            where = " AND ".join(f"{quote_identifier(f)} = ?" for f, _ in pairs)
            select = ", ".join(quote_identifier(f) for f, _ in pairs)
            for rowid, *values in conn.execute(
                f"SELECT rowid, {select} FROM {quote_identifier(child)} WHERE {where}", [mine.get(to) for _, to in pairs]
            ).fetchall():
                found.append((child, rowid, [f for f, _ in pairs], values))
    return found


def set_aside(conn: sqlite3.Connection, table: SyncedTable, rowkey: str, columns: set[str]) -> list[tuple]:
    """Give a row's UNIQUE values among ``columns`` (its next write sets them again) values no
    other row can hold: NULL (NULLs never collide under UNIQUE), or in a NOT NULL column a value
    made from the row's own key. A composite constraint is freed by one of its columns."""
    aside = set()
    for index in secondary_unique_columns(conn, table.name):
        # An expression in the index (lower(code)) hides its columns: set aside every one written.
        aside |= columns if None in index else columns & set(index)
    aside -= set(table.pk)
    if not aside:
        return []
    info = {row[1]: row for row in table_info(conn, table.name)}
    strict = conn.execute(
        "SELECT strict FROM pragma_table_list(?) WHERE schema = 'main' AND name = ?", [table.name, table.name]
    ).fetchone()
    t = quote_identifier(table.name)
    assignments, params = [], []
    for column in sorted(aside):
        q = quote_identifier(column)
        affinity = (info[column][2] or "").upper() if strict and strict[0] else "BLOB"
        if not info[column][3]:
            assignments.append(f"{q} = NULL")
        elif affinity in ("INT", "INTEGER", "REAL"):
            assignments.append(f"{q} = (SELECT coalesce(min({q}), 0) - 1 FROM {t})")  # a STRICT number
        else:
            # A BLOB is stored as it is under any affinity and never equals a TEXT value.
            placeholder = f"datasette-sync: set aside {rowkey}"
            assignments.append(f"{q} = ?")
            params.append(placeholder if affinity == "TEXT" else placeholder.encode())
    referring = referring_rows(conn, table, rowkey, aside)
    # A CHECK constraint may refuse the placeholder: the write then fails as it did before.
    failed = attempt(
        conn,
        lambda: conn.execute(
            f"UPDATE {t} SET {', '.join(assignments)} WHERE {pk_where(table)}", [*params, *parse_rowkey(rowkey)]
        ),
    )
    return [] if failed else referring
