"""What the sync log says about the database, table or row a Datasette page shows, at the
top of that page (Datasette's ``top_database``, ``top_table`` and ``top_row`` slots), with
links to the full sync pages. Only actors with ``sync-view`` see them.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from markupsafe import Markup

from sqlite_utils_sync import SyncError, get_conflict
from sqlite_utils_sync.devices import device_names

from . import queries, views
from .permissions import VIEW, can

ROW_HISTORY = 5  # the row panel shows the latest few operations; the operations page has them all


async def database_panel(datasette, request, database: str) -> Markup:
    actor = request.actor if request else None
    if not await can(datasette, actor, VIEW, database):
        return Markup("")
    db = datasette.get_database(database)
    try:
        visible = await views.viewable_tables(datasette, request, db)
    except SyncError:
        return Markup("")  # sync tables of a newer version: the sync pages say so
    summary = await readable(db, views.hiding(visible, queries.database_summary))
    if summary is None:
        return Markup("")
    context = {"summary": summary, "unresolved": sum(summary["conflicts"].values())}
    return await panel(datasette, request, database, "sync_panel_database.html", context)


async def table_panel(datasette, request, database: str, table: str) -> Markup:
    actor = request.actor if request else None
    if await views.synced_pk(datasette, actor, database, table) is None:
        return Markup("")
    db = datasette.get_database(database)
    conflicts = await readable(db, lambda conn: queries.unresolved_counts(conn).get(table, 0))
    context = {"table": table, "conflicts": conflicts or 0, "query": urllib.parse.urlencode({"table": table})}
    return await panel(datasette, request, database, "sync_panel_table.html", context)


async def row_panel(datasette, request, database: str, table: str, row: Any) -> Markup:
    actor = request.actor if request else None
    pk = await views.synced_row_pk(datasette, actor, database, table)
    if pk is None:
        return Markup("")
    values = [row[column] for column in pk]
    pk_json = views.pk_filter(values)

    def read(conn):
        history = queries.operations(conn, table=table, pk=pk_json, size=ROW_HISTORY + 1)["operations"]
        conflicts = [get_conflict(conn, cid) for cid in queries.row_conflict_ids(conn, table, values)]
        return history, conflicts, device_names(conn)

    found = await readable(datasette.get_database(database), read)
    if found is None:
        return Markup("")
    history, conflicts, names = found
    context = {
        "label": lambda device_id: views.device_label(device_id, names),
        "table": table,
        "history": history[:ROW_HISTORY],
        "more_history": len(history) > ROW_HISTORY,
        "conflicts": conflicts,
        "history_url": views.sync_url(datasette, database)
        + "/operations?"
        + urllib.parse.urlencode({"table": table, "pk": pk_json}),
        "conflicts_url": views.sync_url(datasette, database)
        + "/conflicts?"
        + urllib.parse.urlencode({"table": table}),
    }
    return await panel(datasette, request, database, "sync_panel_row.html", context)


async def readable(db, read):
    """``read`` on a read connection; None where the sync tables are of a newer version (the
    sync pages say so) or a value cannot be a key."""
    try:
        return await db.execute_fn(read)
    except (SyncError, queries.InvalidArgument):
        return None


async def panel(datasette, request, database: str, template: str, context: dict) -> Markup:
    context = {
        "database": database,
        "sync_base": views.sync_url(datasette, database),
        "show_pk": views.show_pk,
        "show": views.show,
        **context,
    }
    return Markup(await datasette.render_template(template, context, request=request))
