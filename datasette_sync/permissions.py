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


async def can(datasette, actor, action, database):
    return await datasette.allowed(action=action, resource=DatabaseResource(database), actor=actor)


async def can_alter(datasette, actor, database):
    """``import?alter=1`` may add columns to any table: require alter-table on the whole
    database (a grant at database level or above, not on one table)."""
    return await datasette.allowed(action="alter-table", resource=TableResource(database, None), actor=actor)
