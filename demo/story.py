#!/usr/bin/env python3
"""Three devices, one todo list, no network for a while: a sync story you can run.

    python demo/story.py [OUT_DIR]          # default: demo/out/ (recreated on every run)

A laptop, a phone and a server each keep their own SQLite file of todos and notes. They edit
offline, then swap bundles through the server. The laptop and the phone both retitle the same
todo, and the phone deletes a note the laptop has just edited: both become conflict records.
Every copy shows the same provisional winner (the latest write by hybrid logical clock) and
the same records; the laptop resolves them, the resolution syncs like any other edit, and at
the end the script checks that the three databases hold identical tables and identical
conflict records. Later the server compacts its log and a new tablet starts from the server's
export. It prints ``CONVERGED`` and exits 0 when everything matches, and exits 1 otherwise.

Every sync step runs the real ``sqlite-utils`` commands in a subprocess (``enable-sync``,
``export-bundle``, ``import-bundle``, ``sync-status``, ``sync-conflicts``, ``sync-resolve``,
``sync-new-device``, ``sync-compact``); edits are made with ``sqlite-utils insert`` / ``query`` or with Python's
``sqlite3`` module: the capture triggers log writes from any client.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "out")
DEVICES = ("laptop", "phone", "server")

TODOS = [
    {"id": 1, "title": "Book the dentist", "done": 0, "note": None},
    {"id": 2, "title": "Pay the electricity bill", "done": 0, "note": "due on the 28th"},
    {"id": 3, "title": "Buy milk", "done": 0, "note": None},
    {"id": 4, "title": "Return the broken kettle", "done": 0, "note": None},
    {"id": 5, "title": "Plan the weekend trip", "done": 0, "note": "see note 2"},
]
NOTES = [
    {"id": 1, "title": "Kettle receipt", "body": "Bought 12 March, order 4471"},
    {"id": 2, "title": "Packing list", "body": "passport, charger"},
    {"id": 3, "title": "Dentist", "body": "Dr Okafor, 020 7946 0018"},
]


class StoryError(Exception):
    """A command failed or a step did not do what the story expects."""


class Demo:
    """The three devices' files, the bundles between them, and a narrator."""

    def __init__(self, out_dir: str, echo: Callable[[str], None] = print):
        self.out = os.path.abspath(out_dir)
        self.bundles = os.path.join(self.out, "bundles")
        self.echo = echo
        self.names: dict[str, str] = {}  # device id -> "laptop", "phone", "server"
        self.bundle_count = 0
        self.commands = 0
        self.local = threading.local()  # per-thread buffer of narrative lines, see parallel()
        self.lock = threading.Lock()

    # -- plumbing ----------------------------------------------------------------------------

    def reset(self) -> None:
        if os.path.isdir(self.out):
            shutil.rmtree(self.out)
        os.makedirs(self.bundles)

    def path(self, device: str) -> str:
        return os.path.join(self.out, f"{device}.db")

    def say(self, who: str, text: str) -> None:
        line = f"{who + ':':<8} {text}"
        buffer = getattr(self.local, "buffer", None)
        if buffer is None:
            self.echo(line)
        else:
            buffer.append(line)

    def cli(self, *args: str, stdin: str | None = None) -> str:
        """Run ``sqlite-utils ARGS`` (the real CLI, in a subprocess); return its stdout."""
        with self.lock:
            self.commands += 1
        done = subprocess.run(
            [sys.executable, "-m", "sqlite_utils", *args], input=stdin, capture_output=True, text=True, check=False
        )
        if done.returncode != 0:
            raise StoryError(f"sqlite-utils {' '.join(args)} failed:\n{done.stderr.strip()}")
        return done.stdout

    def cli_json(self, *args: str, stdin: str | None = None) -> Any:
        return json.loads(self.cli(*args, stdin=stdin))

    def parallel(self, *calls: Callable[[], Any]) -> list[Any]:
        """Run independent steps at once (separate devices; each step is a subprocess); their
        narrative lines are printed afterwards, in the order of ``calls``."""

        def buffered(call: Callable[[], Any]) -> tuple[Any, list[str]]:
            self.local.buffer = []
            try:
                return call(), self.local.buffer
            finally:
                self.local.buffer = None

        with ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(buffered, call) for call in calls]
            outcomes = [f.result() for f in futures]
        for _, lines in outcomes:
            for line in lines:
                self.echo(line)
        return [result for result, _ in outcomes]

    def name(self, device_id: str) -> str:
        return self.names.get(device_id, device_id[:8])

    def sql(self, device: str, sql: str, params: tuple = ()) -> None:
        """A write through Python's sqlite3 module: the triggers capture it all the same."""
        conn = sqlite3.connect(self.path(device), isolation_level=None)
        try:
            conn.execute(sql, params)
        finally:
            conn.close()

    def read(self, device: str, sql: str, params: tuple = ()) -> list[tuple]:
        conn = sqlite3.connect(self.path(device))
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def todo(self, device: str, todo_id: int) -> dict | None:
        rows = self.read(device, "SELECT id, title, done, note FROM todos WHERE id = ?", (todo_id,))
        return dict(zip(("id", "title", "done", "note"), rows[0])) if rows else None

    def note(self, device: str, note_id: int) -> dict | None:
        rows = self.read(device, "SELECT id, title, body FROM notes WHERE id = ?", (note_id,))
        return dict(zip(("id", "title", "body"), rows[0])) if rows else None

    # -- sync commands -----------------------------------------------------------------------

    def status(self, device: str) -> dict:
        status = self.cli_json("sync-status", self.path(device), "--json")
        self.names[status["device_id"]] = device
        return status

    def export(self, source: str, target: str, since: dict | None = None) -> tuple[str, dict]:
        """``export-bundle`` from ``source`` for ``target``: ``--for`` when ``source`` has heard
        from ``target`` before, else ``--since`` the clock ``target`` reported, else everything."""
        self.bundle_count += 1
        bundle = os.path.join(self.bundles, f"{self.bundle_count:02d}-{source}-to-{target}.bundle")
        args = ["export-bundle", self.path(source), bundle, "--json", "--silent"]
        target_id = next((i for i, n in self.names.items() if n == target), None)
        how = "everything"
        if since is not None:
            args += ["--since", json.dumps(since)]
            how = f"--since {target}'s clock"
        elif target_id and self.read(source, "SELECT 1 FROM _sync_peers WHERE device_id = ?", (target_id,)):
            args += ["--for", target_id]
            how = f"--for {target}"
        result = self.cli_json(*args)
        self.say(
            source,
            f"export-bundle {how}: {result['operations']} operation(s), {result['bytes']:,} bytes "
            f"-> {os.path.basename(bundle)}",
        )
        return bundle, result

    def import_(self, target: str, bundle: str) -> dict:
        result = self.cli_json("import-bundle", self.path(target), bundle, "--json", "--silent")
        source = self.name(result["source_device_id"])
        text = (
            f"import-bundle from {source}: applied {result['applied']}, duplicates {result['duplicates']}, "
            f"unresolved conflicts {result['conflicts']}"
        )
        self.say(target, text)
        return result

    def send(self, source: str, target: str, since: dict | None = None) -> dict:
        bundle, _ = self.export(source, target, since)
        return self.import_(target, bundle)

    def conflicts(self, device: str, include_resolved: bool = False) -> list[dict]:
        args = ["sync-conflicts", self.path(device), "--json"] + (["--all"] if include_resolved else [])
        return self.cli_json(*args)

    def resolve(self, device: str, conflict_id: str, keep: str | None = None) -> str:
        args = ["sync-resolve", self.path(device), conflict_id] + (["--keep", keep] if keep else [])
        self.cli(*args)
        return keep or "the current value"

    # -- checks ------------------------------------------------------------------------------

    def snapshot(self, device: str) -> dict[str, list[tuple]]:
        return {
            "todos": self.read(device, "SELECT * FROM todos ORDER BY id"),
            "notes": self.read(device, "SELECT * FROM notes ORDER BY id"),
            "conflicts": self.read(
                device,
                'SELECT id, "table", rowkey, pk, columns, versions, resolved_by FROM _sync_conflicts ORDER BY id',
            ),
        }

    def expect(self, condition: bool, message: str) -> None:
        if not condition:
            raise StoryError(message)


def describe_version(demo: Demo, version: dict) -> str:
    who = demo.name(version["device_id"])
    if version["values"] is None:
        return f"{who} deleted it"
    return f"{who} set " + ", ".join(f"{k}={v!r}" for k, v in version["values"].items())


def describe_conflict(demo: Demo, conflict: dict) -> str:
    what = ", ".join(conflict["columns"]) or "update vs delete"
    versions = "; ".join(describe_version(demo, v) for v in conflict["versions"])
    return f"conflict {conflict['id']} on {conflict['table']} {conflict['pk']} [{what}]: {versions}"


def winner_of(conflict: dict) -> str:
    current = conflict["current"]
    if current is None:
        return "row deleted"
    if conflict["columns"]:
        return ", ".join(f"{c}={current[c]!r}" for c in conflict["columns"])
    return "row kept: " + json.dumps(current)


def find_version(demo: Demo, conflict: dict, device: str) -> dict:
    return next(v for v in conflict["versions"] if demo.name(v["device_id"]) == device)


# -- the story, step by step -----------------------------------------------------------------


def setup(demo: Demo) -> None:
    """The laptop starts the list, the server joins with an empty schema, the phone is a copy."""
    laptop, server = demo.path("laptop"), demo.path("server")
    demo.reset()
    demo.parallel(
        lambda: demo.cli("insert", laptop, "todos", "-", "--pk", "id", stdin=json.dumps(TODOS)),
        lambda: demo.cli(
            "create-table", server, "todos", "id", "integer", "title", "text", "done", "integer", "note", "text",
            "--pk", "id",
        ),
    )
    demo.parallel(
        lambda: demo.cli("insert", laptop, "notes", "-", "--pk", "id", stdin=json.dumps(NOTES)),
        lambda: demo.cli("create-table", server, "notes", "id", "integer", "title", "text", "body", "text", "--pk", "id"),
    )
    demo.say("laptop", f"sqlite-utils insert: {len(TODOS)} todos, {len(NOTES)} notes")
    demo.say("server", "sqlite-utils create-table: empty todos and notes tables")
    demo.parallel(
        lambda: demo.cli("enable-sync", laptop, "todos", "notes"),
        lambda: demo.cli("enable-sync", server, "todos", "notes"),
    )
    status, server_status = demo.parallel(lambda: demo.status("laptop"), lambda: demo.status("server"))
    demo.say("laptop", f"enable-sync todos notes: device {status['device_id'][:8]}…, "
             f"{status['operations']} existing rows logged as operations")
    demo.say("server", f"enable-sync todos notes: device {server_status['device_id'][:8]}…")
    result = demo.send("laptop", "server")
    demo.expect(result["applied"] == len(TODOS) + len(NOTES), "the server should receive every row")
    # Named devices: every copy and page shows "laptop (0db5b7d4)" rather than a bare id.
    demo.parallel(
        lambda: demo.cli("sync-name", laptop, "laptop"), lambda: demo.cli("sync-name", server, "server")
    )
    # The phone is set up from a copy of the laptop's file (sqlite3's backup API makes a
    # consistent copy); a copy must get its own device id before it is edited.
    source, copy = sqlite3.connect(laptop), sqlite3.connect(demo.path("phone"))
    source.backup(copy)
    source.close()
    copy.close()
    phone_id = demo.cli("sync-new-device", demo.path("phone")).strip()
    demo.names[phone_id] = "phone"
    demo.cli("sync-name", demo.path("phone"), "phone")  # every copy and page then shows the name
    demo.say("phone", f"copied laptop.db, then sync-new-device: device {phone_id[:8]}…")


def offline_edits(demo: Demo) -> None:
    """Nobody is connected. The laptop edits first, the phone a moment later."""
    demo.echo("--- offline ---")
    server_edit = {"id": 6, "title": "Renew passport", "done": 0, "note": "before the trip"}
    demo.parallel(
        lambda: demo.cli("query", demo.path("laptop"), "UPDATE todos SET title = :t WHERE id = 3", "-p", "t",
                         "Buy oat milk"),
        lambda: demo.cli("insert", demo.path("server"), "todos", "-", "--pk", "id", stdin=json.dumps(server_edit)),
    )
    demo.say("laptop", "offline edit: todo 3 title -> 'Buy oat milk'  (sqlite-utils query)")
    demo.sql("laptop", "UPDATE notes SET body = ? WHERE id = 2", ("passport, charger, sunscreen",))
    demo.say("laptop", "offline edit: note 2 body -> 'passport, charger, sunscreen'  (sqlite3 module)")
    demo.sql("laptop", "UPDATE todos SET note = ? WHERE id = 4", ("ask for a refund, not a voucher",))
    demo.say("laptop", "offline edit: todo 4 note -> 'ask for a refund, not a voucher'")
    demo.sql("laptop", "UPDATE todos SET done = 1 WHERE id = 1")
    demo.say("laptop", "offline edit: todo 1 done -> 1")
    time.sleep(0.01)  # the phone's edits come later in wall-clock time
    demo.sql("phone", "UPDATE todos SET title = ? WHERE id = 3", ("Buy almond milk",))
    demo.say("phone", "offline edit: todo 3 title -> 'Buy almond milk'")
    demo.sql("phone", "DELETE FROM notes WHERE id = 2")
    demo.say("phone", "offline edit: delete note 2 ('Packing list')")
    demo.sql("phone", "UPDATE todos SET done = 1 WHERE id IN (1, 4)")
    demo.say("phone", "offline edit: todos 1 and 4 done -> 1")
    demo.say("server", "edit in the web UI: new todo 6 'Renew passport'  (sqlite-utils insert)")


def reconnect(demo: Demo) -> list[dict]:
    """Everyone syncs through the server; the conflicts appear, the same on every copy."""
    demo.echo("--- back online: sync through the server ---")
    server_clock = demo.status("server")["clock"]
    demo.say("server", f"sync-status: clock covers {len(server_clock)} device(s); "
             "laptop and phone send what it lacks")
    laptop_bundle, phone_bundle = demo.parallel(
        lambda: demo.export("laptop", "server", since=server_clock)[0],
        lambda: demo.export("phone", "server", since=server_clock)[0],
    )
    first = demo.import_("server", laptop_bundle)
    demo.expect(first["conflicts"] == 0, "the laptop's edits alone conflict with nothing")
    second = demo.import_("server", phone_bundle)
    demo.expect(second["conflicts"] == 2, f"the phone's edits should clash twice, got {second['conflicts']}")
    conflicts = demo.conflicts("server")
    for conflict in conflicts:
        demo.say("server", "detected " + describe_conflict(demo, conflict))
        demo.say("server", f"provisional winner (latest clock, same on every copy): {winner_of(conflict)}")
    merged = demo.todo("server", 4)
    demo.say("server", f"no conflict for todo 4: laptop's note and phone's done merged -> {merged}")
    demo.expect(merged["done"] == 1 and merged["note"], "concurrent edits of different columns merge")
    demo.say("server", "no conflict for todo 1: laptop and phone both set done=1 (same value)")
    to_laptop, to_phone = demo.parallel(
        lambda: demo.export("server", "laptop")[0], lambda: demo.export("server", "phone")[0]
    )
    results = demo.parallel(lambda: demo.import_("laptop", to_laptop), lambda: demo.import_("phone", to_phone))
    for device, result in zip(("laptop", "phone"), results):
        demo.expect(result["conflicts"] == 2, f"{device} should see the two conflicts")
    views = demo.parallel(lambda: demo.conflicts("laptop"), lambda: demo.conflicts("phone"))
    for device, view in zip(("laptop", "phone"), views):
        same = [(c["id"], c["current"]) for c in view] == [(c["id"], c["current"]) for c in conflicts]
        demo.say(device, f"sync-conflicts: {len(view)} unresolved, "
                 f"{'same ids and same provisional winners as the server' if same else 'DIFFERENT from the server'}")
        demo.expect(same, f"{device} should hold the same conflict records")
    return conflicts


def resolve(demo: Demo, conflicts: list[dict], resolve_note: bool = True) -> None:
    """The laptop's owner picks the versions to keep; the resolutions sync like edits."""
    demo.echo("--- resolving on the laptop ---")
    todo_conflict = next(c for c in conflicts if c["table"] == "todos")
    keep = find_version(demo, todo_conflict, "laptop")
    demo.resolve("laptop", todo_conflict["id"], keep["op"])
    demo.say("laptop", f"sync-resolve {todo_conflict['id']} --keep {keep['op'][:8]}…:{keep['op'].split(':')[1]} "
             f"(the laptop's version): todo 3 title -> {demo.todo('laptop', 3)['title']!r}")
    demo.expect(demo.todo("laptop", 3)["title"] == "Buy oat milk", "the kept version is restored")
    if resolve_note:
        note_conflict = next(c for c in conflicts if c["table"] == "notes")
        keep = find_version(demo, note_conflict, "laptop")
        demo.resolve("laptop", note_conflict["id"], keep["op"])
        demo.say("laptop", f"sync-resolve {note_conflict['id']} --keep the laptop's edit: note 2 restored "
                 f"-> {demo.note('laptop', 2)}")
        demo.expect(demo.note("laptop", 2) is not None, "keeping the edit brings the note back")
    left = demo.read("laptop", "SELECT count(*) FROM _sync_conflicts WHERE resolved_by IS NULL")[0][0]
    demo.say("laptop", f"{len(conflicts) - left} conflict(s) resolved, {left} left unresolved")
    demo.echo("--- spreading the resolution ---")
    demo.send("laptop", "server")
    demo.send("server", "phone")
    # One more round so that every copy also holds the others' bookkeeping ("tick") operations.
    demo.send("phone", "server")
    demo.send("server", "laptop")


def check_converged(demo: Demo) -> bool:
    demo.echo("--- checking ---")
    snapshots = {device: demo.snapshot(device) for device in DEVICES}
    reference = snapshots["server"]
    ok = True
    for part in ("todos", "notes", "conflicts"):
        same = all(snapshots[device][part] == reference[part] for device in DEVICES)
        ok &= same
        demo.echo(f"{part + ':':<10} {len(reference[part])} row(s), {'identical' if same else 'DIFFERENT'} on "
                  f"{', '.join(DEVICES)}")
    clocks = demo.parallel(*[lambda d=d: demo.status(d)["clock"] for d in DEVICES])
    demo.echo(f"{'clocks:':<10} {'identical' if all(c == clocks[0] for c in clocks) else 'different'} "
              f"({sum(clocks[0].values())} operations from {len(clocks[0])} device ids)")
    for row in reference["conflicts"]:
        state = f"resolved by {demo.name(row[6].split(':')[0])}" if row[6] else "unresolved"
        demo.echo(f"{'record:':<10} conflict {row[0]} on {row[1]} {row[3]} {row[4]}: {state}")
    for row in reference["todos"]:
        demo.echo(f"{'todo:':<10} {row}")
    return ok


def compact_and_join(demo: Demo) -> bool:
    """Later: the server drops history nobody needs, and a new tablet starts from its export."""
    demo.echo("--- later: the server compacts its log, a tablet joins ---")
    before = demo.status("server")["operations"]
    result = demo.cli_json("sync-compact", demo.path("server"), "--json")
    demo.say("server", f"sync-compact: removed {result['removed']} of {before} operations (overwritten, and seen by "
             f"every device), kept {result['kept']}; tables and conflict records unchanged")
    tablet = demo.path("tablet")
    demo.cli("create-table", tablet, "todos", "id", "integer", "title", "text", "done", "integer", "note", "text",
             "--pk", "id")
    demo.cli("create-table", tablet, "notes", "id", "integer", "title", "text", "body", "text", "--pk", "id")
    demo.cli("enable-sync", tablet, "todos", "notes")
    demo.status("tablet")
    demo.send("server", "tablet")
    same = all(demo.snapshot("tablet")[part] == demo.snapshot("server")[part] for part in ("todos", "notes", "conflicts"))
    demo.echo(f"{'tablet:':<10} started from the server's compacted export: todos, notes and conflict records "
              f"{'identical to the server' if same else 'DIFFERENT from the server'}")
    return same


def run_story(out_dir: str, resolve_note: bool = True, echo: Callable[[str], None] = print) -> tuple[Demo, bool]:
    demo = Demo(out_dir, echo)
    setup(demo)
    offline_edits(demo)
    conflicts = reconnect(demo)
    resolve(demo, conflicts, resolve_note)
    converged = check_converged(demo)
    return demo, compact_and_join(demo) and converged


def main(argv: list[str]) -> int:
    out_dir = argv[1] if len(argv) > 1 else DEFAULT_OUT
    started = time.perf_counter()
    try:
        demo, converged = run_story(out_dir)
    except StoryError as ex:
        print(f"FAILED: {ex}")
        return 1
    elapsed = time.perf_counter() - started
    if not converged:
        print(f"NOT CONVERGED: the three databases differ (files in {demo.out})")
        return 1
    print(f"CONVERGED: laptop, phone and server hold identical todos, notes and conflict records "
          f"({demo.commands} sqlite-utils commands, {elapsed:.1f}s; files in {demo.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
