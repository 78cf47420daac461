"""The sync pages of a hub many devices have pushed to: every device a hub imports from is
also a peer, so a page listing peers against devices grows with their square unless it pages
them. Each page answers with a bounded number of rows and cells, and pages through them all."""

import re
import shutil
import sqlite3

import pytest
import sqlite_utils
from datasette.app import Datasette

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, new_device

DEVICES = 300  # three times the clocks page's largest page (100)
FULL_PEERS = 3  # peers that acknowledged every device: their clocks are as long as the hub's


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """``hub.db``, which imported one small bundle from each of DEVICES devices, then one from
    each of FULL_PEERS copies that had pulled everything."""
    folder = tmp_path_factory.mktemp("many")
    hub = sqlite_utils.Database(folder / "hub.db")
    hub["t"].create({"id": int, "v": str}, pk="id")
    enable_sync(hub, ["t"])
    hub["t"].insert({"id": 0, "v": "hub"})
    export_bundle(hub, folder / "base.bundle")
    import_bundle(sqlite_utils.Database(folder / "base.db"), folder / "base.bundle")
    for i in range(DEVICES + FULL_PEERS):
        shutil.copy(folder / "base.db", folder / "device.db")
        device = sqlite_utils.Database(folder / "device.db")
        new_device(device)
        if i >= DEVICES:
            export_bundle(hub, folder / "full.bundle")
            import_bundle(device, folder / "full.bundle")
        device["t"].insert({"id": i + 1, "v": f"device {i}"})
        export_bundle(device, folder / "device.bundle")
        device.close()
        import_bundle(hub, folder / "device.bundle")
    hub.close()
    return folder / "hub.db"


def listed(path, sql):
    conn = sqlite3.connect(path)
    try:
        return [row[0] for row in conn.execute(sql)]
    finally:
        conn.close()


async def test_clocks_json_pages_devices_and_peers_and_keeps_each_answer_small(hub):
    ds = Datasette([str(hub)])
    devices = listed(hub, "SELECT device_id FROM _sync_devices ORDER BY idx DESC")
    peers = listed(hub, "SELECT device_id FROM _sync_peers ORDER BY last_seen DESC, device_id")
    assert len(devices) > DEVICES + FULL_PEERS and len(peers) == DEVICES + FULL_PEERS

    first = (await ds.client.get("/hub/-/sync/clocks.json")).json()
    assert len(first["devices"]) == 50 and len(first["peers"]) == 50
    assert first["devices"][0]["local"] and first["next"] and first["peers_next"]
    # A peer's clock names only the devices of the page: at most 50 x 50 entries in all.
    shown = {device["device_id"] for device in first["devices"]}
    assert all(set(peer["clock"]) <= shown for peer in first["peers"])
    assert sum(len(peer["clock"]) for peer in first["peers"]) <= 50 * 50
    assert any(len(peer["clock"]) == 50 for peer in first["peers"])  # the full peers, cut to the page

    # _size goes up to 100 on this page; next pages through every device, then stops.
    seen, url = [], "/hub/-/sync/clocks.json?_size=1000"
    while url:
        page = (await ds.client.get(url)).json()
        assert len(page["devices"]) <= 100 and len(page["peers"]) <= 100
        seen += [device["device_id"] for device in page["devices"]]
        url = page["next"] and f"/hub/-/sync/clocks.json?_size=1000&next={page['next']}"
    assert seen == devices
    # peers_next pages through every peer, most recently seen first.
    seen, url = [], "/hub/-/sync/clocks.json?_size=40"
    while url:
        page = (await ds.client.get(url)).json()
        seen += [peer["device_id"] for peer in page["peers"]]
        url = page["peers_next"] and f"/hub/-/sync/clocks.json?_size=40&peers_next={page['peers_next']}"
    assert seen == peers
    assert (await ds.client.get("/hub/-/sync/clocks.json?next=nosuchdevice")).status_code == 400


async def test_clocks_page_draws_one_page_of_devices_against_one_page_of_peers(hub):
    ds = Datasette([str(hub)])
    html = (await ds.client.get("/hub/-/sync/clocks")).text
    matrix = html[html.index("What each peer has acknowledged") :]
    assert matrix.count('<th class="sync-device"') == 50
    assert matrix.count("<tr>") == 1 + 50 + 1  # header, 50 peers, this database
    assert matrix.count("<td") <= 52 * 52
    assert f"(50 of {DEVICES + FULL_PEERS} peers)" in re.sub(r"\s+", " ", matrix)
    next_devices = re.search(r'<a href="([^"]+)">Next devices</a>', html).group(1).replace("&amp;", "&")
    more_peers = re.search(r'<a href="([^"]+)">More peers</a>', html).group(1).replace("&amp;", "&")
    second = (await ds.client.get(next_devices)).text
    assert second.count('<th class="sync-device"') == 50 and "Back to the first devices and peers" in second
    assert (await ds.client.get(more_peers)).status_code == 200


async def test_overview_lists_a_few_peers_and_clock_entries_and_points_to_the_clocks_page(hub):
    ds = Datasette([str(hub)])
    held = len(listed(hub, "SELECT device_id FROM _sync_devices"))
    html = (await ds.client.get("/hub/-/sync")).text
    clock = html[html.index("<h2>Vector clock</h2>") : html.index("<h2>Peers</h2>")]
    peers = html[html.index("<h2>Peers</h2>") : html.index("<h2>Latest operations</h2>")]
    assert clock.count("<tr><td") == 20
    assert f"{held - 20} more — see" in clock and 'href="/hub/-/sync/clocks"' in clock
    assert peers.count("<tr>\n") == 10  # the header row is <thead><tr>
    assert f"{DEVICES + FULL_PEERS - 10} more — see" in peers
    # The full peers synced last: listed first, each with 20 devices of its clock.
    assert f"and {held - 20} more" in peers
    assert len(html) < 200_000
    # The JSON twin stays sync-status: the whole clock.
    assert len((await ds.client.get("/hub/-/sync.json")).json()["clock"]) == held
