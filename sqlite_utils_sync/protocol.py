"""The hub protocol: what the client (client.py) sends a Datasette hub and what the hub's
endpoints (datasette_sync/views.py) answer. Both sides read every path, header, media type
and status from here.

Paths are relative to a database's URL (``http://127.0.0.1:8001/data``)::

    GET  /-/sync/export?since=<clock>    200: a bundle (BUNDLE_MEDIA_TYPE) of the operations
         [&table=<name>...]              the caller lacks (only of those tables, the others'
         [&wait=<s>&device=<id>]         withheld); X-Sync-Clock: the hub's clock,
                                         X-Sync-Operations: how many it holds, X-Sync-Scope:
                                         the bundle's tables (HEAD: headers only). With wait,
                                         a long-poll: see WAIT_PARAM
    GET  /-/sync/changes?since=<clock>   200: JSON {"clock", "operations", "changed"}, for
         [&wait=<s>]                     the sync pages' script (a long-poll too)
    POST /-/sync/import[?alter=1]        body: a bundle; 200: the import result as JSON
                                         (like ``import-bundle --json``), plus "clock" and
                                         X-Sync-Clock: the hub's clock after the import
    POST /-/sync/conflicts/<id>/resolve  body: {"keep": "<op id>"} or {}; 200:
                                         {"ok": true, "op": <op id>, "conflict": {...}}

A refusal is JSON, ``{"ok": false, "error": "<one line>", "reason": "<reason>"}``, with the
status :data:`STATUS` gives the reason; a ``503`` (busy) also carries ``Retry-After``.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

from . import errors
from . import oplog
from .oplog import parse_clock

SYNC_PATH = "/-/sync"
EXPORT_PATH = SYNC_PATH + "/export"
IMPORT_PATH = SYNC_PATH + "/import"
CONFLICTS_PATH = SYNC_PATH + "/conflicts"
RESOLVE_SUFFIX = "/resolve"
CONFLICT_ID_PATTERN = "[0-9a-f]{1,64}"

MIN_RATE = 1024
"""Bytes a second: a body (a pull's download, a push's upload) that comes slower than this,
once past the receiver's timeout, is given up, so a trickle cannot hold a connection and a
temporary file for ever. The slowest mobile link sends several KB a second."""

SINCE_PARAM = "since"
TABLE_PARAM = "table"
"""Repeatable: a pull wants only these tables (the others' operations come withheld)."""
MAX_TABLES = 500
"""The most distinct ``table`` parameters a pull may name: each costs a permission check."""
ALTER_PARAM = "alter"
WAIT_PARAM = "wait"
"""Seconds a pull may wait (a number >= 0): the hub answers as soon as it holds a data operation
(not a knowledge tick) of a device other than ``device`` that ``since`` lacks, or when the
wait is over, either way exactly as an export without it. The hub caps it at its
``max_wait`` setting (never refused for being long); a hub that ignores it answers at once."""
DEVICE_PARAM = "device"
"""The pulling device's id, for a waiting pull: its own operations never end the wait, and the
hub lists it as watching on its pages."""
CHANGES_PATH = SYNC_PATH + "/changes"
TRUE_VALUES = ("1", "true", "on")
KEEP_FIELD = "keep"

CLOCK_HEADER = "X-Sync-Clock"
OPERATIONS_HEADER = "X-Sync-Operations"
SCOPE_HEADER = "X-Sync-Scope"
"""The tables an exported bundle holds, as a JSON list; ``null``: every table."""
RETRY_AFTER_HEADER = "Retry-After"
BUNDLE_MEDIA_TYPE = "application/vnd.sqlite3"
JSON_MEDIA_TYPE = "application/json"

DEFAULT_MAX_WAIT = 60
"""How long a hub holds a waiting pull at most, in seconds (its ``max_wait`` setting)."""

BUSY_RETRY_SECONDS = 5
"""The wait a busy hub asks for in ``Retry-After``: a lock held longer than it waited."""
CLUSTER_RETRY_SECONDS = 2
"""The wait a cluster hub without NATS quorum asks for: a node restarting, a leader election."""

DEFAULT_STATUS = 400
"""The status of a reason missing from :data:`STATUS`: the request's (or bundle's) fault."""

STATUS: dict[str, int] = {
    # The database and its tables.
    errors.NOT_ENABLED: 400,
    errors.MISSING_TABLE: 400,
    errors.INTERNAL_TABLE: 400,
    errors.VIRTUAL_TABLE: 400,
    errors.GENERATED_COLUMNS: 400,
    errors.NO_PRIMARY_KEY: 400,
    errors.NULL_PRIMARY_KEY: 400,
    errors.INVALID_NAME: 400,
    errors.TOO_MANY_COLUMNS: 400,
    errors.PK_CHANGED: 400,
    errors.CONSTRAINT_FAILED: 400,
    errors.INVALID_ARGUMENT: 400,
    errors.UNKNOWN_DEVICE: 400,
    errors.AMBIGUOUS_DEVICE: 400,
    errors.SCHEMA_TOO_NEW: 503,  # the hub's database needs a newer datasette-sync: not the client's fault
    # Conflicts.
    errors.UNKNOWN_CONFLICT: 404,
    errors.ALREADY_RESOLVED: 409,
    errors.UNKNOWN_VERSION: 400,
    # Bundle files.
    errors.MISSING_BUNDLE: 400,
    errors.CANNOT_WRITE: 400,
    errors.INVALID_BUNDLE: 400,
    errors.UNSUPPORTED_FORMAT: 400,
    errors.HASH_MISMATCH: 400,
    errors.INVALID_METADATA: 400,
    errors.INVALID_CLOCK: 400,
    errors.INVALID_OPERATION: 400,
    errors.INVALID_TEXT: 400,
    # A bundle that cannot be applied to the hub's database.
    errors.TABLE_NAME_CASE: 400,
    errors.TABLE_MISSING: 400,
    errors.UNKNOWN_COLUMN: 400,
    errors.PK_MISMATCH: 400,
    errors.NULL_KEY: 400,
    errors.KEY_TYPE: 400,
    errors.UNSUPPORTED_KEY: 400,
    errors.MISSING_OPERATIONS: 400,
    errors.MISSING_DEPENDENCIES: 400,
    errors.COMPACTED_HISTORY: 400,
    errors.DEVICE_ID_CLASH: 400,
    errors.DEVICE_OWNED: 403,  # the actor may not write as that device: a permission, not a bad bundle
    errors.CLOCK_AHEAD: 400,
    errors.PARTIAL_BUNDLE: 400,
    errors.DEVICE_RETIRED: 409,  # the device's own state (retired), not a malformed bundle
    errors.TOO_MANY_DEVICES: 409,  # the hub database's own state (full), not a malformed bundle
    # The hub's own refusals.
    errors.INVALID_REQUEST: 400,
    errors.INVALID_JSON: 400,
    errors.UNAUTHORIZED: 401,
    errors.FORBIDDEN: 403,
    errors.TABLE_FORBIDDEN: 403,
    errors.NOT_FOUND: 404,
    errors.METHOD_NOT_ALLOWED: 405,
    errors.READ_ONLY: 403,
    errors.TOO_LARGE: 413,
    errors.DISCONNECTED: 400,
    errors.TOO_SLOW: 408,
    errors.BUSY: 503,
    errors.SQLITE_ERROR: 500,
    errors.CLUSTER_UNAVAILABLE: 503,
}
"""Every reason the hub answers with, and its HTTP status."""

CLIENT_REASONS = frozenset(
    {
        errors.INVALID_URL,
        errors.CONNECTION_FAILED,
        errors.TIMEOUT,
        errors.INVALID_RESPONSE,
        errors.REJECTED,
        errors.HUB_ERROR,
        errors.UNRELATED_HUB,
    }
)
"""Reasons only the client raises (about the hub's answer), never in a hub's answer."""


def status_for(reason: str) -> int:
    """The HTTP status the hub answers a refusal for ``reason`` with."""
    return STATUS.get(reason, DEFAULT_STATUS)


def error_body(message: str, reason: str) -> dict[str, Any]:
    """The JSON body of a refusal."""
    return {"ok": False, "error": message, "reason": reason}


def error_message(body: Any) -> str:
    """The one-line error in a refusal's JSON body: the hub's ``error``, or the ``errors`` /
    ``message`` of an answer Datasette made itself (a rejected ``dstok_`` token); else ""."""
    if not isinstance(body, dict):
        return ""
    for key in ("error", "errors", "message"):
        value = body.get(key)
        if isinstance(value, list):
            value = "; ".join(str(v) for v in value)
        if value:
            return str(value)
    return ""


def encode_clock(clock: dict[str, int]) -> str:
    """A vector clock as the ``since`` parameter and the X-Sync-Clock header carry it: the op
    log's one JSON form of a clock."""
    return oplog.encode_clock(clock)


MAX_SINCE = 60_000
"""Characters of a ``since`` parameter once URL-encoded. It travels in the URL, which HTTP
clients and servers cap (httpx at 65,536): about 50 characters a device, so a clock of about
1,200 devices."""


def since_param(clock: dict[str, int]) -> str:
    """``clock`` as a pull's ``since`` parameter; a clock too long for a URL is refused in
    words, not as a URL the user never typed."""
    text = encode_clock(clock)
    if len(urllib.parse.quote(text, safe="")) > MAX_SINCE:
        raise errors.SyncError(
            errors.TOO_MANY_DEVICES,
            f"this copy's clock names {len(clock)} devices, too many for a pull through a hub, whose URL carries "
            f"the clock (about {MAX_SINCE // 50:,} at most): sync by bundle files instead (export-bundle, import-bundle)",
        )
    return text


def decode_clock(text: str | None, what: str) -> dict[str, int]:
    """A vector clock from a ``since`` parameter or an X-Sync-Clock header (raises
    BundleError with reason ``invalid_clock``); nothing is the empty clock."""
    return parse_clock(text, what)


def parse_wait(text: str | None) -> float:
    """The seconds of a ``wait`` parameter (0 without one); raises SyncError with reason
    ``invalid_request`` for anything but a finite number >= 0."""
    if text is None or text == "":
        return 0.0
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not (0 <= seconds < float("inf")):
        raise errors.SyncError(
            errors.INVALID_REQUEST, f"wait must be a number of seconds >= 0, got {text[:40]!r}"
        )
    return seconds


def parse_tables(values: list[str]) -> list[str]:
    """The distinct tables of a pull's ``table`` parameters, in order; raises SyncError with
    reason ``invalid_request`` past MAX_TABLES."""
    tables = list(dict.fromkeys(values))
    if len(tables) > MAX_TABLES:
        raise errors.SyncError(
            errors.INVALID_REQUEST, f"a pull may name at most {MAX_TABLES} tables, got {len(tables)} table parameters"
        )
    return tables


def resolve_path(conflict_id: str) -> str:
    return f"{CONFLICTS_PATH}/{conflict_id}{RESOLVE_SUFFIX}"
