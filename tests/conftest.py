"""Shared test fixtures: real SQLite files, real bundles, real CLIs and real ``datasette serve``.

Helpers are fixtures, requested by name like ``tmp_path``; those that only return a function
are session-scoped, so Hypothesis tests may use them too (Hypothesis refuses function-scoped
fixtures: they are not reset between its examples).

- Processes: ``run`` / ``run_json`` (a CLI as a real subprocess), ``run_cli`` (the sqlite-utils
  CLI in process, with this project's commands), ``shell`` (the sqlite3 shell under
  libfaketime), ``executable``, ``clean_env``, ``free_port``, ``datasette_server``.
- Databases and bundles through the Python API: ``make_db``, ``rows``, ``sync``,
  ``file_bytes``, ``conflict_records``, ``knowledge``, ``pair``, ``trio``, and ``craft`` to
  tamper with a bundle as a hostile peer would.
- Databases through the CLI and a hub: ``make_todos_db``, ``todo_rows``, ``upsert``,
  ``conflicts``, ``hub_sync``, ``hub_config``, ``conflicted_db``.

Never set ``sys._called_from_test`` here: it stops Datasette and sqlite-utils from loading
entry-point plugins, i.e. this project.
"""

from __future__ import annotations

import compileall
import copy
import hashlib
import json
import os
import pathlib
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
import pytest
import sqlite_utils
from click.testing import CliRunner
from sqlite_utils.cli import cli as sqlite_utils_cli

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, list_conflicts, sync_status
from sqlite_utils_sync import codec
from sqlite_utils_sync.bundle import chunk_prefix

TESTS = pathlib.Path(__file__).parent
BIN = pathlib.Path(sys.executable).parent
SECRET = "test-secret-for-datasette-sync"
FAKETIME = shutil.which("faketime")
TODOS = "CREATE TABLE todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL)"
HUB_CONFIG = {
    "databases": {
        "hub": {
            "permissions": {
                "sync-export": {"id": ["alice", "bob"]},
                "sync-import": {"id": ["alice"]},
                # alice's pushes insert, update and delete todos (checked per table).
                "insert-row": {"id": ["writer", "alice"]},
                "update-row": {"id": ["writer", "alice"]},
                "delete-row": {"id": ["alice"]},
                "alter-table": {"id": "alice"},
            }
        }
    }
}


# Processes ------------------------------------------------------------------------------------


def _lighten_child_processes() -> None:
    """Make each process the suite starts cheaper, without changing what it does.

    The suite is bound by the CPU of the ``sqlite-utils`` and ``datasette`` processes it
    starts. Three costs in them are not the product's: compiling this checkout's modules again
    in every process where ``PYTHONDONTWRITEBYTECODE`` is set (they are compiled once here);
    importing numpy, which sqlite-utils does whenever it is installed; and, where rich is
    installed, Datasette printing every 403 and 404 as a rich traceback with locals.
    ``hidden_modules`` hides numpy and rich from the children.
    """
    hidden = str(TESTS / "hidden_modules")
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if hidden not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([hidden, *filter(None, paths)])
    for package in ("sqlite_utils_sync", "datasette_sync"):
        compileall.compile_dir(TESTS.parent / package, quiet=2)


_lighten_child_processes()


def _executable(name: str) -> str:
    """The console script installed next to this Python (falls back to PATH)."""
    candidate = BIN / name
    return str(candidate) if candidate.exists() else name


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATASETTE_", "SQLITE_UTILS_"))}
    env.update(extra)
    return env


def _run(args: list, check: bool = True, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a CLI (``sqlite-utils``, ``datasette``) as a real subprocess."""
    program, *rest = args
    result = subprocess.run(
        [_executable(program), *map(str, rest)],
        capture_output=True,
        text=True,
        env=env or _clean_env(),
        timeout=60,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def _run_json(args: list, **kwargs):
    return json.loads(_run(args, **kwargs).stdout)


def _run_cli(*args):
    """The sqlite-utils CLI in this process (click's CliRunner): stdout and stderr in ``.output``."""
    return CliRunner().invoke(sqlite_utils_cli, [str(a) for a in args], catch_exceptions=False)


def _shell(path, sql: str, offset: str = "+0") -> None:
    """Run ``sql`` in the real sqlite3 shell on a machine whose clock is ``offset`` (``-1d``)
    away, moved by libfaketime: the capture triggers read that time as on such a device."""
    subprocess.run([FAKETIME, "-f", offset, "sqlite3", str(path), sql], check=True, capture_output=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def executable():
    return _executable


@pytest.fixture(scope="session")
def clean_env():
    """The environment without DATASETTE_* and SQLITE_UTILS_* variables, plus ``**extra``."""
    return _clean_env


@pytest.fixture(scope="session")
def run():
    """``run(args, check=True, env=None, **subprocess_kwargs)``: a CLI as a real subprocess;
    raises with its output when it fails and ``check`` is true."""
    return _run


@pytest.fixture(scope="session")
def run_json():
    """``run_json(args)``: :func:`run`, its stdout parsed as JSON."""
    return _run_json


@pytest.fixture(scope="session")
def run_cli():
    """``run_cli(*args)``: the sqlite-utils CLI in process, its result's ``.output`` and ``.exit_code``."""
    return _run_cli


@pytest.fixture(scope="session")
def shell():
    """``shell(path, sql, offset="+0")``: the sqlite3 shell with its clock moved by ``offset``.
    Skips the test where faketime is not installed."""
    if not FAKETIME:
        pytest.skip("needs faketime (apt install faketime)")
    return _shell


@pytest.fixture(scope="session")
def free_port():
    return _free_port


# A real datasette serve ------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    port: int
    secret: str
    proc: subprocess.Popen
    log: pathlib.Path
    cwd: pathlib.Path
    args: list[str] = field(default_factory=list)

    def token(self, actor: str, *restrictions: str) -> str:
        """A real ``datasette create-token`` token signed with this server's secret."""
        result = _run(["datasette", "create-token", actor, "--secret", self.secret, *restrictions], cwd=self.cwd)
        token = result.stdout.strip().splitlines()[0]
        assert token.startswith("dstok_"), result
        return token

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=30, **kwargs)


@pytest.fixture
def datasette_server(tmp_path):
    """Start real ``datasette serve`` processes: ``start(files, config=None, *extra_args)``.

    Each binds 127.0.0.1 on a random free port with ``--secret``, is polled until it answers
    and is terminated at teardown.
    """
    servers: list[Server] = []

    def start(files, config: dict | None = None, *extra: str, timeout: float = 30.0) -> Server:
        index = len(servers)
        log = tmp_path / f"datasette-{index}.log"
        args = ["serve", *map(str, files), "--host", "127.0.0.1", "--secret", SECRET]
        if config is not None:
            config_path = tmp_path / f"datasette-{index}.json"
            config_path.write_text(json.dumps(config))
            args += ["-c", str(config_path)]
        args += list(extra)
        last_error = None
        for _ in range(3):  # retry on the rare port race
            port = _free_port()
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [_executable("datasette"), *args, "--port", str(port)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=_clean_env(),
                    cwd=tmp_path,
                )
            server = Server(f"http://127.0.0.1:{port}", port, SECRET, proc, log, tmp_path, args)
            servers.append(server)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    last_error = f"datasette exited {proc.returncode}:\n{server.output()}"
                    break
                try:
                    if httpx.get(server.url + "/-/versions.json", timeout=2).status_code == 200:
                        return server
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            else:
                last_error = f"datasette did not answer within {timeout}s:\n{server.output()}"
            if proc.poll() is None:
                proc.terminate()
            if "address already in use" not in (last_error or "").lower():
                break
        raise AssertionError(last_error)

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.terminate()
            try:
                server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()


# Databases and bundles through the Python API ---------------------------------------------------


def _make_db(path: pathlib.Path | str, schema: str = TODOS, tables: tuple[str, ...] = ("todos",)) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    for statement in schema.split(";"):
        if statement.strip():
            conn.execute(statement)
    enable_sync(conn, list(tables))
    return conn


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _rows(conn: sqlite3.Connection, table: str = "todos") -> list[tuple[Any, ...]]:
    t = _quote(table)
    columns = [_quote(r[1]) for r in conn.execute(f"PRAGMA table_info({t})")]
    select = ", ".join(f"{c}, typeof({c})" for c in columns)
    return [tuple(row) for row in conn.execute(f"SELECT {select} FROM {t} ORDER BY 1, 3")]


def _sync(source: sqlite3.Connection, target: sqlite3.Connection, folder: pathlib.Path, name: str = "b.bundle"):
    path = folder / name
    export_bundle(source, path, since=sync_status(target)["clock"])
    return import_bundle(target, path)


def _file_bytes(path: pathlib.Path | str) -> bytes:
    return pathlib.Path(path).read_bytes()


def _conflict_records(conn: sqlite3.Connection) -> list[tuple]:
    return sorted(
        (c["id"], c["table"], tuple(v["op"] for v in c["versions"]), c["resolved"])
        for c in list_conflicts(conn, include_resolved=True)
    )


def _knowledge(conn: sqlite3.Connection) -> list[tuple]:
    return sorted(
        tuple(row)
        for row in conn.execute(
            "SELECT d.device_id, k.from_seq, k.clock FROM _sync_knowledge k JOIN _sync_devices d ON d.idx = k.device"
        )
    )


@pytest.fixture(scope="session")
def make_db():
    """``make_db(path, schema=TODOS, tables=("todos",))``: a connection (autocommit) to a new
    database made from ``schema`` (statements separated by ``;``), ``tables`` synced. TODOS is
    ``todos (id INTEGER PRIMARY KEY, title TEXT, done INTEGER, score REAL)``."""
    return _make_db


@pytest.fixture(scope="session")
def rows():
    """``rows(conn, table="todos")``: every row with the SQLite type of every value, in primary key order."""
    return _rows


@pytest.fixture(scope="session")
def sync():
    """``sync(source, target, folder, name="b.bundle")``: send ``target`` what it lacks from
    ``source`` (connections) through a bundle file in ``folder``; returns the import result."""
    return _sync


@pytest.fixture(scope="session")
def everyone_syncs(sync):
    """``everyone_syncs(devices, folder)``: every device sends every other what it lacks, twice round."""

    def everyone_syncs(devices, folder):
        for _ in range(2):
            for source in devices:
                for target in devices:
                    if source is not target:
                        sync(source, target, folder)

    return everyone_syncs


@pytest.fixture(scope="session")
def file_bytes():
    """``file_bytes(path)``: the file's bytes, to show a database was left exactly as it was."""
    return _file_bytes


@pytest.fixture(scope="session")
def conflict_records():
    """``conflict_records(conn)``: every conflict record, resolved ones too, as sorted tuples
    (id, table, version op ids, resolved) that compare across copies."""
    return _conflict_records


@pytest.fixture(scope="session")
def knowledge():
    """``knowledge(conn)``: every device's knowledge epochs (what its ops from ``from_seq`` on had seen), by device id."""
    return _knowledge


@pytest.fixture
def pair(tmp_path):
    """``a.db`` with seven todos, never synced, and an empty ``b.db``."""
    a, b = _make_db(tmp_path / "a.db"), _make_db(tmp_path / "b.db")
    a.executemany("INSERT INTO todos VALUES (?, ?, 0, 0.5)", [(i, f"todo {i}") for i in range(1, 8)])
    return a, b


@pytest.fixture
def trio(tmp_path):
    """Three empty devices, ``x.db``, ``y.db`` and ``z.db``."""
    return [_make_db(tmp_path / f"{name}.db") for name in ("x", "y", "z")]


class BundleCraft:
    """Tampering with a bundle file as a hostile peer would (not a corrupted file: ``reseal``
    makes the hash valid again)."""

    @staticmethod
    def rewrite(path, tamper) -> None:
        """Change a bundle in place with ``tamper(conn)``."""
        conn = sqlite3.connect(path)
        tamper(conn)
        conn.commit()
        conn.close()

    @staticmethod
    def reseal(conn) -> None:
        """Recompute the hash after tampering, the way the exporter does."""
        (fmt,) = conn.execute("SELECT value FROM bundle_meta WHERE key = 'format'").fetchone()
        digest = hashlib.sha256(fmt if isinstance(fmt, bytes) else str(fmt).encode())
        for device, table, data in conn.execute("SELECT device, tbl, data FROM bundle_chunks ORDER BY id"):
            digest.update(chunk_prefix(device, table, data))
            digest.update(data)
        digest.update(conn.execute("SELECT data FROM bundle_header").fetchone()[0])
        sha = digest.hexdigest()
        conn.execute("UPDATE bundle_meta SET value = ? WHERE key = 'sha256'", [sha])
        conn.execute("UPDATE bundle_meta SET value = ? WHERE key = 'bundle_id'", [sha[:32]])

    @staticmethod
    def image(data: bytes) -> bytes:
        """The chunk image a stored chunk holds (compressed or not)."""
        return codec.unpack(data, codec.ZSTD, "crafted")

    @staticmethod
    def stored(image: bytes, data: bytes) -> bytes:
        """``image`` stored the way the chunk ``data`` it replaces was."""
        return image if data.startswith(codec.SQLITE_MAGIC) else codec.pack(image, codec.ZSTD)

    @staticmethod
    def edit_chunks(conn, sql, *params, first_only=True) -> None:
        """Run ``sql`` on the ``ops`` table inside chunk images (each one a SQLite database)."""
        chunks = conn.execute("SELECT id, data FROM bundle_chunks ORDER BY id").fetchall()
        for chunk_id, data in chunks[:1] if first_only else chunks:
            image = sqlite3.connect(":memory:")
            image.deserialize(BundleCraft.image(data))
            image.execute(sql, params)
            image.commit()
            conn.execute("UPDATE bundle_chunks SET data = ? WHERE id = ?", [BundleCraft.stored(image.serialize(), data), chunk_id])
            image.close()

    @staticmethod
    def edit_header(conn, change) -> None:
        """Apply ``change(header)`` to the bundle's msgpack header."""
        header = msgpack.unpackb(conn.execute("SELECT data FROM bundle_header").fetchone()[0])
        change(header)
        conn.execute("UPDATE bundle_header SET data = ?", [msgpack.packb(header)])


def chunks(path) -> list[bytes]:
    """A bundle's chunk images as stored (compressed), in order: two bundles with equal chunks
    carry the same operations cut the same way, whatever their headers say."""
    conn = sqlite3.connect(path)
    try:
        return [data for (data,) in conn.execute("SELECT data FROM bundle_chunks ORDER BY id")]
    finally:
        conn.close()


def readable_bytes(path) -> bytes:
    """A bundle file's bytes, then its chunk images decompressed: what a search for a value
    that must not travel looks through."""
    conn = sqlite3.connect(path)
    try:
        images = [codec.unpack(data, codec.ZSTD, "searched") for (data,) in conn.execute("SELECT data FROM bundle_chunks")]
    finally:
        conn.close()
    return pathlib.Path(path).read_bytes() + b"".join(images)


@pytest.fixture(scope="session")
def craft():
    """``craft.rewrite(path, tamper)``, ``craft.reseal(conn)``, ``craft.edit_chunks(conn, sql, *params,
    first_only=True)``, ``craft.edit_header(conn, change)``: see :class:`BundleCraft`."""
    return BundleCraft


# Databases through the CLI, and a hub -----------------------------------------------------------


def _make_todos_db(path: pathlib.Path, rows: list[dict] | None = None) -> pathlib.Path:
    _run(["sqlite-utils", "create-table", path, "todos", "id", "integer", "title", "text", "done", "integer", "--pk", "id"])
    if rows:
        _run(["sqlite-utils", "insert", path, "todos", "-", "--pk", "id"], input=json.dumps(rows))
    _run(["sqlite-utils", "enable-sync", path, "todos"])
    return path


def _todo_rows(path) -> list[dict]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM todos ORDER BY id")]
    finally:
        conn.close()


def _upsert(path, row: dict) -> None:
    _run(["sqlite-utils", "upsert", path, "todos", "-", "--pk", "id"], input=json.dumps([row]))


def _conflicts(path) -> list:
    return _run_json(["sqlite-utils", "sync-conflicts", path, "--json", "--all"])


def _hub_sync(path, server, token, check=True):
    args = ["sqlite-utils", "sync", path, server.url + "/hub", "--json"]
    if token is not None:
        args += ["--token", token]
    if not check:
        return _run(args, check=False)
    return _run_json(args)


@pytest.fixture(scope="session")
def make_todos_db():
    """``make_todos_db(path, rows=None)``: a database with a synced ``todos (id, title, done)``
    table holding ``rows``, made with the real sqlite-utils CLI; returns ``path``."""
    return _make_todos_db


@pytest.fixture(scope="session")
def todo_rows():
    """``todo_rows(path)``: the ``todos`` rows of a database file as dicts, read read-only."""
    return _todo_rows


@pytest.fixture(scope="session")
def upsert():
    """``upsert(path, row)``: ``sqlite-utils upsert`` one row into ``todos``."""
    return _upsert


@pytest.fixture(scope="session")
def conflicts():
    """``conflicts(path)``: ``sqlite-utils sync-conflicts --json --all``, parsed."""
    return _conflicts


@pytest.fixture(scope="session")
def hub_sync():
    """``hub_sync(path, server, token, check=True)``: ``sqlite-utils sync`` with the database
    ``hub`` of ``server``; returns the parsed ``--json`` output (the process when ``check`` is false)."""
    return _hub_sync


@pytest.fixture
def hub_config():
    """A hub config of its own for each test: alice may push and pull, bob pull, writer
    insert and update rows, alice insert, update and delete rows and alter tables."""
    return copy.deepcopy(HUB_CONFIG)


@pytest.fixture
def conflicted_db(tmp_path):
    """``data.db`` holding one conflict on todos 1; beside it ``phone.bundle`` with phone's ops
    and ``phone-new.bundle`` with one operation ``data.db`` has not seen. Returns the path of ``data.db``."""
    data = sqlite_utils.Database(tmp_path / "data.db")
    data["todos"].insert_all([{"id": 1, "title": "Buy milk"}, {"id": 2, "title": "Walk dog"}], pk="id")
    enable_sync(data, ["todos"])
    export_bundle(data, tmp_path / "first.bundle")
    phone = sqlite_utils.Database(tmp_path / "phone.db")
    phone["todos"].create({"id": int, "title": str}, pk="id")
    enable_sync(phone, ["todos"])
    import_bundle(phone, tmp_path / "first.bundle")
    data["todos"].update(1, {"title": "Buy oat milk"})
    phone["todos"].update(1, {"title": "Buy soy milk"})
    export_bundle(phone, tmp_path / "phone.bundle", since=sync_status(data)["clock"])
    import_bundle(data, tmp_path / "phone.bundle")
    phone["todos"].insert({"id": 3, "title": "Call mum"})
    export_bundle(phone, tmp_path / "phone-new.bundle", since=sync_status(data)["clock"])
    return tmp_path / "data.db"
