"""The sync pages (each with a ``.json`` twin) and the bundle endpoints.

Pages only read, through ``db.execute_fn`` on a read connection, so they work on immutable
databases and on databases without sync tables. Writes (import, resolve) go through
Datasette's single write thread with ``execute_write_fn``, which is what serializes
concurrent pushes.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import logging
import os
import pathlib
import re
import shutil
import sqlite3
import tempfile
import time
import urllib.parse
import weakref
from typing import Any, Callable

from datasette import Response
from datasette.resources import TableResource
from datasette.utils import StartupError, add_cors_headers, tilde_decode, tilde_encode
from datasette.utils.asgi import BadRequest, Base400, Forbidden, NotFound, PayloadTooLarge
from markupsafe import Markup, escape

from sqlite_utils_sync import (
    SyncError,
    errors,
    export_bundle,
    get_conflict,
    import_bundle,
    protocol,
    resolve_conflict,
    sync_status,
)
from sqlite_utils_sync.api import read_snapshot
from sqlite_utils_sync.bundle import BundleReader, ExportResult
from sqlite_utils_sync.capture import drifted_tables
from sqlite_utils_sync.clocks import DEFAULT_MAX_CLOCK_SKEW, clock, horizon, parse_duration
from sqlite_utils_sync.devices import device_names, label, resolve_device
from sqlite_utils_sync.oplog import is_device_id, json_value
from sqlite_utils_sync.schema import check_schema, is_enabled

from . import chart, cluster, live, queries
from .guard import repair_capture, schema_version, sync_write
from .permissions import (
    DELETE_ROW,
    EXPORT,
    IMPORT,
    INSERT_ROW,
    RELAY,
    RESOLVE,
    UPDATE_ROW,
    VIEW,
    VIEW_TABLE,
    WRITE_VERBS,
    can,
    can_alter,
    push_actions,
    refused_write,
    table_access,
    viewable,
)

log = logging.getLogger("datasette_sync")

PLUGIN = "datasette-sync"
DEFAULT_MAX_BUNDLE_BYTES = 100 * 1024 * 1024
DEFAULT_SEND_TIMEOUT = 60.0
PAGE_SIZE = 50
CONFLICT_VALUE_CHARS = 200  # a conflict shows versions side by side: long text would hide the others
CONFLICTS_PAGE_SIZE = 20  # conflicts are big: a table each
MAX_PAGE_SIZE = 1000

DATABASE = r"^/(?P<database>[^/]+)"
SYNC = DATABASE + re.escape(protocol.SYNC_PATH)
FORMAT = r"(\.(?P<format>json))?$"


def routes():
    return [(pattern, with_cors(view)) for pattern, view in [
        (SYNC + FORMAT, busy_is_503(overview_page)),
        (SYNC + r"/operations" + FORMAT, busy_is_503(operations_page)),
        (SYNC + r"/conflicts" + FORMAT, busy_is_503(conflicts_page)),
        (SYNC + r"/clocks" + FORMAT, busy_is_503(clocks_page)),
        (SYNC + r"/imports" + FORMAT, busy_is_503(imports_page)),
        (DATABASE + re.escape(protocol.EXPORT_PATH) + "$", ExportEndpoint),
        (DATABASE + re.escape(protocol.CHANGES_PATH) + "$", ChangesEndpoint),
        (DATABASE + re.escape(protocol.IMPORT_PATH) + "$", ImportEndpoint),
        (
            DATABASE
            + re.escape(protocol.CONFLICTS_PATH + "/")
            + f"(?P<conflict_id>{protocol.CONFLICT_ID_PATTERN})"
            + re.escape(protocol.RESOLVE_SUFFIX)
            + "$",
            ResolveEndpoint,
        ),
    ]]


CORS_EXPOSED = ", ".join(
    ["Link", protocol.CLOCK_HEADER, protocol.OPERATIONS_HEADER, protocol.SCOPE_HEADER, protocol.RETRY_AFTER_HEADER]
)
"""The headers a script on another origin may read from a sync answer (Datasette exposes Link)."""


def with_cors(view):
    """Datasette's ``--cors`` on the sync routes as on its own: its headers on every answer
    (the sync headers exposed too) and a preflight ``OPTIONS`` answered."""
    call = (lambda datasette, request: view()(request, datasette)) if isinstance(view, type) else view

    async def cors_view(datasette, request):
        if not datasette.cors:
            return await call(datasette, request)
        response = Response.text("ok") if request.method == "OPTIONS" else await call(datasette, request)
        add_cors_headers(response.headers)
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSED
        return response

    cors_view.__name__ = getattr(view, "__name__", "sync_view")
    return cors_view


# Helpers ----------------------------------------------------------------------------------


def busy_is_503(page):
    """A page whose reads met a lock held longer than Datasette waits (another process inside
    ``BEGIN EXCLUSIVE``, a long commit in rollback-journal mode) answers 503 busy, as the
    endpoints do: a lock is temporary, not the hub's fault."""

    @functools.wraps(page)
    async def view(datasette, request):
        try:
            return await page(datasette, request)
        except sqlite3.OperationalError as ex:
            if not is_busy(ex):
                raise
            raise sqlite_refusal(ex, request.url_vars["database"]) from None

    return view


def sync_url(datasette, database: str) -> str:
    return datasette.urls.database(database) + protocol.SYNC_PATH


def plugin_config(datasette, database: str | None) -> dict:
    # plugin_config() can return None even with fallback, so try both levels explicitly.
    if database is None:
        return datasette.plugin_config(PLUGIN) or {}
    return datasette.plugin_config(PLUGIN, database=database) or datasette.plugin_config(PLUGIN) or {}


def max_bundle_bytes(datasette, database: str) -> int:
    return int(plugin_config(datasette, database).get("max_bundle_bytes") or DEFAULT_MAX_BUNDLE_BYTES)


def check_config(datasette) -> None:
    """Refuse to start with a plugin setting the endpoints could not use, so a typo in
    ``datasette.yaml`` is one line at startup instead of an error on every push."""
    for database in [None, *datasette.databases]:
        where = "datasette-sync plugin config" + (f" for database {database}" if database else "")
        limit = plugin_config(datasette, database).get("max_bundle_bytes")
        if limit is not None and not (isinstance(limit, int) and not isinstance(limit, bool) and limit > 0):
            raise StartupError(f"max_bundle_bytes ({where}) must be a positive whole number of bytes, got {limit!r}")
        wait = plugin_config(datasette, database).get("max_wait")
        if wait is not None and not (is_seconds(wait) and wait >= 0):
            raise StartupError(f"max_wait ({where}) must be a number of seconds from 0 to 86399, got {wait!r}")
        timeout = plugin_config(datasette, database).get("send_timeout")
        if timeout is not None and not (is_seconds(timeout) and timeout > 0):
            raise StartupError(f"send_timeout ({where}) must be a number of seconds above 0 and below 86400, got {timeout!r}")
        try:
            max_clock_skew(datasette, database)
        except SyncError as ex:
            raise StartupError(f"{ex}" + (f" (database {database})" if database else ""))


def is_seconds(value: Any) -> bool:
    """A number (not a boolean) below a day's seconds."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value < 86400


def max_wait(datasette, database: str) -> float:
    """The longest a waiting pull is held here (the ``max_wait`` setting, checked at startup)."""
    value = plugin_config(datasette, database).get("max_wait")
    return float(protocol.DEFAULT_MAX_WAIT if value is None else value)


def send_timeout(datasette, database: str) -> float:
    """How long a bundle download may wait for the client to take the next 64 KB (the
    ``send_timeout`` setting, checked at startup)."""
    value = plugin_config(datasette, database).get("send_timeout")
    return float(DEFAULT_SEND_TIMEOUT if value is None else value)


def max_clock_skew(datasette, database: str | None) -> float:
    """The ``max_clock_skew`` plugin setting in seconds (raises SyncError when it is invalid)."""
    config = plugin_config(datasette, database)
    return parse_duration(config.get("max_clock_skew", DEFAULT_MAX_CLOCK_SKEW), "max_clock_skew (datasette-sync plugin config)")


def jsonable(value: Any) -> Any:
    """Make query results JSON-safe: BLOBs and non-finite floats as the core renders them."""
    if isinstance(value, dict):
        return {key: jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(item) for item in value]
    return json_value(value)


def show(value: Any, limit: int | None = None) -> Markup:
    """A value for HTML: NULL and the empty string look different, BLOBs show size and hex,
    text longer than ``limit`` characters shows its start and its length."""
    if isinstance(value, dict) and value.get("$base64"):
        value = base64.b64decode(value.get("encoded", ""))
    if value is None:
        return Markup('<span class="sync-null">NULL</span>')
    if value == "":
        return Markup('<span class="sync-empty" title="empty string">""</span>')
    if isinstance(value, bytes):
        shown = value[:16].hex(" ")
        more = "…" if len(value) > 16 else ""
        return Markup('<span class="sync-blob">&lt;BLOB {} byte{}&gt; <code>{}{}</code></span>').format(
            len(value), "" if len(value) == 1 else "s", shown, more
        )
    text = str(value)
    if limit is not None and len(text) > limit:
        more = '<span class="sync-muted" title="shortened: the JSON has the whole value">… ({:,} characters)</span>'
        return escape(text[:limit]) + Markup(more).format(len(text))
    return escape(text)


def show_pk(values: list[Any] | None, limit: int | None = None) -> Markup:
    if values is None:
        return Markup("")
    return Markup(", ").join(show(v, limit) for v in values)


def pk_filter(values: list[Any]) -> str:
    """The operations page's ``pk`` filter naming exactly the key ``values``. A REAL key of
    ±inf is written as JSON's ``Infinity``, which the filter reads back as the number:
    ``json_value`` would make it the text ``"inf"``, a different key."""
    return json.dumps([value if isinstance(value, float) else json_value(value) for value in values])


def short(device_id: str | None) -> str:
    return (device_id or "")[:8]


def device_label(device_id: str | None, names: dict[str, str] | None = None, full: bool = False) -> str:
    """How a page shows a device: ``laptop (19cecc3d)`` when it has a name, else ``19cecc3d``;
    ``full`` shows the whole id. ``names`` is :func:`~sqlite_utils_sync.devices.device_names`."""
    if full:
        name = (names or {}).get(device_id or "")
        return f"{name} ({device_id})" if name else (device_id or "")
    return label(device_id, names or {})


def page_size(request, default: int = PAGE_SIZE) -> int:
    try:
        size = int(request.args.get("_size") or default)
    except ValueError:
        raise BadRequest("_size must be an integer")
    return max(1, min(size, MAX_PAGE_SIZE))


def with_args(path: str, request, **changes) -> str:
    """The current page's query string with some arguments replaced (None drops one)."""
    args = dict(urllib.parse.parse_qsl(request.query_string, keep_blank_values=True))
    for key, value in changes.items():
        if value is None:
            args.pop(key, None)
        else:
            args[key] = value
    return path + ("?" + urllib.parse.urlencode(args) if args else "")


async def synced_pk(datasette, actor, database: str, table: str) -> list[str] | None:
    """The primary key of ``table`` when it is synced and the actor may see sync pages."""
    if not await can(datasette, actor, VIEW, database):
        return None
    db = datasette.get_database(database)
    try:
        return await db.execute_fn(lambda conn: queries.table_pk(conn, table))
    except SyncError:
        return None  # sync tables of a newer version: the table pages stay as Datasette's own


async def synced_row_pk(datasette, actor, database: str, table: str) -> list[str] | None:
    """:func:`synced_pk`, when it is still the table's primary key: a column renamed or a
    key changed outside sync leaves the recorded one naming columns the row lacks."""
    pk = await synced_pk(datasette, actor, database, table)
    if pk is None or await datasette.get_database(database).primary_keys(table) != pk:
        return None
    return pk


async def can_view_table(datasette, actor, database: str, table: str) -> bool:
    return await datasette.allowed(action="view-table", resource=TableResource(database, table), actor=actor)


async def viewable_tables(datasette, request, db) -> frozenset[str]:
    """Logged tables this actor may view; the others' rows stay off the sync pages too."""
    names = await db.execute_fn(queries.logged_tables)
    return frozenset([name for name in names if await can_view_table(datasette, request.actor, db.name, name)])


def hiding(visible: frozenset[str], read: Callable[[sqlite3.Connection, frozenset[str]], Any]):
    """A page's ``read(conn, hidden)``, run in one read transaction with ``hidden`` every table
    logged then but not in ``visible``: a table first logged after the permission check stays
    hidden (the next request checks it), in every query of the page."""

    def run(conn: sqlite3.Connection) -> Any:
        with read_snapshot(conn):
            return read(conn, frozenset(queries.logged_tables(conn)) - visible)

    return run


def resolve_database(datasette, request):
    """The database named in the URL, tilde-encoded as Datasette writes it or %-encoded
    (``data%20base``) as clients and browsers do: Datasette's own pages accept both."""
    route = request.url_vars["database"]
    names = [tilde_decode(route)]
    if "%" in route:
        names.append(urllib.parse.unquote(route))
    for name in names:
        try:
            return datasette.get_database(route=name)
        except KeyError:
            pass
    raise NotFound(f"Database not found: {names[-1]}")


async def page_database(datasette, request):
    """The database of a sync page, after the sync-view check (404, then 403) and the check
    that this code can read its sync tables (a newer schema version is refused, not guessed at)."""
    if request.method not in ("GET", "HEAD"):
        raise MethodNotAllowed("Sync pages only answer GET")
    db = resolve_database(datasette, request)
    if not await can(datasette, request.actor, VIEW, db.name):
        raise Forbidden("Permission denied")
    try:
        await db.execute_fn(check_schema)
    except SyncError as ex:
        raise EndpointError(str(ex), ex.reason)
    return db


async def read_page(db, read):
    """Run a page's read; a query argument that cannot mean anything is the visitor's 400."""
    try:
        return await db.execute_fn(read)
    except queries.InvalidArgument as ex:
        raise BadRequest(str(ex))


async def render(datasette, request, db, template: str, tab: str, context: dict, data: dict) -> Response:
    if request.url_vars.get("format") == "json":
        return Response.json(jsonable(data))
    base = sync_url(datasette, db.name)
    paths = {"overview": base, **{name: f"{base}/{name}" for name in ("operations", "conflicts", "clocks", "imports")}}
    json_path = paths[tab] + ".json" + (f"?{request.query_string}" if request.query_string else "")
    names = await db.execute_fn(device_names)
    context = {
        "database": db.name,
        "database_color": db.color,
        "is_mutable": db.is_mutable,
        "sync_base": base,
        "tab": tab,
        "tabs": [(name, name.title(), paths[name]) for name in paths],
        "json_url": json_path,
        "changes_url": datasette.urls.database(db.name) + protocol.CHANGES_PATH,
        "alternate_url_json": json_path,
        "show": show,
        "value_chars": CONFLICT_VALUE_CHARS,
        "show_pk": show_pk,
        "pk_json": pk_filter,
        "tick_devices": OVERVIEW_LISTED,
        # Every short device id on the pages goes through this: named devices show their name.
        "short": lambda device_id: device_label(device_id, names),
        "full_label": lambda device_id: device_label(device_id, names, full=True),
        "ops_url": lambda **args: base + "/operations?" + urllib.parse.urlencode(args),
        **context,
    }
    return Response.html(await datasette.render_template(template, context, request=request))


# Pages ------------------------------------------------------------------------------------


async def overview_page(datasette, request):
    db = await page_database(datasette, request)
    visible = await viewable_tables(datasette, request, db)

    def read(conn, hidden):
        status = queries.without_tables(sync_status(conn), conn, hidden)
        if not status["enabled"]:
            return status, {"peers": [], "total": 0}, [], None, {}
        latest = queries.operations(conn, size=10, hidden=hidden)["operations"]
        names = device_names(conn)
        activity = chart.build(chart.read(conn, hidden), lambda device_id: device_label(device_id, names))
        return status, queries.peer_page(conn, size=OVERVIEW_PEERS), latest, activity, horizon(conn)

    status, peers, latest, activity, compacted = await db.execute_fn(hiding(visible, read))
    status = {
        **status,
        "access": await actor_access(datasette, request.actor, db),
        "watching": await watching(datasette, request.actor, db),
    }
    in_cluster = cluster.status(datasette, db.name)
    if in_cluster is not None:
        status["cluster"] = await cluster_status_for(datasette, request.actor, db, in_cluster)
    context = {
        "status": status,
        "peers": peers["peers"],
        "more_peers": peers["total"] - len(peers["peers"]),
        "clock": overview_clock(status),
        "listed": OVERVIEW_LISTED,
        "latest": latest,
        "chart": activity,
        "compacted": compacted,
        "live_since": protocol.encode_clock(status.get("clock") or {}),
    }
    return await render(datasette, request, db, "sync_overview.html", "overview", context, status)


OVERVIEW_PEERS = 10
OVERVIEW_LISTED = 20
"""The overview lists this many peers, and devices of a clock, at most: every device a hub
imports from is a peer, so a hub may know thousands. The clocks page pages through them all."""


def overview_clock(status: dict[str, Any]) -> dict[str, Any]:
    """The vector clock entries the overview lists (this database's device first) and how
    many it leaves to the clocks page."""
    held = status.get("clock") or {}
    local = status.get("device_id")
    order = ([local] if local in held else []) + [device for device in held if device != local]
    return {
        "entries": [(device, held[device]) for device in order[:OVERVIEW_LISTED]],
        "more": max(0, len(order) - OVERVIEW_LISTED),
    }


async def cluster_status_for(datasette, actor, db, found: dict[str, Any]) -> dict[str, Any]:
    """The cluster status as this actor may see it. A refusal's message can quote any table's
    values (``UNIQUE constraint failed: salaries.name``) and does not say which tables it
    concerns, so it is shown only to an actor who may push here and view every table of the
    database; others get the reason code alone."""
    if not found.get("latest_refused") or await reads_refusals(datasette, actor, db):
        return found
    return {**found, "latest_refused": [{**refused, "message": None} for refused in found["latest_refused"]]}


async def reads_refusals(datasette, actor, db) -> bool:
    """Whether the actor may push here and view every table of the database."""
    if not await can(datasette, actor, IMPORT, db.name):
        return False
    tables = set(await db.table_names()) | set(await db.execute_fn(queries.logged_tables))
    for table in tables:
        if table.startswith(("_sync_", "sqlite_")):
            continue  # the sync tables and SQLite's own hold no values of anyone's rows
        if not await can_view_table(datasette, actor, db.name, table):
            return False
    return True


async def watching(datasette, actor, db) -> list[dict[str, Any]]:
    """The devices watching this database now (a waiting pull open, or one that ended moments
    ago). Who watches as which actor is shown only to those who may export, as on the imports page.

    A pull names its device and clock itself: a device is not listed as watched by an actor
    other than the one that owns it, and its clock shows only devices the hub holds (a
    forged clock of made-up devices would make the page as long as the pullers like)."""
    feed = live.existing_feed(datasette, db.name)
    if feed is None:
        return []
    shows_actors = await can(datasette, actor, EXPORT, db.name)
    watchers = feed.connected()
    owners = await db.execute_fn(queries.device_owners) if watchers else {}
    found, listed = [], set()
    # Newest first, so a device nobody owns that several actors name is listed once, as the
    # last one's.
    for watcher in sorted(watchers, key=lambda w: w.last_seen, reverse=True):
        if owners.get(watcher.device, watcher.actor) != watcher.actor or watcher.device in listed:
            continue
        listed.add(watcher.device)
        item = watcher.as_dict()
        item["clock"] = {device: seq for device, seq in item["clock"].items() if device in feed.clock}
        if not shows_actors and item["actor"] is not None:
            item["actor"] = HIDDEN_ACTOR
        found.append(item)
    return sorted(found, key=lambda item: (item["connected_since"], item["device_id"]))


async def actor_access(datasette, actor, db) -> dict[str, Any]:
    """What the actor syncs with this hub: ``{"pull": [tables whose values a pull carries],
    "push": {table: [write actions a push may use there]}}``, over the tables in the log."""
    access = await table_access(datasette, actor, db.name, await db.execute_fn(queries.logged_tables))
    pull = viewable(access) if await can(datasette, actor, EXPORT, db.name) else []
    may_push = db.is_mutable and await can(datasette, actor, IMPORT, db.name)
    return {"pull": pull, "push": push_actions(access) if may_push else {}}


async def operations_page(datasette, request):
    db = await page_database(datasette, request)
    filters = {key: request.args.get(key) or None for key in ("table", "device", "pk", "type")}
    if filters["type"] and filters["type"] not in queries.OP_TYPES:
        raise BadRequest(f"type must be one of {', '.join(queries.OP_TYPES)}")
    if filters["pk"] and not filters["table"]:
        raise BadRequest("Filtering by pk needs a table too")
    size = page_size(request)
    try:
        after = queries.parse_next(request.args.get("next"))
    except queries.InvalidArgument as ex:
        raise BadRequest(str(ex))
    visible = await viewable_tables(datasette, request, db)

    def read(conn, hidden):
        # Read before the page's operations: one landing in between makes the script refetch.
        since = clock(conn) if is_enabled(conn) else {}
        device = filters["device"]
        if device:
            try:
                device = resolve_device(conn, device)
            except SyncError as ex:
                raise queries.InvalidArgument(str(ex))
        page = queries.operations(
            conn,
            table=filters["table"],
            device=device,
            pk=filters["pk"],
            op_type=filters["type"],
            after=after,
            size=size,
            hidden=hidden,
        )
        tables = [name for name in queries.synced_tables(conn) if name not in hidden]
        return page, tables, [d["device_id"] for d in queries.devices(conn)], device, since

    page, tables, devices, filters["device"], since = await read_page(db, hiding(visible, read))
    base = sync_url(datasette, db.name) + "/operations"
    next_url = with_args(base, request, next=page["next"]) if page["next"] else None
    data = {"operations": page["operations"], "next": page["next"]}
    table_urls = {}
    for table in {op["table"] for op in page["operations"] if op["table"]}:
        if await db.table_exists(table):
            table_urls[table] = datasette.urls.table(db.name, table)
    return await render(
        datasette,
        request,
        db,
        "sync_operations.html",
        "operations",
        {
            "operations": page["operations"],
            "next_url": next_url,
            "filters": filters,
            "tables": tables,
            "devices": devices,
            "types": queries.OP_TYPES,
            "table_urls": table_urls,
            "clear_url": base,
            "live_since": protocol.encode_clock(since),
        },
        data,
    )


async def conflicts_page(datasette, request):
    db = await page_database(datasette, request)
    include_resolved = request.args.get("all") in ("1", "true", "on")
    table = request.args.get("table") or None
    next_token = request.args.get("next") or None
    size = page_size(request, CONFLICTS_PAGE_SIZE)
    visible = await viewable_tables(datasette, request, db)

    def read(conn, hidden):
        page = queries.conflicts(
            conn, include_resolved=include_resolved, table=table, after=next_token, size=size, hidden=hidden
        )
        keys = queries.conflict_keys(conn, [conflict["id"] for conflict in page["conflicts"]])
        return page, [name for name in queries.logged_tables(conn) if name not in hidden], keys

    page, tables, keys = await read_page(db, hiding(visible, read))
    base = sync_url(datasette, db.name) + "/conflicts"
    next_url = with_args(base, request, next=page["next"]) if page["next"] else None
    can_resolve = db.is_mutable and await can(datasette, request.actor, RESOLVE, db.name)
    # Every resolution updates its row: without update-row on the table, no button would work.
    writable = await table_access(datasette, request.actor, db.name, sorted({c["table"] for c in page["conflicts"]}))
    shown = []
    for conflict in page["conflicts"]:
        grid = conflict_grid(conflict)
        row_url = None
        table_exists = await db.table_exists(conflict["table"])
        plain_pk = all(isinstance(v, (str, int, float)) for v in conflict["pk"])
        if conflict["current"] is not None and plain_pk and table_exists:
            pk_path = ",".join(tilde_encode(str(v)) for v in conflict["pk"])
            row_url = datasette.urls.row(db.name, conflict["table"], pk_path)
        # The page's filters ride along, so the form's answer comes back to this page.
        resolve_url = with_args(datasette.urls.database(db.name) + protocol.resolve_path(conflict["id"]), request)
        history = pk_filter(keys.get(conflict["id"], conflict["pk"]))
        # A table dropped since has no row to write: the resolve endpoint refuses (table_missing).
        may_resolve = can_resolve and table_exists and UPDATE_ROW in writable.get(conflict["table"], ())
        shown.append(
            {**grid, "row_url": row_url, "resolve_url": resolve_url, "table_missing": not table_exists,
             "history_pk": history, "may_resolve": may_resolve}
        )
    return await render(
        datasette,
        request,
        db,
        "sync_conflicts.html",
        "conflicts",
        {
            "conflicts": shown,
            "include_resolved": include_resolved,
            "table": table,
            "next_url": next_url,
            "can_resolve": can_resolve,
            "tables": tables,
            "clear_url": base,
            "resolve_hint": resolve_hint(db, request.actor, can_resolve, shown),
            "toggle_url": with_args(base, request, all=None if include_resolved else "1", next=None),
        },
        page,
    )


def resolve_hint(db, actor, can_resolve: bool, shown: list[dict]) -> str | None:
    """Why the conflicts page shows no resolve buttons (for some conflicts), and what would change that."""
    if can_resolve:
        if all(c["may_resolve"] or c["resolved"] or c["table_missing"] for c in shown):
            return None
        return (
            f"Resolving a conflict also needs {UPDATE_ROW} on its table (and {INSERT_ROW} to restore a deleted row, "
            f"{DELETE_ROW} to keep a deletion): conflicts of tables where you lack it show no buttons."
        )
    if not db.is_mutable:
        return (
            f"Database {db.name} is read-only here (immutable), so its conflicts cannot be resolved on this page: "
            "run sqlite-utils sync-resolve on a copy that can write, and the resolution syncs like any edit."
        )
    who = "You are not signed in" if actor is None else f"Actor {actor.get('id')!r} does not have it"
    return (
        f"Resolving needs the {RESOLVE} permission on database {db.name}. "
        f"{who}: ask whoever runs this Datasette to grant it in datasette.yaml."
    )


MISSING = object()


def conflict_grid(conflict: dict) -> dict:
    """Versions side by side: one line per column, the disputed ones flagged, and which
    version the table holds now."""
    current = conflict["current"]
    disputed = set(conflict["columns"])
    columns = list(current) if current else []
    for version in conflict["versions"]:
        columns += [c for c in (version["values"] or {}) if c not in columns]
    versions = []
    for version in conflict["versions"]:
        values = version["values"]
        if values is None:
            in_table = current is None
        else:
            compare = [c for c in values if c in disputed] or list(values)
            in_table = current is not None and all(current.get(c, MISSING) == values[c] for c in compare)
        versions.append({**version, "in_table": in_table})
    lines = [
        {
            "column": column,
            "disputed": column in disputed,
            "cells": [version_cell(version, column) for version in versions],
            "current": current.get(column, MISSING) if current else MISSING,
        }
        for column in columns
    ]
    return {**conflict, "versions": versions, "lines": lines, "missing": MISSING}


def version_cell(version: dict, column: str) -> dict:
    if version["values"] is None:
        return {"state": "deleted"}
    if column not in version["values"]:
        # An update that did not touch this column.
        return {"state": "unchanged"}
    return {"state": "value", "value": version["values"][column]}


CLOCKS_MAX_PAGE_SIZE = 100
"""The clocks page draws a cell per peer per device: pages of both stay this small at most."""


async def clocks_page(datasette, request):
    db = await page_database(datasette, request)
    size = min(page_size(request), CLOCKS_MAX_PAGE_SIZE)
    after = request.args.get("next") or None
    peers_after = request.args.get("peers_next") or None
    visible = await viewable_tables(datasette, request, db)

    def read(conn, hidden):
        status, names = sync_status(conn), device_names(conn)
        page = queries.device_page(conn, hidden, after=after, size=size)
        devices = [{**device, "name": names.get(device["device_id"])} for device in page["devices"]]
        # Every device a hub imports from is a peer: the columns are this page's devices only.
        peers = queries.peer_page(conn, after=peers_after, size=size, devices=[d["device_id"] for d in devices])
        return status, devices, page["next"], peers

    status, devices, next_device, peers = await read_page(db, hiding(visible, read))
    matrix = [
        {
            **peer,
            "cells": [
                {"seq": peer["clock"].get(d["device_id"], 0), "behind": peer["clock"].get(d["device_id"], 0) < d["seq"]}
                for d in devices
            ],
        }
        for peer in peers["peers"]
    ]
    base = sync_url(datasette, db.name) + "/clocks"
    data = {
        "enabled": status["enabled"],
        "device_id": status["device_id"],
        "device_name": status["device_name"],
        "devices": devices,
        "next": next_device,
        "peers": peers["peers"],
        "peers_next": peers["next"],
    }
    return await render(
        datasette,
        request,
        db,
        "sync_clocks.html",
        "clocks",
        {
            "status": status,
            "devices": devices,
            "matrix": matrix,
            "peer_count": peers["total"],
            "next_url": with_args(base, request, next=next_device) if next_device else None,
            "peers_next_url": with_args(base, request, peers_next=peers["next"]) if peers["next"] else None,
            "first_url": with_args(base, request, next=None, peers_next=None) if after or peers_after else None,
        },
        data,
    )


HIDDEN_ACTOR = "(hidden)"


async def imports_page(datasette, request):
    db = await page_database(datasette, request)
    next_token = request.args.get("next") or None
    size = page_size(request)
    visible = await viewable_tables(datasette, request, db)
    page = await read_page(
        db, hiding(visible, lambda conn, hidden: queries.imports(conn, after=next_token, size=size, hidden=hidden))
    )
    # Who pushed which device tells who owns it on this hub: only for those who may export.
    shows_actors = await can(datasette, request.actor, EXPORT, db.name)
    for item in page["imports"]:
        if not shows_actors and item["actor"] is not None:
            item["actor"] = HIDDEN_ACTOR
    base = sync_url(datasette, db.name) + "/imports"
    next_url = with_args(base, request, next=page["next"]) if page["next"] else None
    return await render(
        datasette,
        request,
        db,
        "sync_imports.html",
        "imports",
        {"imports": page["imports"], "next_url": next_url},
        page,
    )


# Endpoints --------------------------------------------------------------------------------
#
# Each endpoint is a class dispatched on the request method, like Datasette's views/base.py
# View. A refusal is raised as one of Datasette's error classes carrying a reason (below)
# or as the engine's SyncError, and the endpoint answers it itself with protocol's JSON
# error body: Datasette would send a raised NotFound to its 404 handling (which redirects
# a %-encoded URL) and a Forbidden to its forbidden hook, and neither keeps the reason.


class EndpointError(Base400):
    """A sync endpoint's refusal, with the status protocol gives its ``reason``. A page that
    raises one gets Datasette's error page with that status."""

    reason = errors.INVALID_REQUEST

    def __init__(self, message: str, reason: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.reason = reason or self.reason
        self.status = protocol.status_for(self.reason)
        self.headers = headers


class SyncBadRequest(EndpointError, BadRequest):
    pass


class Unauthorized(EndpointError):
    reason = errors.UNAUTHORIZED


class SyncForbidden(EndpointError, Forbidden):
    reason = errors.FORBIDDEN


class SyncNotFound(EndpointError, NotFound):
    reason = errors.NOT_FOUND


class MethodNotAllowed(EndpointError):
    reason = errors.METHOD_NOT_ALLOWED


class SyncPayloadTooLarge(EndpointError, PayloadTooLarge):
    reason = errors.TOO_LARGE


def refusal(ex: EndpointError) -> Response:
    return Response.json(protocol.error_body(str(ex), ex.reason), status=ex.status, headers=ex.headers)


def is_busy(ex: sqlite3.Error) -> bool:
    """SQLITE_BUSY or SQLITE_LOCKED: another connection holds a lock longer than we waited."""
    code = getattr(ex, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(ex) or "busy" in str(ex)


def sqlite_refusal(ex: sqlite3.Error, database: str) -> EndpointError:
    """The refusal for an SQLite error: a lock is temporary (busy, with Retry-After)."""
    if is_busy(ex):
        message = f"Database {database} is busy: another connection holds a lock on it. Retry in a few seconds"
        return EndpointError(message, errors.BUSY, {protocol.RETRY_AFTER_HEADER: str(protocol.BUSY_RETRY_SECONDS)})
    return EndpointError(f"SQLite error: {ex}", errors.SQLITE_ERROR)


def import_sqlite_refusal(ex: sqlite3.Error, database: str) -> EndpointError:
    """An SQLite error while importing a pushed bundle: a lock is temporary (503), the hub's
    own trouble is a 500, and anything else (a malformed chunk image, say) is the bundle's 400."""
    if is_busy(ex):
        return sqlite_refusal(ex, database)
    if errors.is_local_trouble(ex):
        return sqlite_refusal(ex, database)
    return SyncBadRequest(f"Bundle could not be read: {ex}. Nothing was imported", errors.INVALID_BUNDLE)


class Endpoint:
    """The checks every endpoint shares, in order: 401 (a Bearer token nobody recognised),
    404, 405, 403 (the endpoint's ``action``); then the method's handler, called as
    ``handler(request, datasette, db)``."""

    action: str
    METHODS = ("get", "head", "post")

    async def __call__(self, request, datasette):
        db = None
        try:
            check_token(request)
            db = endpoint_database(datasette, request)
            handler = self.handler(request)
            if not await can(datasette, request.actor, self.action, db.name):
                raise SyncForbidden(f"Permission denied: needs {self.action}")
            return await handler(request, datasette, db)
        except EndpointError as ex:
            return self.refuse(request, ex)
        except SyncError as ex:
            return self.refuse(request, EndpointError(ex.message, ex.reason))
        except sqlite3.Error as ex:
            return self.refuse(request, sqlite_refusal(ex, db.name if db else ""))

    def handler(self, request):
        name = request.method.lower()
        handler = getattr(self, name, None) if name in self.METHODS else None
        if handler is None:
            allowed = [method.upper() for method in self.METHODS if hasattr(self, method)]
            raise MethodNotAllowed(f"Use {allowed[0]}", headers={"Allow": ", ".join(allowed)})
        return handler

    def refuse(self, request, ex: EndpointError) -> Response:
        return refusal(ex)


def check_token(request) -> None:
    authorization = request.headers.get("authorization") or ""
    if authorization[:7].lower() == "bearer " and request.actor is None:
        # Datasette answers 401 itself only for dstok_ tokens; any other token nobody
        # recognised would otherwise look like a missing permission (403).
        raise Unauthorized("Invalid token: the Bearer token does not authenticate any actor")


def endpoint_database(datasette, request):
    try:
        return resolve_database(datasette, request)
    except NotFound:
        raise SyncNotFound("Database not found")


class ExportEndpoint(Endpoint):
    """GET: the operations the caller lacks (everything without ``since``) as a bundle;
    HEAD: its headers only."""

    action = EXPORT

    async def get(self, request, datasette, db):
        since = protocol.decode_clock(request.args.get(protocol.SINCE_PARAM) or None, "since query parameter")
        wait, device = wait_args(request, datasette, db)
        requested = protocol.parse_tables(request.args.getlist(protocol.TABLE_PARAM))
        tables, visible = await pull_scope(datasette, request.actor, db, requested)
        await capture_in_step(db)
        if wait > 0:
            await wait_for_news(datasette, request, db, since, device, wait)
            made = await shared_export(request, db, live.feed(datasette, db.name), since, tables)
        else:
            made = await own_export(request, db, since, tables)
        response = await within_scope(request, datasette, db, since, requested, (tables, visible), made)
        response.timeout = send_timeout(datasette, db.name)
        return response

    head = get


SCOPE_TRIES = 3
"""Exports a pull may make while new tables keep appearing in the log before it answers 503."""


async def within_scope(request, datasette, db, since: dict, requested: list[str], scope: tuple, made: tuple):
    """The pull's answer, ``made`` (response, result) for ``scope`` (``pull_scope``'s), once it
    tells of no table the actor was not found allowed to view: pull_scope read the log before
    the export's snapshot, and a table first logged in between is in a bundle of every table.
    Such an answer is dropped, and the scope decided and the bundle made again."""
    (tables, visible), (response, result) = scope, made
    for attempt in range(1, SCOPE_TRIES + 1):
        if tables is not None or visible.issuperset(result.tables):
            return response
        await response.discard()
        if attempt == SCOPE_TRIES:
            break
        tables, visible = await pull_scope(datasette, request.actor, db, requested)
        response, result = await own_export(request, db, since, tables)
    raise EndpointError(
        f"Database {db.name} is busy: new tables kept appearing in its log while the pull was exported. "
        "Retry in a few seconds",
        errors.BUSY,
        {protocol.RETRY_AFTER_HEADER: str(protocol.BUSY_RETRY_SECONDS)},
    )


async def own_export(request, db, since: dict, tables: set[str] | None) -> tuple[BundleDownload, ExportResult]:
    """A bundle made for this request alone."""
    directory = new_export_directory()
    try:
        result = await db.execute_fn(exporter(db, directory, since, tables))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return export_response(request, directory, result, tables), result


_SCHEMA_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""The schema version each hub database's capture was last found in step at."""


async def capture_in_step(db) -> None:
    """Repair capture before an export if another process changed a synced table's schema
    (``sqlite-utils transform`` while the hub runs drops its triggers): a hub's exports only
    read, so the edits made after such a change would otherwise wait, unlogged, for the next
    push. Looked at once per schema version; the repair is a write of its own."""
    if not db.is_mutable:
        return
    version = await db.execute_fn(schema_version)
    if _SCHEMA_CHECKED.get(db) == version:
        return
    if await db.execute_fn(lambda conn: bool(drifted_tables(conn))):
        with sync_write():
            await db.execute_write_fn(repair_capture, transaction=False)
        version = await db.execute_fn(schema_version)
    _SCHEMA_CHECKED[db] = version  # a table left unrepaired is not tried again on every pull


def new_export_directory() -> pathlib.Path:
    return pathlib.Path(tempfile.mkdtemp(prefix="datasette-sync-"))


def exporter(db, directory: pathlib.Path, since: dict, tables: set[str] | None):
    def export(conn):
        # repair=False: a read connection cannot write, and exporting must not.
        return export_bundle(
            conn, directory / "export.bundle", since=since, repair=False, tables=tables, unknown_tables=True,
            immutable=not db.is_mutable,
        )

    return export


async def shared_export(
    request, db, feed, since: dict, tables: set[str] | None
) -> tuple[BundleDownload, ExportResult]:
    """A waiting pull's answer: the pulls woken by one write that ask for the same operations
    (same scope, same ``since`` once lowered to the hub's clock) share one export, so a write
    costs the hub one bundle, not one per watcher."""
    since = live.shared_since(since, feed.clock)
    scope = None if tables is None else tuple(sorted(tables))
    key = (tuple(sorted(since.items())), scope, tuple(sorted(feed.clock.items())))

    async def make(directory):
        export = exporter(db, directory, since, tables)

        def export_and_read(conn):
            # A small bundle is read once here, so each of its many answers is one send on the
            # event loop instead of a stat, an open and reads on the thread pool.
            result = export(conn)
            path = directory / "export.bundle"
            return result, path.read_bytes() if path.stat().st_size <= SHARED_IN_MEMORY else None

        return await db.execute_fn(export_and_read)

    shared = live.share_export(feed, key, new_export_directory, make)
    result, content = await shared.result()
    response = export_response(request, shared.directory, result, tables, release=shared.release)
    response.content = content
    return response, result


SHARED_IN_MEMORY = 1 << 20
"""A shared bundle up to this size is served from memory (a live edit's bundle is a few KB)."""


def export_response(request, directory: pathlib.Path, result, tables: set[str] | None, release=None) -> BundleDownload:
    return BundleDownload(
        directory,
        directory / "export.bundle",
        filename=f"{result.bundle_id}.bundle",
        headers={
            protocol.CLOCK_HEADER: protocol.encode_clock(result.clock),
            protocol.OPERATIONS_HEADER: str(result.operations),
            protocol.SCOPE_HEADER: json.dumps(None if tables is None else sorted(tables)),
        },
        body=request.method != "HEAD",
        release=release,
    )


def wait_args(request, datasette, db) -> tuple[float, str | None]:
    """The seconds a pull may wait (capped by ``max_wait``, and by when the caller's token
    expires: a pull answered later would carry what was written after it) and the caller's
    device id."""
    wait = min(protocol.parse_wait(request.args.get(protocol.WAIT_PARAM)), max_wait(datasette, db.name))
    expires = (request.actor or {}).get("token_expires")
    if isinstance(expires, (int, float)):
        wait = max(0.0, min(wait, expires - time.time()))
    device = request.args.get(protocol.DEVICE_PARAM) or None
    if device is not None and not is_device_id(device):
        raise SyncBadRequest(f"device must be a device id (32 hex digits), got {device[:40]!r}")
    return wait, device


async def wait_for_news(datasette, request, db, since: dict, device: str | None, seconds: float) -> bool:
    """Hold a pull until the hub has a data operation ``since`` lacks (not the caller's own),
    the wait is over or the caller hangs up; the device counts as watching meanwhile."""
    feed = live.feed(datasette, db.name)
    actor_id = (request.actor or {}).get("id")
    watcher = None if device is None else feed.watching(device, None if actor_id is None else str(actor_id), since)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        return await feed.wait(since, device, seconds, gone)
    finally:
        if watcher is not None:
            feed.done_watching(watcher, hung_up=gone.done() and not gone.cancelled())
        gone.cancel()


async def disconnected(request) -> None:
    """Finishes when the client hangs up (a GET's body was read already: the next message
    the server sends the app is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class ChangesEndpoint(Endpoint):
    """GET: whether the hub holds data operations ``since`` lacks, waiting up to ``wait``
    seconds for one: ``{"clock", "operations", "changed"}``. For the sync pages' script, so
    it needs what the pages need."""

    action = VIEW
    METHODS = ("get",)

    async def get(self, request, datasette, db):
        since = protocol.decode_clock(request.args.get(protocol.SINCE_PARAM) or None, "since query parameter")
        wait, _ = wait_args(request, datasette, db)
        feed = live.feed(datasette, db.name)
        if wait > 0:
            gone = asyncio.ensure_future(disconnected(request))
            try:
                await feed.wait(since, None, wait, gone)
            finally:
                gone.cancel()
        else:
            await feed.refresh()
        held = feed.clock
        newer = sum(max(0, seq - since.get(device, 0)) for device, seq in held.items())
        return Response.json({"clock": held, "operations": newer, "changed": feed.news_for(since, None)})


async def pull_scope(datasette, actor, db, requested: list[str]) -> tuple[set[str] | None, frozenset[str]]:
    """The tables whose values a pull carries (None: every table, today's full bundle), and
    the tables the actor was found allowed to view.

    Without ``table=`` parameters: every table in the log the actor may view, None when that
    is all of them, a 403 when it is none. With them: exactly those tables, each of which the
    actor must be allowed to view (a table not in the log yet is fine: its operations may come
    later). Operations of every other table are withheld, so their values never leave the hub.
    """
    if requested:
        access = await table_access(datasette, actor, db.name, requested)
        for table in requested:
            if VIEW_TABLE not in access[table]:
                raise SyncForbidden(
                    f"Permission denied: table {table} cannot be pulled, it needs view-table on it",
                    errors.TABLE_FORBIDDEN,
                )
        return set(requested), frozenset(requested)
    logged = await db.execute_fn(queries.logged_tables)
    visible = viewable(await table_access(datasette, actor, db.name, logged))
    if logged and not visible:
        # A copy of no table holds nothing, and could push nothing: its own edits go withheld.
        raise SyncForbidden(
            f"Permission denied: no table of database {db.name} may be viewed with these credentials, "
            "so there is nothing to pull; it needs view-table on a table",
            errors.TABLE_FORBIDDEN,
        )
    return None if len(visible) == len(logged) else set(visible), frozenset(visible)


class BundleDownload(Response):
    """Streams a bundle from its temporary file (never whole in memory), then removes it.

    A ``Response``, so Datasette can add its cookies (it sets ``ds_messages`` on any
    response to a request that carries one). ``body=False`` answers a HEAD: the headers only.
    """

    CHUNK = 1 << 20
    SLICE = 64 * 1024

    def __init__(
        self,
        directory: pathlib.Path,
        path: pathlib.Path,
        filename: str,
        headers: dict,
        body: bool = True,
        release=None,
    ):
        super().__init__(status=200, headers=headers, content_type=protocol.BUNDLE_MEDIA_TYPE)
        # A client that stops reading would hold the file (a whole export) for as long as it
        # keeps the connection open: each SLICE must be taken within ``timeout`` seconds (the
        # export endpoint sets the database's ``send_timeout``).
        self.timeout = DEFAULT_SEND_TIMEOUT
        self.directory = directory
        self.release = release  # a shared file: say this response is done with it, never remove it
        self.content = None  # the file's bytes, when already read
        self.path = path
        self.filename = filename
        self.body_wanted = body

    async def send_slices(self, send, chunk: bytes, more: bool) -> bool:
        """Send ``chunk`` a SLICE at a time, each taken within ``timeout`` (a slow link still
        gets 1 KB/s); False once the client takes too long."""
        for start in range(0, len(chunk) or 1, self.SLICE):
            piece = chunk[start : start + self.SLICE]
            last = start + self.SLICE >= len(chunk)
            try:
                await asyncio.wait_for(send({"type": "http.response.body", "body": piece, "more_body": more or not last}), self.timeout)
            except asyncio.TimeoutError:
                return False
        return True

    async def discard(self) -> None:
        """Never sent: let go of its file as sending it would have."""
        if self.release is not None:
            self.release()
        else:
            await asyncio.to_thread(shutil.rmtree, self.directory, True)

    async def asgi_send(self, send):
        try:
            size = len(self.content) if self.content is not None else (await asyncio.to_thread(os.stat, self.path)).st_size
            headers = {
                **self.headers,
                "content-type": self.content_type,
                "content-disposition": f'attachment; filename="{self.filename}"',
                "content-length": str(size),
            }
            raw = [[key.lower().encode("latin-1"), str(value).encode("latin-1")] for key, value in headers.items()]
            raw += [[b"set-cookie", cookie.encode("latin-1")] for cookie in self._set_cookie_headers]
            await send({"type": "http.response.start", "status": self.status, "headers": raw})
            if not self.body_wanted:
                await send({"type": "http.response.body", "body": b""})
                return
            if self.content is not None:  # a bundle shared by waiting pulls, read once
                await self.send_slices(send, self.content, False)
                return
            with await asyncio.to_thread(open, self.path, "rb") as source:
                while True:
                    chunk = await asyncio.to_thread(source.read, self.CHUNK)
                    more = len(chunk) == self.CHUNK
                    if not await self.send_slices(send, chunk, more):
                        return  # the server closes a response left unfinished
                    if not more:
                        break
        finally:
            await self.discard()


class ImportEndpoint(Endpoint):
    """POST a bundle as the raw body: apply it, answer like ``import-bundle --json``."""

    action = IMPORT

    async def post(self, request, datasette, db):
        alter = request.args.get(protocol.ALTER_PARAM) in protocol.TRUE_VALUES
        # Refused once the bundle is read, and only if it has a table it could alter: a new
        # copy's first sync with --alter pushes nothing but its knowledge tick.
        alter_denied = alter and not await can_alter(datasette, request.actor, db.name)
        if not db.is_mutable:
            raise SyncForbidden(
                f"Database {db.name} is read-only (immutable): bundles cannot be imported", errors.READ_ONLY
            )
        limit = max_bundle_bytes(datasette, db.name)
        if declared_length(request) > limit:
            raise too_large(limit)
        actor_id = (request.actor or {}).get("id")
        options = {
            "alter": alter and not alter_denied,
            "actor": None if actor_id is None else str(actor_id),
            "max_clock_skew": max_clock_skew(datasette, db.name),  # checked at startup (check_config)
            "may_relay": await can(datasette, request.actor, RELAY, db.name),
        }
        with tempfile.TemporaryDirectory(prefix="datasette-sync-") as directory:
            path = os.path.join(directory, "upload.bundle")
            await receive_to_file(request, path, limit, send_timeout(datasette, db.name))
            result = await import_pushed(datasette, request.actor, db, path, options, alter_denied)
        live.changed(datasette, db.name)
        body = result.as_dict()
        body["clock"] = result.clock
        return Response.json(body, headers={protocol.CLOCK_HEADER: protocol.encode_clock(result.clock)})


def too_large(limit: int) -> SyncPayloadTooLarge:
    return SyncPayloadTooLarge(f"Bundle is larger than the limit of {limit} bytes (max_bundle_bytes)")


def declared_length(request) -> int:
    """The body's Content-Length, 0 when none is declared (chunked: the streaming check applies)."""
    try:
        return int(request.headers.get("content-length", ""))
    except ValueError:
        return 0


async def receive_to_file(request, path: str, limit: int, timeout: float) -> int:
    """Stream the request body to ``path``, stopping as soon as it passes ``limit`` bytes, or
    when it comes slower than ``protocol.MIN_RATE`` once ``timeout`` seconds are past (a
    trickle would otherwise hold a connection and a temporary file for as long as it likes).

    Reads the ASGI channel directly: ``post_body()`` would hold the whole bundle in memory.
    """
    received = 0
    deadline = time.monotonic() + timeout
    out = await asyncio.to_thread(open, path, "wb")
    try:
        more_body = True
        while more_body:
            try:
                message = await asyncio.wait_for(request.receive(), deadline + received / protocol.MIN_RATE - time.monotonic())
            except asyncio.TimeoutError:
                raise EndpointError(
                    f"Bundle came too slowly (under {protocol.MIN_RATE:,} bytes a second): nothing was imported",
                    errors.TOO_SLOW,
                ) from None
            if message["type"] == "http.disconnect":
                raise SyncBadRequest("Client disconnected", errors.DISCONNECTED)
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > limit:
                raise too_large(limit)
            if chunk:
                await asyncio.to_thread(out.write, chunk)
            more_body = message.get("more_body", False)
    finally:
        out.close()
    return received


def validate_bundle(path: str) -> list[str]:
    """Check every hash of the bundle; the names of the tables its chunks carry operations of.
    Only those can a push write or be refused for (a table it only names is never stored), so
    only those cost a permission check: a header may name a thousand."""
    reader = BundleReader(path)
    try:
        names = [entry[0] for entry in reader.header["tables"]]
        carried = reader.conn.execute("SELECT DISTINCT tbl FROM bundle_chunks WHERE tbl >= 0 ORDER BY tbl")
        return [names[position] for (position,) in carried if position < len(names)]
    finally:
        reader.close()


async def import_pushed(datasette, actor, db, path: str, options: dict, alter_denied: bool = False):
    """Check every hash of the pushed bundle off the event loop, so a bad bundle never takes
    a turn on the write thread, then import it there. On a cluster hub that import is only
    the check: a push it accepts is published and answered from what this hub's consumer
    makes of it at its stream position (cluster.Ordered). Raises the engine's SyncError, or
    an EndpointError for an SQLite error (import_sqlite_refusal) or anything else."""
    try:
        tables = await asyncio.to_thread(validate_bundle, path)
        if alter_denied and tables:
            raise SyncForbidden("Permission denied: alter=1 also needs the alter-table permission")
        # Asked here, on the event loop: the importer's hook runs on the write thread.
        logged = await db.execute_fn(queries.logged_tables)
        access = await table_access(datasette, actor, db.name, [*logged, *tables])
        authorize = write_authorizer(access)
        visible = set(viewable(access))
        nameable = {table for table, actions in access.items() if actions}
        stored = cluster.before_commit(datasette, db.name, path, options)  # None unless a cluster hub
        try:
            with sync_write():
                return await db.execute_write_fn(
                    lambda conn: import_bundle(
                        conn, path, authorize=authorize, visible=visible, nameable=nameable, before_commit=stored, **options
                    ),
                    transaction=False,
                )
        except cluster.Ordered as ordered:
            return await cluster.outcome(datasette, db.name, ordered)
    except SyncError as ex:
        if ex.reason == errors.CLUSTER_UNAVAILABLE:
            raise EndpointError(ex.message, ex.reason, {protocol.RETRY_AFTER_HEADER: str(protocol.CLUSTER_RETRY_SECONDS)})
        raise
    except EndpointError:
        raise
    except sqlite3.Error as ex:
        raise import_sqlite_refusal(ex, db.name)
    except Exception as ex:
        # The body is the only input here, and the import rolled back: the sender's
        # problem (400), logged in full so a bug in reading bundles is still seen.
        log.exception("datasette-sync: a bundle pushed to %s could not be imported", db.name)
        raise SyncBadRequest(
            f"Bundle could not be read ({type(ex).__name__}): nothing was imported", errors.INVALID_BUNDLE
        )


def write_authorizer(access: dict[str, frozenset[str]], writer: str = "the bundle", undone: str = "imported"):
    """The engine's ``authorize`` hook for a push (or a resolution): it is given the write
    actions the new operations need per table, and refuses the whole write (it rolls back) at
    the first one the actor does not hold."""

    def authorize(needed: dict[str, set[str]]) -> None:
        refused = refused_write(access, needed)
        if refused is not None:
            table, action = refused
            verb = WRITE_VERBS.get(action, f"needs {action} on")
            raise SyncError(
                errors.TABLE_FORBIDDEN,
                f"Permission denied: {writer} {verb} table {table}, which needs {action} on it. Nothing was {undone}",
            )

    return authorize


class ResolveEndpoint(Endpoint):
    """POST ``keep`` (form field or JSON): resolve one conflict with a new operation.

    A JSON caller gets JSON. The conflicts page's form gets what a browser wants: Datasette's
    own 403 and 400 pages, and a redirect to the conflicts page with a message."""

    action = RESOLVE

    def refuse(self, request, ex: EndpointError) -> Response:
        if ex.reason == errors.FORBIDDEN and not wants_json(request):
            raise Forbidden(str(ex))
        return refusal(ex)

    async def post(self, request, datasette, db):
        if not db.is_mutable:
            raise SyncForbidden(
                f"Database {db.name} is read-only (immutable): conflicts cannot be resolved here", errors.READ_ONLY
            )
        conflict_id = request.url_vars["conflict_id"]
        keep = await read_keep(request)
        try:
            op, record = await resolve(datasette, request, db, conflict_id, keep)
        except (SyncError, sqlite3.Error) as ex:
            if wants_json(request):
                raise
            message = str(ex) if isinstance(ex, SyncError) else str(sqlite_refusal(ex, db.name))
            datasette.add_message(request, message, datasette.ERROR)
            return Response.redirect(conflicts_page_url(datasette, request, db.name))
        if wants_json(request):
            return Response.json({"ok": True, "op": op, "conflict": record})
        datasette.add_message(request, f"Resolved conflict {conflict_id} with operation {op}", datasette.INFO)
        return Response.redirect(conflicts_page_url(datasette, request, db.name))


CONFLICTS_PAGE_ARGS = ("table", "all", "next", "_size")


def conflicts_page_url(datasette, request, database: str) -> str:
    """The conflicts page a resolve form came from: its filters, passed in the form's URL
    (only those: the path is always the conflicts page, so no redirect leads elsewhere)."""
    args = [(key, value) for key, value in urllib.parse.parse_qsl(request.query_string) if key in CONFLICTS_PAGE_ARGS]
    query = urllib.parse.urlencode(args)
    return sync_url(datasette, database) + "/conflicts" + (f"?{query}" if query else "")


def wants_json(request) -> bool:
    return protocol.JSON_MEDIA_TYPE in (request.headers.get("content-type") or "") or protocol.JSON_MEDIA_TYPE in (
        request.headers.get("accept") or ""
    )


async def read_keep(request) -> str | None:
    """The ``keep`` of a resolve request, from JSON or from the conflicts page's form."""
    content_type = request.headers.get("content-type") or ""
    is_json = protocol.JSON_MEDIA_TYPE in content_type or (wants_json(request) and "form" not in content_type)
    try:
        return (json_keep if is_json else form_keep)(await request.post_body())
    except SyncError as ex:
        if wants_json(request):
            raise
        raise BadRequest(str(ex))


async def resolve(datasette, request, db, conflict_id: str, keep: str | None):
    """Resolve the conflict on the write thread: (the new op id, the conflict record)."""
    table = await db.execute_fn(lambda conn: queries.conflict_table(conn, conflict_id))
    # A conflict on a table the actor may not view does not exist for them, as on the
    # conflicts page: its versions hold that table's rows.
    if table is None or not await can_view_table(datasette, request.actor, db.name, table):
        raise SyncError(errors.UNKNOWN_CONFLICT, f"No conflict with id {conflict_id}")
    # The row actions the resolution takes, as a pushed resolution needs them: sync-resolve
    # alone must not write where the actor may not.
    access = await table_access(datasette, request.actor, db.name, [table])
    authorize = write_authorizer(access, f"resolving conflict {conflict_id}", "changed")

    def write(conn):
        op = resolve_conflict(conn, conflict_id, keep=keep, authorize=authorize)
        return op, get_conflict(conn, conflict_id)

    with sync_write():
        result = await db.execute_write_fn(write, transaction=False)
    live.changed(datasette, db.name)
    return result


KEEP_HELP = 'send {"keep": "<op id>"} to restore that version, or {} to accept what is in the table now'


def json_keep(raw: bytes) -> str | None:
    """The ``keep`` of a JSON resolve request. Anything but ``{}`` or ``{"keep": "<op id>"}``
    is refused: a typo must not silently accept what is in the table now."""
    try:
        body = json.loads(raw.strip() or b"{}")
    except (ValueError, RecursionError):
        # RecursionError: nesting deeper than json can read, which no valid request has.
        raise SyncError(errors.INVALID_JSON, f"Request body is not valid JSON: {KEEP_HELP}")
    if not isinstance(body, dict):
        raise SyncError(errors.INVALID_REQUEST, f"Request body must be a JSON object: {KEEP_HELP}")
    unknown = sorted(set(body) - {protocol.KEEP_FIELD})
    if unknown:
        raise SyncError(
            errors.INVALID_REQUEST, f"Unknown key {json.dumps(unknown[0])} in the request body: {KEEP_HELP}"
        )
    if protocol.KEEP_FIELD not in body:
        return None
    keep = body[protocol.KEEP_FIELD]
    if not isinstance(keep, str) or not keep:
        shown = json.dumps(keep)
        shown = shown if len(shown) <= 60 else shown[:60] + "…"
        raise SyncError(
            errors.INVALID_REQUEST,
            f'"keep" must be an op id string like "<device id>:<seq>", got {shown}: '
            "leave it out to accept what is in the table now",
        )
    return keep


def form_keep(raw: bytes) -> str | None:
    """The ``keep`` field of the conflicts page form. An empty ``keep``, or no body at all,
    accepts what is in the table."""
    if not raw.strip():
        return None
    try:
        fields = dict(urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
    except UnicodeDecodeError:
        raise SyncError(errors.INVALID_REQUEST, "Request body is not valid UTF-8")
    if protocol.KEEP_FIELD not in fields:
        raise SyncError(
            errors.INVALID_REQUEST,
            "The form has no keep field: send keep=<op id> to restore that version, or keep= (empty) "
            "to accept what is in the table now; send JSON with Content-Type: application/json",
        )
    return fields[protocol.KEEP_FIELD] or None
