"""Reconciling a table with its log: the changes capture missed become local operations."""

from __future__ import annotations

import sqlite3
from typing import Any, Callable

from .capture import SyncedTable, muted, table_info
from .conflicts import rebuild_conflicts
from .clocks import append_local, next_local_hlc
from .oplog import DELETE, INSERT, UPDATE, rowkey_sql
from .schema import quote_identifier
from .merge import Effect, KnowledgeCache, latest_writers, record_clashes, row_state, same_value, table_history
from .rows import key_slots, settle, write_row


def reconcile_table(
    conn: sqlite3.Connection,
    table: SyncedTable,
    captured: set[int] | None = None,
    on_kept: Callable[[str, str], None] | None = None,
) -> int:
    """Log the changes the triggers missed: compare the table with the state its log implies.

    Used when sync is first enabled (every existing row becomes an insert) and when triggers
    were missing or stale (after ``transform`` or ``ALTER TABLE``): the table is the truth and
    its differences become new local operations.

    Operations that arrived while the table was not synced were kept but never applied
    (``_sync_unapplied``). Where one of those wrote last, the table takes the log's value
    instead of overwriting it: enabling sync never deletes or reverts what a peer wrote, unless
    this copy changed the same value meanwhile. Everywhere else the table wins, including edits
    made here while sync was disabled. Where both changed a value, the local edit is kept and
    logged, so it is never lost, and the peer's stays in the log; ``on_kept(table, rowkey)`` is
    called for each such row. (No conflict can be recorded: this copy's log says it had seen
    the peer's operation, so every copy takes the local edit as the later one.)

    :param captured: slots the capture triggers wrote until now. A column outside them was
        added since (again, or for the first time by ``--alter``): where the log holds values
        for it, peers wrote them and the table takes them, rather than its empty new column
        overwriting them everywhere.

    :returns: how many operations were logged
    """
    if not conn.execute("SELECT 1 FROM _sync_ops WHERE tid = ? LIMIT 1", [table.tid]).fetchone():
        return log_every_row(conn, table)
    return Reconciler(conn, table, captured, on_kept).run()


def log_every_row(conn: sqlite3.Connection, table: SyncedTable) -> int:
    """A table with no operations yet: every row becomes an insert, in one statement."""
    columns = table.current_columns(conn)
    key = rowkey_sql(quote_identifier(c) for c in table.pk)
    start = conn.execute("SELECT max(hlc) FROM _sync_ops").fetchone()[0]
    base = next_local_hlc(conn, start)
    cursor = conn.execute(
        f"INSERT INTO _sync_ops (hlc, tid, kind, mask, rowkey, {', '.join(f'c{table.slots[c]}' for c in columns)}) "
        f"SELECT {base} + row_number() OVER () - 1, {table.tid}, {INSERT}, {table.mask_for(columns)}, {key}, "
        f"{', '.join(quote_identifier(c) for c in columns)} FROM {quote_identifier(table.name)}"
    )
    return cursor.rowcount


WriteRowArgs = tuple[str, bool, dict[str, Any], bool]  # write_row's rowkey, exists, values, present


class Reconciler:
    """One table's rows compared with its history: differences are logged, or adopted where a
    kept (unapplied) operation of a peer wrote last."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        table: SyncedTable,
        captured: set[int] | None,
        on_kept: Callable[[str, str], None] | None = None,
    ):
        self.conn = conn
        self.on_kept = on_kept
        self.table = table
        self.columns = table.current_columns(conn)
        self.full = table.mask_for(self.columns)
        # Operations kept unapplied while the table was not synced here.
        self.unapplied = {op for (op,) in conn.execute("SELECT op FROM _sync_unapplied WHERE tid = ?", [table.tid])}
        conn.execute("DELETE FROM _sync_unapplied WHERE tid = ?", [table.tid])
        self.history = table_history(conn, table)
        # Re-enabled (it had triggers here, or operations applied) rather than first enabled on
        # a copy that held rows of it: then a row no applied operation made was inserted here.
        self.synced_before = captured is not None or any(
            e.op not in self.unapplied for effects in self.history.values() for e in effects
        )
        self.fresh = self.fresh_columns(captured)
        self.logged = 0
        self.adopted: list[WriteRowArgs] = []  # peers' values the table takes

    def fresh_columns(self, captured: set[int] | None) -> dict[str, tuple[Any, bool]]:
        """Columns outside ``captured``, with what ALTER TABLE gave every row: (default, NOT NULL)."""
        if captured is None:
            return {}
        return {
            info[1]: (self.conn.execute(f"SELECT {info[4]}").fetchone()[0] if info[4] is not None else None, bool(info[3]))
            for info in table_info(self.conn, self.table.name)
            if info[1] in self.table.slots and self.table.slots[info[1]] not in captured
        }

    def run(self) -> int:
        key = rowkey_sql(quote_identifier(c) for c in self.table.pk)
        seen = set()
        for row in self.conn.execute(f"SELECT {key} AS _rowkey, * FROM {quote_identifier(self.table.name)}").fetchall():
            seen.add(row[0])
            self.reconcile_row(row[0], dict(zip(self.columns, row[1:])))
        for rowkey, effects in self.history.items():
            if rowkey not in seen:
                self.reconcile_gone(rowkey, effects)
        if self.adopted:
            # Taking a peer's value is not a local edit: write it with capture muted, once. Peers
            # may have handed UNIQUE values from row to row (a swap): settle them as an import does.
            with muted(self.conn):
                settle(
                    self.conn,
                    [(self.table, a[0], set(a[2]), lambda a=a: write_row(self.conn, self.table, *a)) for a in self.adopted],
                )
        if self.unapplied:
            record_kept_clashes(self.conn, self.table, self.history, self.unapplied)
        return self.logged

    def by_peer(self, effect: Effect | None) -> bool:
        return effect is not None and effect.op in self.unapplied

    def adopts(self, column: str, value: Any, implied: dict[int, Any]) -> bool:
        """A new column still holding what ALTER gave it takes what peers wrote there. A value
        written here since is a local edit, and the log's NULL can't go into a NOT NULL column."""
        slot = self.table.slots[column]
        if column not in self.fresh or slot not in implied:
            return False
        default, not_null = self.fresh[column]
        return same_value(value, default) and not (not_null and implied[slot] is None)

    def log(self, kind: int, mask: int, rowkey: str, slots: dict[int, Any]) -> None:
        append_local(self.conn, self.table.tid, kind, mask, rowkey, slots=slots)
        self.logged += 1

    def state_here(self, effects: list[Effect]) -> tuple[bool, dict[int, Any]] | None:
        """The row as the operations this copy applied to its table left it (complete: a
        table with kept operations is never compacted); None when none did."""
        applied = [e for e in effects if e.op not in self.unapplied]
        return row_state(applied) if applied else None

    def changed_here(self, here: tuple[bool, dict[int, Any]] | None, slot: int, value: Any) -> bool:
        """Whether the table's value of a cell was written here while capture was off: it
        differs from the row ``here`` (:meth:`state_here`), or no applied operation made the
        row, so it was inserted here meanwhile. On a copy first syncing the table that tells
        nothing: the table takes what peers wrote, as it holds stale rows of it, say."""
        if here is None:
            return self.synced_before
        return not same_value(here[1].get(slot), value)

    def existed_here(self, effects: list[Effect]) -> bool:
        """Whether the row existed as the operations this copy applied left it."""
        here = self.state_here(effects)
        return here is not None and here[0]

    def kept(self, rowkey: str) -> None:
        if self.on_kept is not None:
            self.on_kept(self.table.name, rowkey)

    def reconcile_row(self, rowkey: str, values: dict[str, Any]) -> None:
        """A row the table holds: log an insert or the columns that differ from the log, or
        take the log's values where a peer's kept operation wrote last and this copy did not
        change them meanwhile."""
        slots = self.table.slots
        effects = self.history.get(rowkey, [])
        exists, implied = row_state(effects)
        if not exists:
            by_peer = self.by_peer(effects[-1] if effects else None)
            if by_peer and not self.edited_here(effects, values):
                self.adopted.append((rowkey, False, {}, True))
            else:
                if by_peer:
                    self.kept(rowkey)
                self.log(INSERT, self.full, rowkey, {slots[c]: v for c, v in values.items()})
            return
        writers = latest_writers(effects)
        # Only rows with kept operations need it (by_peer is never true without them).
        here = self.state_here(effects) if self.unapplied else None
        mask, taken, kept = 0, {}, False
        for column, value in values.items():
            slot = slots[column]
            # A value no operation wrote (a column added since, with its DEFAULT) is a change:
            # a peer that adds the column gets NULL there unless it is logged.
            if same_value(implied.get(slot), value):
                continue
            if self.adopts(column, value, implied):
                taken[column] = implied[slot]
            elif self.by_peer(writers.get(slot)) and not self.changed_here(here, slot, value):
                taken[column] = implied[slot]
            else:
                kept = kept or self.by_peer(writers.get(slot))
                mask |= 1 << slot
        if kept:
            self.kept(rowkey)
        if taken:
            self.adopted.append((rowkey, True, taken, True))
            values.update(taken)
        if mask:
            self.log(UPDATE, mask, rowkey, {slots[c]: v for c, v in values.items()})

    def edited_here(self, effects: list[Effect], values: dict[str, Any]) -> bool:
        """Whether a row a peer's kept delete removed was inserted or changed here meanwhile
        (else it is a stale copy of the row, which goes)."""
        here = self.state_here(effects)
        if here is None:
            return self.synced_before
        if not here[0]:
            return True  # it was deleted here before, so inserted again here
        slots = self.table.slots
        return any(self.changed_here(here, slots[c], v) for c, v in values.items() if not self.as_added(c, v))

    def as_added(self, column: str, value: Any) -> bool:
        """A column added since capture last ran that still holds what ALTER TABLE gave it."""
        return column in self.fresh and same_value(value, self.fresh[column][0])

    def reconcile_gone(self, rowkey: str, effects: list[Effect]) -> None:
        """A row the log implies and the table lacks: log its delete, or bring it back when a
        peer's kept operation wrote last and the row was not deleted here meanwhile."""
        exists, implied = row_state(effects)
        if not exists:
            return
        by_peer = self.by_peer(effects[-1])
        if by_peer and not self.existed_here(effects):
            names = self.table.slot_names(self.columns)
            self.adopted.append((rowkey, True, {names[s]: v for s, v in implied.items() if s in names}, False))
        else:
            if by_peer:
                self.kept(rowkey)
            self.log(DELETE, 0, rowkey, key_slots(self.table, rowkey))


def record_kept_clashes(
    conn: sqlite3.Connection, table: SyncedTable, history: dict[str, list[Effect]], kept: set[int]
) -> None:
    """Operations kept while the table was not synced here were never checked against each
    other: record their clashes now, as the copies that applied them did on arrival."""
    knowledge = KnowledgeCache(conn)
    clashed = set()
    for rowkey, effects in history.items():
        if any(e.op in kept for e in effects):
            marked = [e._replace(new=e.op in kept) for e in effects]
            if record_clashes(conn, table, rowkey, marked, knowledge):
                clashed.add((table.tid, rowkey))
    if clashed:
        rebuild_conflicts(conn, clashed)
