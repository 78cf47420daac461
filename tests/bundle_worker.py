"""Imports bundles one after another for the fuzz tests, in a process of its own, so that a
crash (a signal) is seen as a crash and not as a failed test in the runner.

Usage: ``python tests/bundle_worker.py SCRATCH_DIR``. Reads one JSON line per bundle on stdin,
``{"bundle": PATH, "db": TEMPLATE_DB}``, imports the bundle into a fresh copy of the template
and answers one JSON line: ``{"outcome": "ok" | "error" | "exception", "reason", "message",
"same", "integrity"}``; ``same`` says whether the copy is byte-identical to the template.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sqlite3
import sys
import traceback

from sqlite_utils_sync import SyncError, import_bundle


def import_one(job: dict, scratch: pathlib.Path) -> dict:
    target = scratch / "target.db"
    shutil.copyfile(job["db"], target)
    before = target.read_bytes()
    conn = sqlite3.connect(target, isolation_level=None)
    try:
        result = import_bundle(conn, job["bundle"])
        out = {"outcome": "ok", "applied": result.applied}
        out["integrity"] = conn.execute("PRAGMA integrity_check").fetchone()[0]
    except SyncError as ex:
        out = {"outcome": "error", "reason": ex.reason, "message": str(ex)}
    except BaseException:  # a bug: reported for the test to show, the run goes on
        out = {"outcome": "exception", "message": traceback.format_exc()[-3000:]}
    finally:
        conn.close()
    out["same"] = target.read_bytes() == before
    return out


def main() -> None:
    scratch = pathlib.Path(sys.argv[1])
    for line in sys.stdin:
        print(json.dumps(import_one(json.loads(line), scratch)), flush=True)


if __name__ == "__main__":
    main()
