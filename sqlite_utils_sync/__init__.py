"""Offline-first sync for SQLite: the core engine. Its sqlite-utils commands are in
:mod:`sqlite_utils_sync.cli`, the module the ``sqlite_utils`` entry point names, so importing
the library loads no click.

Public API (each function takes a ``sqlite_utils.Database`` or a ``sqlite3.Connection``)::

    enable_sync(db, ["todos"])
    export_bundle(db, "out.bundle", since=None, for_device=None)
    import_bundle(db, "out.bundle", alter=False)
    sync_status(db)
    list_conflicts(db, include_resolved=False)
    resolve_conflict(db, conflict_id, keep=None)
    new_device(db)
    set_device_name(db, "laptop")
    retire_device(db, "phone")
    compact_log(db)
    sync_with_hub(db, "http://127.0.0.1:8001/data", token=None)
    watch_hub(db, "http://127.0.0.1:8001/data", token=None, stop=threading_event)
"""

from .api import disable_sync, enable_sync, export_bundle, new_device, retire_device, set_device_name, sync_status
from .importer import ImportResult, import_bundle
from .bundle import ExportResult
from .client import HubError, sync_with_hub
from .compaction import CompactResult, compact_log
from .conflicts import get_conflict, list_conflicts
from .resolution import resolve_conflict
from .errors import BundleError, SyncError
from .watch import watch_hub

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
    "retire_device",
    "set_device_name",
    "sync_status",
    "sync_with_hub",
    "watch_hub",
]
