"""The operation log's row format: the only module that knows how an operation is encoded.

``_sync_ops`` holds every operation, local and remote, keyed by one integer::

    op = device_index << 40 | seq

The local device always uses the top index :data:`LOCAL`, so the local range sorts last and
SQLite's own rowid allocation (``max(rowid) + 1``) hands the capture triggers the next local
sequence number for free. A sentinel row with ``seq = 0`` keeps that range non-empty.
Remote devices get small indexes in ``_sync_devices``. Values live in untyped slot columns
``c0, c1, …`` (one per user column, mapped in ``_sync_tables``) so every value keeps its exact
type and bits: no encoding in the triggers, none on replay.

Operation kinds (the low two bits of ``kind``): :data:`INSERT` (full row), :data:`UPDATE`
(full new row, ``mask`` = changed slots, ``newkey`` set when the primary key changed),
:data:`DELETE` (old primary key), :data:`TICK` (a knowledge epoch: the device's vector clock
after an import, as JSON in ``rowkey``). :data:`RESOLUTION` is or-ed into the kind of an
operation written by ``sync-resolve``.

Python code uses the functions here (:func:`op_id`, :func:`op_device`, :func:`kind_of`...);
SQL uses the matching fragments (:func:`device_sql`, :func:`seq_sql`, :func:`kind_sql`...).
"""

from __future__ import annotations

import base64
import json
import re
import sqlite3
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from .errors import INVALID_CLOCK, BundleError, shorten

# Op ids --------------------------------------------------------------------------------

SEQ_BITS = 40
SEQ_MASK = (1 << SEQ_BITS) - 1
LOCAL = (1 << 22) - 1
"""The device index of this database's own operations (the top one: the local range sorts last)."""


def op_id(device_index: int, seq: int) -> int:
    return (device_index << SEQ_BITS) | seq


def op_device(op: int) -> int:
    """The device index of an op id."""
    return op >> SEQ_BITS


def op_seq(op: int) -> int:
    """The sequence number of an op id within its device."""
    return op & SEQ_MASK


def device_sql(column: str = "op") -> str:
    """SQL for the device index of the op id in ``column``."""
    return f"({column} >> {SEQ_BITS})"


def seq_sql(column: str = "op") -> str:
    """SQL for the sequence number of the op id in ``column``."""
    return f"({column} & {SEQ_MASK})"


def device_range(device_index: int, first_seq: int = 1) -> tuple[int, int]:
    """The op ids of one device from ``first_seq`` on, for ``op BETWEEN ? AND ?``."""
    return op_id(device_index, first_seq), op_id(device_index, SEQ_MASK)


def op_label(device_id: str, seq: int) -> str:
    """The public id of an operation: ``<device id hex>:<seq>``."""
    return f"{device_id}:{seq}"


# Kinds -----------------------------------------------------------------------------------

INSERT, UPDATE, DELETE, TICK = 0, 1, 2, 3
KIND_MASK = 3
RESOLUTION = 8
KIND_NAMES = {INSERT: "insert", UPDATE: "update", DELETE: "delete", TICK: "tick"}
KIND_CODES = {name: code for code, name in KIND_NAMES.items()}


def kind_of(kind: int) -> int:
    """The operation kind (INSERT, UPDATE, DELETE or TICK) without the RESOLUTION flag."""
    return kind & KIND_MASK


def is_resolution(kind: int) -> bool:
    return bool(kind & RESOLUTION)


ROW_ACTIONS = {INSERT: "insert-row", UPDATE: "update-row", DELETE: "delete-row"}


def row_actions(kind: int) -> set[str]:
    """What a writer needs, in Datasette's names, to add an operation of ``kind``: the row
    action of its kind, and ``update-row`` for a resolution (an update of the conflict: the
    flag must not turn an insert or a delete into something else). Nothing for a tick."""
    actions = {ROW_ACTIONS[kind_of(kind)]} if kind_of(kind) in ROW_ACTIONS else set()
    return actions | {"update-row"} if is_resolution(kind) else actions


def kind_sql(column: str = "kind") -> str:
    """SQL for the operation kind in ``column``, without the RESOLUTION flag."""
    return f"({column} & {KIND_MASK})"


def resolution_sql(column: str = "kind") -> str:
    """SQL that is true for an operation written by ``sync-resolve``."""
    return f"({column} & {RESOLUTION})"


# Masks and slots ---------------------------------------------------------------------------

MAX_COLUMNS = 62
"""How many slots (columns ever seen) a table may use: a mask is one SQLite integer."""


def slot_column(slot: int) -> str:
    """The ``_sync_ops`` column holding the values of ``slot``."""
    return f"c{slot}"


def mask_of(slots: Iterable[int]) -> int:
    mask = 0
    for slot in slots:
        mask |= 1 << slot
    return mask


def mask_slots(mask: int) -> Iterator[int]:
    """The slots whose bits are set in ``mask``, lowest first."""
    slot = 0
    while mask:
        if mask & 1:
            yield slot
        mask >>= 1
        slot += 1


def slot_names(slots: dict[str, int], columns: Iterable[str] | None = None) -> dict[int, str]:
    """The slot → column map of a table (``slots`` maps column → slot), in slot order,
    optionally only for ``columns``."""
    wanted = None if columns is None else set(columns)
    return {slot: name for name, slot in sorted(slots.items(), key=lambda item: item[1]) if wanted is None or name in wanted}


def remap_mask_sql(moves: list[tuple[int, int]], column: str = "mask") -> str:
    """SQL for ``column`` with bit ``a`` moved to bit ``b`` for each ``(a, b)``; other bits drop.

    Slots are numbered per copy, so masks are remapped on their way into a bundle (slot to
    column position) and out of it (position to slot).
    """
    if all(a == b for a, b in moves):
        return f"{column} & {mask_of(b for _, b in moves)}"
    return " | ".join(f"((({column} >> {a}) & 1) << {b})" for a, b in moves)


# Row keys ---------------------------------------------------------------------------------
#
# A row is identified by its primary key values rendered with SQLite's quote(), joined by
# commas: exact (quote() round-trips REAL and BLOB), computable inside a trigger, and
# comparable as one TEXT value.

_LITERAL = re.compile(
    r"\s*(?:(NULL)|X'([0-9A-Fa-f]*)'|'((?:[^']|'')*)'|(-?Inf)|([-+]?[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?))\s*(,|$)"
)


def parse_rowkey(rowkey: str) -> list[Any]:
    """Decode a row key (quote() literals joined by commas) back into Python values."""
    values: list[Any] = []
    position = 0
    while position < len(rowkey):
        match = _LITERAL.match(rowkey, position)
        if not match:
            raise ValueError(f"bad row key: {rowkey!r}")
        null, blob, text, inf, number, _ = match.groups()
        if null:
            values.append(None)
        elif blob is not None:
            values.append(bytes.fromhex(blob))
        elif text is not None:
            values.append(text.replace("''", "'"))
        elif inf:
            values.append(float(inf.replace("Inf", "inf")))
        elif "." in number or "e" in number or "E" in number:
            values.append(float(number))
        else:
            values.append(int(number))
        position = match.end()
    return values


def rowkey_sql(
    expressions: Iterable[str], typed: Iterable[bool] | None = None, integers: Iterable[bool] | None = None
) -> str:
    """SQL for a row key. SQLite treats 1 and 1.0 as the same key, so an integral REAL is keyed
    as the integer; ``typed`` marks expressions (columns with type affinity) that can skip that,
    and ``integers`` those known to hold only integers, whose ``quote()`` is their decimal text:
    ``CAST … AS TEXT`` makes the same key in a third of the time (a bulk import's keys)."""
    expressions = list(expressions)
    flags = list(typed) if typed is not None else [False] * len(expressions)
    whole = list(integers) if integers is not None else [False] * len(expressions)
    return " || ',' || ".join(
        f"CAST({e} AS TEXT)"
        if integer
        else f"quote({e})"
        if flag
        else f"(CASE WHEN typeof({e}) = 'real' AND {e} = CAST({e} AS INTEGER) THEN quote(CAST({e} AS INTEGER)) "
        f"ELSE quote({e}) END)"
        for e, flag, integer in zip(expressions, flags, whole)
    )


def make_rowkey(conn: sqlite3.Connection, values: list[Any]) -> str:
    return conn.execute("SELECT " + rowkey_sql(f"?{i + 1}" for i in range(len(values))), values).fetchone()[0]


# Vector clocks as JSON ----------------------------------------------------------------------
#
# A vector clock maps device ids (32 hex digits) to the highest seq held from each. Ticks,
# peers' acknowledgements, bundle headers and the hub's headers all carry it as JSON.


def encode_clock(clock: dict[str, int]) -> str:
    """The one JSON form of a vector clock: sorted keys, no spaces."""
    return json.dumps(clock, sort_keys=True, separators=(",", ":"))


def load_clock(text: str | None) -> dict[str, int]:
    """A clock this database wrote itself (a tick, a peer's acknowledgement): not checked."""
    return json.loads(text) if text else {}


def parse_clock(text: str | dict | None, what: str = "clock") -> dict[str, int]:
    """Parse and check a vector clock from outside: ``{"<32 hex device id>": <seq>, ...}``."""
    if text is None or text == "":
        return {}
    try:
        value = json.loads(text) if isinstance(text, str) else text
    except (ValueError, RecursionError):  # deep nesting is a RecursionError, not a ValueError
        raise BundleError(INVALID_CLOCK, f"{what} is not valid JSON: {shorten(text)}")
    if not isinstance(value, dict) or not all(is_device_id(k) and is_count(v, SEQ_MASK) for k, v in value.items()):
        raise BundleError(
            INVALID_CLOCK, f'{what} must look like {{"<32 hex digit device id>": <seq>, ...}}, got {shorten(text)}'
        )
    return value


def is_count(value: Any, most: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= most


def is_device_id(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 32 and all(c in "0123456789abcdef" for c in value)


# Values -------------------------------------------------------------------------------------


class RawText(bytes):
    """A TEXT value that is not valid UTF-8 (SQLite stores what a client hands it), as its
    bytes: written back with ``CAST(? AS TEXT)`` (see :func:`marker`) it is the same value."""


def exact_text(data: bytes) -> str | RawText:
    """A ``text_factory`` that changes no value: ``str`` where TEXT is valid UTF-8, else RawText."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return RawText(data)


def marker(value: Any) -> str:
    """The SQL parameter for a value read with :func:`exact_text`: RawText goes back as TEXT."""
    return "CAST(? AS TEXT)" if isinstance(value, RawText) else "?"


@contextmanager
def text_as(conn: sqlite3.Connection, factory: Callable[[bytes], Any]) -> Iterator[None]:
    """Read TEXT through ``factory`` for a while. Datasette's connections decode with
    replacement, which would change a value that is not valid UTF-8 without a word."""
    old = conn.text_factory
    conn.text_factory = factory
    try:
        yield
    finally:
        conn.text_factory = old


def json_value(value: Any) -> Any:
    """A JSON-safe rendering of a SQLite value (BLOBs as Datasette renders them)."""
    if isinstance(value, bytes):
        return {"$base64": True, "encoded": base64.b64encode(value).decode()}
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value
