"""Cluster mode (NATS JetStream): real ``nats-server`` processes on loopback ports (one node
with JetStream is enough here; tests/test_cluster_faults.py kills nodes of a three-node
cluster), real ``datasette serve`` hubs and the real ``sqlite-utils`` CLI.

Convergence is asynchronous: a test waits (``eventually``) until what it asserts holds, with a
generous deadline, and asserts contents, never how long it took.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
import sqlite_utils

from sqlite_utils_sync import export_bundle, sync_status

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
pytestmark = pytest.mark.skipif(not shutil.which(NATS_SERVER), reason="nats-server is not installed")
nats = pytest.importorskip("nats")

ALICE_ACTIONS = ["sync-export", "sync-import", "view-database", "view-table", "insert-row", "update-row", "delete-row"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Nats:
    """One ``nats-server -js`` on a free loopback port, with its store in a temporary folder."""

    def __init__(self, folder, config: str = ""):
        self.folder = folder
        self.config = config
        self.port = free_port()
        self.proc = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> "Nats":
        self.folder.mkdir(exist_ok=True)
        args = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.folder / "store")]
        if self.config:
            path = self.folder / "nats.conf"
            path.write_text(self.config)
            args += ["-c", str(path)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        eventually(lambda: self.answers(), what="nats-server to accept connections")
        return self

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)

    def ask(self, coro_fn):
        """Run ``coro_fn(js)`` with a fresh client connection (the test's view of the stream)."""

        async def main():
            nc = await nats.connect(self.url)
            try:
                return await coro_fn(nc.jetstream())
            finally:
                await nc.close()

        return asyncio.run(main())


def eventually(check, timeout: float = 60.0, what: str = "the cluster to converge"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def nats_server(tmp_path):
    servers = []

    def start(config: str = "") -> Nats:
        server = Nats(tmp_path / f"nats-{len(servers)}", config).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def cluster_config(hub_config, nats_url: str, hub: str, **extra) -> dict:
    config = json.loads(json.dumps(hub_config))
    config["plugins"] = {"datasette-sync": {"cluster": {"servers": [nats_url], "hub": hub, **extra}}}
    return config


@pytest.fixture
def start_hub(tmp_path, datasette_server, hub_config, make_todos_db):
    """``start_hub(nats, name, **cluster_settings)``: a hub serving its own ``hub.db``."""

    def start(server: Nats, name: str, **extra):
        folder = tmp_path / name
        folder.mkdir()
        path = make_todos_db(folder / "hub.db")
        hub = datasette_server([path], cluster_config(hub_config, server.url, name, **extra))
        hub.path = path
        hub.alice = hub.token("alice", *[arg for action in ALICE_ACTIONS for arg in ("-d", "hub", action)])
        return hub

    return start


def rows_of(todo_rows, path):
    return lambda: todo_rows(path)


def test_a_push_to_one_hub_reaches_the_other(tmp_path, nats_server, start_hub, hub_sync, make_todos_db, todo_rows):
    server = nats_server()
    a, b = start_hub(server, "a"), start_hub(server, "b")
    phone = make_todos_db(tmp_path / "phone.db", [{"id": 1, "title": "Buy milk", "done": 0}])
    result = hub_sync(phone, a, a.alice)
    assert result["pushed"]["applied"] >= 1
    expected = [{"id": 1, "title": "Buy milk", "done": 0}]
    eventually(lambda: todo_rows(b.path) == expected)
    # A pull from B gives a new device what was pushed to A.
    laptop = make_todos_db(tmp_path / "laptop.db")
    hub_sync(laptop, b, b.alice)
    assert todo_rows(laptop) == expected
