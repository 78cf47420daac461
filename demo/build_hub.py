#!/usr/bin/env python3
"""Build ``demo/hub.db``: the server of ``story.py`` as a hub to browse with Datasette.

    python demo/build_hub.py [OUTPUT]        # default: demo/hub.db
    datasette demo/hub.db -m demo/metadata.yml

It plays the story (laptop, phone and server editing offline and syncing through the server)
in a scratch directory, but the laptop resolves only the todo conflict: the hub ends up with
operations from three devices, their clocks and import log, one resolved conflict and one
unresolved one (the note the phone deleted while the laptop edited it).
"""

from __future__ import annotations

import os
import sqlite3
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from story import StoryError, run_story

DEFAULT_OUTPUT = os.path.join(HERE, "hub.db")


def build_hub(output: str, echo=lambda line: None) -> dict:
    """Play the story and copy the server's database to ``output``; returns a summary."""
    output = os.path.abspath(output)
    with tempfile.TemporaryDirectory(prefix="datasette-sync-demo-") as scratch:
        demo, converged = run_story(os.path.join(scratch, "devices"), resolve_note=False, echo=echo)
        if not converged:
            raise StoryError("the devices did not converge")
        for suffix in ("", "-wal", "-shm", "-journal"):
            if os.path.exists(output + suffix):
                os.remove(output + suffix)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        source, target = sqlite3.connect(demo.path("server")), sqlite3.connect(output)
        source.backup(target)
        source.close()
        # One self-contained file: no -wal/-shm next to it, compact.
        target.execute("PRAGMA journal_mode = DELETE")
        target.execute("VACUUM")
        summary = {
            "devices": target.execute(
                "SELECT count(DISTINCT op >> 40) FROM _sync_ops WHERE kind & 3 != 3 AND tid != 0"
            ).fetchone()[0],
            "operations": target.execute("SELECT count(*) FROM _sync_ops WHERE op & ((1 << 40) - 1) != 0").fetchone()[0],
            "unresolved": target.execute("SELECT count(*) FROM _sync_conflicts WHERE resolved_by IS NULL").fetchone()[0],
            "resolved": target.execute("SELECT count(*) FROM _sync_conflicts WHERE resolved_by IS NOT NULL").fetchone()[0],
        }
        target.close()
    return summary


def shown(path: str) -> str:
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def main(argv: list[str]) -> int:
    output = argv[1] if len(argv) > 1 else DEFAULT_OUTPUT
    try:
        summary = build_hub(output)
    except StoryError as ex:
        print(f"FAILED: {ex}")
        return 1
    print(
        f"Wrote {output}: {summary['operations']} operations from {summary['devices']} devices, "
        f"{summary['resolved']} resolved and {summary['unresolved']} unresolved conflict(s)"
    )
    print(f"Browse it: datasette {shown(output)} -m {shown(os.path.join(HERE, 'metadata.yml'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
