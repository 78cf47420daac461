"""The sync actions and who gets them by default.

``sync-view`` follows ``view-database``: it is granted by default (so every database page
reader can see its sync pages) unless Datasette runs with ``--default-deny``, and it also
requires ``view-database``, so a private database keeps its sync pages private too.
Exporting, importing, relaying and resolving change or reveal more, so they are never
granted by default: only root and actors named in a ``permissions:`` block get them.

``sync-relay``: without it, an actor's push may only add new operations of devices that actor
owns (the first actor to push a device's new operations owns it), so one token holder cannot
write as another's device. Operations the hub already holds relay freely.

Every action also requires ``view-database``. Datasette applies a token's restriction
allowlist to that requirement too, so a restricted token must list ``view-database`` beside
the sync actions it needs.

The ``_sync_*`` tables are closed to Datasette's own table machinery, for every actor, root
included: their rows hold the values of every synced table (so a table page would show rows
of tables the actor may not view), and a change made outside the sync endpoints breaks the
log. A DENY on the table itself is the most specific rule, and Datasette lets a deny win over
an allow at the same level, so no grant (root's, or a ``permissions:`` block at any level)
reopens them. The sync pages are the supported view: they filter by ``view-table``.

Per table, the hub asks Datasette's own table actions: a pull carries the values of the
tables the actor may ``view-table`` (the others' operations are withheld), and a push may add
new operations of a table only where the actor holds what they do there (``insert-row``,
``update-row``, ``delete-row``), on top of ``sync-import``.
"""

import json

from datasette.permissions import Action, PermissionSQL
from datasette.resources import DatabaseResource, TableResource

VIEW = "sync-view"
EXPORT = "sync-export"
IMPORT = "sync-import"
RESOLVE = "sync-resolve"
RELAY = "sync-relay"

ACTIONS = [
    Action(
        name=VIEW,
        description="View sync status, operation log, clocks, imports and conflicts",
        resource_class=DatabaseResource,
        also_requires="view-database",
    ),
    Action(
        name=EXPORT,
        description="Download sync bundles (every synced row and its history)",
        resource_class=DatabaseResource,
        also_requires="view-database",
    ),
    Action(
        name=IMPORT,
        description="Upload sync bundles that change the database",
        resource_class=DatabaseResource,
        also_requires="view-database",
    ),
    Action(
        name=RELAY,
        description="Push new operations of devices another actor pushes from (relay for other devices)",
        resource_class=DatabaseResource,
        also_requires="view-database",
    ),
    Action(
        name=RESOLVE,
        description="Resolve sync conflicts",
        resource_class=DatabaseResource,
        also_requires="view-database",
    ),
]


# Table-scoped actions denied on every _sync_* table. Row writes are not among them:
# Datasette's write SQL checks them on the tables its triggers write, so denying them would
# refuse every write SQL on a synced table. The write guard (guard.py) refuses row writes to
# _sync_* tables that do not come from a capture trigger, and creating a _sync_* table
# (create-table is database-scoped in Datasette).
SYNC_TABLE_DENIED = frozenset({"view-table", "alter-table", "drop-table", "set-column-type"})

# The engine's tables, denied even before Datasette's catalog (refreshed at most once a
# second) lists them; the catalog covers every other _sync_* table.
ENGINE_TABLES = (
    "_sync_state _sync_devices _sync_tables _sync_ops _sync_knowledge _sync_unapplied _sync_peers "
    "_sync_imports _sync_conflict_pairs _sync_resolutions _sync_conflicts _sync_horizon _sync_settled _sync_captured "
    "_sync_device_actors"
).split()

SYNC_TABLES_SQL = r"""
SELECT database_name AS parent, table_name AS child, 0 AS allow, :datasette_sync_reason AS reason
FROM catalog_tables WHERE table_name LIKE '\_sync\_%' ESCAPE '\'
UNION
SELECT database_name AS parent, value AS child, 0 AS allow, :datasette_sync_reason AS reason
FROM catalog_databases CROSS JOIN json_each(:datasette_sync_tables)
"""


def default_permission_sql(datasette, action):
    """The default grant (sync-view everywhere, unless --default-deny is on) and the deny
    that keeps Datasette's table pages and write API off the _sync_* tables."""
    if action == VIEW and not datasette.default_deny:
        return PermissionSQL.allow(reason="datasette-sync: sync-view is allowed by default")
    if action in SYNC_TABLE_DENIED:
        return PermissionSQL(
            sql=SYNC_TABLES_SQL,
            params={
                "datasette_sync_reason": "datasette-sync: _sync_* tables are only read and written by the sync endpoints",
                "datasette_sync_tables": json.dumps(ENGINE_TABLES),
            },
        )
    return None


VIEW_TABLE = "view-table"
INSERT_ROW = "insert-row"
UPDATE_ROW = "update-row"
DELETE_ROW = "delete-row"
WRITE_ACTIONS = (INSERT_ROW, UPDATE_ROW, DELETE_ROW)
TABLE_ACTIONS = (VIEW_TABLE, *WRITE_ACTIONS)

# What a refused write action does, for the one-line refusal of a push.
WRITE_VERBS = {INSERT_ROW: "inserts rows into", UPDATE_ROW: "updates rows of", DELETE_ROW: "deletes rows from"}


async def can(datasette, actor, action, database):
    return await datasette.allowed(action=action, resource=DatabaseResource(database), actor=actor)


async def can_alter(datasette, actor, database):
    """``import?alter=1`` may add columns to any table: require alter-table on the whole
    database (a grant at database level or above, not on one table)."""
    return await datasette.allowed(action="alter-table", resource=TableResource(database, None), actor=actor)


async def table_access(datasette, actor, database: str, tables) -> dict[str, frozenset[str]]:
    """For each of ``tables``, which of :data:`TABLE_ACTIONS` the actor holds on it: one
    query of Datasette's own permission check per table (token restrictions included)."""
    access = {}
    for table in dict.fromkeys(tables):
        allowed = await datasette.allowed_many(
            actions=TABLE_ACTIONS, resource=TableResource(database, table), actor=actor
        )
        access[table] = frozenset(action for action, yes in allowed.items() if yes and action in TABLE_ACTIONS)
    return access


def viewable(access: dict[str, frozenset[str]]) -> list[str]:
    """The tables of a :func:`table_access` map the actor may view, sorted."""
    return sorted(table for table, actions in access.items() if VIEW_TABLE in actions)


def push_actions(access: dict[str, frozenset[str]]) -> dict[str, list[str]]:
    """The write actions per viewable table, for the sync pages: a table the actor may not
    view is not named to them even where a grant lets them write it."""
    return {
        table: [action for action in WRITE_ACTIONS if action in actions]
        for table, actions in sorted(access.items())
        if VIEW_TABLE in actions and any(action in actions for action in WRITE_ACTIONS)
    }


def refused_write(access: dict[str, frozenset[str]], needed: dict[str, set[str]]) -> tuple[str, str] | None:
    """The first (table, action) of ``needed`` (what a push's new operations do per table)
    that ``access`` does not grant, in a stable order; None when everything is granted.
    A table missing from ``access`` grants nothing."""
    order = {action: position for position, action in enumerate(WRITE_ACTIONS)}
    for table in sorted(needed):
        granted = access.get(table, frozenset())
        for action in sorted(needed[table], key=lambda a: (order.get(a, len(order)), a)):
            if action not in granted:
                return table, action
    return None
