"""Live sync on the hub: pulls that wait for new operations (long-polls), and who is watching.

One :class:`ChangeFeed` per database, made the first time someone waits on it and kept on the
Datasette object (so two Datasette instances in one process never share one). It holds, in
memory, the hub's vector clock and its **data clock** (per device, the highest seq of an
operation that is not a knowledge tick), an :class:`asyncio.Event` the waiting requests await,
and the registry of watching devices.

A waiting request holds no thread and no database connection: it is a coroutine parked on the
event. Whoever may have written operations calls :func:`changed` (the import and resolve
endpoints, the write hook after a Datasette write, the cluster importer); the feed then
re-reads its clocks (two indexed look-ups per device, each only over operations it has not
seen yet) and, when the data clock moved, wakes every waiter, each of which compares the
clock with its own ``since`` in memory. Writes by other processes (the ``sqlite3`` shell on
the hub's file) are seen by a poller task that runs while anyone waits: every
:data:`POLL_SECONDS` it reads ``PRAGMA data_version`` on a connection of its own, and never
opens the file itself (see :class:`CommitWatch`).

Knowledge ticks never wake anyone: every watcher pushes one after each pull, and waking the
others for it would make every edit cost O(watchers²) requests.

Shutdown: uvicorn waits for open requests when it is told to stop. The poller notices the
server stopping (uvicorn's ``should_exit``, found through its signal handler) and ends every
wait, so the waiting pulls answer at once and the hub exits promptly.
"""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from datasette.utils.sqlite import sqlite3  # Datasette's SQLite library: see CommitWatch

from sqlite_utils_sync.clocks import max_seq
from sqlite_utils_sync.oplog import TICK, device_range, kind_sql, op_seq
from sqlite_utils_sync.schema import is_enabled

from .guard import sync_write

POLL_SECONDS = 0.2
"""How often the poller looks for commits by other connections (see :class:`CommitWatch`)."""
CONNECTED_GRACE = 10.0
"""A device stays "watching" this long after its last waiting pull ended: the gap between
two long-polls."""
FEEDS_ATTRIBUTE = "_datasette_sync_feeds"


def feed(datasette, database: str) -> ChangeFeed:
    """The change feed of a database, made on first use (call it on the event loop)."""
    feeds = datasette.__dict__.setdefault(FEEDS_ATTRIBUTE, {})
    current = feeds.get(database)
    # A Datasette object outlives its event loop in some test setups: a feed serves one loop.
    if current is None or current.loop is not asyncio.get_running_loop():
        current = feeds[database] = ChangeFeed(datasette, database)
    return current


def existing_feed(datasette, database: str) -> ChangeFeed | None:
    return datasette.__dict__.get(FEEDS_ATTRIBUTE, {}).get(database)


def changed(datasette, database_name: str) -> None:
    """Operations may have landed in ``database_name``: re-read its data clock and wake the
    waiters it concerns. Call it on the event loop; from another thread (Datasette's write
    thread) use :func:`changed_threadsafe`. Nothing to do when nobody ever waited there."""
    current = existing_feed(datasette, database_name)
    if current is not None:
        current.schedule_refresh()


def changed_threadsafe(datasette, database_name: str) -> None:
    """:func:`changed` from any thread."""
    current = existing_feed(datasette, database_name)
    if current is not None and not current.loop.is_closed():
        current.loop.call_soon_threadsafe(current.schedule_refresh)


def reporting_writes(datasette, database: str, guard):
    """The ``write_wrapper`` hook's wrapper ``guard`` (None: a sync endpoint's own write, which
    reports itself), made to also report the write to the feed when anyone waits there."""
    if guard is None or existing_feed(datasette, database) is None:
        return guard

    def report(conn):
        try:
            result = yield from guard(conn)
        finally:
            current = existing_feed(datasette, database)
            if current is not None and not current.loop.is_closed():
                current.loop.call_soon_threadsafe(current.after_write)
        return result

    return report


@dataclass
class Watcher:
    """A device pulling with ``wait``: who, since when, and what it had."""

    device: str
    actor: str | None
    since: dict[str, int]
    connected: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)
    waiting: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "device_id": self.device,
            "actor": self.actor,
            "connected_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.connected)),
            "waiting": self.waiting > 0,
            "clock": dict(self.since),
        }


class ChangeFeed:
    def __init__(self, datasette, name: str):
        self.datasette = datasette
        self.name = name
        self.loop = asyncio.get_running_loop()
        self.clock: dict[str, int] = {}
        self.data_clock: dict[str, int] = {}
        # By device and actor: a pull names its device itself, so another actor naming the same
        # device makes an entry of its own (the pages list only the owner's, see views.watching).
        self.watchers: dict[tuple[str, str | None], Watcher] = {}
        self.waiting = 0
        self.stopping = False
        self._scanned: dict[tuple[int, str], int] = {}
        self._event = asyncio.Event()
        self._lock = asyncio.Lock()
        self._requested = 0
        self._done = 0
        self._poller: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.exports: dict[tuple, SharedExport] = {}

    # Reading the clocks --------------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read the clocks (a read that started after this call was made counts), and wake
        the waiters when the data clock moved."""
        self._requested += 1
        wanted = self._requested
        async with self._lock:
            if self._done >= wanted:
                return
            target = self._requested
            db = self.datasette.get_database(self.name)
            scanned = dict(self._scanned)
            clock, data, scanned = await db.execute_fn(lambda conn: read_clocks(conn, scanned))
            self._done = target
            self._scanned = scanned
            self.clock = clock
            moved = any(seq > self.data_clock.get(device, 0) for device, seq in data.items())
            self.data_clock = {**self.data_clock, **{d: max(s, self.data_clock.get(d, 0)) for d, s in data.items()}}
            if moved:
                self.wake()

    def schedule_refresh(self) -> None:
        """A refresh in the background, for callers that must not wait for it (refreshes
        requested while one reads are done together by the next read)."""
        task = self.loop.create_task(self._refresh_quietly())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def after_write(self) -> None:
        """:meth:`schedule_refresh` once the write being run on Datasette's write thread has
        committed (the wrapper reports it from inside its transaction)."""
        task = self.loop.create_task(self._after_write())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _after_write(self) -> None:
        db = self.datasette.get_database(self.name)
        try:
            # The write thread runs its tasks in order: once this one ran, that write committed.
            with sync_write():
                await db.execute_write_fn(lambda conn: None, transaction=False)
        except Exception:  # noqa: BLE001 - the poller still sees the commit
            pass
        await self._refresh_quietly()

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception:  # noqa: BLE001
            # A database that cannot be read now (locked, gone) leaves the clocks as they
            # were; the poller or the next call tries again, and waiters still time out.
            pass

    def wake(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    def news_for(self, since: dict[str, int], device: str | None) -> bool:
        """Whether the hub holds a data operation, of a device other than ``device``, that
        ``since`` lacks."""
        return any(seq > since.get(other, 0) for other, seq in self.data_clock.items() if other != device)

    # Waiting ------------------------------------------------------------------------------

    async def wait(self, since: dict[str, int], device: str | None, seconds: float, gone=None) -> bool:
        """Wait until :meth:`news_for` holds, ``seconds`` pass, the server stops or the
        awaitable ``gone`` (the caller disconnected) finishes. True when there is news."""
        self.waiting += 1
        try:
            # The poller's starting point first: a commit by another process after it is seen
            # by the poller or by this read (one between the read and the poller's start was not).
            self._start_poller()
            await self.refresh()
            deadline = self.loop.time() + seconds
            while not self.news_for(since, device) and not self.stopping:
                remaining = deadline - self.loop.time()
                if remaining <= 0 or (gone is not None and gone.done()):
                    break
                event = asyncio.ensure_future(self._event.wait())
                waits = {event} if gone is None else {event, gone}
                try:
                    await asyncio.wait(waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    event.cancel()
            return self.news_for(since, device)
        finally:
            self.waiting -= 1

    def watching(self, device: str, actor: str | None, since: dict[str, int]) -> Watcher:
        """Register a waiting pull of ``device`` (call :meth:`done_watching` when it ends)."""
        watcher = self.watchers.get((device, actor))
        if watcher is None or not self._connected(watcher):
            if len(self.watchers) > 2 * self.waiting + 100:
                # Forget the devices gone, even if no page ever lists them: short pulls with
                # ever new device ids must not grow this without end.
                self.connected()
            watcher = Watcher(device, actor, since)
            self.watchers[(device, actor)] = watcher
        watcher.since, watcher.last_seen = since, time.monotonic()
        watcher.waiting += 1
        return watcher

    def done_watching(self, watcher: Watcher, hung_up: bool = False) -> None:
        """A waiting pull ended; one the device hung up on mid-wait means it stopped watching
        (a watcher between two pulls never hangs up), so it is no longer listed."""
        watcher.waiting -= 1
        watcher.last_seen = time.monotonic()
        key = (watcher.device, watcher.actor)
        if hung_up and watcher.waiting == 0 and self.watchers.get(key) is watcher:
            del self.watchers[key]

    def _connected(self, watcher: Watcher) -> bool:
        return watcher.waiting > 0 or time.monotonic() - watcher.last_seen < CONNECTED_GRACE

    def connected(self) -> list[Watcher]:
        """The devices watching now, longest connected first; forgets those gone."""
        for key in [k for k, w in self.watchers.items() if not self._connected(w)]:
            del self.watchers[key]
        return sorted(self.watchers.values(), key=lambda w: (w.connected, w.device))

    # Writes by other processes ------------------------------------------------------------

    def _start_poller(self) -> None:
        if self._poller is None or self._poller.done():
            watch = CommitWatch(self.datasette.get_database(self.name).path)
            self._poller = self.loop.create_task(self._poll(watch, watch.state()))

    async def _poll(self, watch: CommitWatch, last: tuple) -> None:
        """While anyone waits: refresh when another connection commits (``last``: the state
        when the first waiter read the clocks); end every wait when the server stops."""
        server = uvicorn_server()
        try:
            while self.waiting > 0:
                await asyncio.sleep(POLL_SECONDS)
                if server is not None and getattr(server, "should_exit", False):
                    self.stopping = True
                    self.wake()
                    return
                state = watch.state()
                if state != last:
                    last = state
                    await self._refresh_quietly()
        finally:
            watch.close()


# Sharing one export between woken waiters ---------------------------------------------------


def shared_since(since: dict[str, int], clock: dict[str, int]) -> dict[str, int]:
    """``since`` lowered to what the hub holds (its vector clock ``clock``): the same
    operations are beyond it, so every watcher that is up to date asks the same (each is
    ahead of the hub only on its own device). A lower ``since`` is always safe for the
    receiver: it skips operations it has, and a withheld range need only start after it."""
    lowered = {device: min(seq, clock[device]) if device in clock else seq for device, seq in since.items()}
    return {device: seq for device, seq in lowered.items() if seq > 0}


class SharedExport:
    """One bundle file served to every concurrent pull that asks for the same operations:
    made once, read by each response, removed when the last one is done with it."""

    def __init__(self, directory, make):
        self.directory = directory
        self.refs = 0
        self.task = asyncio.ensure_future(make())
        self.task.add_done_callback(lambda _: self._remove_if_unused())

    async def result(self):
        """The export's result (shared: one caller hanging up does not cancel it)."""
        self.refs += 1
        try:
            return await asyncio.shield(self.task)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """One response is done with the file."""
        self.refs -= 1
        self._remove_if_unused()

    def _remove_if_unused(self) -> None:
        if self.refs <= 0 and self.task.done():
            shutil.rmtree(self.directory, ignore_errors=True)


def share_export(feed: ChangeFeed, key: tuple, directory_factory, make_factory) -> SharedExport:
    """The export in flight for ``key`` (since, scope and the hub clock it is made at), or a
    new one; it is forgotten as soon as it is made, so a later pull never gets a stale one."""
    current = feed.exports.get(key)
    if current is not None and not current.task.done():
        return current
    directory = directory_factory()
    shared = feed.exports[key] = SharedExport(directory, lambda: make_factory(directory))
    shared.task.add_done_callback(lambda _: feed.exports.pop(key, None) if feed.exports.get(key) is shared else None)
    return shared


class CommitWatch:
    """Sees commits to the database at ``path`` by any other connection, of this process or
    another: its ``PRAGMA data_version`` on a read-only connection of its own, and the file's
    inode, size and modification time (a restored backup is a new file).

    Never by opening the file itself: on POSIX, closing any descriptor of a file drops every
    lock this process holds on it, SQLite's included, so another process could then write under
    Datasette's open transaction, or roll it back as a crash's. SQLite's own connections share
    their descriptors and put such a close off until no lock is held, within one SQLite library:
    so this connection comes from the one Datasette uses (``pysqlite3`` where installed)."""

    def __init__(self, path: str | None):
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.inode: int | None = None

    def state(self) -> tuple:
        if not self.path:
            return ()
        try:
            stat = os.stat(self.path)
        except OSError:
            self.close()
            return (None,)
        try:
            if self.conn is None or stat.st_ino != self.inode:
                self.close()
                uri = pathlib.Path(self.path).absolute().as_uri() + "?mode=ro"
                self.conn = sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False)
                self.inode = stat.st_ino
            (version,) = self.conn.execute("PRAGMA data_version").fetchone()
        except sqlite3.Error:
            version = None  # locked by a commit under way: the next look sees it done
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns, version)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def uvicorn_server():
    """The uvicorn server running this process, if it is (its signal handler is a bound method
    of it), so the poller can see it stopping."""
    try:
        handler = signal.getsignal(signal.SIGTERM)
    except (ValueError, OSError):
        return None
    server = getattr(handler, "__self__", None)
    return server if hasattr(server, "should_exit") else None


def read_clocks(conn, scanned: dict[tuple[int, str], int]):
    """(vector clock, data clock, new scanned marks): per device, its highest seq, and the
    highest seq of a non-tick operation among those not scanned before (0: none new)."""
    if not is_enabled(conn):
        return {}, {}, scanned
    clock, data, marks = {}, {}, {}
    for idx, device_id in conn.execute("SELECT idx, device_id FROM _sync_devices").fetchall():
        seq = max_seq(conn, idx)
        if seq:
            clock[device_id] = seq
        first, last = device_range(idx)
        top = conn.execute("SELECT max(op) FROM _sync_ops WHERE op BETWEEN ? AND ?", [first, last]).fetchone()[0]
        done = scanned.get((idx, device_id), 0)
        marks[(idx, device_id)] = max(done, top or 0)
        if top is None or top <= done:
            continue
        row = conn.execute(
            f"SELECT op FROM _sync_ops WHERE op BETWEEN ? AND ? AND {kind_sql()} != {TICK} ORDER BY op DESC LIMIT 1",
            [max(first, done + 1), top],
        ).fetchone()
        if row:
            data[device_id] = op_seq(row[0])
    return clock, data, marks
