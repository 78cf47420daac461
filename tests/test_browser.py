"""The sync pages in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright)
against a real ``datasette serve`` process."""

from __future__ import annotations

import os
import shutil

import pytest
import sqlite_utils

from sqlite_utils_sync import enable_sync, export_bundle, import_bundle, list_conflicts, sync_status

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")


def make_conflicted(tmp_path):
    """todos.db holding one unresolved conflict on column priority_label, made by two devices."""
    paths = [tmp_path / "todos.db", tmp_path / "other.db"]
    dbs = []
    for path in paths:
        db = sqlite_utils.Database(path)
        db["todos"].create({"id": int, "title": str, "priority_label": str}, pk="id")
        enable_sync(db, ["todos"])
        dbs.append(db)
    main, other = dbs
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


def test_sync_pages_in_chromium(tmp_path, datasette_server):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    db_path, device_id, conflict = make_conflicted(tmp_path)
    server = datasette_server([db_path])

    pages = {
        "sync": ("/todos/-/sync", [device_id, "todos"]),
        "operations": ("/todos/-/sync/operations", ["todos", "Water the plants"]),
        "conflicts": ("/todos/-/sync/conflicts", ["priority_label", "urgent-from-laptop", "later-from-phone", conflict["id"]]),
    }
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"),
            executable_path=CHROMIUM,
            headless=True,
            args=ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            for name, (path, expected) in pages.items():
                response = page.goto(server.url + path, wait_until="load")
                assert response is not None and response.status == 200, (path, response and response.status)
                text = page.inner_text("body")
                for needle in expected:
                    assert needle in text, f"{needle!r} not visible on {path}:\n{text[:2000]}"
                screenshot = tmp_path / f"{name}.png"
                page.screenshot(path=str(screenshot), full_page=True)
                data = screenshot.read_bytes()
                assert data.startswith(b"\x89PNG\r\n\x1a\n")
                assert len(data) > 10_000, (name, len(data))
            assert errors == []
        finally:
            context.close()
    if os.environ.get("SYNC_SCREENSHOTS"):
        for name in pages:
            shutil.copy(tmp_path / f"{name}.png", os.path.join(os.environ["SYNC_SCREENSHOTS"], f"{name}.png"))
