"""The write guard: no write through Datasette touches a ``_sync_*`` table or trigger,
except the sync endpoints' own and the capture triggers'.

The permission rules (permissions.py) already deny the table-scoped write actions on
``_sync_*`` tables. This guard is the backstop under them, at the SQLite level, for what a
table-scoped rule cannot name: ``create-table`` is database-scoped, so ``POST /db/-/create``
could otherwise create a ``_sync_*`` table; and any plugin's write runs on the same
connection. Writes to synced tables still work: their capture triggers (named ``_sync_*``)
append to the log, and SQLite reports those writes with the trigger as their source.

A write that changes the schema (Datasette's ``/-/alter``, ``"alter": true`` on its write API,
a plugin's ``ALTER TABLE``) can leave a synced table with stale triggers or none: capture is
repaired inside that same write, and what it missed logged, as the engine's own writes do.
Otherwise the hub's edits would wait, unlogged, for the next push (a hub's exports only read).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import sqlite3
import sys

from sqlite_utils_sync.writing import repair_capture as engine_repair, writing

log = logging.getLogger("datasette_sync")

PREFIX = "_sync_"

# Set while a sync endpoint queues its own write (import, resolve).
_sync_write = contextvars.ContextVar("datasette_sync_write", default=False)

_ROW_WRITES = {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE}
# Schema changes, and which authorizer arguments (1 or 2) must not be a _sync_* name. Dropping
# a table drops its triggers and indexes too, so for those drops only the table counts: a
# synced table can still be dropped or rebuilt (its capture triggers go with it, as before).
_SCHEMA = {
    sqlite3.SQLITE_CREATE_TABLE: (1,),
    sqlite3.SQLITE_CREATE_TEMP_TABLE: (1,),
    sqlite3.SQLITE_DROP_TABLE: (1,),
    sqlite3.SQLITE_DROP_TEMP_TABLE: (1,),
    sqlite3.SQLITE_CREATE_INDEX: (1, 2),
    sqlite3.SQLITE_CREATE_TEMP_INDEX: (1, 2),
    sqlite3.SQLITE_DROP_INDEX: (2,),
    sqlite3.SQLITE_DROP_TEMP_INDEX: (2,),
    sqlite3.SQLITE_CREATE_TRIGGER: (1, 2),
    sqlite3.SQLITE_CREATE_TEMP_TRIGGER: (1, 2),
    sqlite3.SQLITE_DROP_TRIGGER: (2,),
    sqlite3.SQLITE_DROP_TEMP_TRIGGER: (2,),
    sqlite3.SQLITE_CREATE_VIEW: (1,),
    sqlite3.SQLITE_CREATE_TEMP_VIEW: (1,),
    sqlite3.SQLITE_ALTER_TABLE: (2,),
}
for _name in ("SQLITE_CREATE_VTABLE", "SQLITE_DROP_VTABLE"):
    if hasattr(sqlite3, _name):
        _SCHEMA[getattr(sqlite3, _name)] = (1,)


def is_sync_name(name: str | None) -> bool:
    # SQLite names are case-insensitive for ASCII letters.
    return name is not None and name[: len(PREFIX)].lower() == PREFIX


def authorizer(action, arg1, arg2, schema, source):
    if action in _ROW_WRITES:
        # A capture trigger writing the log is the sync machinery itself.
        if is_sync_name(arg1) and not is_sync_name(source):
            return sqlite3.SQLITE_DENY
    elif action in _SCHEMA:
        if any(is_sync_name((arg1, arg2)[position - 1]) for position in _SCHEMA[action]):
            return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _allow_all(*args):
    return sqlite3.SQLITE_OK


def remove_authorizer(conn) -> None:
    # Python 3.10 cannot unregister an authorizer (None would be called).
    conn.set_authorizer(None if sys.version_info >= (3, 11) else _allow_all)


def write_wrapper(datasette, database, request, transaction):
    """The ``write_wrapper`` hook: guard every write but the sync endpoints' own."""
    if _sync_write.get():
        return None

    def guard(conn):
        before = table_pages(conn)
        version = schema_version(conn)
        conn.set_authorizer(authorizer)
        try:
            yield
        finally:
            remove_authorizer(conn)
        undo_renames(conn, before)
        if schema_version(conn) != version:
            repair_capture(conn)

    return guard


def schema_version(conn) -> int:
    return conn.execute("PRAGMA schema_version").fetchone()[0]


def repair_capture(conn) -> None:
    """Put the synced tables' capture in step with their schema, logging what stale or missing
    triggers missed: what every engine write does first (:func:`writing`). A table that cannot
    be repaired (its primary key changed, say) is left as the pages and sync-status show it:
    the Datasette write or the pull that found it goes on."""
    with writing(conn, repair=False):
        engine_repair(conn, on_refused=lambda table, ex: log.warning("datasette-sync: capture of %s not repaired: %s", table, ex))


def table_pages(conn) -> dict[str, int]:
    return dict(conn.execute("SELECT name, rootpage FROM main.sqlite_master WHERE type = 'table'"))


def undo_renames(conn, before: dict[str, int]) -> None:
    """``ALTER TABLE x RENAME TO _sync_y`` passes the authorizer, which is only told the old
    name: a table that appeared under a ``_sync_*`` name was renamed there (creating one is
    denied), and could plant an engine table the engine makes only when first needed
    (``_sync_device_actors``, ``_sync_horizon``...). Rename it back and refuse the write."""
    after = table_pages(conn)
    planted = [name for name in after if is_sync_name(name) and name not in before]
    if not planted:
        return
    gone = {page: name for name, page in before.items() if name not in after}
    for name in planted:
        old = gone.get(after[name])
        if old is not None:
            conn.execute(f"ALTER TABLE {quote(name)} RENAME TO {quote(old)}")
    raise sqlite3.DatabaseError(f"not authorized: {planted[0]} is a name only the sync machinery may give a table")


def quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@contextlib.contextmanager
def sync_write():
    """Mark the writes queued inside this block as the sync endpoints' own."""
    token = _sync_write.set(True)
    try:
        yield
    finally:
        _sync_write.reset(token)
