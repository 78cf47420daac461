"""Datasette plugin: sync views and bundle endpoints (hook implementations only)."""

import urllib.parse

from datasette import hookimpl

from sqlite_utils_sync import SyncError
from sqlite_utils_sync.schema import is_enabled

from . import cluster, guard, live, panels, permissions, views


@hookimpl
def register_actions(datasette):
    return permissions.ACTIONS


@hookimpl
def permission_resources_sql(datasette, actor, action):
    return permissions.default_permission_sql(datasette, action)


@hookimpl
def write_wrapper(datasette, database, request, transaction):
    return live.reporting_writes(datasette, database, guard.write_wrapper(datasette, database, request, transaction))


@hookimpl
def startup(datasette):
    views.check_config(datasette)
    return cluster.startup(datasette)


@hookimpl
def shutdown(datasette):
    return cluster.shutdown(datasette)


@hookimpl
def register_routes():
    return views.routes()


@hookimpl
def database_actions(datasette, actor, database, request):
    async def inner():
        if not await permissions.can(datasette, actor, permissions.VIEW, database):
            return []
        try:
            if not await datasette.get_database(database).execute_fn(is_enabled):
                return []
        except SyncError:
            pass  # sync tables of a newer version: the sync page says so
        base = views.sync_url(datasette, database)
        return [
            {"href": base, "label": "Sync status", "description": "Devices, clocks, peers and recent activity"},
            {"href": base + "/conflicts", "label": "Sync conflicts", "description": "Concurrent edits that disagreed"},
        ]

    return inner


@hookimpl
def table_actions(datasette, actor, database, table, request):
    async def inner():
        if await views.synced_pk(datasette, actor, database, table) is None:
            return []
        base = views.sync_url(datasette, database)
        query = urllib.parse.urlencode({"table": table})
        return [
            {
                "href": f"{base}/operations?{query}",
                "label": "Sync operations",
                "description": "Every change to this table in the sync log",
            },
            {
                "href": f"{base}/conflicts?{query}",
                "label": "Sync conflicts",
                "description": "Unresolved concurrent edits of rows in this table",
            },
        ]

    return inner


@hookimpl
def row_actions(datasette, actor, request, database, table, row):
    async def inner():
        pk = await views.synced_row_pk(datasette, actor, database, table)
        if pk is None:
            return []
        query = urllib.parse.urlencode({"table": table, "pk": views.pk_filter([row[column] for column in pk])})
        return [
            {
                "href": f"{views.sync_url(datasette, database)}/operations?{query}",
                "label": "Sync history",
                "description": "The operations that touched this row",
            }
        ]

    return inner


@hookimpl
def top_database(datasette, request, database):
    return panels.database_panel(datasette, request, database)


@hookimpl
def top_table(datasette, request, database, table):
    return panels.table_panel(datasette, request, database, table)


@hookimpl
def top_row(datasette, request, database, table, row):
    return panels.row_panel(datasette, request, database, table, row)
