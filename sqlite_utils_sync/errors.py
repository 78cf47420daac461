"""Errors raised by the sync engine, and the catalogue of their reasons.

Every error carries a machine-readable ``reason`` and a one-line message that says what is
wrong and with which bundle, table or column, so the CLI and the Datasette endpoints can show
it as-is. The reasons below are part of the contract: ``--json`` output and the hub's error
bodies carry them, so a reason is never renamed. The hub maps each one to an HTTP status in
:mod:`sqlite_utils_sync.protocol`.
"""


class SyncError(Exception):
    """A user-facing sync error.

    :param reason: one of the reason constants below, such as :data:`HASH_MISMATCH`
    :param message: one readable line
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class BundleError(SyncError):
    """The bundle is invalid, tampered with, or cannot be applied to this database."""


# SQLite result codes that say this machine is in trouble (a full disk, I/O, permissions,
# memory), whatever was being read: such an error is never the bundle's fault.
_LOCAL_TROUBLE_CODES = {"SQLITE_FULL", "SQLITE_IOERR", "SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_NOMEM", "SQLITE_PERM"}
_LOCAL_TROUBLE_TEXT = ("disk is full", "disk i/o error", "readonly database", "unable to open", "out of memory")


def is_local_trouble(ex: BaseException) -> bool:
    """Whether an SQLite error comes from this machine rather than from the data read."""
    import sqlite3

    if not isinstance(ex, sqlite3.Error):
        return False
    name = getattr(ex, "sqlite_errorname", None)  # Python 3.11+; SQLITE_IOERR_WRITE is an IOERR
    if name is not None:
        return "_".join(name.split("_")[:2]) in _LOCAL_TROUBLE_CODES
    return any(text in str(ex).lower() for text in _LOCAL_TROUBLE_TEXT)


def shorten(value, most: int = 80) -> str:
    """A value for a one-line message: repr (text as it is), cut short."""
    text = value if isinstance(value, str) and most > 80 else repr(value)
    text = " ".join(text.split())
    return text if len(text) <= most else text[: most - 3] + "..."


# The database and its tables.

NOT_ENABLED = "not_enabled"
"""The database has never had sync enabled: run ``enable-sync`` first."""
MISSING_TABLE = "missing_table"
"""``enable-sync`` was given a table that does not exist."""
INTERNAL_TABLE = "internal_table"
"""A ``_sync_*`` table was named where a user table is needed, or a bundle carries one."""
VIRTUAL_TABLE = "virtual_table"
"""Virtual tables (FTS, R*Tree, ...) cannot be synced: their triggers cannot capture writes."""
GENERATED_COLUMNS = "generated_columns"
"""The table has generated columns, which capture cannot write back."""
NO_PRIMARY_KEY = "no_primary_key"
"""The table has no explicit primary key, so rows have no identity that peers share."""
NULL_PRIMARY_KEY = "null_primary_key"
"""Rows of the table have a NULL primary key value."""
INVALID_NAME = "invalid_name"
"""A table or column has a name bundles cannot carry (an empty one)."""
TOO_MANY_COLUMNS = "too_many_columns"
"""The table has more columns than an operation's change mask can hold."""
PK_CHANGED = "pk_changed"
"""The primary key of a synced table changed since sync was enabled on it."""
CONSTRAINT_FAILED = "constraint_failed"
"""A write the merge decided on breaks a constraint of this database (CHECK, UNIQUE, FOREIGN KEY)."""
INVALID_ARGUMENT = "invalid_argument"
"""An option has a value out of range or of the wrong form (a duration, say)."""
UNKNOWN_DEVICE = "unknown_device"
"""A ``--for`` device id that this database has never heard of."""
AMBIGUOUS_DEVICE = "ambiguous_device"
"""A device name (or id prefix) given where one device is needed names several: use the id."""
SCHEMA_TOO_NEW = "schema_too_new"
"""The database's sync tables were made by a newer version of this code: upgrade it."""

# Conflicts.

UNKNOWN_CONFLICT = "unknown_conflict"
"""No conflict has that id."""
ALREADY_RESOLVED = "already_resolved"
"""The conflict was resolved already (here or on a peer)."""
UNKNOWN_VERSION = "unknown_version"
"""``--keep`` names an operation that is not one of the conflict's versions."""

# Bundle files.

MISSING_BUNDLE = "missing_bundle"
"""The bundle file does not exist."""
CANNOT_WRITE = "cannot_write"
"""The bundle file cannot be written (missing directory, permissions, full disk)."""
INVALID_BUNDLE = "invalid_bundle"
"""The file is not a readable bundle: not SQLite, damaged, or with unexpected tables."""
UNSUPPORTED_FORMAT = "unsupported_format"
"""The bundle was written in a format version this code does not read."""
HASH_MISMATCH = "hash_mismatch"
"""The bundle's content does not match its recorded hash: truncated or tampered with."""
INVALID_METADATA = "invalid_metadata"
"""The bundle's metadata or header is missing, malformed or inconsistent."""
INVALID_CLOCK = "invalid_clock"
"""A vector clock (in a bundle, a header or a request) is malformed."""
INVALID_OPERATION = "invalid_operation"
"""An operation in the bundle is malformed (kind, mask, sequence, values)."""
INVALID_TEXT = "invalid_text"
"""A TEXT value in the bundle cannot be stored as-is here."""

# A bundle that cannot be applied to this database.

TABLE_NAME_CASE = "table_name_case"
"""A table of the bundle exists here under a name that differs only in case."""
TABLE_MISSING = "table_missing"
"""A synced table was dropped or renamed here, so its operations cannot be applied."""
UNKNOWN_COLUMN = "unknown_column"
"""The bundle writes columns this table lacks (import with ``--alter`` to add them)."""
PK_MISMATCH = "pk_mismatch"
"""A table has a different primary key here than in the bundle."""
NULL_KEY = "null_key"
"""An operation has a NULL primary key value."""
KEY_TYPE = "key_type"
"""An operation's key cannot be a key of this table (a text key for an INTEGER PRIMARY KEY)."""
UNSUPPORTED_KEY = "unsupported_key"
"""A primary key sync cannot tell rows apart by: a value with a NUL character, a column with
a collation (NOCASE, RTRIM)."""
MISSING_OPERATIONS = "missing_operations"
"""The bundle starts a device's operations after a gap: import the bundles before it first."""
MISSING_DEPENDENCIES = "missing_dependencies"
"""The bundle's operations depend on operations neither this database nor the bundle has."""
COMPACTED_HISTORY = "compacted_history"
"""The bundle comes from a compacted log that only an empty database can start from."""
DEVICE_ID_CLASH = "device_id_clash"
"""Two databases write under one device id: run ``sqlite-utils sync-new-device --recover``."""
DEVICE_OWNED = "device_owned"
"""The bundle carries operations of a device that another actor owns on this hub."""
DEVICE_RETIRED = "device_retired"
"""The bundle carries operations a retired device wrote after it was retired."""
TOO_MANY_DEVICES = "too_many_devices"
"""The database holds operations of as many devices as it can number: it cannot take another."""
CLOCK_AHEAD = "clock_ahead"
"""An operation's clock is further ahead of this machine's clock than ``max_clock_skew``."""
PARTIAL_BUNDLE = "partial_bundle"
"""A bundle exported for only some tables reached a copy that holds a table it withholds."""

# The hub, as its endpoints answer and its client reports.

INVALID_REQUEST = "invalid_request"
"""A request parameter is missing or malformed."""
INVALID_JSON = "invalid_json"
"""A request body that should be JSON is not."""
UNAUTHORIZED = "unauthorized"
"""The token authenticates no actor."""
FORBIDDEN = "forbidden"
"""The actor lacks the permission the request needs."""
TABLE_FORBIDDEN = "table_forbidden"
"""The actor lacks a table's permission: ``view-table`` for a pull that asks for it, or the
write action (``insert-row``, ``update-row``, ``delete-row``) a push's new operations need."""
NOT_FOUND = "not_found"
"""No such database (or hub endpoint)."""
METHOD_NOT_ALLOWED = "method_not_allowed"
"""The endpoint does not take that HTTP method."""
READ_ONLY = "read_only"
"""The hub's database is immutable, so bundles cannot be imported into it."""
TOO_LARGE = "too_large"
"""The pushed bundle is larger than the hub's ``max_bundle_bytes``."""
DISCONNECTED = "disconnected"
"""The client went away while sending its bundle."""
TOO_SLOW = "too_slow"
"""The client sent its bundle slower than ``MIN_RATE`` once past the hub's ``send_timeout``."""
BUSY = "busy"
"""Another connection holds a lock on the hub's database: retry shortly."""
SQLITE_ERROR = "sqlite_error"
"""SQLite failed on the hub's side (disk full, I/O error)."""
CLUSTER_UNAVAILABLE = "cluster_unavailable"
"""A cluster hub could not store the pushed bundle in its replicated log (no NATS quorum):
nothing was imported, retry shortly (or push to another hub of the cluster)."""
INVALID_URL = "invalid_url"
"""The hub URL is not an http(s) URL of a Datasette database."""
CONNECTION_FAILED = "connection_failed"
"""The hub cannot be reached."""
TIMEOUT = "timeout"
"""The hub did not answer in time."""
INVALID_RESPONSE = "invalid_response"
"""The hub answered with something that is not a bundle or a JSON error body."""
REJECTED = "rejected"
"""The hub refused the pushed bundle (400); the message says why."""
HUB_ERROR = "hub_error"
"""The hub failed with an unexpected status."""
UNRELATED_HUB = "unrelated_hub"
"""The hub's database shares no device with this copy, which synced elsewhere before, and
sends operations of none of its tables (most likely another database of the hub): nothing
was pulled or pushed; ``--alter`` merges them."""


def constraint_hint(ex: Exception) -> str:
    """What to do about a constraint that rows a peer wrote break here."""
    if "UNIQUE" in str(ex):
        # Another row here holds a value the peer's rows need.
        return "If a row here holds that value, change it (the change syncs too) and try again; see Limits in the README"
    # CHECK, NOT NULL or a STRICT column's type: this copy declares the table otherwise.
    return (
        "This copy's table refuses a value a peer's table took (a CHECK, NOT NULL or STRICT type declared "
        "here only): declare the table alike on every copy, or change the value where it was written, "
        "then try again"
    )
