"""Declared column types: carried in bundles so a receiver creates a table as its sender
declared it (``INTEGER``, ``TEXT``, ``VARCHAR(20)``, ...), and checked so that a hostile bundle
can put nothing else into the ``CREATE TABLE`` it causes.

A bundle header's ``"column_types"`` is ``{table: {column: declared type}}`` and
``"without_rowid"`` lists the tables declared ``WITHOUT ROWID``. Both are optional: a bundle
without them (older senders) creates untyped columns, as before, and older readers ignore them.

``"strict"`` lists the tables declared ``STRICT``, whose ``ANY`` columns are sent without a
type: in a STRICT table ``ANY`` keeps every value as it is, like a column with no type, while
elsewhere SQLite reads it as NUMERIC. A receiver that lacks such a table creates it STRICT,
its columns without a type as ``ANY``. Older readers ignore the key and create the table
without STRICT, with the same types and affinities.

``"unaliased_keys"`` lists the tables whose one ``INTEGER`` key column is no rowid alias
(declared ``INTEGER PRIMARY KEY DESC``, SQLite's exception): such a key may hold text, which an
alias refuses, so a receiver creates the key the same way. Older readers create an alias.

``"not_null_defaults"`` is ``{table: {column: literal}}`` for the columns declared
``NOT NULL DEFAULT <literal>``, also optional. A row applied from a copy that lacks such a column
takes the DEFAULT there (it can't be NULL), so every copy must declare the column alike, or
the copies hold different values in it with no operation to tell them apart. Only literals
travel (a number, a string, a blob); a default that is an expression (``CURRENT_TIMESTAMP``)
differs from copy to copy anyway, and such a column is declared without it.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from typing import Any

from . import errors
from .errors import BundleError
from .schema import quote_identifier

MAX_TYPE_LENGTH = 64

# SQLite's type-name grammar, narrowed: words of letters, digits and underscores separated by
# single spaces, optionally one "(n)" or "(n, m)". No quotes, no other punctuation.
TYPE_NAME = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(?: [A-Za-z_][A-Za-z0-9_]*)*"
    r"(?: ?\( ?[+-]?[0-9]{1,10} ?(?:, ?[+-]?[0-9]{1,10} ?)?\))?"
)

# Words SQLite would read as the start of a column constraint rather than part of the type.
CONSTRAINT_WORDS = {
    "ALWAYS", "AS", "ASC", "AUTOINCREMENT", "CHECK", "COLLATE", "CONFLICT", "CONSTRAINT", "DEFAULT",
    "DESC", "GENERATED", "KEY", "NOT", "NULL", "ON", "PRIMARY", "REFERENCES", "STORED", "UNIQUE", "VIRTUAL",
}


MAX_DEFAULT_LENGTH = 1000

# A literal as SQLite writes it back in ``PRAGMA table_info``: a number, a string, a blob.
LITERAL = re.compile(
    r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
    r"|[+-]?0[xX]0*[0-9a-fA-F]{1,16}"
    r"|'(?:[^'\x00]|'')*'"
    r"|[xX]'(?:[0-9a-fA-F]{2})*'"
)


def is_default_literal(value: Any) -> bool:
    """A DEFAULT safe to write into ``CREATE TABLE`` and ``ALTER TABLE``: one literal."""
    return isinstance(value, str) and len(value) <= MAX_DEFAULT_LENGTH and LITERAL.fullmatch(value) is not None


def is_type_name(value: Any) -> bool:
    """A declared type safe to write into ``CREATE TABLE`` (the empty string: no type)."""
    if not isinstance(value, str) or len(value) > MAX_TYPE_LENGTH:
        return False
    if value == "":
        return True
    if not TYPE_NAME.fullmatch(value):
        return False
    words = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", value)
    return not any(word.upper() in CONSTRAINT_WORDS for word in words)


def types_problem(header: dict[str, Any]) -> str | None:
    """What is wrong with a header's ``column_types`` / ``not_null_defaults`` /
    ``without_rowid``, or None. Entries for tables or columns the bundle does not carry are
    never read, so they are let be."""
    problem = column_map_problem(header.get("column_types", {}), is_type_name, "column types", "declared type")
    problem = problem or column_map_problem(
        header.get("not_null_defaults", {}), is_default_literal, "NOT NULL defaults", "NOT NULL default"
    )
    if problem:
        return problem
    for key in ("without_rowid", "strict", "unaliased_keys"):
        tables = header.get(key, [])
        if not isinstance(tables, list) or not all(isinstance(t, str) for t in tables):
            return f"{key} list is invalid"
    for table in set(header.get("strict", [])):  # a name repeated must not repeat the work
        types = header.get("column_types", {}).get(table, {})
        if any(t.upper() not in STRICT_TYPES for t in types.values()):
            return f"table {table[:100]!r} is declared STRICT with a type a STRICT table cannot have"
    return None


def column_map_problem(value: Any, valid: Callable[[Any], bool], name: str, what: str) -> str | None:
    """What is wrong with a ``{table: {column: value}}`` header entry, or None."""
    if not isinstance(value, dict) or not all(isinstance(t, str) and isinstance(c, dict) for t, c in value.items()):
        return f"{name} are not a map of maps"
    for table, columns in value.items():
        for column, item in columns.items():
            if not valid(item):
                return f"column {str(column)[:100]!r} of table {table[:100]!r} has an invalid {what}"
    return None


STRICT_TYPES = {"INT", "INTEGER", "REAL", "TEXT", "BLOB", "ANY"}
"""The types a STRICT table's columns may be declared with."""


def is_strict(conn: sqlite3.Connection, table: str) -> bool:
    try:
        row = conn.execute("SELECT strict FROM pragma_table_list(?) WHERE schema = 'main' AND name = ?", [table, table]).fetchone()
    except sqlite3.OperationalError:  # SQLite before 3.37, which has no STRICT tables
        return False
    return bool(row and row[0])


def column_types(conn: sqlite3.Connection, table: str) -> dict[str, str]:
    """Each column's declared type, as it decides the column's affinity: in a STRICT table
    ``ANY`` has none (it keeps 1 and 1.0 apart), so it reads as no type at all."""
    declared = {row[1]: row[2] for row in conn.execute(f"PRAGMA table_info({quote_identifier(table)})")}
    if is_strict(conn, table):
        return {c: "" if t.upper() == "ANY" else t for c, t in declared.items()}
    return declared


def sender_types(conn: sqlite3.Connection, table: str, columns: list[str]) -> dict[str, str]:
    """The declared types of ``columns`` in this database, for a bundle header: only those
    a receiver accepts (an odd type is sent as none rather than make the bundle unreadable)."""
    declared = column_types(conn, table)
    return {c: declared[c] for c in columns if declared.get(c) and is_type_name(declared[c])}


def sender_defaults(conn: sqlite3.Connection, table: str, columns: list[str]) -> dict[str, str]:
    """The literal DEFAULT of each of ``columns`` declared ``NOT NULL`` here, but key columns
    (every operation writes those), for a bundle header, written the one way a receiver takes."""
    declared = {row[1]: row for row in conn.execute(f"PRAGMA table_info({quote_identifier(table)})")}
    found = {}
    for c in columns:
        if c in declared and declared[c][3] and not declared[c][5] and declared[c][4] is not None:
            literal = canonical_literal(declared[c][4])
            if literal is not None:
                found[c] = literal
    return found


# Words a DEFAULT may be that are not strings: each copy works them out for itself.
EXPRESSION_WORDS = {"CURRENT_TIME", "CURRENT_DATE", "CURRENT_TIMESTAMP", "NULL"}


def canonical_literal(text: str) -> str | None:
    """A DEFAULT as SQLite keeps its text (``(('x'))``, ``"x"``, ``TRUE``, ``- 1``) written
    as the literal it stands for, or None when it is not one."""
    text = text.strip()
    while text.startswith("(") and text.endswith(")"):
        text = text[1:-1].strip()
    if text.upper() in ("TRUE", "FALSE"):
        return "1" if text.upper() == "TRUE" else "0"
    if len(text) >= 2 and text[0] == text[-1] == '"':  # SQLite takes it for a string
        inner = text[1:-1]
        if re.fullmatch(r'(?:[^"]|"")*', inner):
            text = "'" + inner.replace('""', '"').replace("'", "''") + "'"
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", text) and text.upper() not in EXPRESSION_WORDS:
        text = f"'{text}'"  # a bare word SQLite takes for a string
    text = re.sub(r"^([+-])\s+", r"\1", text)
    if text.startswith("+'"):  # unary plus leaves a string as it is
        text = text[1:]
    return decimal_literal(text) if is_default_literal(text) else None


HEX_LITERAL = re.compile(r"([+-]?)0[xX]([0-9a-fA-F]+)")


def decimal_literal(text: str) -> str:
    """A hex integer literal as its decimal value (SQLite reads hex as 64-bit two's
    complement), anything else as it is: ``ALTER TABLE ... ADD COLUMN`` gives rows that exist
    a hex DEFAULT of 0x80000000 or more as TEXT, where ``CREATE TABLE`` and inserts store the
    integer, so the copies would differ."""
    match = HEX_LITERAL.fullmatch(text)
    if match is None:
        return text
    value = int(match.group(2), 16)
    value = value - (1 << 64) if value >= 1 << 63 else value
    return str(-value if match.group(1) == "-" else value)



def is_without_rowid(conn: sqlite3.Connection, table: str) -> bool:
    try:
        row = conn.execute("SELECT wr FROM pragma_table_list(?) WHERE schema = 'main' AND name = ?", [table, table]).fetchone()
        return bool(row and row[0])
    except sqlite3.OperationalError:  # SQLite before 3.37: the clause ends the table's SQL
        row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?", [table]).fetchone()
        return bool(row and re.search(r"\)\s*WITHOUT\s+ROWID\s*$", row[0] or "", re.I))


def is_integer_key(conn: sqlite3.Connection, table: str, pk: list[str]) -> bool:
    """One key column, declared ``INTEGER``."""
    return len(pk) == 1 and column_types(conn, table).get(pk[0], "").upper() == "INTEGER"


def has_key_index(conn: sqlite3.Connection, table: str) -> bool:
    """An index backs the primary key (every key but a rowid alias)."""
    return any(row[3] == "pk" for row in conn.execute(f"PRAGMA index_list({quote_identifier(table)})"))


def is_rowid_alias(conn: sqlite3.Connection, table: str, pk: list[str]) -> bool:
    """True when the key is one INTEGER PRIMARY KEY column of a rowid table (no index backs it)."""
    return is_integer_key(conn, table, pk) and not has_key_index(conn, table)


def is_unaliased_integer_key(conn: sqlite3.Connection, table: str, pk: list[str]) -> bool:
    """One INTEGER key column of a rowid table that is no rowid alias: declared ``INTEGER
    PRIMARY KEY DESC``, which SQLite backs with an index and lets hold any value, text too."""
    return is_integer_key(conn, table, pk) and not is_without_rowid(conn, table) and has_key_index(conn, table)


def column_sql(column: str, declared: str, default: str | None = None, strict: bool = False) -> str:
    constraint = "" if default is None else f" NOT NULL DEFAULT {default}"
    return f"{quote_identifier(column)} {declared or ('ANY' if strict else '')}".rstrip() + constraint


def create_table(
    conn: sqlite3.Connection,
    name: str,
    columns: list[str],
    pk: list[str],
    types: dict[str, str],
    without_rowid: bool,
    defaults: dict[str, str],
    strict: bool = False,
    unaliased_key: bool = False,
) -> None:
    """``CREATE TABLE`` with the sender's declared types, NOT NULL defaults, primary key and
    table options, then a check that SQLite read exactly those and no other constraint (they
    were validated already; this makes sure of it). ``unaliased_key``: the sender's INTEGER key
    is no rowid alias (see :func:`is_unaliased_integer_key`), so neither is this one."""
    defaults = {c: decimal_literal(d) for c, d in defaults.items() if c not in pk}
    options = [option for option, wanted in (("WITHOUT ROWID", without_rowid), ("STRICT", strict)) if wanted]
    integer_key = not without_rowid and len(pk) == 1 and types.get(pk[0], "").upper() == "INTEGER"
    alias = integer_key and not unaliased_key
    definitions = [column_sql(c, types.get(c, ""), defaults.get(c), strict) for c in columns]
    if integer_key and unaliased_key:
        # Only this form is no alias: PRIMARY KEY ("id" DESC) as a table constraint is one.
        position = columns.index(pk[0])
        definitions[position] += " PRIMARY KEY DESC"
    else:
        definitions.append(f"PRIMARY KEY ({', '.join(quote_identifier(c) for c in pk)})")
    try:
        conn.execute(f"CREATE TABLE {quote_identifier(name)} ({', '.join(definitions)}) {', '.join(options)}")
    except sqlite3.OperationalError as ex:  # e.g. STRICT on SQLite before 3.37
        raise BundleError(errors.INVALID_METADATA, f"table '{name}' cannot be created as its sender declared it: {ex}")
    got = {row[1]: (row[2], row[3], row[4], row[6]) for row in conn.execute(f"PRAGMA table_xinfo({quote_identifier(name)})")}
    # WITHOUT ROWID and STRICT tables make their key columns NOT NULL, but a rowid alias.
    not_null_key = {c for c in pk if without_rowid or (strict and not alias)}
    expected = {
        c: (
            types.get(c) or ("ANY" if strict else ""),
            1 if c in not_null_key or c in defaults else 0,
            defaults.get(c),
            0,
        )
        for c in columns
    }
    if got != expected:
        raise BundleError(errors.INVALID_METADATA, f"table '{name}' cannot be created as its sender declared it")


def check_strict_default(conn: sqlite3.Connection, table: str, column: str, declared: str, default: str) -> None:
    """Refuse a DEFAULT a STRICT column of type ``declared`` cannot store: SQLite takes it in
    ``ALTER TABLE``, then every row there holds a value of the wrong type. (A table created so
    holds no such row: there a write that leaves the column out fails, as on the sender.)"""
    conn.execute(f"CREATE TEMP TABLE _sync_fits (v {declared or 'ANY'}) STRICT")
    try:
        conn.execute(f"INSERT INTO temp._sync_fits VALUES ({default})")
    except sqlite3.IntegrityError:
        raise BundleError(
            errors.INVALID_METADATA,
            f"column '{column}' of table '{table}' has a default its STRICT type {declared or 'ANY'} cannot store",
        )
    finally:
        conn.execute("DROP TABLE temp._sync_fits")


def add_column(conn: sqlite3.Connection, table: str, column: str, declared: str, default: str | None) -> None:
    strict = is_strict(conn, table)
    if strict and declared.upper() not in STRICT_TYPES:
        declared = ""  # a type a STRICT table cannot have (the sender's table is not STRICT): ANY
    default = None if default is None else decimal_literal(default)
    if strict and default is not None:
        check_strict_default(conn, table, column, declared, default)
    conn.execute(f"ALTER TABLE {quote_identifier(table)} ADD COLUMN {column_sql(column, declared, default, strict)}")
