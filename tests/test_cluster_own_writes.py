"""A write made on a cluster hub itself commits there first and leaves through its outbox,
so it can clash with a push the stream ordered before it (real nats-server, real hubs)."""

from __future__ import annotations

import sqlite3

import pytest
import sqlite_utils

from nats_cluster import wait_for
from sqlite_utils_sync import export_bundle
from test_cluster_order import cluster_status, missing, nats, table, tags_db, token, two_hubs  # noqa: F401

pytestmark = pytest.mark.skipif(missing() is not None, reason=missing() or "")


def refused(hub) -> list[str]:
    return [r["reason"] for r in cluster_status(hub)["latest_refused"]]


def test_a_hub_write_clashing_with_an_earlier_push(tmp_path, nats, two_hubs):
    a, b = two_hubs()
    # Hub a's write commits while its consumer waits on the lock: the push to b is in the
    # stream first, hub a's outbox message after it.
    writer = sqlite3.connect(a.path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO todos VALUES (1, 'Buy milk', 0)")
    phone = tags_db(tmp_path / "phone.db")
    sqlite_utils.Database(phone)["todos"].insert({"id": 2, "title": "Buy milk", "done": 0})
    export_bundle(sqlite_utils.Database(phone), tmp_path / "phone.bundle")
    answer = b.post("/hub/-/sync/import", content=(tmp_path / "phone.bundle").read_bytes(),
                    headers={"Authorization": f"Bearer {token()}"})
    assert answer.status_code == 200, answer.text
    writer.execute("COMMIT")
    show = lambda: [(cluster_status(h), table(h.path)) for h in (a, b)]  # noqa: E731
    # Hub b refuses hub a's outbox message (the title is taken); hub a refused the push (it
    # held its own row then) and shows that b refused its writes.
    wait_for(lambda: "constraint_failed" in refused(b), what="hub b to refuse hub a's write", show=show)
    wait_for(lambda: any("Hub b refused" in r["message"] for r in cluster_status(a)["latest_refused"]),
             what="hub a to show the refusal", show=show)
    assert table(a.path) == [(1, "Buy milk", 0)] and table(b.path) == [(2, "Buy milk", 0)]

    # Changing the clashing row on hub a sends the refused write again with the change.
    write(a.path, "UPDATE todos SET title = 'Buy oat milk' WHERE id = 1")
    both = [(1, "Buy oat milk", 0), (2, "Buy milk", 0)]
    wait_for(lambda: table(a.path) == table(b.path) == both, what="the hubs to converge", show=show)
    write(a.path, "INSERT INTO todos VALUES (3, 'Later', 0)")
    wait_for(lambda: table(b.path) == [*both, (3, "Later", 0)], what="a later write on a to reach b", show=show)
    assert table(a.path) == table(b.path)
    assert cluster_status(a)["behind"] == cluster_status(b)["behind"] == 0
    # Hub a applied on retry the push it had refused; the line about b's refusal stays.
    assert [r["message"].startswith("Hub b refused") for r in cluster_status(a)["latest_refused"]] == [True]
    page = a.get("/hub/-/sync", headers={"Authorization": f"Bearer {token()}"}).text
    assert "Hub b refused this hub&#39;s own writes" in page or "Hub b refused this hub's own writes" in page


def write(path, sql: str) -> None:
    """Another process writing the hub's file."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute(sql)
    finally:
        conn.close()
