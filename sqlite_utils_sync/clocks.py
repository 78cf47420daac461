"""Time and knowledge: hybrid logical clocks, vector clocks, knowledge epochs, the horizon.

Every operation carries a hybrid logical clock (``hlc``): milliseconds since the epoch, times
1024 (the unit bundles carry). A device's clocks never decrease and stay above every clock it
has imported; operations of one device that share a clock are ordered by seq. A vector clock
(:func:`clock`) says how far this database holds each device's operations; a tick operation
records the vector clock a device had seen (a knowledge epoch, indexed in
``_sync_knowledge``), so "had the author of A seen B?" is one lookup (:func:`knowledge_at`).
"""

from __future__ import annotations

import re
import sqlite3
import time
from typing import Any

from .errors import INVALID_ARGUMENT, SyncError
from .oplog import (
    LOCAL,
    TICK,
    device_range,
    encode_clock,
    load_clock,
    marker,
    op_id,
    op_seq,
    slot_column,
)
from .schema import has_table, log_rewrite
from .scope import max_withheld

HLC_NOW_SQL = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) * 1024"
# Bundles may not carry clocks above this, so counting up from any clock seen stays an integer.
MAX_HLC = 1 << 62
HLC_PER_SECOND = 1000 * 1024
# How far ahead of the receiver's wall clock an imported clock may be, in seconds. An accepted
# clock becomes the floor of every later local clock (here and wherever this copy syncs), so
# a far-future one would stop ordering edits by time until the wall clock caught up with it.
# A week tolerates devices that are days fast (a wrong date, a time zone error) and keeps the
# damage of a wrong clock to a week; the limit is configurable for odder setups.
DEFAULT_MAX_CLOCK_SKEW = 7 * 86400
# A bound far below MAX_HLC (2^62 units is about 142,000 years), so that a copy's clocks, at
# most the wall clock plus the bound plus one unit per relay, never leave the valid range.
MAX_CLOCK_SKEW_LIMIT = 100 * 365 * 86400
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# The settled marker only bounds the next scan, so it moves only when that saves a real one:
# small exports and imports leave the file as it was.
SETTLE_MARK_EVERY = 4096


def parse_duration(value: Any, what: str = "max_clock_skew") -> float:
    """Seconds from a number of seconds or a string like ``90s``, ``36h`` or ``7d``, checked
    against :data:`MAX_CLOCK_SKEW_LIMIT`."""
    seconds = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", value.lower())
        if match:
            seconds = float(match.group(1)) * DURATION_UNITS[match.group(2) or "s"]
    if seconds is None or not 0 <= seconds <= MAX_CLOCK_SKEW_LIMIT:
        raise SyncError(
            INVALID_ARGUMENT,
            f"{what} must be a duration like 90s, 36h or 7d (at most {MAX_CLOCK_SKEW_LIMIT // 86400}d), got {value!r}",
        )
    return seconds


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# Vector clocks -------------------------------------------------------------------------------


def max_seq(conn: sqlite3.Connection, idx: int) -> int:
    """The highest seq held from the device with index ``idx`` (0: none), withheld seqs
    included: a partial copy knows they exist (see :mod:`scope`)."""
    row = conn.execute("SELECT max(op) FROM _sync_ops WHERE op BETWEEN ? AND ?", device_range(idx, 0)).fetchone()
    return max(0 if row[0] is None else op_seq(row[0]), max_withheld(conn, idx))


def clock(conn: sqlite3.Connection) -> dict[str, int]:
    """The vector clock: highest contiguous seq held from each device, by device id hex."""
    result = {}
    for idx, device_id in conn.execute("SELECT idx, device_id FROM _sync_devices ORDER BY idx"):
        seq = max_seq(conn, idx)
        if seq:
            result[device_id] = seq
    return result


def knowledge_at(conn: sqlite3.Connection, idx: int, seq: int) -> dict[str, int]:
    """The vector clock the author of op ``(idx, seq)`` had seen when writing it."""
    row = conn.execute(
        "SELECT clock FROM _sync_knowledge WHERE device = ? AND from_seq <= ? ORDER BY from_seq DESC LIMIT 1",
        [idx, seq],
    ).fetchone()
    return load_clock(row[0]) if row else {}


def horizon(conn: sqlite3.Connection) -> dict[str, int]:
    """The highest seq of each device whose operations may be missing here (compacted)."""
    if not has_table(conn, "_sync_horizon"):
        return {}
    return {device: seq for device, seq in conn.execute("SELECT device_id, seq FROM _sync_horizon")}


def raise_horizon(conn: sqlite3.Connection, seqs: dict[str, int]) -> None:
    conn.executemany(
        "INSERT INTO _sync_horizon VALUES (?, ?) ON CONFLICT (device_id) DO UPDATE SET seq = max(seq, excluded.seq)",
        list(seqs.items()),
    )


# Local clocks --------------------------------------------------------------------------------


def last_hlc(conn: sqlite3.Connection) -> int:
    """The clock of the newest local operation (the local range sorts last)."""
    return conn.execute("SELECT hlc FROM _sync_ops ORDER BY op DESC LIMIT 1").fetchone()[0]


def next_local_hlc(conn: sqlite3.Connection, floor: int = 0) -> int:
    (now,) = conn.execute(f"SELECT {HLC_NOW_SQL}").fetchone()  # the clock the triggers read
    return max(now, last_hlc(conn), floor + 1)


def append_local(
    conn: sqlite3.Connection,
    tid: int,
    kind: int,
    mask: int | None,
    rowkey: str | None,
    newkey: str | None = None,
    slots: dict[int, Any] | None = None,
    floor: int = 0,
) -> int:
    """Append one local operation written by Python (ticks, resolutions, repairs)."""
    slots = slots or {}
    columns = ["hlc", "tid", "kind", "mask", "rowkey", "newkey"] + [slot_column(s) for s in slots]
    values = [next_local_hlc(conn, floor), tid, kind, mask, rowkey, newkey] + list(slots.values())
    cursor = conn.execute(
        f"INSERT INTO _sync_ops ({', '.join(columns)}) VALUES ({', '.join(marker(v) for v in values)})", values
    )
    return cursor.lastrowid


def append_tick(conn: sqlite3.Connection, known: dict[str, int], floor: int = 0) -> int:
    """Record a knowledge epoch: the local ops after this one had seen ``known``."""
    text = encode_clock(known)
    op = append_local(conn, 0, TICK, None, text, floor=floor)
    record_knowledge(conn, LOCAL, op_seq(op) + 1, text)
    return op


def record_knowledge(conn: sqlite3.Connection, idx: int, from_seq: int, clock_text: str) -> None:
    """Index a tick: the operations of device ``idx`` from ``from_seq`` on had seen ``clock_text``."""
    conn.execute(
        "INSERT OR REPLACE INTO _sync_knowledge (device, from_seq, clock) VALUES (?, ?, ?)", [idx, from_seq, clock_text]
    )


# Settling ------------------------------------------------------------------------------------


def settled_through(conn: sqlite3.Connection) -> int:
    """Local operations up to this op id have settled clocks."""
    if has_table(conn, "_sync_settled"):
        row = conn.execute("SELECT op FROM _sync_settled").fetchone()
        if row:
            return row[0]
    return op_id(LOCAL, 0)


def settle_start(conn: sqlite3.Connection) -> int:
    base = op_id(LOCAL, 0)
    (start,) = conn.execute(
        "SELECT ifnull(max(op), ?) FROM _sync_ops WHERE op BETWEEN ? AND ?", [base, base, settled_through(conn)]
    ).fetchone()
    return start


def unsettled_clocks(conn: sqlite3.Connection, start: int | None = None) -> list[tuple[int, int]]:
    """``(clock, op)`` for each local operation whose clock is below an earlier one's (the wall
    clock was set back), with the clock it should have: the highest before it."""
    return conn.execute(
        "SELECT top, op FROM (SELECT op, hlc, max(hlc) OVER (ORDER BY op ROWS UNBOUNDED PRECEDING) AS top "
        "FROM _sync_ops WHERE op >= ?) WHERE hlc < top",
        [settle_start(conn) if start is None else start],
    ).fetchall()


def settle_clocks(conn: sqlite3.Connection) -> list[tuple[int, int]]:
    """Make the local clocks non-decreasing before anything reads them.

    Capture triggers take the wall clock, so a clock set back gives a later operation a lower
    clock than an earlier one. Such operations are raised to the clock before them here, while
    they are still local: every write settles first (see
    :func:`sqlite_utils_sync.writing.writing`). The result is a function of the log alone,
    so an export from a database it cannot write sends the same clocks (see
    :func:`unsettled_clocks`). Call inside a transaction.

    :returns: the ``(clock, op)`` changes it could not write (a read-only database)
    """
    start = settle_start(conn)
    fixes = unsettled_clocks(conn, start)
    last = conn.execute("SELECT max(op) FROM _sync_ops").fetchone()[0]  # the local range sorts last
    if not fixes and (last - start < SETTLE_MARK_EVERY or not has_table(conn, "_sync_settled")):
        return []
    conn.execute("SAVEPOINT settle_clocks")
    try:
        if fixes:
            with log_rewrite(conn):
                conn.executemany("UPDATE _sync_ops SET hlc = ? WHERE op = ?", fixes)
        if has_table(conn, "_sync_settled"):
            conn.execute("INSERT OR REPLACE INTO _sync_settled (id, op) VALUES (1, ?)", [last])
    except sqlite3.OperationalError as ex:
        conn.execute("ROLLBACK TO settle_clocks")
        conn.execute("RELEASE settle_clocks")
        if "readonly" not in str(ex):
            raise
        return fixes
    conn.execute("RELEASE settle_clocks")
    return []


def restart_settling(conn: sqlite3.Connection) -> None:
    """Forget how far the local clocks were settled: the local range starts again."""
    conn.execute("DELETE FROM _sync_settled")
