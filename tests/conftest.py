"""Shared test helpers: real ``datasette serve`` and CLI subprocesses.

Never set ``sys._called_from_test`` here: it stops Datasette and sqlite-utils from loading
entry-point plugins, i.e. this project.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import httpx
import pytest

BIN = pathlib.Path(sys.executable).parent
SECRET = "test-secret-for-datasette-sync"


def executable(name: str) -> str:
    """The console script installed next to this Python (falls back to PATH)."""
    candidate = BIN / name
    return str(candidate) if candidate.exists() else name


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATASETTE_", "SQLITE_UTILS_"))}
    env.update(extra)
    return env


def run(args: list[str], check: bool = True, env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """Run a CLI (``sqlite-utils``, ``datasette``) as a real subprocess."""
    program, *rest = args
    result = subprocess.run(
        [executable(program), *map(str, rest)],
        capture_output=True,
        text=True,
        env=env or clean_env(),
        timeout=60,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


def run_json(args: list[str], **kwargs):
    return json.loads(run(args, **kwargs).stdout)


FAKETIME = shutil.which("faketime")


def shell(path, sql: str, offset: str = "+0") -> None:
    """Run ``sql`` in the real sqlite3 shell on a machine whose clock is ``offset`` (``-1d``)
    away, moved by libfaketime: the capture triggers read that time as on such a device."""
    subprocess.run([FAKETIME, "-f", offset, "sqlite3", str(path), sql], check=True, capture_output=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        result = run(["datasette", "create-token", actor, "--secret", self.secret, *restrictions], cwd=self.cwd)
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
            port = free_port()
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    [executable("datasette"), *args, "--port", str(port)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=clean_env(),
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


def make_todos_db(path: pathlib.Path, rows: list[dict] | None = None) -> pathlib.Path:
    """A database with a synced ``todos`` table, made with the real sqlite-utils CLI."""
    run(["sqlite-utils", "create-table", path, "todos", "id", "integer", "title", "text", "done", "integer", "--pk", "id"])
    if rows:
        run(["sqlite-utils", "insert", path, "todos", "-", "--pk", "id"], input=json.dumps(rows))
    run(["sqlite-utils", "enable-sync", path, "todos"])
    return path
