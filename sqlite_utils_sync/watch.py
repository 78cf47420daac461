"""Live sync: keep a database in sync with a Datasette hub while it runs
(``sqlite-utils sync DB URL --watch``, :func:`watch_hub`).

Two threads, and every database access on one of them:

- a *poller* thread only does HTTP: a long-poll pull, ``GET /-/sync/export?since=<clock>
  &wait=<s>&device=<us>``, which the hub holds until another device's operation lands. It
  saves the bundle to a file and hands it to the main thread, then waits to be told the
  clock to pull from next;
- the *main* thread imports those bundles, and notices local commits by any other connection
  (``PRAGMA data_version`` changes only for those: the sqlite3 shell, Datasette, another
  program); it sends them in one push of what the hub's last known clock lacks. The knowledge
  tick an import writes goes out the same way once imports pause (:data:`TICK_QUIET`), so the
  hub learns what this copy holds (ticks wake no watcher). A whole
  :func:`~sqlite_utils_sync.client.sync_with_hub` exchange (pull, push, pull again) runs at
  the start, when the hub is back after an absence, and after a push the hub refused.

Only one step runs at a time and both directions are computed from clocks, so no operation
is applied twice. When the hub cannot be reached (refused, timed out, 5xx) one status line
says so and both threads retry with a growing delay (0.5 s doubling to 30 s, jittered); local
edits are captured meanwhile and sent when the hub is back. Any other refusal (401, 403, 404,
400) is final: :class:`~sqlite_utils_sync.client.HubError`. Another program that holds the
database's lock longer than the busy timeout gets one status line too, and the step that met
it is tried again.

A hub without long-poll answers at once: two pulls in a row that come back with nothing long
before ``wait`` make the poller pull every :data:`OLD_HUB_POLL` seconds instead of spinning.
"""

from __future__ import annotations

import os
import queue
import random
import shutil
import sqlite3
import tempfile
import threading
import time
from typing import Any, Callable

import sqlite_utils

from . import errors, protocol
from .client import HubError, _hub_client, is_transient, _request, _Run, empty_result, held_back_message, normalize_url, read_pulled, sync_with_hub
from .clocks import DEFAULT_MAX_CLOCK_SKEW, clock, max_seq, parse_duration
from .importer import import_bundle
from .oplog import LOCAL
from .schema import connection
from .scope import load_scope

DEFAULT_WAIT = 25.0  # seconds a pull may wait at the hub (the hub caps it at its max_wait)
OLD_HUB_POLL = 2.0  # seconds between pulls from a hub that answers at once
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 30.0
# The knowledge an import wrote goes out once imports pause this long (at most TICK_LATEST
# after the first): a stream of edits costs the hub one tick import per watcher, not one per edit.
TICK_QUIET = 3.0
TICK_LATEST = 30.0


def watch_hub(
    db: Any,
    url: str,
    token: str | None = None,
    *,
    tables: list[str] | None = None,
    alter: bool = False,
    create_tables: bool = False,
    max_clock_skew: float | str = DEFAULT_MAX_CLOCK_SKEW,
    on_status: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
    wait: float = DEFAULT_WAIT,
    poll_interval: float = 0.1,
    on_sync: Callable[[dict], None] | None = None,
    timeout: float = 60.0,
) -> None:
    """Sync ``db`` with the hub at ``url`` until ``stop`` is set: local commits are pushed
    within about ``poll_interval`` seconds, the hub's new operations are pulled as they land.

    :param db: a ``sqlite_utils.Database``, ``sqlite3.Connection`` or a path; used by the
        calling thread only
    :param tables, alter, create_tables, max_clock_skew: as for :func:`sync_with_hub` (the
        first exchange stores the scope, ``create_tables`` only applies to it)
    :param on_status: called with one line when watching starts, when the hub is lost and
        when it is back, and when another connection keeps the database locked
    :param stop: set it (from any thread or a signal handler) to return after the current
        step; imports are transactions, so nothing is left half-written
    :param wait: seconds each pull may wait at the hub for new operations
    :param poll_interval: seconds between two checks for local commits
    :param on_sync: called with a :func:`sync_with_hub`-shaped result after every step that
        moved operations
    :raises HubError: the hub refused a request (bad token, no permission, wrong URL)
    :raises SyncError: the database cannot sync
    """
    if isinstance(db, (str, os.PathLike)):
        db = sqlite_utils.Database(db)
    watcher = _Watcher(
        db, normalize_url(url), token, tables, alter, create_tables, parse_duration(max_clock_skew),
        on_status or (lambda line: None), stop or threading.Event(), wait, poll_interval,
        on_sync or (lambda result: None), timeout,
    )
    watcher.run()


class _Poller(threading.Thread):
    """Long-polls on request: ``resume(since, device, scope)`` starts one pull, whose outcome
    is put on ``events`` as ``("pulled", path, response, seconds, waited)`` or ``("failed", error,
    when the request started)``."""

    def __init__(self, url: str, token: str | None, workdir: str, wait: float, timeout: float, events: queue.Queue):
        super().__init__(name="datasette-sync-poller", daemon=True)
        self.url, self.token, self.workdir, self.wait = url, token, workdir, wait
        self.timeout = timeout + wait  # the hub holds the request up to wait seconds
        self.events = events
        self.requests: queue.Queue = queue.Queue()

    def resume(self, since: dict[str, int], device: str, scope: set[str] | None, waits: bool = True) -> None:
        self.requests.put((since, device, scope, waits))

    def finish(self) -> None:
        self.requests.put(None)

    def run(self) -> None:
        with _hub_client(self.token, self.timeout, None) as client:
            while (request := self.requests.get()) is not None:
                self.events.put(self.pull(client, *request))

    def pull(self, client: Any, since: dict[str, int], device: str, scope: set[str] | None, waits: bool) -> tuple:
        path = os.path.join(self.workdir, "pull.bundle")
        params: dict[str, Any] = {
            protocol.SINCE_PARAM: protocol.since_param(since),
            protocol.WAIT_PARAM: f"{self.wait if waits else 0:g}",
            protocol.DEVICE_PARAM: device,
        }
        if scope is not None:
            params[protocol.TABLE_PARAM] = sorted(scope)
        started = time.monotonic()
        try:
            response = _request(
                client, "GET", self.url + protocol.EXPORT_PATH, self.url, "export (pull)", bool(self.token),
                save_to=path, retries=0, params=params,
            )
        except HubError as ex:
            return ("failed", ex, started)
        except Exception as ex:  # noqa: BLE001 - e.g. the work folder removed while stopping
            return ("failed", HubError(errors.CONNECTION_FAILED, f"pull from {self.url} failed: {ex}"), started)
        return ("pulled", path, response, time.monotonic() - started, waits)


class _Watcher:
    """The main thread's side of :func:`watch_hub`: timers, imports and exchanges."""

    def __init__(self, db, url, token, tables, alter, create_tables, max_clock_skew, on_status, stop, wait,
                 poll_interval, on_sync, timeout):
        self.db, self.conn, self.url, self.token = db, connection(db), url, token
        self.tables, self.alter, self.create_tables = tables, alter, create_tables
        self.max_clock_skew, self.timeout = max_clock_skew, timeout
        self.say, self.stop, self.wait, self.poll_interval, self.on_sync = on_status, stop, wait, poll_interval, on_sync
        self.events: queue.Queue = queue.Queue()
        self.poller: _Poller | None = None
        self.device_id: str | None = None
        self.hub_clock: dict[str, int] = {}
        self.hub_device: str | None = None
        self.started = False  # the first exchange succeeded
        self.exchange_due: float | None = 0.0  # when to run a whole exchange; None: not needed
        self.push_due: float | None = None  # when to push local operations the hub lacks
        self.tick_due: float | None = None  # when to push the knowledge an import wrote
        self.tick_first = 0.0  # when the first import of those happened
        self.client: Any = None
        self.workdir = ""
        self.poll_due: float | None = None  # when to start the next pull; None: one is running
        self.held_back = 0  # this copy's edits its last push left out (see tell_held_back)
        self.failures = 0
        self.lost_at: float | None = None
        self.reached_at = float("-inf")  # when a request last succeeded
        self.locked = False  # said that another connection holds the database's lock
        self.quick_empty = 0  # pulls in a row answered at once with nothing
        self.old_hub = False
        self.data_version = self.read_data_version()

    def run(self) -> None:
        self.workdir = workdir = tempfile.mkdtemp(prefix="sqlite-utils-sync-watch-")
        self.poller = _Poller(self.url, self.token, workdir, self.wait, self.timeout, self.events)
        self.poller.start()
        self.client = _hub_client(self.token, self.timeout, None)
        try:
            while not self.stop.is_set():
                self.step()
        finally:
            self.client.close()
            self.poller.finish()
            # The poller may be inside a long-poll: it notices the finish when that returns
            # (its files go with the folder; it reports that as a failed pull nobody reads).
            shutil.rmtree(workdir, ignore_errors=True)

    def step(self) -> None:
        try:
            event = self.events.get(timeout=self.poll_interval)
        except queue.Empty:
            event = None
        try:
            self.act(event)
        except sqlite3.OperationalError as ex:
            if not _is_busy(ex):
                raise
            self.busy()
            # Another program holds a lock on the database longer than the busy timeout: what
            # was due stays due (or was rescheduled), and the next step tries again.

    def act(self, event: tuple | None) -> None:
        if event is not None:
            self.handle(event)
        if self.stop.is_set():
            return
        self.notice_local_commits()
        now = time.monotonic()
        pushes = [t for t in (self.push_due, self.tick_due) if t is not None]
        if self.exchange_due is not None and self.exchange_due <= now:
            self.exchange()
            return
        if pushes and min(pushes) <= now:
            self.push()
        # Not only when no push is due: a device that commits all the time always has one,
        # and would then never pull what others push.
        if self.started and self.poll_due is not None and self.poll_due <= now and not self.stop.is_set():
            self.poll_due = None
            # While the hub is lost, a pull that finds it answers at once: held open on an idle
            # hub, it would put off the catch-up exchange (and the "back" line) by the wait.
            self.poller.resume(clock(self.conn), self.device_id, self.scope(), waits=self.lost_at is None)

    def scope(self) -> set[str] | None:
        return load_scope(self.conn)

    # Local commits ---------------------------------------------------------------------------

    def read_data_version(self) -> int:
        return self.conn.execute("PRAGMA data_version").fetchone()[0]

    def notice_local_commits(self) -> None:
        """Another connection committed: if it wrote operations the hub lacks, push them."""
        version = self.read_data_version()
        if version == self.data_version:
            return
        if self.push_due is None and self.has_unsent():
            self.push_due = time.monotonic()
        self.data_version = version  # only once read: a locked database is asked again

    def has_unsent(self) -> bool:
        return self.started and max_seq(self.conn, LOCAL) > self.hub_clock.get(self.device_id, 0)

    # Exchanges ---------------------------------------------------------------------------------

    def exchange(self) -> None:
        """One pull-push-pull with the hub; on a failure the next try is scheduled."""
        try:
            result = sync_with_hub(
                self.db, self.url, token=self.token, alter=self.alter, timeout=self.timeout,
                max_clock_skew=self.max_clock_skew, retries=0,
                tables=None if self.started else self.tables,
                create_tables=self.create_tables and not self.started,
            )
        except (HubError, sqlite3.OperationalError) as ex:
            self.failed(ex)
            self.exchange_due = self.retry_at()
            return
        self.device_id = result["device_id"]
        self.learn_hub_clock(result["hub"]["clock"], result["hub"]["device_id"])
        self.reached()
        self.exchange_due = self.push_due = self.tick_due = None
        if not self.started:
            self.started = True
            self.poll_due = time.monotonic()
            self.say(f"Watching {self.db_name()} with {self.url}: Ctrl-C stops")
        if any(result[key] and result[key]["total_operations"] for key in ("pulled", "pushed", "pulled_after_push")):
            self.on_sync(result)

    def push(self) -> None:
        """Send what the hub lacks by the last clock it told: one request, and the next
        edit can go. (Another device's operations the hub already holds are skipped there.)"""
        run = _Run(self.db, self.client, self.url, bool(self.token), self.workdir, self.alter, self.max_clock_skew,
                   None, 0, None, scope=self.scope())
        try:
            pushed, after = run.push(self.device_id, self.hub_clock)
        except (HubError, sqlite3.OperationalError) as ex:
            if isinstance(ex, HubError) and ex.reason == errors.REJECTED:
                self.exchange_due = time.monotonic()  # refused as we built it: a whole exchange decides
                return
            self.failed(ex)
            self.push_due = self.retry_at()
            return
        self.push_due = self.tick_due = None
        self.learn_hub_clock(after or {}, None)
        self.reached()
        self.tell_held_back(pushed.get("held_back", 0))
        if pushed["total_operations"]:
            self.on_sync(self.result(empty_result(self.hub_device), pushed))

    def tell_held_back(self, held: int) -> None:
        """Say (once for each count) that edits of this partial copy wait: a watcher otherwise
        prints nothing for a push that sent none of them."""
        if held and held != self.held_back:
            self.say(f"{held_back_message(held, 'the hub')}; they go once a copy holding those syncs with the hub")
        self.held_back = held

    def result(self, pulled: dict[str, Any], pushed: dict[str, Any]) -> dict[str, Any]:
        """A step's outcome shaped like :func:`sync_with_hub`'s result."""
        return {
            "hub": {"url": self.url, "device_id": self.hub_device, "clock": self.hub_clock},
            "device_id": self.device_id,
            "pulled": pulled,
            "pushed": pushed,
            "pulled_after_push": None,
        }

    def learn_hub_clock(self, hub_clock: dict[str, int], hub_device: str | None) -> None:
        self.hub_clock, self.hub_device = hub_clock or self.hub_clock, hub_device or self.hub_device

    def db_name(self) -> str:
        row = self.conn.execute("PRAGMA database_list").fetchone()
        return row[2] or "the database"

    # Pulls -------------------------------------------------------------------------------------

    def handle(self, event: tuple) -> None:
        if event[0] == "failed":
            _, ex, started = event
            if started < self.reached_at:
                # Sent before another request found the hub (back after a restart, say): it
                # tells nothing about the hub now, and saying "unreachable" would be wrong.
                self.poll_due = time.monotonic()
                return
            self.failed(ex)
            self.poll_due = self.retry_at()
            return
        _, path, response, seconds, waited = event
        try:
            operations = self.import_pulled(path, response)
        except (HubError, sqlite3.OperationalError) as ex:
            self.failed(ex)
            self.poll_due = self.retry_at()
            return
        self.reached()
        self.poll_due = time.monotonic()
        # Answered at once with nothing, twice in a row (once is a hub ending its waits as it
        # stops): a hub that does not hold pulls open. Don't spin on it.
        if not waited:
            return
        self.quick_empty = self.quick_empty + 1 if not operations and seconds < min(self.wait / 2, 1.0) else 0
        if self.quick_empty >= 2:
            if not self.old_hub:
                self.say(f"hub {self.url} does not hold pulls open: pulling every {OLD_HUB_POLL:g} s")
            self.old_hub = True
            self.poll_due += OLD_HUB_POLL

    def import_pulled(self, path: str, response: Any) -> int:
        """Import a pulled bundle; returns how many operations it held."""
        hub_clock, hub_device, operations, *_ = read_pulled(path, response, self.url)
        self.learn_hub_clock(hub_clock, hub_device)
        self.answered()  # before the import's line; the delay grows again if the import fails
        if not operations:
            return 0
        pulled = import_bundle(
            self.db, path, alter=self.alter, max_clock_skew=self.max_clock_skew, adopt_scope=True
        ).as_dict()
        if self.has_unsent():
            now = time.monotonic()
            if self.tick_due is None:
                self.tick_first = now
            self.tick_due = min(now + TICK_QUIET, self.tick_first + TICK_LATEST)
        self.on_sync(self.result(pulled, empty_result(self.device_id)))
        return operations

    # Losing and finding the hub ----------------------------------------------------------------

    def failed(self, ex: Exception) -> None:
        # The hub may be back in a moment (client.is_transient); a refusal is final.
        if isinstance(ex, HubError) and not is_transient(ex):
            raise ex
        if isinstance(ex, sqlite3.OperationalError) and not _is_busy(ex):
            raise ex
        self.failures += 1
        if isinstance(ex, sqlite3.OperationalError):
            self.busy()
        elif self.lost_at is None:
            self.lost_at = time.monotonic()
            self.say(f"hub {self.url} unreachable: {ex.message.rstrip('.')}; retrying")

    def busy(self) -> None:
        """Another program held the database's lock longer than the busy timeout."""
        if not self.locked:
            self.locked = True
            self.say(f"{self.db_name()} is locked by another connection: waiting for it")

    def reached(self) -> None:
        """A step with the hub and the database succeeded."""
        self.failures = 0
        self.locked = False
        self.answered()

    def answered(self) -> None:
        """The hub answered a request."""
        self.reached_at = time.monotonic()
        if self.lost_at is not None:
            self.say(f"hub {self.url} back after {time.monotonic() - self.lost_at:.1f} s")
            self.lost_at = None
            if self.started:  # the hub may have lost what it had (a restored backup): exchange all
                self.exchange_due = time.monotonic()

    def retry_at(self) -> float:
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (self.failures - 1))
        return time.monotonic() + delay * random.uniform(0.8, 1.2)


def _is_busy(ex: sqlite3.OperationalError) -> bool:
    text = str(ex).lower()
    return "locked" in text or "busy" in text
