"""Late devices and compaction: a device made from a peer's export (holding others' data, no
edit of its own) or one that writes before its first sync meets copies that compacted their
logs meanwhile. Whatever is accepted must merge as on copies that kept their whole log: copies
holding the same operations hold the same rows and conflicts, and when nothing is refused
every copy converges."""

from __future__ import annotations

import os
import pathlib
import tempfile

from hypothesis import HealthCheck, given, settings, strategies as st

from sqlite_utils_sync import BundleError, compact_log, export_bundle, import_bundle, sync_status

from test_convergence import DONE, ROW_IDS, SCORES, TITLES, TODOS, T_UNIQ, TABLES, assert_table_matches_its_log, do_write, helpers, named_rows, write  # noqa: F401

EXAMPLES = int(os.environ.get("LATE_EXAMPLES", "40"))
join = st.tuples(st.just("join"), st.integers(0, 2), st.booleans())  # from which peer; edit first?
exchange = st.tuples(st.just("sync"), st.integers(0, 3), st.integers(0, 3))
compact = st.tuples(st.just("compact"), st.integers(0, 3), st.booleans())
# The late device's edits: of rows with history (1-3) or of new rows (4-9).
late_new = st.tuples(st.just("write"), st.just(3), st.just("insert"), st.integers(4, 9), ROW_IDS, TITLES, DONE, SCORES, st.just(False))
late_old = st.tuples(
    st.just("write"), st.just(3), st.sampled_from(["update", "move", "delete"]), st.integers(1, 9), ROW_IDS, TITLES, DONE, SCORES, st.just(False)
)
# Edits of the first three that overwrite history, so that compaction has something to remove.
overwrite = st.tuples(
    st.just("write"), st.integers(0, 2), st.just("retitle"), ROW_IDS, ROW_IDS, st.integers(0, 10**6).map(str), DONE, SCORES, st.just(False)
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    before=st.lists(st.one_of(write, exchange, compact), max_size=12),
    joined=join,
    # The late device stays away meanwhile (it may write), the others edit, meet and compact.
    away=st.lists(st.one_of(late_new, late_new, late_old, overwrite, overwrite, overwrite, st.tuples(st.just("sync"), st.integers(0, 2), st.integers(0, 2)), compact), min_size=4, max_size=16),
    after=st.lists(st.one_of(write, late_new, exchange, exchange, compact), max_size=16),
)
def test_late_devices_and_compaction_never_diverge(helpers, before, joined, away, after):
    if not joined[2]:  # the late device makes no edit before its first sync
        away = [step for step in away if step[0] != "write" or step[1] % 4 != 3]
    steps = before + [joined] + away + [("compact", 0, True)] + after
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        schema = f"{TODOS}; {T_UNIQ}"
        devices = [helpers.make_db(folder / f"d{i}.db", schema, TABLES) for i in range(3)]
        for i, conn in enumerate(devices):
            conn.execute("INSERT INTO todos (id, title) VALUES (?, 'hello')", [100 + i])
        devices[0].execute("INSERT INTO todos (id, title) VALUES (1, 'a'), (2, 'b'), (3, 'c')")
        meet(helpers, devices, folder)
        refused = []

        def sync(source, target):
            try:
                helpers.sync(source, target, folder)
            except BundleError as error:
                assert error.reason == "compacted_history", str(error)
                refused.append(str(error))

        for step in steps:
            if step[0] == "join":
                if len(devices) == 3:
                    late = helpers.make_db(folder / "late.db", schema, TABLES)
                    export_bundle(devices[step[1]], folder / "first.bundle")
                    import_bundle(late, folder / "first.bundle")
                    devices.append(late)
            elif step[0] == "write":
                _, d, kind, row_id, other_id, title, done, score, _ = step
                if d % 4 < len(devices):
                    do_write(devices[d % 4], kind, row_id, other_id, title, done, score)
            elif step[0] == "sync":
                s, t = step[1] % len(devices), step[2] % len(devices)
                if s != t:
                    sync(devices[s], devices[t])
            else:
                if step[2]:  # history the first three have seen
                    for _ in range(2):
                        for s in devices[:3]:
                            for t in devices[:3]:
                                if s is not t:
                                    sync(s, t)
                compact_log(devices[step[1] % len(devices)])
        refused.clear()
        for _ in range(3):
            for s in devices:
                for t in devices:
                    if s is not t:
                        sync(s, t)
        by_clock = {}
        for conn in devices:
            assert_table_matches_its_log(conn)
            by_clock.setdefault(repr(sorted(sync_status(conn)["clock"].items())), []).append(conn)
        for same in by_clock.values():
            for other in same[1:]:
                assert named_rows(other) == named_rows(same[0])
                assert helpers.conflict_records(other) == helpers.conflict_records(same[0])
        if not refused[-len(devices) * (len(devices) - 1):]:
            assert len(by_clock) == 1


def meet(helpers, devices, folder):
    for _ in range(2):
        for s in devices:
            for t in devices:
                if s is not t:
                    helpers.sync(s, t, folder)
