"""Cluster mode: several hubs that share every bundle through NATS JetStream.

Each hub keeps its own SQLite copy, and its synced state is a function of the stream prefix
it has applied: every hub applies the stream's messages strictly in stream order, so each
message meets the same state, and gets the same outcome, on every hub. A push to a hub is
imported there as a check only (hashes, permissions, constraints, clock skew, device
ownership); inside that check's transaction the bundle is published to the stream
(``<stream>.<database>.bundles``, deduplicated by ``Nats-Msg-Id`` = bundle id) and the check
is rolled back. The hub then answers from what its own consumer made of the message at its
stream position: the import's result, or the refusal every hub recorded
(``_sync_cluster_refused``). Every hub has a durable consumer (``<hub>_<database>``) that
imports each message's bundle; a hub that was down resumes where its consumer stopped. The
hub's own operations (knowledge ticks, resolutions, Datasette writes) commit locally first
and leave through an outbox that publishes what this hub's device wrote since the last
publish. Retention: the hub furthest along stores a full export as ``snapshot-<database>``
in the object store (with the stream sequence it covers, and the device claims as
``claims-<database>``) and purges the messages every consumer has acknowledged up to there;
a new hub starts from that snapshot. Each consumer has the server's
inactive threshold (``forget_after``): a hub gone for good is forgotten, and starts from the
snapshot if it comes back. Datasette's ``shutdown`` hook stops the members.

``nats`` is imported only by a hub whose configuration has a ``cluster`` setting.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import sqlite3
import tempfile
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from datasette.utils import StartupError, tilde_encode

from sqlite_utils_sync import SyncError, errors, export_bundle, import_bundle, protocol
from sqlite_utils_sync.clocks import MAX_CLOCK_SKEW_LIMIT, max_seq, now_iso
from sqlite_utils_sync.devices import local_device_id
from sqlite_utils_sync.oplog import LOCAL
from sqlite_utils_sync.schema import has_table, is_enabled
from sqlite_utils_sync.transaction import transaction

from .guard import sync_write

log = logging.getLogger("datasette_sync.cluster")

DEFAULT_STREAM = "datasette-sync"
DEFAULT_SNAPSHOT_EVERY = 1000
DEFAULT_FORGET_AFTER = 7 * 24 * 3600  # seconds without a pull before a hub's consumer is deleted
OBJECT_HEADER = "Datasette-Sync-Object"
ALTER_HEADER = "Datasette-Sync-Alter"
ACTOR_HEADER = "Datasette-Sync-Actor"
RELAY_HEADER = "Datasette-Sync-Relay"  # "0": the pusher lacked sync-relay, so it claimed its devices
SEQ_HEADER = "Datasette-Sync-Stream-Seq"
ORIGIN_HEADER = "Datasette-Sync-Origin"  # an outbox message's "<device> <first seq> <last seq>"
NOTICE_HEADER = "Datasette-Sync-Refused"  # a notice's refused stream sequence
MSG_ID_HEADER = "Nats-Msg-Id"
PUBLISH_TIMEOUT = 5.0  # seconds a push waits for the stream's PubAck before answering 503
DUPLICATE_WINDOW = 120.0  # a push retried within this is stored once (the import dedupes anyway)
ACK_WAIT = 20.0  # unacknowledged this long (a hub that died mid-import), a message is redelivered
RETRY_DELAY = 0.5  # a message this hub cannot import for now is retried in place after this, longer each time
MAX_RETRY_DELAY = 30.0
OUTCOME_WAIT = 30.0  # seconds a push waits for this hub's consumer to reach its stream position
KEEP_OUTCOMES = 4096  # outcomes of recent stream positions kept in memory for the pushes waiting on them
LATEST_REFUSED = 5  # refusals the overview shows
RETENTION_CHECK = 10.0  # seconds between two looks at the other consumers by a hub that is behind
HEADER_ROOM = 4096  # max_payload counts headers too
OUTBOX_INTERVAL = 1.0
# The hub's own trouble, not the message's: the same message is retried in place. Any other
# refusal is the same on every hub (the same message meets the same state): it is recorded.
HUB_TROUBLE = {errors.BUSY, errors.SQLITE_ERROR, errors.SCHEMA_TOO_NEW}
NAME = re.compile(r"^[A-Za-z0-9_-]+$")
KEYS = {"servers", "stream", "hub", "replicas", "snapshot_every", "forget_after"}
STOP_TIMEOUT = 5.0  # seconds a hub stopping waits for the NATS server to take what it sent
# pip keeps the datasette-sync installed (from a checkout too) and adds only the extra's nats-py.
INSTALL_CLIENT = "pip install 'datasette-sync[cluster]' in the hub's environment, then start the hub again"


@dataclass(frozen=True)
class Settings:
    servers: tuple[str, ...]
    hub: str
    stream: str = DEFAULT_STREAM
    replicas: int = 1
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    forget_after: int = DEFAULT_FORGET_AFTER


def parse_settings(value: Any) -> Settings:
    """The ``cluster`` plugin setting; raises ValueError with one line saying what is wrong."""
    if not isinstance(value, dict):
        raise ValueError(f"cluster must be a mapping with servers and hub, got {value!r}")
    unknown = set(value) - KEYS
    if unknown:
        raise ValueError(f"cluster has unknown keys {sorted(unknown)} (known: {sorted(KEYS)})")
    servers = value.get("servers")
    if isinstance(servers, str):
        servers = [servers]
    if not servers or not isinstance(servers, list) or not all(isinstance(s, str) and "://" in s for s in servers):
        raise ValueError(f"cluster servers must be a list of nats:// URLs, got {servers!r}")
    for key, default in (("hub", None), ("stream", DEFAULT_STREAM)):
        name = value.get(key, default)
        if not isinstance(name, str) or not NAME.match(name):
            raise ValueError(f"cluster {key} must be a name of letters, digits, - and _, got {name!r}")
    numbers = {}
    limits = (("replicas", 1, 5), ("snapshot_every", DEFAULT_SNAPSHOT_EVERY, None))
    for key, default, most in (*limits, ("forget_after", DEFAULT_FORGET_AFTER, None)):
        number = value.get(key, default)
        if isinstance(number, bool) or not isinstance(number, int) or number < 1 or (most and number > most):
            limit = f"from 1 to {most}" if most else "at least 1"
            raise ValueError(f"cluster {key} must be a whole number {limit}, got {number!r}")
        numbers[key] = number
    return Settings(tuple(servers), value["hub"], value.get("stream", DEFAULT_STREAM), **numbers)


def raw_setting(datasette, database: str | None):
    from .views import plugin_config

    return plugin_config(datasette, database).get("cluster")


def settings_for(datasette, database: str) -> Settings | None:
    value = raw_setting(datasette, database)
    return None if value is None else parse_settings(value)


def check_config(datasette) -> None:
    for database in [None, *datasette.databases]:
        value = raw_setting(datasette, database)
        if value is None:
            continue
        try:
            parse_settings(value)
        except ValueError as ex:
            where = " (datasette-sync plugin config" + (f" for database {database})" if database else ")")
            raise StartupError(f"{ex}{where}")


def token(database: str) -> str:
    """The database name as one subject token and a consumer-name part (no dots, no spaces)."""
    return tilde_encode(database).replace("+", "~20")


def subject(settings: Settings, database: str) -> str:
    return f"{settings.stream}.{token(database)}.bundles"


def consumer_name(settings: Settings, database: str) -> str:
    return f"{settings.hub}_{token(database)}"


def bucket_name(settings: Settings) -> str:
    return f"{settings.stream}-bundles"


def snapshot_name(database: str) -> str:
    return f"snapshot-{token(database)}"


def claims_name(database: str) -> str:
    """The device claims (``_sync_device_actors``) stored with the snapshot, as JSON."""
    return f"claims-{token(database)}"


def notices_subject(settings: Settings, database: str) -> str:
    """Where a hub says it refused another hub's outbox message, so that hub sends it again."""
    return f"{settings.stream}.{token(database)}.notices"


def object_name(database: str, bundle_id: str) -> str:
    """A pushed bundle too big for a message; per database, so its retention can drop it."""
    return f"bundle-{token(database)}-{bundle_id}"


# Members ----------------------------------------------------------------------------------

_members: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def members(datasette) -> dict[str, "Member"]:
    return _members.setdefault(datasette, {})


def member(datasette, database: str) -> "Member | None":
    return _members.get(datasette, {}).get(database)


def startup(datasette):
    """The ``startup`` hook's part: one member per mutable database with a ``cluster`` setting."""
    check_config(datasette)
    wanted = {}
    for name, db in datasette.databases.items():
        settings = settings_for(datasette, name)
        if settings is not None and db.is_mutable and not db.is_memory:
            wanted[name] = settings
    if not wanted:
        return None

    async def start():
        for name, settings in wanted.items():
            if name not in members(datasette):
                members(datasette)[name] = Member(datasette, name, settings)
                members(datasette)[name].start()

    return start


def shutdown(datasette):
    """The ``shutdown`` hook's part (Datasette runs it on the ASGI lifespan's shutdown, after
    the server stopped taking requests): stop every member before the loop ends. A stopped
    member stays registered, so a push arriving after all is refused, not left unpublished."""
    running = _members.get(datasette, {})
    if not running:
        return None

    async def stop():
        await asyncio.gather(*(this.stop() for this in running.values()), return_exceptions=True)

    return stop


class Member:
    """This hub in the cluster for one database: its connection, consumer and outbox."""

    def __init__(self, datasette, database: str, settings: Settings):
        self.datasette = datasette
        self.database = database
        self.settings = settings
        self.subject = subject(settings, database)
        self.purge_held = False  # the last retention check waited for a message in flight
        self.loop: asyncio.AbstractEventLoop | None = None
        self.nc = None
        self.js = None
        self.behind: int | None = None
        self.error: str | None = None
        self.client_missing: str | None = None  # why nats cannot be imported, once started
        self.snapshot_seq = 0
        self.next_check = 0.0
        self.poked: asyncio.Event | None = None
        self.tasks: list[asyncio.Task] = []
        self.handled = 0  # the highest stream sequence this hub's consumer has handled
        self.outcomes: dict[int, Any] = {}  # stream sequence: ImportResult or the SyncError refusing it
        self.awaited: set[str] = set()  # bundle ids of pushes to this hub waiting for their outcome
        self.progress: asyncio.Condition | None = None
        self.refused: tuple[int, list[dict]] | None = None  # (count, latest), read when consuming starts
        self.device: str | None = None  # this hub's device id, read when consuming starts
        self.ordered_own = 0  # this hub's device's highest seq its consumer met in the stream
        # Set once the stream has everything this database held before it joined (at once for
        # one that held nothing). Until then a push waits: its operations may depend on those,
        # and other hubs would refuse it, for good, if it reached the stream first.
        self.held_published: asyncio.Event | None = None

    @property
    def db(self):
        return self.datasette.get_database(self.database)

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.poked = asyncio.Event()
        self.progress = asyncio.Condition()
        self.held_published = asyncio.Event()
        self.client_missing = missing_client()
        if self.client_missing is not None:
            # Nothing changes until it is installed and the hub restarted: say so once, rather
            # than have the consumer and the outbox fail on the import every second.
            self.error = f"cluster mode needs the NATS client (nats-py), which cannot be imported ({self.client_missing}): {INSTALL_CLIENT}"
            log.error("datasette-sync cluster (%s): %s", self.database, self.error)
            return
        self.tasks = [self.loop.create_task(self.run()), self.loop.create_task(self.outbox_loop())]

    async def stop(self) -> None:
        """Cancel the consumer and outbox tasks and close the NATS connection. A message being
        imported is not acknowledged: it is redelivered when the hub starts again."""
        tasks, self.tasks = self.tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        nc, self.nc, self.js = self.nc, None, None
        if nc is None or nc.is_closed:
            return
        # Flush and close rather than drain: draining waits for the pull subscription's
        # queue, which nobody reads once the consumer task is cancelled.
        with contextlib.suppress(Exception):
            await nc.flush(timeout=STOP_TIMEOUT)
        with contextlib.suppress(Exception):
            await nc.close()

    def poke(self) -> None:
        """Run the outbox soon (thread-safe)."""
        if self.loop is not None and self.poked is not None:
            self.loop.call_soon_threadsafe(self.poked.set)

    # Connection ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, bind the consumer and import for ever; after any failure (NATS down, no
        quorum) start over a second later: the durable consumer resumes where it stopped."""
        while True:
            subscription = None
            try:
                await self.connect()
                await self.ensure_stream()
                subscription = await self.subscribe()
                with sync_write():
                    await self.db.execute_write_fn(join_empty)
                await self.note_joined()
                self.error = None
                await self.consume(subscription)
            except asyncio.CancelledError:
                raise
            except Exception as ex:
                error = f"{type(ex).__name__}: {ex}".rstrip(": ")
                if error != self.error:  # once per outage, not every second
                    log.warning("datasette-sync cluster (%s): %s; retrying", self.database, error)
                self.error = error
                if subscription is not None:
                    with contextlib.suppress(Exception):
                        await subscription.unsubscribe()
                await asyncio.sleep(1)

    async def connect(self) -> None:
        import nats

        if self.nc is not None and not self.nc.is_closed:
            return

        async def disconnected():
            self.error = "disconnected from NATS"

        async def reconnected():
            self.error = None

        async def on_error(ex):
            log.debug("datasette-sync cluster (%s): %s", self.database, ex)

        self.nc = await nats.connect(
            servers=list(self.settings.servers),
            name=f"datasette-sync {self.settings.hub}",
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            connect_timeout=2,
            allow_reconnect=True,
            disconnected_cb=disconnected,
            reconnected_cb=reconnected,
            error_cb=on_error,
        )
        self.js = self.nc.jetstream(timeout=PUBLISH_TIMEOUT)

    async def ensure_stream(self) -> None:
        from nats.js.api import StorageType, StreamConfig
        from nats.js.errors import NotFoundError

        name = self.settings.stream
        try:
            await self.js.stream_info(name)
        except NotFoundError:
            config = StreamConfig(
                name=name,
                subjects=[f"{name}.>"],
                num_replicas=self.settings.replicas,
                duplicate_window=DUPLICATE_WINDOW,
                storage=StorageType.FILE,
            )
            try:
                await self.js.add_stream(config)
            except Exception:
                await self.js.stream_info(name)  # another hub created it meanwhile
        await self.object_store()

    async def object_store(self):
        from nats.js.errors import BucketNotFoundError, NotFoundError

        try:
            return await self.js.object_store(bucket_name(self.settings))
        except (BucketNotFoundError, NotFoundError):
            try:
                return await self.js.create_object_store(bucket_name(self.settings), replicas=self.settings.replicas)
            except Exception:
                return await self.js.object_store(bucket_name(self.settings))

    async def subscribe(self):
        """Bind to this hub's durable consumer; a new hub (or one whose consumer was forgotten
        after ``forget_after`` without a pull) first imports the snapshot, if any, and starts
        after the sequence it covers."""
        from nats.js.errors import NotFoundError

        durable = consumer_name(self.settings, self.database)
        try:
            info = await self.js.consumer_info(self.settings.stream, durable)
        except NotFoundError:
            await self.add_consumer(durable)
        else:
            await self.one_at_a_time(info.config)
            await self.keep_forget_after(info)
        await self.join_from_snapshot()
        return await self.js.pull_subscribe_bind(durable, self.settings.stream)

    async def add_consumer(self, durable: str) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        covered = await self.snapshot_info()
        if covered:
            # Noted before the consumer exists, imported after: the consumer holds the
            # messages after the snapshot from now on (a purge while the snapshot is being
            # imported would otherwise skip them), and a hub stopped in between imports it
            # when it starts again.
            await self.note_snapshot_due(covered)
        config = ConsumerConfig(
            durable_name=durable,
            filter_subject=self.subject,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ACK_WAIT,
            max_ack_pending=1,  # strictly in order, even when messages are redelivered
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if covered else DeliverPolicy.ALL,
            opt_start_seq=covered + 1 if covered else None,
            inactive_threshold=float(self.settings.forget_after),
        )
        await self.js.add_consumer(self.settings.stream, config)
        latest = await self.snapshot_info()
        if latest > covered:
            # A snapshot taken before the consumer existed may have purged messages after
            # ``covered`` it would have started with; the newer snapshot holds them.
            await self.note_snapshot_due(latest)

    async def one_at_a_time(self, config) -> None:
        """A consumer made before messages were applied strictly in order gets max_ack_pending
        1: after a crash, the server would otherwise deliver later messages before it
        redelivers the unacknowledged one."""
        if config.max_ack_pending == 1:
            return
        config.max_ack_pending = 1
        try:
            await self.js.add_consumer(self.settings.stream, config)  # same name: an update
        except Exception as ex:  # consuming out of order could skip a message here: don't start
            raise RuntimeError(f"the consumer could not be set to take one message at a time: {ex}") from ex

    async def note_snapshot_due(self, covered: int) -> None:
        with sync_write():
            await self.db.execute_write_fn(lambda conn: set_cluster_value(conn, "snapshot_due", covered))

    async def keep_forget_after(self, info) -> None:
        """Give a consumer made before (or with another ``forget_after``) the server's inactive
        threshold: the server deletes a durable consumer nobody pulled from for that long, so
        a hub gone for good stops holding retention back."""
        import dataclasses

        wanted = float(self.settings.forget_after)
        if info.config.inactive_threshold is not None and abs(info.config.inactive_threshold - wanted) < 0.001:
            return
        try:
            await self.js.add_consumer(self.settings.stream, dataclasses.replace(info.config, inactive_threshold=wanted))
        except Exception as ex:  # an older server: the consumer simply stays until removed by hand
            log.warning("datasette-sync cluster (%s): forget_after not set on the consumer: %s", self.database, ex)

    # Publishing (pushes and the outbox) ---------------------------------------------------

    def publish_from_thread(self, path: str, bundle_id: str, alter: bool, actor: str | None, relay: bool = True) -> int:
        """Store a bundle file in the stream and wait for the PubAck; called on the write
        thread, inside the import's transaction. The message's stream sequence (a bundle
        stored already: the first copy's). Raises SyncError (cluster_unavailable)."""
        if self.loop is None or self.js is None:
            why = "this hub cannot import the NATS client" if self.client_missing else "not connected to NATS yet"
            raise unavailable(self.database, why)
        self.awaited.add(bundle_id)  # before the message can reach the consumer
        future = asyncio.run_coroutine_threadsafe(self.publish_push(path, bundle_id, alter, actor, relay), self.loop)
        try:
            # A big bundle goes to the object store in chunks first: allow 1 s per MB.
            return future.result(PUBLISH_TIMEOUT * 2 + os.path.getsize(path) / 1e6).seq
        except Exception as ex:
            future.cancel()
            raise unavailable(self.database, f"{type(ex).__name__}: {ex}".rstrip(": ")) from ex

    async def publish_push(self, path: str, bundle_id: str, alter: bool, actor: str | None, relay: bool):
        """Publish a push once the stream has what this hub held before it joined (the outbox
        sends that first; it needs no write, so the push holding the write connection meanwhile
        does not stop it)."""
        if not self.held_published.is_set():
            self.poke()
            await asyncio.wait_for(self.held_published.wait(), PUBLISH_TIMEOUT)
        return await self.publish(path, bundle_id, alter, actor, relay)

    async def note_joined(self) -> None:
        if await self.db.execute_fn(joined):
            self.held_published.set()

    async def publish(self, path: str, bundle_id: str, alter: bool, actor: str | None, relay: bool = True, origin=None):
        headers = {MSG_ID_HEADER: bundle_id, RELAY_HEADER: "1" if relay else "0"}
        if origin is not None:
            headers[ORIGIN_HEADER] = origin
        if alter:
            headers[ALTER_HEADER] = "1"
        if actor is not None:
            headers[ACTOR_HEADER] = actor
        size = os.path.getsize(path)
        if size > self.nc.max_payload - HEADER_ROOM:
            name = object_name(self.database, bundle_id)
            await self.put_object(name, path)
            headers[OBJECT_HEADER] = name
            body = b""
        else:
            body = await asyncio.to_thread(read_file, path)
        return await self.js.publish(self.subject, body, headers=headers, stream=self.settings.stream)

    async def outbox_loop(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.poked.wait(), OUTBOX_INTERVAL)
            self.poked.clear()
            try:
                await self.read_notices()
            except asyncio.CancelledError:
                raise
            except Exception as ex:  # the outbox goes on: its messages do not wait for notices
                log.warning("datasette-sync cluster (%s): refusal notices not read: %s", self.database, ex)
            try:
                await self.flush_outbox()
            except asyncio.CancelledError:
                raise
            except Exception as ex:
                log.warning("datasette-sync cluster (%s): outbox not published: %s", self.database, ex)

    async def flush_outbox(self) -> bool:
        """Publish this hub's own operations not published yet; True if there were some."""
        if self.js is None or not self.nc.is_connected:
            return False
        pending = await self.db.execute_fn(own_pending)
        if pending is None:
            return False
        with tempfile.TemporaryDirectory(prefix="datasette-sync-") as directory:
            path = os.path.join(directory, "outbox.bundle")
            since = await self.db.execute_fn(resend_since)
            result = await self.db.execute_fn(lambda conn: export_own(conn, path, pending, since))
            if result is None:
                self.held_published.set()  # it held nothing to send (its log's sentinel aside)
                return False
            done = max(pending[1], result.clock.get(pending[0], 0))
            await self.publish(path, result.bundle_id, True, None, origin=f"{pending[0]} {since + 1} {done}")
        self.held_published.set()  # the first message after joining holds everything held here
        with sync_write():
            await self.db.execute_write_fn(lambda conn: record_published(conn, done))
        return True

    async def read_notices(self) -> None:
        """Take the notices published since the last one read: another hub refused this hub's
        outbox message, so its ops are sent again with the next one (once something new is
        written here, e.g. the clashing row changed) and the refusal shows on the overview."""
        from nats.js.errors import NotFoundError

        if self.js is None or self.device is None:
            return
        where = notices_subject(self.settings, self.database)
        while True:
            seen = await self.db.execute_fn(lambda conn: cluster_value(conn, "notice_seen") or 0)
            try:
                notice = await self.js.get_msg(self.settings.stream, seen + 1, subject=where, next=True)
            except NotFoundError:
                return
            note = parse_notice(notice, self.device)
            with sync_write():
                await self.db.execute_write_fn(lambda conn: record_notice(conn, notice.seq, note))
            if note is not None:
                self.refused = await self.db.execute_fn(refusals)
                log.warning("datasette-sync cluster (%s): %s", self.database, note[3])

    # Consuming ----------------------------------------------------------------------------

    async def consume(self, subscription) -> None:
        """Apply the messages one at a time, in stream order (max_ack_pending is 1)."""
        import nats.errors

        if self.refused is None:
            self.refused = await self.db.execute_fn(refusals)
        if self.device is None:
            self.device, self.ordered_own = await self.db.execute_fn(own_device)
        since_check = 0
        while True:
            try:
                messages = await subscription.fetch(1, timeout=1)
            except asyncio.TimeoutError:  # nats-py raises it plain too, not only its subclass
                messages = []
            for message in messages:
                await self.handle(message)
            since_check += len(messages)
            if not messages or since_check >= 16:
                since_check = 0
                await self.after_batch(subscription)

    async def handle(self, message) -> None:
        """Apply one message and ack it. The hub's own trouble (a lock, a full disk, the object
        store not answering) retries the same message in place: nothing after it is applied
        first. A refusal is recorded (every hub refuses it alike) and the message acked.

        A gap in a device's operations is a refusal too: a hub publishes a push only after its
        check imported it, which needs the device's earlier operations held there, i.e.
        imported from earlier messages (or published by that hub before). So a bundle's
        predecessors are always earlier in the stream, and a message that lacks them lacks them
        on every hub."""
        seq = sequence(message)
        if seq is not None and seq <= self.handled:
            await message.ack()  # redelivered after this hub handled it (its ack was lost)
            return
        heartbeat = asyncio.create_task(keep_in_progress(message))
        try:
            outcome = await self.apply_in_place(message)
        finally:
            heartbeat.cancel()
        await message.ack()
        self.behind = pending(message)
        await self.own_message(message)
        await self.settle(seq, outcome, (message.headers or {}).get(MSG_ID_HEADER))
        if isinstance(outcome, SyncError):
            return
        if not outcome.skipped:
            self.poke()  # the import wrote a knowledge tick of this hub's device
            notify_live(self.datasette, self.database)

    async def apply_in_place(self, message):
        """The message's ImportResult, or the SyncError refusing it (recorded)."""
        for attempt in itertools.count(1):
            try:
                return await self.apply(message)
            except (HubTrouble, OSError) as ex:  # OSError: no room for the bundle's temporary file
                if attempt == 1 or attempt % 10 == 0:
                    self.warn(message, f"waits (retried in place): {ex}")
                await asyncio.sleep(min(RETRY_DELAY * attempt, MAX_RETRY_DELAY))

    async def apply(self, message):
        with tempfile.TemporaryDirectory(prefix="datasette-sync-") as directory:
            path = os.path.join(directory, "upload.bundle")  # named as a push's is: the refusal reads the same
            outcome = await self.fetch_body(message, path)
            if outcome is None:
                outcome = await self.import_file(message, path)
        if isinstance(outcome, SyncError):
            self.warn(message, f"refused: {outcome}")
            record = (sequence(message) or 0, (message.headers or {}).get(MSG_ID_HEADER), outcome)
            try:
                with sync_write():
                    await self.db.execute_write_fn(lambda conn: record_refusal(conn, *record, self.ordered_own))
            except sqlite3.Error as ex:
                raise HubTrouble(f"the refusal could not be recorded: {ex}") from ex
            self.refused = await self.db.execute_fn(refusals)
            await self.notify_origin(message, outcome)
        return outcome

    async def notify_origin(self, message, refusal: SyncError) -> None:
        """Another hub's outbox message refused here: publish a notice for it (stored once,
        whichever hubs refuse it). Lost (NATS down), the hubs differ until it is repaired by hand."""
        origin = origin_of(message)
        seq = sequence(message)
        if origin is None or origin[0] == self.device or seq is None:
            return
        headers = {MSG_ID_HEADER: f"refused-{seq}", ORIGIN_HEADER: " ".join(map(str, origin)), NOTICE_HEADER: str(seq)}
        body = json.dumps({"hub": self.settings.hub, "reason": refusal.reason, "message": refusal.message}).encode()
        try:
            where = notices_subject(self.settings, self.database)
            await self.js.publish(where, body, headers=headers, stream=self.settings.stream)
        except Exception as ex:
            self.warn(message, f"refusal notice not published: {type(ex).__name__}: {ex}")

    async def own_message(self, message) -> None:
        """This hub's outbox message at its stream position. One that sends ops again (another
        hub refused them) retries, in stream order, the messages this hub refused while it held
        those ops and the stream did not: they may have clashed with them only here."""
        origin = origin_of(message)
        if origin is None or origin[0] != self.device:
            return
        resent = origin[1] <= self.ordered_own
        self.ordered_own = max(self.ordered_own, origin[2])
        if resent:
            await self.retry_held(origin[1])

    async def retry_held(self, first: int) -> None:
        for seq in await self.db.execute_fn(lambda conn: held_refusals(conn, first)):
            try:
                message = await self.js.get_msg(self.settings.stream, seq)
            except Exception:  # purged: the snapshot does not bring it either
                continue
            with tempfile.TemporaryDirectory(prefix="datasette-sync-") as directory:
                path = os.path.join(directory, "upload.bundle")
                outcome = await self.fetch_body(message, path)
                if outcome is None:
                    outcome = await self.import_file(message, path)
            if isinstance(outcome, SyncError):
                continue
            with sync_write():
                await self.db.execute_write_fn(lambda conn: forget_refusal(conn, seq))
            log.info("datasette-sync cluster (%s): message %s applied on retry", self.database, seq)
            notify_live(self.datasette, self.database)
        self.refused = await self.db.execute_fn(refusals)
        self.poke()

    async def settle(self, seq: int | None, outcome, bundle_id: str | None) -> None:
        """Note the outcome of stream position ``seq`` when a push to this hub waits for it
        (others' would only fill memory), and wake the pushes waiting."""
        if seq is None:
            return
        if bundle_id in self.awaited:
            self.awaited.discard(bundle_id)
            self.outcomes[seq] = outcome
        while len(self.outcomes) > KEEP_OUTCOMES:
            del self.outcomes[next(iter(self.outcomes))]  # the oldest: seqs arrive in order
        self.handled = max(self.handled, seq)
        async with self.progress:
            self.progress.notify_all()

    async def outcome(self, ordered: "Ordered"):
        """The ImportResult of the push published at ``ordered.seq`` once this hub's consumer
        has applied it there; raises the refusal, or cluster_unavailable (the bundle is stored
        and will be applied) when the consumer does not get there within OUTCOME_WAIT."""
        try:
            async with self.progress:
                await asyncio.wait_for(self.progress.wait_for(lambda: self.handled >= ordered.seq), OUTCOME_WAIT)
        except asyncio.TimeoutError:
            raise not_applied_yet(self.database) from None
        found = self.outcomes.get(ordered.seq)
        if found is None:
            found = await self.db.execute_fn(lambda conn: refusal_of(conn, ordered.seq))
        if isinstance(found, SyncError):
            raise found
        # None: applied long ago (a push repeated past the duplicate window) or by a snapshot.
        return ordered.result if found is None else found

    async def fetch_body(self, message, path: str) -> SyncError | None:
        """Write the message's bundle to ``path`` (from the object store for a big one); the
        refusal when the object is gone."""
        from nats.js.errors import NotFoundError

        name = (message.headers or {}).get(OBJECT_HEADER)
        if not name:
            try:
                await asyncio.to_thread(write_file, path, message.data or b"")
            except OSError as ex:
                raise HubTrouble(f"the bundle could not be written to a temporary file: {ex}") from ex
            return None
        try:
            store = await self.object_store()
            with open(path, "wb") as out:
                await store.get(name, writeinto=out)
            return None
        except NotFoundError:
            return SyncError(errors.INVALID_BUNDLE, f"Bundle {name} is not in the object store: nothing was imported")
        except Exception as ex:
            raise HubTrouble(f"the object store did not answer ({type(ex).__name__})") from ex

    async def import_file(self, message, path: str):
        """Import with the options the push had, deterministically: no clock-skew limit (the
        hub that took the push checked it against its clock) and no table permissions (it
        checked those too). A pusher without sync-relay claims its devices here as it did
        there, in stream order: the first claim wins, a later one is refused alike on every hub."""
        headers = message.headers or {}
        options = {
            "alter": headers.get(ALTER_HEADER) == "1",
            "actor": headers.get(ACTOR_HEADER),
            "may_relay": headers.get(RELAY_HEADER) != "0",
            "max_clock_skew": MAX_CLOCK_SKEW_LIMIT,
        }
        try:
            with sync_write():
                return await self.db.execute_write_fn(
                    lambda conn: import_bundle(conn, path, **options), transaction=False
                )
        except SyncError as ex:
            if ex.reason in HUB_TROUBLE:
                raise HubTrouble(str(ex)) from ex
            return ex
        except sqlite3.Error as ex:
            from .views import import_sqlite_refusal

            refusal = import_sqlite_refusal(ex, self.database)
            if refusal.reason != errors.INVALID_BUNDLE:
                raise HubTrouble(str(refusal)) from ex
            return SyncError(refusal.reason, str(refusal))
        except Exception as ex:
            # Not a refusal the engine made, so not one every hub is sure to make alike (out of
            # memory, no thread to start, a bug): recording it would let this hub differ from
            # the others. Retried in place instead; a bundle that always fails stalls every hub
            # the same visible way.
            log.exception("datasette-sync cluster (%s): message %s could not be imported", self.database, sequence(message))
            raise HubTrouble(f"{type(ex).__name__} while importing: {ex}") from ex

    def warn(self, message, what: str) -> None:
        log.warning("datasette-sync cluster (%s): message %s %s", self.database, sequence(message), what)

    def max_clock_skew(self) -> float:
        from .views import max_clock_skew

        return max_clock_skew(self.datasette, self.database)

    async def after_batch(self, subscription) -> None:
        info = await subscription.consumer_info()
        self.behind = info.num_pending + info.num_ack_pending
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        if floor - self.snapshot_seq >= self.settings.snapshot_every and self.loop.time() >= self.next_check:
            if not await self.maybe_snapshot(floor):
                self.next_check = self.loop.time() + RETENTION_CHECK

    # Retention ----------------------------------------------------------------------------

    async def maybe_snapshot(self, floor: int) -> bool:
        """Snapshot and purge if this hub's consumer is the furthest along of the subject's,
        and no consumer holds a message delivered but not acknowledged: a purge drops such a
        message from its consumer's pending list (nats-server 2.9 does, though the message is
        kept), so a hub that died holding one would never be given it again, and would refuse
        every later message built on it. The purge waits for such a hub to come back (or to be
        forgotten after ``forget_after``)."""
        floors, pending = await self.consumer_floors()
        mine = consumer_name(self.settings, self.database)
        if pending and not self.purge_held:
            log.warning("datasette-sync cluster (%s): retention waits: a hub holds a message it has not acknowledged "
                        "(stopped while importing it?)", self.database)
        self.purge_held = pending
        if mine not in floors or pending:
            return False
        furthest = min(floors, key=lambda name: (-floors[name], name))  # ties: the first name
        current = await self.snapshot_info()
        self.snapshot_seq = max(self.snapshot_seq, current)
        if furthest != mine or floor - self.snapshot_seq < self.settings.snapshot_every:
            return False
        await self.take_snapshot(floor)
        await self.purge(min(floor, *floors.values()))
        return True

    async def consumer_floors(self) -> tuple[dict[str, int], bool]:
        """Each consumer of the subject's ack floor, and whether any holds a message delivered
        but not acknowledged yet."""
        floors, pending = {}, False
        for info in await self.js.consumers_info(self.settings.stream):
            if info.config.filter_subject == self.subject:
                floors[info.name] = info.ack_floor.stream_seq if info.ack_floor else 0
                pending = pending or bool(info.num_ack_pending)
        return floors, pending

    async def snapshot_info(self) -> int:
        """The stream sequence the stored snapshot covers (0: none)."""
        from nats.js.errors import NotFoundError

        store = await self.object_store()
        try:
            info = await store.get_info(snapshot_name(self.database))
        except NotFoundError:  # any other error propagates: a new hub must not skip the snapshot
            return 0
        return seq_header(info.headers)

    async def take_snapshot(self, floor: int) -> None:
        """Store a full export covering every message up to ``floor`` (all imported here)."""
        with tempfile.TemporaryDirectory(prefix="datasette-sync-") as directory:
            path = os.path.join(directory, "snapshot.bundle")
            claims = os.path.join(directory, "claims.json")
            owners = await self.db.execute_fn(device_claims)
            await asyncio.to_thread(write_file, claims, json.dumps(owners).encode())
            await self.db.execute_fn(lambda conn: export_bundle(conn, path, repair=False))
            # Claims first: a hub reading this snapshot finds claims at least as recent.
            await self.put_object(claims_name(self.database), claims, {SEQ_HEADER: [str(floor)]})
            await self.put_object(snapshot_name(self.database), path, {SEQ_HEADER: [str(floor)]})
        self.snapshot_seq = floor
        log.info("datasette-sync cluster (%s): snapshot up to stream sequence %s", self.database, floor)

    async def put_object(self, name: str, path: str, headers: dict | None = None) -> None:
        """Store a file in the object store, in chunks the server's max_payload allows."""
        from nats.js.api import ObjectMeta, ObjectMetaOptions

        chunk = min(128 * 1024, self.nc.max_payload - HEADER_ROOM)
        meta = ObjectMeta(name=name, headers=headers, options=ObjectMetaOptions(max_chunk_size=chunk))
        store = await self.object_store()
        with open(path, "rb") as source:
            await store.put(name, source, meta=meta)

    async def purge(self, upto: int) -> None:
        """Remove the messages up to ``upto`` (every consumer has them, the snapshot covers
        them), and the objects of big bundles only they referred to."""
        if upto <= 0:
            return
        try:
            last_purged = parse_time((await self.js.get_msg(self.settings.stream, upto)).time)
        except Exception:
            last_purged = None
        await self.js.purge_stream(self.settings.stream, seq=upto + 1, subject=self.subject)
        if last_purged is not None:
            await self.drop_objects(last_purged - DUPLICATE_WINDOW)

    async def drop_objects(self, before: float) -> None:
        """Delete this database's bundle objects stored before ``before`` (a Unix time): the
        message referring to one is published right after it is stored, so these were
        referred to by purged messages only (a retried push stores its object anew)."""
        store = await self.object_store()
        prefix = object_name(self.database, "")
        try:
            infos = await store.list(ignore_deletes=True)
        except Exception:
            return
        for info in infos:
            stored = parse_time(info.mtime)
            if info.name.startswith(prefix) and stored is not None and stored < before:
                with contextlib.suppress(Exception):
                    await store.delete(info.name)

    async def join_from_snapshot(self) -> None:
        """Import the stored snapshot when one is due (a new hub), with the device claims made
        on other hubs. A hub that held operations before it joined is not marked joined: its
        outbox then publishes all it holds, once."""
        due = await self.db.execute_fn(lambda conn: cluster_value(conn, "snapshot_due"))
        if not due:
            return
        store = await self.object_store()
        with tempfile.TemporaryDirectory(prefix="datasette-sync-") as directory:
            path = os.path.join(directory, "snapshot.bundle")
            with open(path, "wb") as out:
                await store.get(snapshot_name(self.database), writeinto=out)
            claims = await self.stored_claims(due)
            options = {"alter": True, "may_relay": True, "max_clock_skew": self.max_clock_skew()}

            def apply(conn):
                empty = not is_enabled(conn) or not conn.execute("SELECT 1 FROM _sync_ops LIMIT 1").fetchone()
                import_bundle(conn, path, **options)
                # Committed here: the write connection would leave these in an implicit
                # transaction, which the next write's BEGIN trips on and rolls back.
                with transaction(conn):
                    add_claims(conn, claims)  # also when the snapshot brought nothing new here
                    if empty:
                        record_joined(conn)
                    conn.execute(f"DELETE FROM {CLUSTER_TABLE} WHERE key = 'snapshot_due'")

            with sync_write():
                await self.db.execute_write_fn(apply, transaction=False)
        self.snapshot_seq = max(self.snapshot_seq, due)
        await self.note_joined()
        log.info("datasette-sync cluster (%s): joined from the snapshot up to sequence %s", self.database, due)

    async def stored_claims(self, covered: int) -> list:
        """The claims stored with the snapshot covering ``covered`` ([] for a snapshot stored
        without them). Raises ValueError, which keeps the hub from joining and shows in its
        status, for claims that are older than the snapshot or not claims at all: joining
        without them would let this hub take pushes the others refuse."""
        from nats.js.errors import NotFoundError

        store = await self.object_store()
        try:
            found = await store.get(claims_name(self.database))
        except NotFoundError:
            return []
        if seq_header(found.info.headers) < covered:
            raise ValueError(f"the device claims stored with the snapshot are older than it (sequence < {covered})")
        return parse_claims(found.data or b"[]")

    # Status -------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        connected = self.nc is not None and self.nc.is_connected
        return {
            "stream": self.settings.stream,
            "subject": self.subject,
            "hub": self.settings.hub,
            "connected": connected,
            "behind": self.behind,
            "error": self.error,
            "refused": self.refused[0] if self.refused else 0,
            "latest_refused": self.refused[1] if self.refused else [],
        }


class Ordered(Exception):
    """Raised by a push's ``before_commit`` once its bundle is in the stream at ``seq``: the
    check is rolled back, and the push is answered from what the consumer makes of ``seq``."""

    def __init__(self, seq: int, result):
        super().__init__(f"published at stream sequence {seq}")
        self.seq = seq
        self.result = result


class HubTrouble(Exception):
    """This hub cannot apply a message for now (its own trouble, not the message's)."""


async def outcome(datasette, database: str, ordered: Ordered):
    return await member(datasette, database).outcome(ordered)


def not_applied_yet(database: str) -> SyncError:
    return SyncError(
        errors.CLUSTER_UNAVAILABLE,
        f"The cluster stored the bundle, but this hub has not applied it to {database} yet: it will be. "
        f"Retry in {protocol.CLUSTER_RETRY_SECONDS} seconds (pushing it again is safe) to get its result",
    )


def pending(message) -> int | None:
    """Messages of the consumer after this one."""
    try:
        return message.metadata.num_pending
    except Exception:
        return None


def missing_client() -> str | None:
    """Why the NATS client cannot be imported (its ImportError), or None when it can."""
    try:
        import nats  # noqa: F401
    except Exception as ex:  # an ImportError, or whatever a broken install raises on import
        return str(ex) or type(ex).__name__
    return None


def unavailable(database: str, why: str) -> SyncError:
    return SyncError(
        errors.CLUSTER_UNAVAILABLE,
        f"The cluster could not store the bundle ({why}): nothing was imported into {database}. "
        f"Retry in {protocol.CLUSTER_RETRY_SECONDS} seconds or push to another hub",
    )


def sequence(message) -> int | None:
    try:
        return message.metadata.sequence.stream
    except Exception:
        return None


async def keep_in_progress(message) -> None:
    """Tell the server a long import is still going, so it does not redeliver the message."""
    while True:
        await asyncio.sleep(ACK_WAIT / 3)
        with contextlib.suppress(Exception):
            await message.in_progress()


def parse_time(value) -> float | None:
    """A Unix time from a NATS timestamp (RFC 3339, maybe with nanoseconds) or a datetime."""
    import datetime

    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if not isinstance(value, str):
        return None
    match = re.match(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)?$", value)
    if match is None:
        return None
    whole, fraction, zone = match.groups()
    zone = "+00:00" if zone in (None, "Z") else zone
    stamp = datetime.datetime.fromisoformat(whole + zone).timestamp()
    return stamp + (float(fraction) if fraction else 0.0)


def read_file(path: str) -> bytes:
    with open(path, "rb") as source:
        return source.read()


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as out:
        out.write(data)


def notify_live(datasette, database: str) -> None:
    try:
        from . import live
    except ImportError:
        return
    changed = getattr(live, "changed", None)
    if changed is not None:
        changed(datasette, database)


# The hooks views.py calls -------------------------------------------------------------------


def before_commit(datasette, database: str, path: str, options: dict) -> Callable | None:
    """The import's ``before_commit`` for a push to a cluster hub (None otherwise). The import
    was the push's check: when it brought something new, publish the bundle and raise Ordered,
    which rolls the check back; the push is applied where the stream orders it."""
    this = member(datasette, database)
    if this is None:
        return None

    def publish(result) -> None:
        if result.applied or result.withheld:
            alter, actor, relay = options.get("alter", False), options.get("actor"), options.get("may_relay", True)
            raise Ordered(this.publish_from_thread(path, result.bundle_id, alter, actor, relay), result)
        this.poke()

    return publish


def status(datasette, database: str) -> dict[str, Any] | None:
    this = member(datasette, database)
    return None if this is None else this.status()


def seq_header(headers: dict | None) -> int:
    """The stream sequence an object of the store covers (0: none said)."""
    value = (headers or {}).get(SEQ_HEADER)
    if isinstance(value, list):
        value = value[0] if value else None
    try:
        return int(value or 0)
    except ValueError:
        return 0


def parse_claims(data: bytes) -> list[list]:
    """[device id, actor, since] rows from a claims object; ValueError for anything else."""
    try:
        claims = json.loads(data)
    except ValueError:
        raise ValueError("the device claims stored with the snapshot are not JSON") from None
    valid = isinstance(claims, list) and all(
        isinstance(c, list) and len(c) == 3 and all(isinstance(v, str) for v in c[:2]) and isinstance(c[2], (str, type(None)))
        for c in claims
    )
    if not valid:
        raise ValueError("the device claims stored with the snapshot are not [device, actor, since] rows")
    return claims


def device_claims(conn) -> list[list]:
    """Who owns which device here: [device id, actor, since] rows of ``_sync_device_actors``."""
    if not has_table(conn, "_sync_device_actors"):
        return []
    return [list(row) for row in conn.execute("SELECT device_id, actor, since FROM _sync_device_actors ORDER BY 1")]


def add_claims(conn, claims: list) -> None:
    """Claims from another hub: a device owned here already keeps its owner."""
    if claims and has_table(conn, "_sync_device_actors"):
        conn.executemany("INSERT OR IGNORE INTO _sync_device_actors VALUES (?, ?, ?)", claims)


# The outbox's bookkeeping, in ``_sync_cluster`` (made when first needed) ---------------------

CLUSTER_TABLE = "_sync_cluster"


def cluster_value(conn, key: str) -> int | None:
    exists = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [CLUSTER_TABLE]).fetchone()
    if not exists:
        return None
    row = conn.execute(f"SELECT value FROM {CLUSTER_TABLE} WHERE key = ?", [key]).fetchone()
    return int(row[0]) if row else None


def published(conn) -> int:
    """The highest seq of this hub's device published to the stream."""
    return cluster_value(conn, "published") or 0


def joined(conn) -> bool:
    """Whether the cluster has everything this database held when it joined: a hub that held
    operations before cluster mode publishes them all once (other devices' too)."""
    return bool(cluster_value(conn, "joined"))


def own_pending(conn) -> tuple[str, int] | None:
    """(this hub's device id, its highest seq) when there is something to publish."""
    if not is_enabled(conn):
        return None
    device = local_device_id(conn)
    seq = max_seq(conn, LOCAL)
    if not joined(conn):
        held = conn.execute("SELECT 1 FROM _sync_ops LIMIT 1").fetchone()
        return (device, seq) if held else None
    return (device, seq) if seq > published(conn) else None


def export_own(conn, path: str, pending: tuple[str, int], start: int):
    """This hub's device's operations after seq ``start`` (and no other device's); on
    joining, everything it holds."""
    from sqlite_utils_sync.clocks import clock

    device, _ = pending
    since = {**clock(conn), device: start} if joined(conn) else None
    result = export_bundle(conn, path, since=since, repair=False)
    return result if result.operations else None


def resend_since(conn) -> int:
    """The seq of this hub's device the next outbox message starts after: the published one,
    or lower when another hub refused the ops after it (see ``read_notices``)."""
    resend = cluster_value(conn, "resend_from")
    return published(conn) if resend is None else min(resend, published(conn))


def record_published(conn, seq: int) -> None:
    conn.execute(f"CREATE TABLE IF NOT EXISTS {CLUSTER_TABLE} (key TEXT PRIMARY KEY, value)")
    conn.executemany(
        f"INSERT INTO {CLUSTER_TABLE} VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
        [("published", seq), ("joined", 1)],
    )
    conn.execute(f"DELETE FROM {CLUSTER_TABLE} WHERE key = 'resend_from'")


def own_device(conn) -> tuple[str | None, int]:
    """This hub's device id and the seq the stream has of it as far as this hub knows."""
    if not is_enabled(conn):
        return None, 0
    return local_device_id(conn), published(conn)


def join_empty(conn) -> None:
    """A database holding no operation yet brings nothing from before cluster mode."""
    if joined(conn):
        return
    if not is_enabled(conn) or not conn.execute("SELECT 1 FROM _sync_ops LIMIT 1").fetchone():
        record_joined(conn)


def set_cluster_value(conn, key: str, value: int) -> None:
    conn.execute(f"CREATE TABLE IF NOT EXISTS {CLUSTER_TABLE} (key TEXT PRIMARY KEY, value)")
    conn.execute(f"INSERT OR REPLACE INTO {CLUSTER_TABLE} VALUES (?, ?)", [key, value])


def record_joined(conn) -> None:
    """A hub that joined from the snapshot holds only what the cluster has, and its own
    operations (published as usual)."""
    set_cluster_value(conn, "joined", 1)


# Refusals, in ``_sync_cluster_refused`` (made when first needed) -----------------------------

REFUSED_TABLE = "_sync_cluster_refused"


HELD_TABLE = "_sync_cluster_held"  # refusals made while this hub held own ops the stream did not


def record_refusal(conn, seq: int, bundle_id: str | None, refusal: SyncError, ordered_own: int | None = None) -> None:
    """Record a refusal; with ``ordered_own`` (this hub's device's seq the stream holds so
    far), also which own ops this hub held then that the stream did not."""
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {REFUSED_TABLE} (seq INTEGER PRIMARY KEY, bundle_id TEXT, reason TEXT NOT NULL, "
        "message TEXT NOT NULL, refused_at TEXT NOT NULL)"
    )
    conn.execute(
        f"INSERT OR IGNORE INTO {REFUSED_TABLE} VALUES (?, ?, ?, ?, ?)",
        [seq, bundle_id, refusal.reason, refusal.message, now_iso()],
    )
    held = max_seq(conn, LOCAL) if ordered_own is not None and is_enabled(conn) else 0
    if held > (ordered_own or 0):
        columns = "seq INTEGER PRIMARY KEY, held_from INTEGER, held_to INTEGER"
        conn.execute(f"CREATE TABLE IF NOT EXISTS {HELD_TABLE} ({columns})")
        conn.execute(f"INSERT OR IGNORE INTO {HELD_TABLE} VALUES (?, ?, ?)", [seq, ordered_own + 1, held])


def held_refusals(conn, first: int) -> list[int]:
    """The messages refused here while this hub held its op ``first`` unpublished to the stream."""
    if not conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", [HELD_TABLE]).fetchone():
        return []
    where = "held_from <= ? AND ? <= held_to"
    rows = conn.execute(f"SELECT seq FROM {HELD_TABLE} WHERE {where} ORDER BY seq", [first, first])
    return [row[0] for row in rows]


def forget_refusal(conn, seq: int) -> None:
    conn.execute(f"DELETE FROM {HELD_TABLE} WHERE seq = ?", [seq])
    conn.execute(f"DELETE FROM {REFUSED_TABLE} WHERE seq = ?", [seq])


def origin_of(message) -> tuple[str, int, int] | None:
    """An outbox message's (device, first seq, last seq); None for a push."""
    value = (message.headers or {}).get(ORIGIN_HEADER)
    parts = value.split() if isinstance(value, str) else []
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


def parse_notice(notice, device: str) -> tuple | None:
    """(refused seq, first own seq, reason, message) of a notice about this hub's device."""
    origin = origin_of(notice)
    refused = (notice.headers or {}).get(NOTICE_HEADER, "")
    if origin is None or origin[0] != device or not str(refused).isdigit():
        return None
    try:
        body = json.loads(notice.data or b"{}")
    except ValueError:
        body = {}
    hub, reason = body.get("hub", "another hub"), body.get("reason", "refused")
    text = (
        f"Hub {hub} refused this hub's own writes (stream message {refused}): {body.get('message', '')} "
        "Change the clashing row here: the change is sent again with them"
    )
    return int(refused), origin[1], reason, text


def record_notice(conn, seq: int, note: tuple | None) -> None:
    if note is not None:
        refused, first, reason, text = note
        record_refusal(conn, refused, None, SyncError(reason, text))
        resend = cluster_value(conn, "resend_from")
        set_cluster_value(conn, "resend_from", first - 1 if resend is None else min(resend, first - 1))
    set_cluster_value(conn, "notice_seen", seq)


def has_refused(conn) -> bool:
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [REFUSED_TABLE])
    return found.fetchone() is not None


def refusals(conn) -> tuple[int, list[dict]]:
    """How many messages this hub refused, and the latest few."""
    if not has_refused(conn):
        return 0, []
    count = conn.execute(f"SELECT count(*) FROM {REFUSED_TABLE}").fetchone()[0]
    rows = conn.execute(
        f"SELECT seq, bundle_id, reason, message, refused_at FROM {REFUSED_TABLE} ORDER BY seq DESC LIMIT ?",
        [LATEST_REFUSED],
    )
    keys = ("seq", "bundle_id", "reason", "message", "refused_at")
    return count, [dict(zip(keys, row)) for row in rows]


def refusal_of(conn, seq: int) -> SyncError | None:
    if not has_refused(conn):
        return None
    row = conn.execute(f"SELECT reason, message FROM {REFUSED_TABLE} WHERE seq = ?", [seq]).fetchone()
    return None if row is None else SyncError(*row)
