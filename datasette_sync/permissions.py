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
"""

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


def default_permission_sql(datasette, action):
    """The default grant: sync-view everywhere, unless --default-deny is on."""
    if action == VIEW and not datasette.default_deny:
        return PermissionSQL.allow(reason="datasette-sync: sync-view is allowed by default")
    return None


async def can(datasette, actor, action, database):
    return await datasette.allowed(action=action, resource=DatabaseResource(database), actor=actor)


async def can_alter(datasette, actor, database):
    """``import?alter=1`` may add columns to any table: require alter-table on the whole
    database (a grant at database level or above, not on one table)."""
    return await datasette.allowed(action="alter-table", resource=TableResource(database, None), actor=actor)
