"""The hub client: sync a local database with a Datasette hub over HTTP (httpx only, no
Datasette, no click; the ``sync`` command in cli.py wraps :func:`sync_with_hub`).

One run is a pull and a push, both deltas by vector clock (the endpoints, headers and error
bodies are in protocol.py)::

    GET  {url}/-/sync/export?since=<our clock>   -> bundle of the operations we lack
                                                    (header X-Sync-Clock: the hub's clock)
    POST {url}/-/sync/import  (bundle as the body) -> JSON import result from the hub

The pull is imported first, so the push (everything the hub's clock lacks) also carries the
knowledge tick that import wrote. When the hub's import of our push advances its clock past
ours (its own knowledge tick), the client pulls once more, so that a second run right after
moves nothing either way.

Every step is idempotent: imports skip bundles and operations they already hold and both
directions are computed from clocks, so a run cut short by a network failure is simply
re-run. For the same reason a request the hub answers with ``503`` (busy: another connection
held a lock on its database longer than it waited) is sent again by itself, after the hub's
``Retry-After`` or a growing delay, a bounded number of times; and given the URLs of several
hubs of one cluster, a run that one of them could not finish starts again with the next.

httpx is imported by the functions that send requests, not with this module: sqlite-utils
imports every plugin for every command, and httpx alone takes about 0.14 s to import.
"""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import os
import random
import shutil
import tempfile
import time
import urllib.parse
from http import HTTPStatus
from typing import Any, Callable, NamedTuple

from . import errors, protocol
from .importer import ImportResult, import_bundle
from .bundle import BundleReader, carries_changes
from .errors import BundleError, SyncError
from .api import export_bundle, local_state, set_scope
from .capture import load_tables, table_exists
from .schema import connection
from .scope import load_scope
from .clocks import DEFAULT_MAX_CLOCK_SKEW, parse_duration

TOKEN_ENV = "DATASETTE_SYNC_TOKEN"
RETRIES = 5  # 503 busy answers retried per request before giving up
FIRST_RETRY_DELAY = 0.5  # seconds, doubled on each retry unless the hub asks for longer
MAX_RETRY_DELAY = 60.0  # a hub asking for a longer wait is not retried: run sync again later
# A hub's answer is checked like a bundle: a JSON answer (a push's result) may be no longer
# than MAX_ANSWER, the text of a refusal is read up to MAX_ERROR_BODY, and a body that comes
# slower than protocol.MIN_RATE bytes a second, once past the client's timeout, is given up.
MAX_ANSWER = 1 << 20
MAX_ERROR_BODY = 64 * 1024
MAX_DETAIL = 500  # characters of a hub's error text shown


class HubError(SyncError):
    """The hub could not be reached, or it refused or failed a request."""

    def __init__(
        self, reason: str, message: str, status: int | None = None, retry_after: float | None = None,
        hub_reason: str | None = None,
    ):
        super().__init__(reason, message)
        self.status = status
        self.hub_reason = hub_reason  # the reason in the hub's own refusal, if it gave one
        self.retry_after = retry_after


def retry_after_seconds(value: str | None) -> float | None:
    """A ``Retry-After`` header in seconds (it may also be an HTTP date); None when absent or
    unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_delay(retry: int, retry_after: float | None) -> float | None:
    """Seconds to wait before retry number ``retry`` (1-based): at least what the hub asked
    for, else a delay doubling from FIRST_RETRY_DELAY. A random quarter more spreads out
    clients that met the same lock. None when the hub asks for more than MAX_RETRY_DELAY."""
    if retry_after is not None and retry_after > MAX_RETRY_DELAY:
        return None
    delay = max(retry_after or 0.0, FIRST_RETRY_DELAY * 2 ** (retry - 1))
    return min(delay, MAX_RETRY_DELAY) * random.uniform(1.0, 1.25)


def empty_result(source_device_id: str | None, bundle_id: str | None = None) -> dict[str, Any]:
    """The result of a pull or push that moved nothing, shaped like every import result."""
    return ImportResult(bundle_id, source_device_id, 0).as_dict()


def is_import_result(answer: Any) -> bool:
    """Whether a hub's answer to a push is an import result: its counts are there."""
    return isinstance(answer, dict) and all(
        isinstance(answer.get(key), int) and not isinstance(answer.get(key), bool)
        for key in ("total_operations", "applied", "conflicts", "duplicates")
    )


def combined_results(first: dict[str, Any], second: dict[str, Any] | None) -> dict[str, Any]:
    """Two import results of one run in the same direction (two pulls, or two pushes) as
    one: counts added up, tables and columns joined. ``second`` may be None."""
    combined = dict(first)
    if not second:
        return combined
    for key in ("total_operations", "applied", "conflicts", "duplicates", "withheld"):
        combined[key] = (combined.get(key) or 0) + (second.get(key) or 0)
    for key in ("applied_by_table", "not_applied"):
        a, b = combined.get(key) or {}, second.get(key) or {}
        combined[key] = {name: a.get(name, 0) + b.get(name, 0) for name in {**a, **b}}
    combined["tables_created"] = (combined.get("tables_created") or []) + (second.get("tables_created") or [])
    added = {table: list(columns) for table, columns in (combined.get("columns_added") or {}).items()}
    for table, columns in (second.get("columns_added") or {}).items():
        added[table] = added.get(table, []) + [c for c in columns if c not in added.get(table, [])]
    combined["columns_added"] = added
    return combined


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    example = "a database URL like http://127.0.0.1:8001/data"
    scheme, separator, rest = url.partition("://")
    if separator and scheme.lower() in ("http", "https"):
        url = f"{scheme.lower()}://{rest}"  # schemes are case-insensitive (RFC 3986)
    if not (url.startswith("http://") or url.startswith("https://")) or url.count("/") < 3:
        raise HubError(errors.INVALID_URL, f"Hub URL must be {example}, got {url!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises for a port that is not a number in range
    except ValueError as ex:
        raise HubError(errors.INVALID_URL, f"Hub URL {url!r} is not a valid URL ({ex}): it must be {example}")
    if not parts.hostname:
        raise HubError(errors.INVALID_URL, f"Hub URL {url!r} has no host: it must be {example}")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        # The endpoints are appended to the path: .../data?x=1/-/sync/export would miss them.
        raise HubError(errors.INVALID_URL, f"Hub URL {url!r} must not have a query string or fragment: use {example}")
    return url


def _error_detail(response: Any) -> str:
    """The error text of a hub response, else nothing: one line of printable characters (a
    terminal shows it, and control sequences in it would reach the terminal)."""
    try:
        text = protocol.error_message(response.json())
    except (ValueError, RecursionError):  # not JSON, or nested deeper than json reads
        return ""
    text = "".join(c if c.isprintable() else " " for c in text[: MAX_DETAIL + 1])
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "…"


def _hub_reason(response: Any) -> str | None:
    """The ``reason`` of a refusal's JSON body, if it has one."""
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return None
    reason = body.get("reason") if isinstance(body, dict) else None
    return reason if isinstance(reason, str) else None


def _check(response: Any, url: str, what: str, has_token: bool) -> None:
    """Raise a one-line HubError for any non-2xx answer. By its status, not the reason in
    its body: Datasette itself, or a proxy in front of it, may answer too."""
    status = response.status_code
    if 200 <= status < 300:
        return
    detail = _error_detail(response)
    suffix = f": {detail}" if detail else ""
    if status == HTTPStatus.UNAUTHORIZED:
        if has_token:
            message = f"hub {url} refused the token ({status}){suffix}"
        else:
            message = f"hub {url} requires a token ({status}): pass --token or set {TOKEN_ENV}"
        raise HubError(errors.UNAUTHORIZED, message, status)
    if status == HTTPStatus.FORBIDDEN:
        if not has_token:
            suffix = f"{suffix}; no token was sent: pass --token or set {TOKEN_ENV}"
        raise HubError(errors.FORBIDDEN, f"hub {url} does not allow {what} ({status}){suffix}", status, hub_reason=_hub_reason(response))
    if status == HTTPStatus.NOT_FOUND:
        raise HubError(
            errors.NOT_FOUND,
            f"hub {url} not found ({status}): check the database name and that datasette-sync is installed{suffix}",
            status,
        )
    if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
        raise HubError(errors.TOO_LARGE, f"hub {url} refused the bundle as too large ({status}){suffix}", status)
    if status == HTTPStatus.BAD_REQUEST:
        target = "the bundle" if what.startswith("import") else "the request"
        raise HubError(errors.REJECTED, f"hub {url} rejected {target} ({status}){suffix}", status, hub_reason=_hub_reason(response))
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        retry_after = retry_after_seconds(response.headers.get(protocol.RETRY_AFTER_HEADER))
        raise HubError(errors.BUSY, f"hub {url} could not do the {what} now ({status}){suffix}", status, retry_after)
    raise HubError(errors.HUB_ERROR, f"hub {url} failed the {what} ({status}){suffix}", status)


def _request(
    client: Any,
    method: str,
    endpoint: str,
    url: str,
    what: str,
    has_token: bool,
    save_to: str | None = None,
    retries: int = RETRIES,
    on_retry: Callable[[str, int, int, float], None] | None = None,
    **kwargs,
) -> Any:
    """Send a request, again after a ``503`` busy answer up to ``retries`` times: every request
    is idempotent, and a busy hub changed nothing. ``on_retry(what, retry, retries, delay)``
    is called before each wait."""
    retry = 0
    while True:
        try:
            return _request_once(client, method, endpoint, url, what, has_token, save_to, **kwargs)
        except HubError as ex:
            if ex.reason != errors.BUSY:
                raise
            retry += 1
            delay = retry_delay(retry, ex.retry_after) if retry <= retries else None
            if delay is None:
                if retry > 1:
                    tries = f"{retry - 1} retr{'y' if retry == 2 else 'ies'}"
                    raise HubError(ex.reason, f"{ex.message}; gave up after {tries}", ex.status)
                raise
            if on_retry is not None:
                on_retry(what, retry, retries, delay)
            time.sleep(delay)
            body = kwargs.get("content")
            if hasattr(body, "seek"):
                body.seek(0)  # the file being pushed is sent whole again


def _request_once(
    client: Any, method: str, endpoint: str, url: str, what: str, has_token: bool, save_to: str | None = None, **kwargs
) -> Any:
    """Send one request; with ``save_to`` a successful body is streamed into that file."""
    import httpx

    try:
        with client.stream(method, endpoint, **kwargs) as response:
            body = _Body(response, url, what, client.timeout.read)
            if save_to is None or not 200 <= response.status_code < 300:
                ok = 200 <= response.status_code < 300
                # The body is decoded already: the rebuilt answer must not say it is compressed.
                decoded = ("content-encoding", "content-length", "transfer-encoding")
                answer = httpx.Response(
                    response.status_code,
                    headers=[(k, v) for k, v in response.headers.multi_items() if k.lower() not in decoded],
                    content=body.read(MAX_ANSWER if ok else MAX_ERROR_BODY, truncate=not ok),
                    request=response.request,
                )
                _check(answer, url, what, has_token)
                return answer
            try:
                with open(save_to, "wb") as fp:
                    body.copy(fp)
            except OSError as ex:  # a full disk or a small /tmp: this machine's trouble, not the hub's
                raise SyncError(
                    errors.CANNOT_WRITE,
                    f"cannot write what {url} sent ({what}) to {os.path.dirname(save_to)}: {ex.strerror or ex}",
                )
            return response
    except httpx.ConnectError as ex:
        text = str(ex)
        reason = "connection refused" if "refused" in text.lower() else text or "connection failed"
        raise HubError(errors.CONNECTION_FAILED, f"cannot connect to {url}: {reason}")
    except httpx.TimeoutException:
        raise HubError(errors.TIMEOUT, f"hub {url} timed out during the {what}")
    except httpx.InvalidURL as ex:
        raise HubError(errors.INVALID_URL, f"Hub URL {url!r} is not a valid URL: {ex}")
    except httpx.HTTPError as ex:
        raise HubError(errors.CONNECTION_FAILED, f"{what} with {url} failed: {ex}")


class _Body:
    """A hub answer's body, read with the limits above."""

    def __init__(self, response: Any, url: str, what: str, timeout: float | None):
        self.response, self.url, self.what = response, url, what
        self.started, self.timeout, self.received = time.monotonic(), timeout or 60.0, 0

    def chunks(self) -> Any:
        for chunk in self.response.iter_bytes():
            self.received += len(chunk)
            if time.monotonic() - self.started > self.timeout + self.received / protocol.MIN_RATE:
                raise HubError(errors.TIMEOUT, f"hub {self.url} sent the {self.what} too slowly (under {protocol.MIN_RATE:,} bytes a second)")
            yield chunk

    def read(self, limit: int, truncate: bool) -> bytes:
        """The body, or its first ``limit`` bytes (``truncate``: a refusal's text; else a
        longer body is refused)."""
        data = bytearray()
        for chunk in self.chunks():
            data += chunk
            if len(data) > limit:
                if truncate:
                    return bytes(data[:limit])
                raise HubError(errors.INVALID_RESPONSE, f"hub {self.url} answered the {self.what} with more than {limit:,} bytes")
        return bytes(data)

    def copy(self, out: Any) -> None:
        for chunk in self.chunks():
            out.write(chunk)


def _hub_clock(response: Any, reader: BundleReader | None, url: str) -> dict[str, int]:
    text = response.headers.get(protocol.CLOCK_HEADER)
    if text:
        try:
            return protocol.decode_clock(text, f"{protocol.CLOCK_HEADER} header from {url}")
        except BundleError as ex:
            raise HubError(errors.INVALID_RESPONSE, str(ex))
    if reader is not None:
        return dict(reader.header.get("clock") or {})
    return {}


class Pulled(NamedTuple):
    """What a pull needs of a pulled bundle."""

    hub_clock: dict[str, int]
    hub_device: str
    operations: int  # how many it tells of, withheld ones too
    bundle_id: str
    tables: list[str]  # the tables it names (a full export names those with no operation too)
    scope: list[str] | None  # the tables whose values it holds (None: all)


def read_pulled(path: str, response: Any, url: str) -> Pulled:
    """Check a pulled bundle (every hash) and read what a pull needs of it. Operations it
    withholds count: a partial copy takes them, else its clock stays behind the hub's and
    every waiting pull is answered at once with them."""
    try:
        reader = BundleReader(path)
    except BundleError as ex:
        raise HubError(errors.INVALID_RESPONSE, f"hub {url} sent an invalid bundle: {ex}")
    try:
        header = reader.header
        told = header["operations"] + header.get("withheld", 0)
        tables = [entry[0] for entry in header.get("tables") or []]
        return Pulled(_hub_clock(response, reader, url), header["source"], told, reader.bundle_id, tables, header.get("scope"))
    finally:
        reader.close()


@functools.lru_cache(maxsize=1)
def _tls_context() -> Any:
    """httpx makes a TLS context for every client, reading every CA certificate (about 0.1 s
    of CPU, more than the rest of a small sync): a process that syncs often makes it once."""
    import httpx

    return httpx.create_ssl_context()


def _behind(ours: dict[str, int], theirs: dict[str, int]) -> bool:
    return any(seq > ours.get(device, 0) for device, seq in theirs.items())


def is_transient(ex: HubError) -> bool:
    """Whether the hub (later, or another hub of a cluster) may do what it could not now: it
    could not be reached, timed out, failed (5xx), stayed busy through the retries, or broke
    off its answer. A refusal (4xx) is final: every hub of a cluster applies the same
    permissions and checks, and asking again changes nothing."""
    if ex.reason in (errors.CONNECTION_FAILED, errors.TIMEOUT, errors.BUSY, errors.INVALID_RESPONSE):
        return True
    return ex.reason == errors.HUB_ERROR and (ex.status is None or ex.status >= 500)


def sync_with_hub(
    db: Any,
    url: str | list[str] | tuple[str, ...],
    token: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    alter: bool = False,
    timeout: float = 60.0,
    transport: Any = None,
    max_clock_skew: float | str = DEFAULT_MAX_CLOCK_SKEW,
    retries: int = RETRIES,
    on_retry: Callable[[str, int, int, float], None] | None = None,
    tables: list[str] | None = None,
    create_tables: bool = False,
    on_failover: Callable[[str, HubError, str], None] | None = None,
) -> dict[str, Any]:
    """Pull what the hub has and this database lacks, then push what the hub lacks.

    :param db: a ``sqlite_utils.Database`` or ``sqlite3.Connection`` with sync enabled
    :param url: the hub database's URL, like ``http://127.0.0.1:8001/data``; or a list of the
        URLs of several hubs of one cluster, tried in order: when one cannot be reached, times
        out, fails (5xx) or stays busy, the run starts again with the next one (every step is
        idempotent, so nothing is lost or applied twice); a refusal (4xx) is final
    :param token: an API token (``dstok_…``), sent as ``Authorization: Bearer``
    :param progress: called as ``progress("pull" | "push", operations, total)``
    :param alter: add tables and columns a bundle has and the receiver lacks, here and on the
        hub (there it needs the ``alter-table`` permission)
    :param transport: an ``httpx`` transport (tests)
    :param max_clock_skew: refuse pulled operations whose clock is further ahead of this
        machine's clock (seconds, or a duration like ``"7d"``); the hub applies its own bound
    :param retries: how many times each request is sent again after a ``503`` busy answer,
        waiting the hub's ``Retry-After`` (or 0.5 s, 1 s, 2 s, ...) in between; 0 never retries
    :param on_retry: called as ``on_retry(what, retry, retries, delay)`` before each wait
    :param on_failover: called as ``on_failover(url, error, next_url)`` before trying the next hub
    :param tables: pull only these tables; this copy then holds only them (its scope, kept for
        later syncs; see :mod:`~sqlite_utils_sync.scope`). None: the scope stored, if any
    :param create_tables: create the tables the hub has and this database lacks, as the hub
        declares them, and sync them (for a new database; ``alter`` does it too)
    :returns: ``{"hub": {"url", "device_id", "clock"}, "pulled": {...}, "pushed": {...},
        "pulled_after_push": {...} or None}``; each result is an import result dict
        (``bundle_id``, ``source_device_id``, ``total_operations``, ``applied``, ``conflicts``,
        ``duplicates``, ``skipped``, ``not_applied``, ``applied_by_table``, ``tables_created``,
        ``columns_added``, ``withheld``)
    :raises HubError: the hub is unreachable or refused a request (nothing half-applied), or
        withholds from these credentials tables this copy holds (reason ``partial_bundle``)
    :raises SyncError: the local database cannot sync (e.g. sync not enabled)
    """
    urls = [normalize_url(u) for u in ([url] if isinstance(url, str) else url)]
    token = checked_token(token)
    if not urls:
        raise HubError(errors.INVALID_URL, "No hub URL given: pass a database URL like http://127.0.0.1:8001/data")
    max_clock_skew = parse_duration(max_clock_skew)
    if not local_state(db)[0] and not (alter or create_tables):
        raise SyncError(
            errors.NOT_ENABLED,
            "This database has no synced tables: run enable-sync first (or sync with --alter to copy the hub's tables)",
        )
    # Stored before the pull: a copy asking for fewer tables holds fewer from now on.
    scope = set_scope(db, tables) if tables is not None else load_scope(connection(db))
    workdir = tempfile.mkdtemp(prefix="sqlite-utils-sync-")

    def exchange(url: str) -> tuple:
        with _hub_client(token, timeout, transport) as client:
            return _Run(
                db, client, url, bool(token), workdir, alter, max_clock_skew, progress, retries, on_retry,
                scope=scope, create_tables=create_tables,
            ).exchange()

    try:
        url, (device_id, pulled, pushed, pulled_after_push, hub_clock, hub_device) = _fail_over(urls, exchange, on_failover)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "hub": {"url": url, "device_id": hub_device, "clock": hub_clock},
        "device_id": device_id,
        "pulled": pulled,
        "pushed": pushed,
        "pulled_after_push": pulled_after_push,
    }


def checked_token(token: str | None) -> str | None:
    """The token without the spaces and line breaks a copy and paste brings around it. One
    that still holds characters an HTTP header cannot carry is refused without quoting it:
    error lines end up in logs, and a token is a secret."""
    token = token.strip() if token else token
    if token and not (token.isascii() and token.isprintable() and " " not in token):
        raise HubError(
            errors.UNAUTHORIZED,
            f"the token holds a space, a control or a non-ASCII character, which an HTTP header cannot carry: "
            f"check --token or {TOKEN_ENV}",
        )
    return token or None


def _fail_over(urls: list[str], exchange: Callable[[str], Any], on_failover: Callable | None) -> tuple[str, Any]:
    """``exchange(url)`` with each hub in turn until one does it: (its URL, its result)."""
    for index, url in enumerate(urls):
        try:
            return url, exchange(url)
        except HubError as ex:
            if not is_transient(ex) or index + 1 == len(urls):
                raise _last_hub_error(ex, index) from None
            if on_failover is not None:
                on_failover(url, ex, urls[index + 1])
    raise AssertionError("unreachable: urls is never empty")


def _last_hub_error(ex: HubError, index: int) -> HubError:
    """The error that ends a run, saying how many hubs were tried before when there were any."""
    if index == 0 or not is_transient(ex):
        return ex
    return HubError(ex.reason, f"{ex.message} (and the {index} hub{'s' if index > 1 else ''} before it failed too)", ex.status, ex.retry_after)


def _hub_client(token: str | None, timeout: float, transport: Any) -> Any:
    import httpx

    headers = {"Accept": protocol.JSON_MEDIA_TYPE}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(
        headers=headers,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        transport=transport,
        verify=_tls_context(),
        follow_redirects=False,
    )


PLAIN_HUBS: set[str] = set()
"""Hubs (by URL) that refused a compressed bundle's format in this process: a version from
before compression, sent uncompressed bundles from then on."""

def held_back_message(count: int, receiver: str = "the receiver") -> str:
    """What a bundle or push that leaves out ``count`` of this partial copy's own edits says
    (see :func:`~sqlite_utils_sync.bundle.cut_points`)."""
    edits = f"{count} edit" + ("" if count == 1 else "s")
    return (
        f"Held back {edits} of this copy, made after it heard of operations it holds no values of (a partial copy) "
        f"that {receiver} lacks too"
    )


PULL_ONLY = {
    errors.FORBIDDEN: "hub {url} lets these credentials pull only, so this copy pushed nothing",
    errors.READ_ONLY: "hub {url} is read-only (immutable), so this copy pushed nothing",
}
"""The hub's reasons for refusing any push, and what a sync with nothing of its own to send says."""


@dataclasses.dataclass
class _Run:
    """One :func:`sync_with_hub` run: the local database, the open connection to the hub,
    and the options every request and import of the run shares."""

    db: Any
    client: Any  # an httpx.Client
    url: str
    has_token: bool
    workdir: str
    alter: bool
    max_clock_skew: float
    progress: Callable[[str, int, int], None] | None
    retries: int
    on_retry: Callable[[str, int, int, float], None] | None
    scope: set[str] | None = None  # the tables this copy holds (None: all)
    create_tables: bool = False

    def exchange(self) -> tuple:
        """Pull, push, and pull again if importing the push made the hub write a tick:
        ``(device id, pulled, pushed, pulled after push, hub clock, hub device)``."""
        pulled, hub_clock, hub_device = self.pull("from-hub.bundle")
        enabled, device_id, _ = local_state(self.db)
        if not enabled:
            raise SyncError(errors.NOT_ENABLED, "The hub has no operations and this database has no synced tables")
        pushed, clock_after_push = self.push(device_id, hub_clock)
        pulled_after_push = None
        if clock_after_push is not None:
            hub_clock = clock_after_push or hub_clock
            # Importing our push may make the hub write a knowledge tick of its own: fetch it
            # now so that the next run starts level.
            if _behind(local_state(self.db)[2], hub_clock):
                pulled_after_push, hub_clock, hub_device = self.pull("from-hub-2.bundle")
                if _behind(hub_clock, {device_id: local_state(self.db)[2].get(device_id, 0)}):
                    # Another device pushed between our pull and our push: importing its
                    # operations wrote a tick after our push. Send it (a tick alone makes
                    # the hub write none), or it waits for this copy's next edit.
                    late, clock_after = self.push(device_id, hub_clock)
                    pushed, hub_clock = combined_results(pushed, late), clock_after or hub_clock
        return device_id, pulled, pushed, pulled_after_push, hub_clock, hub_device

    def request(self, method: str, path: str, what: str, **kwargs) -> Any:
        return _request(
            self.client,
            method,
            self.url + path,
            self.url,
            what,
            self.has_token,
            retries=self.retries,
            on_retry=self.on_retry,
            **kwargs,
        )

    def stage(self, name: str) -> Callable[[int, int], None] | None:
        progress = self.progress
        if progress is None:
            return None
        return lambda done, total: progress(name, done, total)

    def pull(self, name: str) -> tuple[dict[str, Any], dict[str, int], str | None]:
        """Fetch and import what the hub has and this database lacks: (the import result,
        the hub's clock, the hub's device id)."""
        path = os.path.join(self.workdir, name)
        state = local_state(self.db)
        params: dict[str, Any] = {protocol.SINCE_PARAM: protocol.since_param(state[2])}
        if self.scope is not None:
            params[protocol.TABLE_PARAM] = sorted(self.scope)
        response = self.request("GET", protocol.EXPORT_PATH, "export (pull)", save_to=path, params=params)
        hub_clock, hub_device, operations, bundle_id, tables, sent = read_pulled(path, response, self.url)
        if operations and not self.alter:
            self.check_related(state, hub_clock, tables)
        if not operations and not self.creates_table(tables):
            # Nothing to apply: don't record an empty import on every run.
            return empty_result(hub_device, bundle_id), hub_clock, hub_device
        try:
            result = import_bundle(
                self.db,
                path,
                alter=self.alter,
                progress=self.stage("pull"),
                max_clock_skew=self.max_clock_skew,
                adopt_scope=True,
                create_tables=self.create_tables,
            )
        except BundleError as ex:
            if ex.reason == errors.PARTIAL_BUNDLE:
                raise self.withheld_tables(sent) from None
            raise
        return result.as_dict(), hub_clock, hub_device

    def check_related(self, state: tuple, hub_clock: dict[str, int], tables: list[str]) -> None:
        """Refuse, before anything is written here or sent, a hub database that shares no device
        with this copy, which has synced with others before, and whose operations are of none of
        its tables: a URL naming another database of the hub. Syncing would merge the two logs
        for good, each passing the other's rows on to its own devices.

        A copy that never synced may join any hub, and an empty hub takes any copy. ``tables``
        are those the pull carries (a delta names no table it has nothing new of); ``state``
        is this copy's :func:`~sqlite_utils_sync.api.local_state` when it asked."""
        _, device_id, local_clock = state
        if not hub_clock or not set(local_clock) - {device_id} or set(hub_clock) & set(local_clock):
            return
        known = load_tables(connection(self.db))
        # Names that differ in case only are the importer's to explain (rename one of them).
        if not known or {name.lower() for name in tables} & {name.lower() for name in known}:
            return
        raise HubError(
            errors.UNRELATED_HUB,
            f"hub {self.url} syncs table(s) {', '.join(sorted(tables))} and none of this copy's "
            f"({', '.join(sorted(known))}), and neither side holds an edit of the other: check the database name "
            "in the URL. Nothing was pulled or pushed; sync with --alter to merge the two",
        )

    def withheld_tables(self, scope: list[str] | None) -> HubError:
        """The error for a pull of only ``scope`` that withholds tables this copy holds: the
        import's own words name a temporary file and advise on exporting bundles, neither of
        which fits a sync."""
        sent = ", ".join(sorted(scope or [])) or "(none)"
        held = load_scope(connection(self.db))
        holds = "every table" if held is None else f"tables {', '.join(sorted(held))}"
        return HubError(
            errors.PARTIAL_BUNDLE,
            f"hub {self.url} sends only tables {sent} to these credentials, but this copy holds {holds}: "
            "sync with --table for each table you may view (after disable-sync on the others), "
            "sync into a new file, or use credentials that may view them all",
        )

    def creates_table(self, tables: list[str]) -> bool:
        """Whether importing a bundle naming ``tables`` would create one here, operations or
        not: the hub's tables that nobody wrote to yet reach a new copy too."""
        if not (self.create_tables or self.alter):
            return False
        conn = connection(self.db)
        return any(not table_exists(conn, name) for name in tables)

    def push(self, device_id: str, hub_clock: dict[str, int]) -> tuple[dict[str, Any], dict[str, int] | None]:
        """Send what the hub's clock lacks: (the hub's import result, the hub's clock after
        it, {} when it did not say); the clock is None when there was nothing to send."""
        path = os.path.join(self.workdir, "to-hub.bundle")
        plain = {"codec": None} if self.url in PLAIN_HUBS else {}
        exported = export_bundle(self.db, path, since=hub_clock, progress=self.stage("push"), **plain)
        pushed, clock = self.send_exported(path, exported, device_id, hub_clock)
        if exported.held_back:
            pushed["held_back"] = exported.held_back
        return pushed, clock

    def send_exported(
        self, path: str, exported: Any, device_id: str, hub_clock: dict[str, int]
    ) -> tuple[dict[str, Any], dict[str, int] | None]:
        """Send the bundle :meth:`push` exported, if it holds anything; see :meth:`push`."""
        if not exported.operations:
            return empty_result(device_id, None), None
        try:
            response = self.send_bundle(path, hub_clock)
        except HubError as ex:
            if ex.hub_reason not in PULL_ONLY:  # not the push itself refused: a device, a table
                raise
            if not carries_changes(path):
                # Credentials that may only pull, or a published (immutable) hub: this copy has
                # no row change to send, only what it heard (knowledge ticks), which a hub that
                # never hears from it does without. Said, all the same: a sync-name or
                # sync-retire made here stays here.
                result = empty_result(device_id, None)
                result["not_pushed"] = PULL_ONLY[ex.hub_reason].format(url=self.url)
                return result, None
            raise HubError(ex.reason, f"{ex.message}; what was pulled is applied here, but this copy's changes were not sent", ex.status)
        return self.push_answer(response)

    def send_bundle(self, path: str, hub_clock: dict[str, int]) -> Any:
        """POST the bundle at ``path``. A hub from before compressed bundles refuses their
        format: it is sent the same operations again, uncompressed."""
        try:
            return self.post_bundle(path)
        except HubError as ex:
            if ex.hub_reason != errors.UNSUPPORTED_FORMAT or self.url in PLAIN_HUBS:
                raise
        PLAIN_HUBS.add(self.url)  # a watcher's later pushes go uncompressed at once
        export_bundle(self.db, path, since=hub_clock, codec=None)
        return self.post_bundle(path)

    def post_bundle(self, path: str) -> Any:
        with open(path, "rb") as body:  # streamed, with its Content-Length
            return self.request(
                "POST",
                protocol.IMPORT_PATH,
                "import (push)",
                content=body,
                headers={"Content-Type": protocol.BUNDLE_MEDIA_TYPE},
                params={protocol.ALTER_PARAM: "1"} if self.alter else None,
            )

    def push_answer(self, response: Any) -> tuple[dict[str, Any], dict[str, int]]:
        """The hub's import result and its clock after it, from its answer to a push."""
        try:
            answer = response.json()
        except (ValueError, RecursionError):
            raise HubError(errors.INVALID_RESPONSE, f"hub {self.url} answered the push with something other than JSON")
        if not is_import_result(answer):
            # Taking it for a success would report changes as sent that no hub holds.
            raise HubError(errors.INVALID_RESPONSE, f"hub {self.url} answered the push with unexpected JSON")
        pushed = {key: answer.get(key) for key in empty_result(None)}
        # An older hub answers without the newer keys: they are empty, not missing.
        for key, empty in (("not_applied", {}), ("applied_by_table", {}), ("tables_created", []), ("columns_added", {})):
            pushed[key] = pushed[key] or empty
        after = response.headers.get(protocol.CLOCK_HEADER) or answer.get("clock")
        try:
            return pushed, protocol.decode_clock(after, f"hub {self.url} clock") if after else {}
        except BundleError as ex:
            raise HubError(errors.INVALID_RESPONSE, str(ex))
