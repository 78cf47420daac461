"""The sync pages in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
against a real ``datasette serve`` process."""

from __future__ import annotations

import os
import shutil

import pytest
import sqlite_utils

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, list_conflicts, set_device_name, sync_status

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")


def make_conflicted(tmp_path):
    """todos.db holding one unresolved conflict on column priority_label, made by two devices
    named laptop (todos.db) and phone."""
    paths = [tmp_path / "todos.db", tmp_path / "other.db"]
    dbs = []
    for path in paths:
        db = sqlite_utils.Database(path)
        db["todos"].create({"id": int, "title": str, "priority_label": str}, pk="id")
        enable_sync(db, ["todos"])
        dbs.append(db)
    main, other = dbs
    set_device_name(main, "laptop")
    set_device_name(other, "phone")
    main["todos"].insert_all([{"id": 1, "title": "Water the plants", "priority_label": "normal"}, {"id": 2, "title": "Call mum", "priority_label": "normal"}])
    export_bundle(main, tmp_path / "1.bundle", since=sync_status(other)["clock"])
    import_bundle(other, tmp_path / "1.bundle")
    main["todos"].update(1, {"priority_label": "urgent-from-laptop"})
    other["todos"].update(1, {"priority_label": "later-from-phone"})
    export_bundle(other, tmp_path / "2.bundle", since=sync_status(main)["clock"])
    import_bundle(main, tmp_path / "2.bundle")
    conflicts = list_conflicts(main)
    assert len(conflicts) == 1 and conflicts[0]["columns"] == ["priority_label"]
    return paths[0], sync_status(main)["device_id"], conflicts[0]


WIDTHS = {"desktop": 1280, "phone": 390}

# What a visible tick label, bar count or conflict mark of the activity chart looks like on
# screen: its text, font size and box. Overlapping labels would be unreadable.
CHART_GEOMETRY = """() => {
    const box = (el) => { const r = el.getBoundingClientRect(); return {left: r.left, right: r.right}; };
    const shown = (selector) => [...document.querySelectorAll(selector)].filter((el) => el.offsetParent !== null);
    return {
        ticks: shown(".sync-tick").map((el) => ({text: el.innerText, ...box(el)})),
        counts: shown(".sync-bar-count").map((el) => ({text: el.innerText, size: parseFloat(getComputedStyle(el).fontSize)})),
        marks: shown(".sync-bar-mark").map((el) => el.innerText),
        rows: shown(".sync-activity-device").map((el) => el.innerText.replace(/\\s+/g, " ").trim()),
    };
}"""


def test_sync_pages_in_chromium(tmp_path, datasette_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    db_path, device_id, conflict = make_conflicted(tmp_path)
    other_id = next(v["device_id"] for v in conflict["versions"] if v["device_id"] != device_id)
    server = datasette_server([db_path])

    laptop, phone = f"laptop ({device_id[:8]})", f"phone ({other_id[:8]})"
    pages = {
        "sync": ("/todos/-/sync", [device_id, f"{laptop} this database", "3 edits, 1 in", phone, "1 edit, 1 in"]),
        "operations": ("/todos/-/sync/operations", ["todos", "Water the plants", "Row primary key"]),
        "conflicts": (
            "/todos/-/sync/conflicts",
            [conflict["id"], "urgent-from-laptop", "later-from-phone", "Resolving needs the sync-resolve permission"],
        ),
        "database": ("/todos", ["Synced with other devices: 1 table (todos)", "1 unresolved conflict: todos 1."]),
        "table": ("/todos/todos", ["This table is synced", "1 unresolved conflict on rows of this table."]),
        "row": ("/todos/todos/1", ["in an unresolved conflict: priority_label differs", f"update by {phone}"]),
    }
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": WIDTHS["desktop"], "height": 900},
        )
        try:
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            for width_name, width in WIDTHS.items():
                page.set_viewport_size({"width": width, "height": 900})
                for name, (path, expected) in pages.items():
                    response = page.goto(server.url + path, wait_until="load")
                    assert response is not None and response.status == 200, (path, response and response.status)
                    text = " ".join(page.inner_text("body").split())
                    for needle in expected:
                        assert needle in text, f"{needle!r} not visible on {path} at {width} px:\n{text[:3000]}"
                    scroll_width, inner_width = page.evaluate("[document.documentElement.scrollWidth, innerWidth]")
                    assert scroll_width <= inner_width, f"{path} overflows sideways at {width} px: {scroll_width}"
                    if name == "sync":
                        check_chart(page.evaluate(CHART_GEOMETRY), device_id, other_id, width)
                    screenshot = tmp_path / f"{name}-{width_name}.png"
                    page.screenshot(path=str(screenshot), full_page=True)
                    data = screenshot.read_bytes()
                    assert data.startswith(b"\x89PNG\r\n\x1a\n")
                    assert len(data) > 10_000, (name, len(data))
            assert errors == []
        finally:
            context.close()
    if os.environ.get("SYNC_SCREENSHOTS"):
        for png in tmp_path.glob("*.png"):
            shutil.copy(png, os.path.join(os.environ["SYNC_SCREENSHOTS"], png.name))


def check_chart(chart, device_id, other_id, width):
    """Devices by label, every count printed in a readable size, the conflict marked on each
    device's bar, and time labels that neither repeat nor overlap."""
    assert chart["rows"] == [
        f"laptop ({device_id[:8]}) this database 3 edits, 1 in conflict",
        f"phone ({other_id[:8]}) 1 edit, 1 in conflict",
    ]
    assert sum(int(count["text"]) for count in chart["counts"]) == 4, chart
    assert all(count["size"] >= 11 for count in chart["counts"]), chart
    assert chart["marks"] == ["\u26a01", "\u26a01"], chart
    ticks = chart["ticks"]
    assert len(ticks) >= 2 and len({tick["text"] for tick in ticks}) == len(ticks), ticks
    for before, after in zip(ticks, ticks[1:]):
        assert before["right"] <= after["left"], (width, ticks)
    assert ticks[0]["left"] >= 0 and ticks[-1]["right"] <= width, (width, ticks)


def test_an_open_page_polls_a_hub_that_does_not_hold_requests_every_few_seconds(tmp_path, datasette_server):
    # max_wait 0: the changes endpoint answers at once. The page's script must not ask again
    # at once (it asked over 100 times a second).
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    db_path, _, _ = make_conflicted(tmp_path)
    server = datasette_server([db_path], {"plugins": {"datasette-sync": {"max_wait": 0}}})
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=ARGS
        )
        try:
            page = context.new_page()
            asked = []
            page.on("request", lambda request: "/-/sync/changes" in request.url and asked.append(request.url))
            page.goto(server.url + "/todos/-/sync/operations", wait_until="load")
            page.wait_for_timeout(6000)
            assert 1 <= len(asked) <= 3, len(asked)
        finally:
            context.close()
