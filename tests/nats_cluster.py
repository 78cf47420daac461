"""Real NATS JetStream clusters and cluster hubs for tests/test_cluster_faults.py and
bench/bench_cluster.py (no pytest here: the benchmark imports it too).

- :class:`Cluster`: 1 or 3 ``nats-server -js`` nodes on free loopback ports, each with its
  store in a folder of its own; ready once every running node is healthy and agrees on a
  JetStream meta leader. A node can be killed (SIGKILL) and restarted on the same ports and
  store, as a machine that crashed and came back.
- :class:`Hub`: a ``datasette serve`` of one database with the ``cluster`` setting, on a
  free loopback port; it can be killed mid-request and restarted on the same port and file.

Everything binds 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import httpx

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
BIN = pathlib.Path(sys.executable).parent
SECRET = "test-secret-for-datasette-sync"


def missing() -> str | None:
    """Why cluster tests cannot run here (None: they can)."""
    if not os.path.exists(NATS_SERVER):
        return "nats-server is not installed (apt install nats-server)"
    if importlib.util.find_spec("nats") is None:
        return "nats-py is not installed (pip install -e '.[cluster]')"
    return None


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (held together while chosen, so never the same)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


_tokens: dict[str, str] = {}


def actor_token(actor: str = "alice") -> str:
    """An unrestricted token of ``actor`` for hubs started with SECRET (their config says what
    each actor may do), made in this process: the create-token CLI costs seconds."""
    if actor not in _tokens:
        from datasette.app import Datasette

        async def make():
            datasette = Datasette(secret=SECRET)
            await datasette.invoke_startup()
            return await datasette.create_token(actor)

        _tokens[actor] = asyncio.run(make())
    return _tokens[actor]


def wait_for(check: Callable[[], Any], timeout: float = 60.0, what: str = "the cluster", show: Callable[[], Any] | None = None) -> Any:
    """Poll ``check`` until it returns something true; AssertionError naming ``what`` (and
    what ``show()`` returns then) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout:.0f} s waiting for {what}" + (f": {show()}" if show else ""))
        time.sleep(0.1)


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Node:
    """One ``nats-server`` of a cluster: client, route and monitoring ports, and a store folder."""

    def __init__(self, folder: pathlib.Path, name: str, ports: list[int], routes: list[str] | None):
        self.folder, self.name, self.routes = folder, name, routes
        self.port, self.cluster_port, self.monitor_port = ports
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def args(self) -> list[str]:
        args = [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-m", str(self.monitor_port)]
        args += ["-sd", str(self.folder / "store"), "--server_name", self.name]
        if self.routes is not None:
            args += ["--cluster_name", "c", "--cluster", f"nats://127.0.0.1:{self.cluster_port}"]
            args += ["--routes", ",".join(self.routes)]
        return args

    def start(self) -> "Node":
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "nats.log", "ab")
        self.proc = subprocess.Popen(self.args(), stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def kill(self) -> None:
        """SIGKILL: the node dies as its machine would, without a goodbye to its peers."""
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc)

    def monitor(self, path: str) -> dict | None:
        try:
            response = httpx.get(f"http://127.0.0.1:{self.monitor_port}{path}", timeout=2)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def ready(self, size: int) -> bool:
        """Healthy, and (clustered) a member of a meta group of ``size`` that has a leader."""
        if not self.running or self.monitor("/healthz") is None:
            return False
        if self.routes is None:
            return True
        meta = (self.monitor("/jsz") or {}).get("meta_cluster") or {}
        return bool(meta.get("leader")) and meta.get("cluster_size") == size

    def log(self) -> str:
        path = self.folder / "nats.log"
        return path.read_text(errors="replace") if path.exists() else ""


class Cluster:
    """``size`` JetStream nodes (1: a single server, no routes) in ``folder``."""

    def __init__(self, folder: pathlib.Path, size: int = 3):
        ports = free_ports(3 * size)
        routes = [f"nats://127.0.0.1:{ports[3 * i + 1]}" for i in range(size)] if size > 1 else None
        self.nodes = [Node(folder / f"n{i + 1}", f"n{i + 1}", ports[3 * i : 3 * i + 3], routes) for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def start(self, timeout: float = 60.0) -> "Cluster":
        for node in self.nodes:
            node.start()
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 60.0) -> "Cluster":
        """Wait until every running node is healthy and knows the meta leader."""
        size = len(self.nodes)
        try:
            wait_for(lambda: all(node.ready(size) for node in self.nodes if node.running), timeout, "a JetStream meta leader")
        except AssertionError as ex:
            raise AssertionError(f"{ex}\n" + "\n".join(f"--- {n.name}\n{n.log()[-2000:]}" for n in self.nodes))
        return self

    def kill(self, index: int) -> Node:
        self.nodes[index].kill()
        return self.nodes[index]

    def restart(self, index: int, timeout: float = 60.0) -> Node:
        node = self.nodes[index]
        node.stop()
        node.start()
        self.wait_ready(timeout)
        return node

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def ask(self, coro_fn: Callable, timeout: float = 10.0) -> Any:
        """``coro_fn(js)`` with a fresh nats-py connection to the running nodes."""
        import nats

        async def main():
            urls = [node.url for node in self.nodes if node.running]
            nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=2)
            try:
                return await asyncio.wait_for(coro_fn(nc.jetstream()), timeout)
            finally:
                await nc.close()

        return asyncio.run(main())

    def consumers(self, stream: str) -> set[str]:
        """The durable consumers of ``stream`` (empty while it does not exist)."""

        async def names(js):
            try:
                return {info.name for info in await js.consumers_info(stream)}
            except Exception:
                return set()

        return self.ask(names)

    def stream_state(self, stream: str) -> Any:
        async def state(js):
            return (await js.stream_info(stream)).state

        return self.ask(state)


def cluster_config(base: dict, servers: list[str], hub: str, **cluster: Any) -> dict:
    """A copy of the Datasette config ``base`` with the cluster setting for hub ``hub``."""
    config = json.loads(json.dumps(base))
    config.setdefault("plugins", {})["datasette-sync"] = {"cluster": {"servers": servers, "hub": hub, **cluster}}
    return config


def _executable(name: str) -> str:
    candidate = BIN / name
    return str(candidate) if candidate.exists() else name


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("DATASETTE_", "SQLITE_UTILS_"))}


class Hub:
    """``datasette serve`` of ``path`` (its database is named by the file: ``hub``) with ``config``."""

    def __init__(self, path: pathlib.Path, config: dict, name: str):
        self.path, self.name = pathlib.Path(path), name
        self.folder = self.path.parent
        self.config_path = self.folder / f"datasette-{name}.json"
        self.config_path.write_text(json.dumps(config))
        self.port = free_ports(1)[0]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db_url(self) -> str:
        return f"{self.url}/{self.path.stem}"

    def start(self, timeout: float = 60.0) -> "Hub":
        args = [_executable("datasette"), "serve", str(self.path), "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--secret", SECRET, "-c", str(self.config_path)]
        with open(self.folder / f"datasette-{self.name}.log", "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=self.folder)
        wait_for(self.answers, timeout, f"hub {self.name} to answer")
        return self

    def answers(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"hub {self.name} exited:\n{self.log()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(self.url + "/-/versions.json", timeout=2).status_code == 200
        return False

    def kill(self) -> None:
        _stop(self.proc, signal.SIGKILL)

    def stop(self) -> None:
        _stop(self.proc)

    def restart(self, timeout: float = 60.0) -> "Hub":
        self.stop()
        return self.start(timeout)

    def token(self, actor: str, *restrictions: str) -> str:
        args = [_executable("datasette"), "create-token", actor, "--secret", SECRET, *restrictions]
        result = subprocess.run(args, capture_output=True, text=True, env=_env(), cwd=self.folder, check=True)
        return result.stdout.strip().splitlines()[0]

    def log(self) -> str:
        path = self.folder / f"datasette-{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
