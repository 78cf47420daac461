"""Offline-first sync for SQLite: the core engine and its sqlite-utils plugin.

Public API (each function takes a ``sqlite_utils.Database`` or a ``sqlite3.Connection``)::

    enable_sync(db, ["todos"])
    export_bundle(db, "out.bundle", since=None, for_device=None)
    import_bundle(db, "out.bundle", alter=False)
    sync_status(db)
    list_conflicts(db, include_resolved=False)
    resolve_conflict(db, conflict_id, keep=None)
    new_device(db)
    compact_log(db)
    sync_with_hub(db, "http://127.0.0.1:8001/data", token=None)
"""

import sqlite_utils

from .api import disable_sync, enable_sync, export_bundle, new_device, sync_status
from .apply import ImportResult, import_bundle
from .bundle import ExportResult
from .client import HubError, sync_with_hub
from .compact import CompactResult, compact_log
from .conflicts import get_conflict, list_conflicts, resolve_conflict
from .errors import BundleError, SyncError

__all__ = [
    "BundleError",
    "CompactResult",
    "ExportResult",
    "HubError",
    "ImportResult",
    "SyncError",
    "compact_log",
    "disable_sync",
    "enable_sync",
    "export_bundle",
    "get_conflict",
    "import_bundle",
    "list_conflicts",
    "new_device",
    "resolve_conflict",
    "sync_status",
    "sync_with_hub",
]


@sqlite_utils.hookimpl
def register_commands(cli):
    from .cli import register

    register(cli)
