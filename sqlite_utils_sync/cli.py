"""The sqlite-utils commands: each a thin wrapper over a library call.

Every command is a top-level ``click`` command; :func:`register_commands` (the sqlite-utils
plugin hook) adds them to the ``sqlite-utils`` group. Engine errors become one readable line
and exit code 1 (:func:`user_errors`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shlex
import signal
import sqlite3
import sys
import threading
from typing import Any, Callable, Iterator

import click
import sqlite_utils

from .importer import import_bundle
from .capture import secondary_unique_columns
from .api import disable_sync, enable_sync, export_bundle, new_device, retire_device, set_device_name, sync_status
from .client import RETRIES, TOKEN_ENV, combined_results, held_back_message, normalize_url, sync_with_hub
from .watch import watch_hub
from .compaction import compact_log
from .conflicts import list_conflicts
from .resolution import resolve_conflict
from .devices import device_names, label, local_device_id
from .errors import SyncError

DB_PATH = click.Path(exists=True, dir_okay=False, allow_dash=False)
# import-bundle and sync create a database that does not exist yet.
NEW_DB_PATH = click.Path(dir_okay=False, allow_dash=False)


# Options shared by several commands.


def json_option(command: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, help="Output as JSON")(command)


def silent_option(command: Callable) -> Callable:
    return click.option("--silent", is_flag=True, help="Don't show a progress bar")(command)


def max_clock_skew_option(command: Callable) -> Callable:
    return click.option(
        "--max-clock-skew",
        default="7d",  # DEFAULT_MAX_CLOCK_SKEW, as --help shows it
        show_default=True,
        help="Refuse operations whose clock is further ahead of this machine's clock (like 90s, 36h, 7d)",
    )(command)


@contextlib.contextmanager
def user_errors(database: str | None = None) -> Iterator[None]:
    """Turn engine errors into one readable line and a non-zero exit (naming ``database``
    where it is locked)."""
    try:
        yield
    except SyncError as ex:
        raise click.ClickException(str(ex))
    except sqlite3.OperationalError as ex:
        if database is not None and str(ex) == "database is locked":
            raise click.ClickException(
                f"{database} is locked: another connection is writing to it; try again once it is done"
            )
        raise click.ClickException(f"SQLite error: {ex}")
    except sqlite3.Error as ex:
        raise click.ClickException(f"SQLite error: {ex}")
    except OSError as ex:  # a full disk, a path that may not be read or written
        where = f": {ex.filename}" if ex.filename else ""
        raise click.ClickException(f"{ex.strerror or ex}{where}")
    except (UnicodeError, RecursionError, MemoryError, ValueError, TypeError, KeyError, IndexError) as ex:
        # A bug, but one line all the same: a user must never see a traceback.
        raise click.ClickException(f"Unexpected {type(ex).__name__}: {' '.join(str(ex).split())[:300]} (please report this)")


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that it ends the way Ctrl-C does."""


@contextlib.contextmanager
def stops_cleanly_on_sigterm() -> Iterator[None]:
    """End the command on SIGTERM (a service manager, ``timeout``, ``kill``) by unwinding it:
    an import in progress rolls back, and temporary files and a file the command created are
    removed, which Python's default (dying at once) would leave behind. Exit code 143."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set there
        return

    def on_term(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except Terminated:
        click.echo("stopped", err=True)
        sys.exit(128 + signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def progress_bar(silent: bool, label: str) -> Iterator[Callable[[int, int], None] | None]:
    """A click progress bar on a terminal, nothing otherwise (or with --silent)."""
    if silent or not sys.stderr.isatty():
        yield None
        return
    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            state["bar"] = click.progressbar(length=total, label=label, file=sys.stderr)
            state["bar"].__enter__()
        state["bar"].update(done)

    try:
        yield update
    finally:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)


def open_db(path: str) -> sqlite_utils.Database:
    return sqlite_utils.Database(path)


@contextlib.contextmanager
def new_database(path: str) -> Iterator[bool]:
    """Yields whether ``path`` is a new database: missing, or with no tables at all. A file
    this creates is removed again if the command fails, so a failure leaves nothing behind,
    unless another process wrote to it meanwhile (it has tables, or a journal: that is theirs)."""
    created = not os.path.lexists(path)  # a symlink, even one to nothing, is the user's
    try:
        yield created or not has_tables(path)
    except BaseException:
        if created and not any(os.path.lexists(path + suffix) for suffix in ("-journal", "-wal")) and not has_tables(path):
            with contextlib.suppress(OSError):  # the command's own error is the one to report
                os.remove(path)
        raise


def has_tables(path: str) -> bool:
    """True unless the file is an empty database (an unreadable one is left to the command)."""
    try:
        conn = sqlite3.connect(pathlib.Path(path).resolve().as_uri() + "?mode=ro", uri=True)
        try:
            return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' LIMIT 1").fetchone() is not None
        finally:
            conn.close()
    except sqlite3.Error:
        return True


def echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


# Commands.


@click.command(name="enable-sync")
@click.argument("path", type=DB_PATH)
@click.argument("tables", nargs=-1, required=True)
@click.option(
    "--partial",
    is_flag=True,
    help="This copy holds only the tables synced here: operations of others it receives are kept as withheld",
)
@click.option("--name", help="Also name this database's device (see sync-name)")
def enable_sync_command(path, tables, partial, name):
    """Capture every write to TABLES so they can be synced

    Idempotent: running it again repairs stale triggers and logs changes they missed.

    Example:

    \b
        sqlite-utils enable-sync data.db todos notes --name laptop
        sqlite-utils enable-sync phone.db todos --partial
    """
    kept: dict[str, int] = {}
    with user_errors(path):
        db = open_db(path)
        logged = enable_sync(
            db, list(tables), partial=partial, name=name, on_kept=lambda table, _: kept.update({table: kept.get(table, 0) + 1})
        )
    for table, count in logged.items():
        if count:
            click.echo(f"{table}: logged {count} existing or missed row change(s)", err=True)
        if kept.get(table):
            click.echo(
                f"{table}: kept {plural(kept[table], 'row')} as edited here while sync was off, over a peer's edit of "
                "the same values that arrived meanwhile (the peer's stays in the log)",
                err=True,
            )
        for columns in secondary_unique_columns(db.conn, table):
            named = ", ".join(c or "<expression>" for c in columns)  # None: an expression index
            click.echo(
                f"Note: {table} has UNIQUE({named}): an INSERT OR REPLACE that removes another "
                "row because of it is only captured with PRAGMA recursive_triggers=ON "
                "(sqlite-utils and Datasette turn it on)",
                err=True,
            )


@click.command(name="disable-sync")
@click.argument("path", type=DB_PATH)
@click.argument("tables", nargs=-1, required=True)
def disable_sync_command(path, tables):
    """Stop capturing writes to TABLES (the operation log is kept)

    Example:

        sqlite-utils disable-sync data.db todos
    """
    with user_errors(path):
        disable_sync(open_db(path), list(tables))


@click.command(name="export-bundle")
@click.argument("path", type=DB_PATH)
@click.argument("bundle", type=click.Path(dir_okay=False, writable=True))
@click.option(
    "--since", help='Vector clock of the receiver: {"<device id>": <seq>, ...}, or its sync-status --json output'
)
@click.option(
    "--for", "for_device", help="Device id or name: send what it has not acknowledged (everything, the first time)"
)
@click.option(
    "--table",
    "tables",
    multiple=True,
    help="Send the values of this table only (repeatable); other operations go withheld: counted, never their values",
)
@click.option(
    "--uncompressed",
    is_flag=True,
    help="Write the chunks uncompressed (format datasette-sync-bundle/2), for a copy whose version predates compression",
)
@json_option
@silent_option
def export_bundle_command(path, bundle, since, for_device, tables, uncompressed, as_json, silent):
    """Write the operations a peer lacks to BUNDLE (a SQLite file)

    Without --since or --for, every operation is included.

    Example:

    \b
        sqlite-utils export-bundle laptop.db to-phone.bundle --for phone
        sqlite-utils export-bundle laptop.db todos-only.bundle --table todos
    """
    if since and for_device:
        raise click.ClickException("Use --since or --for, not both")
    with stops_cleanly_on_sigterm(), user_errors(path), progress_bar(silent, "Exporting") as progress:
        result = export_bundle(
            open_db(path), bundle, since=since, for_device=for_device, progress=progress, tables=list(tables) or None,
            **({"codec": None} if uncompressed else {}),
        )
    if as_json:
        echo_json(result.as_dict())
    else:
        click.echo(f"Wrote {result.operations} operation(s) to {bundle} ({result.bytes} bytes)", err=True)
    if result.held_back:
        held = held_back_message(result.held_back)
        click.echo(f"{held}: export with --since the receiver's clock (or --for it) to send them to one that holds those", err=True)


@click.command(name="import-bundle")
@click.argument("path", type=NEW_DB_PATH)
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--alter", is_flag=True, help="Add tables and columns the bundle has and this database lacks")
@max_clock_skew_option
@json_option
@silent_option
def import_bundle_command(path, bundle, alter, max_clock_skew, as_json, silent):
    """Apply BUNDLE to the database, in one transaction

    A database that does not exist yet (or has no tables) is created with the bundle's
    tables, as their sender declared them, and syncs them from then on.

    Example:

        sqlite-utils import-bundle phone.db to-phone.bundle
    """
    with stops_cleanly_on_sigterm(), user_errors(path), new_database(path) as new, progress_bar(silent, "Importing") as progress:
        db = open_db(path)
        result = import_bundle(
            db, bundle, alter=alter, progress=progress, max_clock_skew=max_clock_skew, adopt_scope=True, create_tables=new
        )
        own = result.skipped and result.source_device_id == local_device_id(db.conn)
        missing = {t for t in result.not_applied if not db[t].exists()}
    if as_json:
        echo_json(result.as_dict())
    elif result.skipped:
        done = "was exported by this database" if own else "was already imported"
        click.echo(f"Bundle {result.bundle_id} {done}: nothing to do", err=True)
    else:
        click.echo(import_summary(path, result.as_dict(), missing), err=True)


@click.command(name="sync-status")
@click.argument("path", type=DB_PATH)
@json_option
def sync_status_command(path, as_json):
    """Show this database's device id, vector clock, synced tables and conflicts

    Example:

        sqlite-utils sync-status data.db --json
    """
    with user_errors(path):
        db = open_db(path)
        status = sync_status(db)
    for warning in status["warnings"]:
        click.echo(f"Warning: {warning}", err=True)
    if as_json:
        echo_json(status)
        return
    if not status["enabled"]:
        click.echo("Sync is not enabled on this database")
        return
    named = f" ({status['device_name']})" if status["device_name"] else ""
    click.echo(f"Device: {status['device_id']}{named}")
    click.echo(f"Operations: {status['operations']}")
    click.echo(f"Unresolved conflicts: {status['unresolved_conflicts']}")
    if status["scope"] is not None:
        click.echo(f"Partial copy of: {', '.join(status['scope'])} ({status['withheld']} operation(s) of others withheld)")
    click.echo("Tables:")
    for name, info in status["tables"].items():
        click.echo(f"  {name}: {info['operations']} operation(s)")
    click.echo("Clock:")
    names = device_names(db.conn)
    for device, seq in status["clock"].items():
        # A named device as other commands show it, laptop (19cecc3d); others by their whole id.
        click.echo(f"  {label(device, names) if device in names else device}: {seq}")


@click.command(name="sync-conflicts")
@click.argument("path", type=DB_PATH)
@click.option("--all", "include_resolved", is_flag=True, help="Include resolved conflicts")
@json_option
def sync_conflicts_command(path, include_resolved, as_json):
    """List conflicts: concurrent edits that disagreed

    Example:

        sqlite-utils sync-conflicts data.db --json
    """
    with user_errors(path):
        db = open_db(path)
        conflicts = list_conflicts(db, include_resolved=include_resolved)
        names = device_names(db.conn)
    if as_json:
        echo_json(conflicts)
        return
    if not conflicts:
        click.echo("No conflicts")
    for conflict in conflicts:
        state = "resolved" if conflict["resolved"] else "unresolved"
        columns = ", ".join(conflict["columns"]) or "update vs delete"
        click.echo(f"{conflict['id']}  {conflict['table']} {json.dumps(conflict['pk'])}  [{columns}]  {state}")
        for version in conflict["versions"]:
            # Records are the same on every copy; names are what this copy has heard, so they
            # are shown here and never stored in a record.
            by = f" ({names[version['device_id']]})" if version["device_id"] in names else ""
            click.echo(f"    {version['op']}{by}  {json.dumps(version['values'], default=str)}")
        click.echo(f"    now: {json.dumps(conflict['current'], default=str)}")


@click.command(name="sync-resolve")
@click.argument("path", type=DB_PATH)
@click.argument("conflict_id")
@click.option("--keep", help="Op id of the version to keep (default: the value in the table now)")
def sync_resolve_command(path, conflict_id, keep):
    """Resolve a conflict; the resolution syncs like any other change

    Example:

        sqlite-utils sync-resolve data.db 3f2a9c0d1e2b4a5c --keep 5f0c...:12
    """
    with user_errors(path):
        op = resolve_conflict(open_db(path), conflict_id, keep=keep)
    click.echo(f"Resolved {conflict_id} with operation {op}", err=True)


@click.command(name="sync-new-device")
@click.argument("path", type=DB_PATH)
@click.option(
    "--recover",
    is_flag=True,
    help="After a device_id_clash: also move this database's edits that no peer has acknowledged to the new id",
)
def sync_new_device_command(path, recover):
    """Give a copied database file its own device id

    Run this on the copy after copying a synced database file, before editing it. If an
    import or sync failed with device_id_clash (the copy was edited under the old id, or
    someone pushed operations under it), run it with --recover: every edit is kept, and
    syncing works again.

    Example:

    \b
        sqlite-utils sync-new-device phone.db
        sqlite-utils sync-new-device --recover phone.db
    """
    with user_errors(path):
        device_id = new_device(open_db(path), recover=recover)
    click.echo(device_id)


@click.command(name="sync-name")
@click.argument("path", type=DB_PATH)
@click.argument("name")
def sync_name_command(path, name):
    """Name this database's device

    Every copy and hub it syncs with then shows the name (laptop (19cecc3d)), and takes it
    wherever a device id goes (export-bundle --for, sync-retire, the pages' filters). Names
    need not be unique; an ambiguous one is refused where one device is needed.

    Example:

        sqlite-utils sync-name laptop.db laptop
    """
    with user_errors(path):
        set_device_name(open_db(path), name)
    click.echo(f"This device is now named {name}", err=True)


@click.command(name="sync-retire")
@click.argument("path", type=DB_PATH)
@click.argument("device")
@json_option
def sync_retire_command(path, device, as_json):
    """Retire DEVICE (an id or a name): a device that will never sync again

    For a lost or replaced device. The retirement syncs like an edit: every copy then
    refuses anything DEVICE writes after the last of its operations held here, and
    sync-compact no longer waits for it to catch up.

    Example:

        sqlite-utils sync-retire laptop.db phone
    """
    with user_errors(path):
        result = retire_device(open_db(path), device)
    if as_json:
        echo_json(result)
    else:
        click.echo(f"Retired {result['device_id']} after its operation {result['seq']}", err=True)


@click.command(name="sync-compact")
@click.argument("path", type=DB_PATH)
@json_option
def sync_compact_command(path, as_json):
    """Remove operations no copy can need again from the sync log

    Keeps what the tables, conflicts and peers still depend on: only operations every known
    device has seen, and later operations have overwritten, go. New devices can then start
    from a full export of this database. Run 'sqlite-utils vacuum' afterwards to shrink
    the file.

    Example:

        sqlite-utils sync-compact data.db
    """
    with user_errors(path):
        result = compact_log(open_db(path))
    if as_json:
        echo_json(result.as_dict())
    else:
        click.echo(f"Removed {result.removed} operations, kept {result.kept}", err=True)


@click.command(name="sync")
@click.argument("path", type=NEW_DB_PATH)
@click.argument("url", nargs=-1, required=True)
@click.option("--token", envvar=TOKEN_ENV, help=f"API token for the hub (default: ${TOKEN_ENV})")
@click.option("--alter", is_flag=True, help="Add tables and columns one side has and the other lacks")
@click.option(
    "--table",
    "tables",
    multiple=True,
    help="Pull only this table (repeatable): this copy then holds only these tables; later syncs keep to them",
)
@max_clock_skew_option
@click.option(
    "--retries",
    type=click.IntRange(0),
    default=RETRIES,
    show_default=True,
    help="Send a request again this many times while the hub answers 503 busy",
)
@click.option("--watch", is_flag=True, help="Keep running: push local changes as they commit, pull the hub's as they land")
@json_option
def sync_command(path, url, token, alter, tables, max_clock_skew, retries, as_json, watch=False):
    """Sync the database with a Datasette hub: pull what it lacks here, push what the hub lacks

    URL is the hub database's URL. Safe to re-run at any time, also after a network failure.
    Several URLs (hubs of one cluster) are tried in order: when one cannot be reached, fails
    or stays busy, the sync is done with the next one.
    A database that does not exist yet (or has no tables) is created with the hub's tables.

    Example:

    \b
        sqlite-utils sync laptop.db http://127.0.0.1:8001/data --token dstok_...
        sqlite-utils sync phone.db http://127.0.0.1:8001/data --table todos
        sqlite-utils sync laptop.db http://hub-a:8001/data http://hub-b:8001/data
        DATASETTE_SYNC_TOKEN=dstok_... sqlite-utils sync laptop.db https://hub.example.com/data
        sqlite-utils sync laptop.db http://127.0.0.1:8001/data --watch
    """
    if watch:
        if len(url) > 1:
            raise click.ClickException("--watch syncs with one hub: give one URL (several are for a sync that tries each in turn)")
        return watch_command(path, url[0], token or None, alter, list(tables) or None, max_clock_skew, as_json)
    with stops_cleanly_on_sigterm(), user_errors(path), new_database(path) as new:
        db = open_db(path)
        result = sync_with_hub(
            db,
            url,
            token=token or None,
            alter=alter,
            max_clock_skew=max_clock_skew,
            retries=retries,
            on_retry=say_retry,
            tables=list(tables) or None,
            create_tables=new,
            on_failover=say_failover,
        )
        unresolved = sync_status(db)["unresolved_conflicts"]
        missing = {t for t in merged_pull(result)["not_applied"] if not db[t].exists()}
    if as_json:
        echo_json(result)
        return
    click.echo(sync_summary(path, result["hub"]["url"], result, unresolved, missing), err=True)


def say_failover(url: str, error: Exception, next_url: str) -> None:
    click.echo(f"{error}: trying {next_url}", err=True)


def watch_command(path: str, url: str, token: str | None, alter: bool, tables: list[str] | None,
                  max_clock_skew: str, as_json: bool) -> None:
    """``sync --watch``: sync until Ctrl-C or SIGTERM, one line per sync that changed a table.
    The first signal lets the current step finish; a second stops at once (an import in
    progress rolls back)."""
    stop = threading.Event()

    def on_signal(signum, frame):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    def on_sync(result: dict[str, Any]) -> None:
        if as_json:
            click.echo(json.dumps(result))
        elif moved_rows(result):
            # Not sync_status: it counts the whole log, on every line.
            unresolved = db.execute("SELECT count(*) FROM _sync_conflicts WHERE resolved_by IS NULL").fetchone()[0]
            missing = {t for t in merged_pull(result)["not_applied"] if not db[t].exists()}
            click.echo(sync_summary(path, normalize_url(url), result, unresolved, missing), err=True)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with user_errors(path):
            with new_database(path) as new:
                db = open_db(path)
                if new:  # a first copy: made by one plain sync, and removed if that fails
                    on_sync(sync_with_hub(db, url, token, alter=alter, max_clock_skew=max_clock_skew,
                                          tables=tables, create_tables=True))
            watch_hub(
                db, url, token, tables=tables, alter=alter, max_clock_skew=max_clock_skew,
                on_status=lambda line: click.echo(line, err=True), stop=stop, on_sync=on_sync,
            )
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
        sys.exit(130)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("stopped", err=True)


def moved_rows(result: dict[str, Any]) -> bool:
    """Whether a sync changed a table here or on the hub (not only knowledge ticks)."""
    parts = (result["pulled"], result["pulled_after_push"], result["pushed"])
    keys = ("applied_by_table", "tables_created", "columns_added", "conflicts")
    return any(part and any(part.get(key) for key in keys) for part in parts)


def say_retry(what: str, retry: int, retries: int, delay: float) -> None:
    click.echo(f"Hub is busy: retrying the {what} in {delay:.1f} s (retry {retry} of {retries})", err=True)


def merged_pull(result: dict[str, Any]) -> dict[str, Any]:
    """A sync's pull, and its second pull when there was one, merged into one result."""
    return combined_results(result["pulled"], result["pulled_after_push"])


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def changes_summary(path: str, result: dict[str, Any], missing: set[str], command: str) -> list[str]:
    """What an import did to the tables, as sentences: created, added, applied, kept for later."""
    parts = []
    if result.get("tables_created"):
        parts.append(f"Created {'table' if len(result['tables_created']) == 1 else 'tables'} "
                     f"{', '.join(result['tables_created'])}, synced from now on.")
    added = result.get("columns_added") or {}
    if added:
        columns = [f"{table}.{column}" for table, names in added.items() for column in names]
        parts.append(f"Added {'column' if len(columns) == 1 else 'columns'} {', '.join(columns)}.")
    by_table = result.get("applied_by_table") or {}
    if by_table:
        counts = ", ".join(f"{table} {count}" for table, count in by_table.items())
        # Every operation held already: the ones applied now were kept by an earlier import.
        earlier = " kept from an earlier import" if result["duplicates"] == result["total_operations"] else ""
        parts.append(f"Applied {plural(sum(by_table.values()), 'operation')}{earlier}: {counts}.")
    withheld = result.get("withheld") or 0
    if withheld:
        # A partial copy: what it learned exists without being sent the values.
        parts.append(f"{plural(withheld, 'operation')} of tables this copy does not hold "
                     f"{'is' if withheld == 1 else 'are'} counted without their values (withheld).")
    return parts + kept_summary(path, result.get("not_applied") or {}, missing, command)


def kept_summary(path: str, kept: dict[str, int], missing: set[str], command: str) -> list[str]:
    """Why operations were kept for later, per reason: a table not synced here, or one missing."""
    parts = []
    unsynced = {t: n for t, n in kept.items() if t not in missing}
    if unsynced:
        them = "it" if sum(unsynced.values()) == 1 else "them"
        how = f"'sqlite-utils enable-sync {shlex.join([path, *unsynced])}' applies {them}"
        parts.append(kept_for_later(unsynced, f"{'it is' if len(unsynced) == 1 else 'they are'} not synced here ({how})"))
    lacking = {t: n for t, n in kept.items() if t in missing}
    if lacking:
        it = "it" if len(lacking) == 1 else "them"
        parts.append(kept_for_later(lacking, f"this database lacks {it} ({command} again with --alter to create {it})"))
    return parts


def kept_for_later(counts: dict[str, int], why: str) -> str:
    if len(counts) == 1:
        tables = f"table '{next(iter(counts))}'"
    else:
        tables = "tables " + ", ".join(f"'{table}' ({count})" for table, count in counts.items())
    return f"Kept {plural(sum(counts.values()), 'operation')} of {tables} for later: {why}."


def import_summary(path: str, result: dict[str, Any], missing: set[str]) -> str:
    """One message on what an import did, and what it kept for later and why."""
    parts = changes_summary(path, result, missing, "import")
    duplicates, total = result["duplicates"], result["total_operations"]
    held = f"{'was' if duplicates == 1 else 'were'} here already"
    if not (result.get("applied_by_table") or result.get("tables_created") or result.get("columns_added")):
        everything = duplicates and duplicates == total
        parts.insert(0, f"No table changed: the bundle's {plural(total, 'operation')} {held}." if everything else "No table changed.")
    if duplicates and duplicates < total:
        parts.append(f"{plural(duplicates, 'operation')} of the bundle's {total} {held}.")
    if result["conflicts"]:
        parts.append(f"{plural(result['conflicts'], 'unresolved conflict')}: see 'sqlite-utils sync-conflicts {shlex.quote(path)}'.")
    return " ".join(parts)


def sync_summary(path: str, url: str, result: dict[str, Any], unresolved: int, missing: set[str]) -> str:
    """One message on what a sync moved each way and what it left to do."""
    pulled, pushed = merged_pull(result), result["pushed"]
    changes = changes_summary(path, pulled, missing, "sync")
    parts = [f"Synced with {url}."]
    parts += changes or ["Nothing new to apply here."]
    sent = pushed["total_operations"] or 0
    if sent:
        notes = []
        if (pushed["applied"] or 0) != sent:
            notes.append(f"{pushed['applied'] or 0} new there")
        if pushed["conflicts"]:
            notes.append(f"{plural(pushed['conflicts'], 'unresolved conflict')} there")
        parts.append(f"Sent {plural(sent, 'operation')} to the hub{' (' + ', '.join(notes) + ')' if notes else ''}.")
    elif pushed.get("not_pushed"):
        parts.append(f"Not pushed: {pushed['not_pushed']} (no row changed here).")
    elif not pushed.get("held_back"):
        parts.append("The hub had everything from here.")
    if pushed.get("held_back"):
        parts.append(f"{held_back_message(pushed['held_back'], 'the hub')}; they go once a copy holding those syncs with the hub.")
    if unresolved:
        parts.append(f"{plural(unresolved, 'unresolved conflict')} here: see 'sqlite-utils sync-conflicts {shlex.quote(path)}'.")
    return " ".join(parts)


COMMANDS = [
    enable_sync_command,
    disable_sync_command,
    export_bundle_command,
    import_bundle_command,
    sync_status_command,
    sync_conflicts_command,
    sync_resolve_command,
    sync_new_device_command,
    sync_name_command,
    sync_retire_command,
    sync_compact_command,
    sync_command,
]


@sqlite_utils.hookimpl
def register_commands(cli: click.Group) -> None:
    """The sqlite-utils plugin hook: add every command to the ``sqlite-utils`` group."""
    for command in COMMANDS:
        cli.add_command(command)
