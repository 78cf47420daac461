"""Sync a local database with a Datasette hub over HTTP (no Datasette import: httpx only).

One run is a pull and a push, both deltas by vector clock::

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
``Retry-After`` or a growing delay, a bounded number of times.
"""

from __future__ import annotations

import email.utils
import functools
import json
import os
import random
import shutil
import tempfile
import time
import urllib.parse
from typing import Any, Callable

import click

from .apply import ImportResult, import_bundle
from .bundle import BundleReader
from .errors import BundleError, SyncError
from .api import export_bundle, sync_status
from .clocks import DEFAULT_MAX_CLOCK_SKEW, parse_duration
from .oplog import parse_clock

BUNDLE_MEDIA_TYPE = "application/vnd.sqlite3"
CLOCK_HEADER = "X-Sync-Clock"
TOKEN_ENV = "DATASETTE_SYNC_TOKEN"
RETRIES = 5  # 503 busy answers retried per request before giving up
FIRST_RETRY_DELAY = 0.5  # seconds, doubled on each retry unless the hub asks for longer
MAX_RETRY_DELAY = 60.0  # a hub asking for a longer wait is not retried: run sync again later


class HubError(SyncError):
    """The hub could not be reached, or it refused or failed a request."""

    def __init__(self, reason: str, message: str, status: int | None = None, retry_after: float | None = None):
        super().__init__(reason, message)
        self.status = status
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


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    example = "a database URL like http://127.0.0.1:8001/data"
    if not (url.startswith("http://") or url.startswith("https://")) or url.count("/") < 3:
        raise HubError("invalid_url", f"Hub URL must be {example}, got {url!r}")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # raises for a port that is not a number in range
    except ValueError as ex:
        raise HubError("invalid_url", f"Hub URL {url!r} is not a valid URL ({ex}): it must be {example}")
    if not parts.hostname:
        raise HubError("invalid_url", f"Hub URL {url!r} has no host: it must be {example}")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        # The endpoints are appended to the path: .../data?x=1/-/sync/export would miss them.
        raise HubError("invalid_url", f"Hub URL {url!r} must not have a query string or fragment: use {example}")
    return url


def _error_detail(response: Any) -> str:
    """The error text of a hub response: JSON "error"/"errors"/"message", else nothing."""
    try:
        body = response.json()
    except Exception:
        return ""
    if not isinstance(body, dict):
        return ""
    for key in ("error", "errors", "message"):
        value = body.get(key)
        if isinstance(value, list):
            value = "; ".join(str(v) for v in value)
        if value:
            return str(value)
    return ""


def _check(response: Any, url: str, what: str, has_token: bool) -> None:
    """Raise a one-line HubError for any non-2xx answer."""
    status = response.status_code
    if 200 <= status < 300:
        return
    detail = _error_detail(response)
    suffix = f": {detail}" if detail else ""
    if status == 401:
        if has_token:
            message = f"hub {url} refused the token (401){suffix}"
        else:
            message = f"hub {url} requires a token (401): pass --token or set {TOKEN_ENV}"
        raise HubError("unauthorized", message, status)
    if status == 403:
        if not has_token:
            suffix = f"{suffix}; no token was sent: pass --token or set {TOKEN_ENV}"
        raise HubError("forbidden", f"hub {url} does not allow {what} (403){suffix}", status)
    if status == 404:
        raise HubError(
            "not_found",
            f"hub {url} not found (404): check the database name and that datasette-sync is installed{suffix}",
            status,
        )
    if status == 413:
        raise HubError("too_large", f"hub {url} refused the bundle as too large (413){suffix}", status)
    if status == 400:
        target = "the bundle" if what.startswith("import") else "the request"
        raise HubError("rejected", f"hub {url} rejected {target} (400){suffix}", status)
    if status == 503:
        retry_after = retry_after_seconds(response.headers.get("retry-after"))
        raise HubError("busy", f"hub {url} could not do the {what} now (503){suffix}", status, retry_after)
    raise HubError("hub_error", f"hub {url} failed the {what} ({status}){suffix}", status)


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
            if ex.reason != "busy":
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
            if save_to is None or not 200 <= response.status_code < 300:
                response.read()
                _check(response, url, what, has_token)
                return response
            with open(save_to, "wb") as fp:
                for chunk in response.iter_bytes():
                    fp.write(chunk)
            return response
    except httpx.ConnectError as ex:
        text = str(ex)
        reason = "connection refused" if "refused" in text.lower() else text or "connection failed"
        raise HubError("connection_failed", f"cannot connect to {url}: {reason}")
    except httpx.TimeoutException:
        raise HubError("timeout", f"hub {url} timed out during the {what}")
    except httpx.InvalidURL as ex:
        raise HubError("invalid_url", f"Hub URL {url!r} is not a valid URL: {ex}")
    except httpx.HTTPError as ex:
        raise HubError("connection_failed", f"{what} from {url} failed: {ex}")


def _hub_clock(response: Any, reader: BundleReader | None, url: str) -> dict[str, int]:
    text = response.headers.get(CLOCK_HEADER)
    if text:
        try:
            return parse_clock(text, f"{CLOCK_HEADER} header from {url}")
        except BundleError as ex:
            raise HubError("invalid_response", str(ex))
    if reader is not None:
        return dict(reader.header.get("clock") or {})
    return {}


@functools.lru_cache(maxsize=1)
def _tls_context() -> Any:
    """httpx makes a TLS context for every client, reading every CA certificate (about 0.1 s
    of CPU, more than the rest of a small sync): a process that syncs often makes it once."""
    import httpx

    return httpx.create_ssl_context()


def _behind(ours: dict[str, int], theirs: dict[str, int]) -> bool:
    return any(seq > ours.get(device, 0) for device, seq in theirs.items())


def sync_with_hub(
    db: Any,
    url: str,
    token: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    alter: bool = False,
    timeout: float = 60.0,
    transport: Any = None,
    max_clock_skew: float | str = DEFAULT_MAX_CLOCK_SKEW,
    retries: int = RETRIES,
    on_retry: Callable[[str, int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Pull what the hub has and this database lacks, then push what the hub lacks.

    :param db: a ``sqlite_utils.Database`` or ``sqlite3.Connection`` with sync enabled
    :param url: the hub database's URL, like ``http://127.0.0.1:8001/data``
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
    :returns: ``{"hub": {"url", "device_id", "clock"}, "pulled": {...}, "pushed": {...},
        "pulled_after_push": {...} or None}``; each result is an import result dict
        (``bundle_id``, ``source_device_id``, ``total_operations``, ``applied``, ``conflicts``,
        ``duplicates``, ``skipped``, ``not_applied``)
    :raises HubError: the hub is unreachable or refused a request (nothing half-applied)
    :raises SyncError: the local database cannot sync (e.g. sync not enabled)
    """
    import httpx

    url = normalize_url(url)
    max_clock_skew = parse_duration(max_clock_skew)
    if not sync_status(db)["enabled"] and not alter:
        raise SyncError(
            "not_enabled",
            "This database has no synced tables: run enable-sync first (or sync with --alter to copy the hub's tables)",
        )
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    has_token = bool(token)

    def stage(name: str) -> Callable[[int, int], None] | None:
        if progress is None:
            return None
        return lambda done, total: progress(name, done, total)

    workdir = tempfile.mkdtemp(prefix="sqlite-utils-sync-")
    try:
        with httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            transport=transport,
            verify=_tls_context(),
            follow_redirects=False,
        ) as client:

            def pull(name: str) -> tuple[dict[str, Any], dict[str, int], str | None]:
                since = json.dumps(sync_status(db)["clock"], sort_keys=True, separators=(",", ":"))
                path = os.path.join(workdir, name)
                response = _request(
                    client,
                    "GET",
                    f"{url}/-/sync/export",
                    url,
                    "export (pull)",
                    has_token,
                    save_to=path,
                    retries=retries,
                    on_retry=on_retry,
                    params={"since": since},
                )
                try:
                    reader = BundleReader(path)
                except BundleError as ex:
                    raise HubError("invalid_response", f"hub {url} sent an invalid bundle: {ex}")
                try:
                    hub_clock = _hub_clock(response, reader, url)
                    hub_device = reader.header["source"]
                    operations = reader.header["operations"]
                    bundle_id = reader.bundle_id
                finally:
                    reader.close()
                if not operations:
                    # Nothing to apply: don't record an empty import on every run.
                    return empty_result(hub_device, bundle_id), hub_clock, hub_device
                result = import_bundle(
                    db, path, alter=alter, progress=stage("pull"), max_clock_skew=max_clock_skew
                ).as_dict()
                return result, hub_clock, hub_device

            pulled, hub_clock, hub_device = pull("from-hub.bundle")
            status = sync_status(db)
            if not status["enabled"]:
                raise SyncError("not_enabled", "The hub has no operations and this database has no synced tables")
            device_id = status["device_id"]

            push_path = os.path.join(workdir, "to-hub.bundle")
            exported = export_bundle(db, push_path, since=hub_clock, progress=stage("push"))
            pulled_after_push = None
            if not exported.operations:
                pushed = empty_result(device_id, None)
            else:
                with open(push_path, "rb") as body:  # streamed, with its Content-Length
                    response = _request(
                        client,
                        "POST",
                        f"{url}/-/sync/import",
                        url,
                        "import (push)",
                        has_token,
                        retries=retries,
                        on_retry=on_retry,
                        content=body,
                        headers={"Content-Type": BUNDLE_MEDIA_TYPE},
                        params={"alter": "1"} if alter else None,
                    )
                try:
                    answer = response.json()
                except ValueError:
                    raise HubError("invalid_response", f"hub {url} answered the push with something other than JSON")
                if not isinstance(answer, dict):
                    raise HubError("invalid_response", f"hub {url} answered the push with unexpected JSON")
                pushed = {key: answer.get(key) for key in empty_result(None)}
                pushed["not_applied"] = pushed["not_applied"] or {}
                after = response.headers.get(CLOCK_HEADER) or answer.get("clock")
                try:
                    after_clock = parse_clock(after, f"hub {url} clock") if after else {}
                except BundleError as ex:
                    raise HubError("invalid_response", str(ex))
                if after_clock:
                    hub_clock = after_clock
                # Importing our push may make the hub write a knowledge tick of its own: fetch it
                # now so that the next run starts level.
                if _behind(sync_status(db)["clock"], hub_clock):
                    pulled_after_push, hub_clock, hub_device = pull("from-hub-2.bundle")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "hub": {"url": url, "device_id": hub_device, "clock": hub_clock},
        "device_id": device_id,
        "pulled": pulled,
        "pushed": pushed,
        "pulled_after_push": pulled_after_push,
    }


def summary(url: str, result: dict[str, Any]) -> str:
    pulled, pushed, extra = result["pulled"], result["pushed"], result["pulled_after_push"]
    pulled_ops = pulled["total_operations"] + (extra["total_operations"] if extra else 0)
    applied = pulled["applied"] + (extra["applied"] if extra else 0)
    conflicts = pulled["conflicts"] + (extra["conflicts"] if extra else 0)
    line = f"Pulled {pulled_ops} operation(s) from {url} ({applied} new"
    if conflicts:
        line += f", {conflicts} unresolved conflict(s)"
    line += f"); pushed {pushed['total_operations'] or 0} operation(s)"
    if pushed["total_operations"]:
        line += f" ({pushed['applied'] or 0} new to the hub"
        if pushed["conflicts"]:
            line += f", {pushed['conflicts']} unresolved conflict(s) there"
        line += ")"
    return line


def register(cli: click.Group) -> None:
    """Add the ``sync`` command (called from :func:`sqlite_utils_sync.cli.register`)."""
    from .cli import DB_PATH, echo_json, max_clock_skew_option, open_db, user_errors

    @cli.command(name="sync")
    @click.argument("path", type=DB_PATH)
    @click.argument("url")
    @click.option("--token", envvar=TOKEN_ENV, help=f"API token for the hub (default: ${TOKEN_ENV})")
    @click.option("--alter", is_flag=True, help="Add tables and columns one side has and the other lacks")
    @max_clock_skew_option
    @click.option(
        "--retries",
        type=click.IntRange(0),
        default=RETRIES,
        show_default=True,
        help="Send a request again this many times while the hub answers 503 busy",
    )
    @click.option("--json", "as_json", is_flag=True, help="Output the result as JSON")
    def sync_command(path, url, token, alter, max_clock_skew, retries, as_json):
        """Sync the database with a Datasette hub: pull what it lacks here, push what the hub lacks

        URL is the hub database's URL. Safe to re-run at any time, also after a network failure.

        Example:

        \b
            sqlite-utils sync laptop.db http://127.0.0.1:8001/data --token dstok_...
            DATASETTE_SYNC_TOKEN=dstok_... sqlite-utils sync laptop.db https://hub.example.com/data
        """
        db = open_db(path)

        def say_retry(what: str, retry: int, retries: int, delay: float) -> None:
            click.echo(f"Hub is busy: retrying the {what} in {delay:.1f} s (retry {retry} of {retries})", err=True)

        with user_errors():
            result = sync_with_hub(
                db,
                url,
                token=token or None,
                alter=alter,
                max_clock_skew=max_clock_skew,
                retries=retries,
                on_retry=say_retry,
            )
            unresolved = sync_status(db)["unresolved_conflicts"]
        if as_json:
            echo_json(result)
            return
        click.echo(summary(normalize_url(url), result), err=True)
        for table, count in result["pulled"]["not_applied"].items():
            click.echo(f"Warning: {count} operation(s) for table '{table}' kept but not applied: it is not synced here", err=True)
        if unresolved:
            click.echo(f"{unresolved} unresolved conflict(s): see 'sqlite-utils sync-conflicts {path}'", err=True)
