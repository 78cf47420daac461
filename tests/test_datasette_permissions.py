"""Who may see and use the sync pages and endpoints: defaults, grants, tokens, privacy."""

import hashlib
import json

import pytest
import sqlite_utils
from click.testing import CliRunner
from datasette.app import Datasette
from datasette.cli import cli as datasette_cli

from sqlite_utils_sync import list_conflicts

SECRET = "sync-test-secret"
PAGES = ["/-/sync", "/-/sync/operations", "/-/sync/conflicts", "/-/sync/clocks", "/-/sync/imports"]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def make_ds(path, config=None, **kwargs):
    ds = Datasette([str(path)], config=config or {}, secret=SECRET, **kwargs)
    await ds.invoke_startup()
    return ds


def conflict_id(path):
    return list_conflicts(sqlite_utils.Database(path))[0]["id"]


async def test_defaults_view_yes_everything_else_no(conflicted_db):
    ds = await make_ds(conflicted_db)
    before = digest(conflicted_db)
    for page in PAGES:
        assert (await ds.client.get(f"/data{page}")).status_code == 200
        assert (await ds.client.get(f"/data{page}.json")).status_code == 200
    alice = {"id": "alice"}
    for actor in (None, alice):
        export = await ds.client.get("/data/-/sync/export", actor=actor)
        assert export.status_code == 403
        assert export.json() == {"ok": False, "error": "Permission denied: needs sync-export", "reason": "forbidden"}
        bundle = (conflicted_db.parent / "phone-new.bundle").read_bytes()
        assert (await ds.client.post("/data/-/sync/import", content=bundle, actor=actor)).status_code == 403
        resolve = await ds.client.post(
            f"/data/-/sync/conflicts/{conflict_id(conflicted_db)}/resolve", json={"keep": None}, actor=actor
        )
        assert resolve.status_code == 403
    assert "Accept what is in the table now" not in (await ds.client.get("/data/-/sync/conflicts", actor=alice)).text
    assert digest(conflicted_db) == before


async def test_default_deny_needs_a_grant(conflicted_db):
    ds = await make_ds(conflicted_db, default_deny=True)
    for page in PAGES:
        assert (await ds.client.get(f"/data{page}.json")).status_code == 403
    assert "Sync status" not in (await ds.client.get("/data", actor={"id": "alice"})).text

    granted = await make_ds(
        conflicted_db,
        {"databases": {"data": {"permissions": {"view-database": {"id": "alice"}, "sync-view": {"id": "alice"}}}}},
        default_deny=True,
    )
    for page in PAGES:
        assert (await granted.client.get(f"/data{page}.json", actor={"id": "alice"})).status_code == 200
        assert (await granted.client.get(f"/data{page}.json", actor={"id": "bob"})).status_code == 403
    # sync-view alone is not enough: it also requires view-database.
    view_only = await make_ds(
        conflicted_db, {"databases": {"data": {"permissions": {"sync-view": {"id": "alice"}}}}}, default_deny=True
    )
    assert (await view_only.client.get("/data/-/sync.json", actor={"id": "alice"})).status_code == 403


async def test_grants_in_config(conflicted_db):
    config = {
        "databases": {
            "data": {
                "permissions": {
                    "sync-export": {"id": "alice"},
                    "sync-import": {"id": "alice"},
                    "sync-resolve": {"id": ["carol", "dave"]},
                    "insert-row": {"id": "alice"},  # the pushed bundle inserts a row
                    "update-row": {"id": "dave"},  # a resolution writes the row
                }
            }
        }
    }
    ds = await make_ds(conflicted_db, config)
    alice, bob, carol = {"id": "alice"}, {"id": "bob"}, {"id": "carol"}
    assert (await ds.client.get("/data/-/sync/export", actor=alice)).status_code == 200
    assert (await ds.client.get("/data/-/sync/export", actor=bob)).status_code == 403
    bundle = (conflicted_db.parent / "phone-new.bundle").read_bytes()
    assert (await ds.client.post("/data/-/sync/import", content=bundle, actor=bob)).status_code == 403
    response = await ds.client.post("/data/-/sync/import", content=bundle, actor=alice)
    assert response.status_code == 200 and response.json()["applied"] == 1

    # Only a resolver who may update the table's rows sees resolve buttons; the others are told why.
    assert "Accept what is in the table now" not in (await ds.client.get("/data/-/sync/conflicts", actor=alice)).text
    carols = (await ds.client.get("/data/-/sync/conflicts", actor=carol)).text
    assert "Accept what is in the table now" not in carols
    assert "Resolving a conflict also needs update-row on its table" in carols
    daves = (await ds.client.get("/data/-/sync/conflicts", actor={"id": "dave"})).text
    assert "Accept what is in the table now" in daves and "also needs update-row" not in daves
    url = f"/data/-/sync/conflicts/{conflict_id(conflicted_db)}/resolve"
    assert (await ds.client.post(url, json={}, actor=alice)).status_code == 403
    # sync-resolve does not stand in for the row actions a resolution takes.
    refused = await ds.client.post(url, json={}, actor=carol)
    assert (refused.status_code, refused.json()["reason"]) == (403, "table_forbidden")
    assert refused.json()["error"] == (
        f"Permission denied: resolving conflict {conflict_id(conflicted_db)} updates rows of table todos, "
        "which needs update-row on it. Nothing was changed"
    )
    assert (await ds.client.post(url, json={}, actor={"id": "dave"})).json()["ok"] is True


async def test_root_passes_every_check(conflicted_db):
    ds = await make_ds(conflicted_db)
    ds.root_enabled = True
    root = {"id": "root"}
    assert (await ds.client.get("/data/-/sync/export", actor=root)).status_code == 200
    bundle = (conflicted_db.parent / "phone-new.bundle").read_bytes()
    assert (await ds.client.post("/data/-/sync/import?alter=1", content=bundle, actor=root)).status_code == 200
    text = (await ds.client.get("/data/-/sync/conflicts", actor=root)).text
    assert "Accept what is in the table now" in text


async def test_alter_needs_alter_table_too(conflicted_db):
    bundle = (conflicted_db.parent / "phone-new.bundle").read_bytes()
    grants = {"sync-import": {"id": ["alice", "bob"]}, "insert-row": {"id": ["alice", "bob"]}, "alter-table": {"id": "bob"}}
    ds = await make_ds(conflicted_db, {"databases": {"data": {"permissions": grants}}})
    before = digest(conflicted_db)
    response = await ds.client.post("/data/-/sync/import?alter=1", content=bundle, actor={"id": "alice"})
    assert response.status_code == 403
    assert response.json()["error"] == "Permission denied: alter=1 also needs the alter-table permission"
    assert digest(conflicted_db) == before
    response = await ds.client.post("/data/-/sync/import?alter=1", content=bundle, actor={"id": "bob"})
    assert response.status_code == 200


async def test_resolve_hides_conflicts_on_tables_the_actor_cannot_view(conflicted_db):
    config = {
        "databases": {
            "data": {
                "permissions": {"sync-resolve": {"id": ["carol", "admin"]}, "update-row": {"id": ["carol", "admin"]}},
                "tables": {"todos": {"allow": {"id": "admin"}}},
            }
        }
    }
    ds = await make_ds(conflicted_db, config)
    conflict = conflict_id(conflicted_db)
    url = f"/data/-/sync/conflicts/{conflict}/resolve"
    before = digest(conflicted_db)
    carol, unknown = {"id": "carol"}, f"No conflict with id {conflict}"
    # To carol it answers like a conflict that does not exist, and shows no version's values.
    for body in ({}, {"keep": list_conflicts(sqlite_utils.Database(conflicted_db))[0]["versions"][0]["op"]}):
        response = await ds.client.post(url, json=body, actor=carol)
        assert response.status_code == 404
        assert response.json() == {"ok": False, "error": unknown, "reason": "unknown_conflict"}
    form = await ds.client.post(url, data={"keep": ""}, actor=carol, headers={"Sec-Fetch-Site": "same-origin"})
    page = await ds.client.get("/data/-/sync/conflicts", actor=carol, cookies=form.cookies)
    assert unknown in page.text and "milk" not in page.text
    assert digest(conflicted_db) == before
    assert (await ds.client.post(url, json={}, actor={"id": "admin"})).json()["ok"] is True


async def test_private_database_is_private_everywhere(conflicted_db):
    ds = await make_ds(conflicted_db, {"databases": {"data": {"permissions": {"view-database": {"id": "nobody"}}}}})
    ds.root_enabled = True
    before = digest(conflicted_db)
    for page in PAGES:
        for suffix in ("", ".json"):
            response = await ds.client.get(f"/data{page}{suffix}")
            assert response.status_code == 403, page + suffix
            assert "todos" not in response.text
    assert (await ds.client.get("/data/-/sync/export")).status_code == 403
    bundle = (conflicted_db.parent / "phone-new.bundle").read_bytes()
    assert (await ds.client.post("/data/-/sync/import", content=bundle)).status_code == 403
    url = f"/data/-/sync/conflicts/{conflict_id(conflicted_db)}/resolve"
    assert (await ds.client.post(url, json={})).status_code == 403
    assert (await ds.client.post(url, data={"keep": ""})).status_code == 403
    assert digest(conflicted_db) == before
    # The one named actor still gets in.
    assert (await ds.client.get("/data/-/sync.json", actor={"id": "nobody"})).status_code == 200


WRITES = ("insert-row", "update-row", "delete-row")


def create_token(*restrictions):
    args = ["create-token", "alice", "--secret", SECRET]
    for action in restrictions:
        args += ["-d", "data", action]
    result = CliRunner().invoke(datasette_cli, args)
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def tokens():
    # Created outside the event loop: the create-token command runs its own.
    return {
        "recipe": create_token("view-database", "view-table", "sync-view", "sync-export", "sync-import", *WRITES),
        "no_view_database": create_token("view-table", "sync-view", "sync-export", "sync-import", *WRITES),
        "export_only": create_token("view-database", "view-table", "sync-export"),
        "no_tables": create_token("view-database", "sync-view", "sync-export", "sync-import"),
    }


async def test_token_recipe(conflicted_db, tokens):
    """The README recipe: a token restricted to the sync actions on one database, plus
    view-database (restrictions also apply to the actions the sync actions require), and
    the table actions a pull (view-table) and a push (insert-row, ...) are checked against."""
    grants = {action: {"id": "alice"} for action in ("sync-export", "sync-import", *WRITES)}
    config = {"databases": {"data": {"permissions": grants}}}
    ds = await make_ds(conflicted_db, config)
    bundle = (conflicted_db.parent / "phone-new.bundle").read_bytes()

    def auth(name):
        return {"Authorization": f"Bearer {tokens[name]}"}

    # Without the table actions: a pull would withhold every table (a copy of nothing, which
    # would read back as a copy of everything), so it is refused; a push may not insert.
    pulled = await ds.client.get("/data/-/sync/export", headers=auth("no_tables"))
    assert pulled.status_code == 403 and pulled.json()["reason"] == "table_forbidden"
    assert pulled.json()["error"] == (
        "Permission denied: no table of database data may be viewed with these credentials, so there is "
        "nothing to pull; it needs view-table on a table"
    )
    pushed = await ds.client.post("/data/-/sync/import", content=bundle, headers=auth("no_tables"))
    assert pushed.status_code == 403 and pushed.json()["reason"] == "table_forbidden"

    assert (await ds.client.get("/data/-/sync.json", headers=auth("recipe"))).status_code == 200
    assert (await ds.client.get("/data/-/sync/export", headers=auth("recipe"))).status_code == 200
    response = await ds.client.post("/data/-/sync/import", content=bundle, headers=auth("recipe"))
    assert response.status_code == 200 and response.json()["applied"] == 1

    assert (await ds.client.get("/data/-/sync/export", headers=auth("no_view_database"))).status_code == 403
    assert (await ds.client.get("/data/-/sync/export", headers=auth("export_only"))).status_code == 200
    assert (await ds.client.post("/data/-/sync/import", content=bundle, headers=auth("export_only"))).status_code == 403

    bad = await ds.client.get("/data/-/sync/export", headers={"Authorization": "Bearer dstok_bad"})
    assert bad.status_code == 401


async def test_resolve_form_post_and_csrf(conflicted_db):
    grants = {"sync-resolve": {"id": "carol"}, "update-row": {"id": "carol"}}
    ds = await make_ds(conflicted_db, {"databases": {"data": {"permissions": grants}}})
    carol = {"id": "carol"}
    conflict = list_conflicts(sqlite_utils.Database(conflicted_db))[0]
    url = f"/data/-/sync/conflicts/{conflict['id']}/resolve"
    page = (await ds.client.get("/data/-/sync/conflicts", actor=carol)).text
    assert f'action="{url}"' in page and 'name="csrftoken"' in page

    # A cross-site form post carrying the cookie is refused by Datasette's CSRF protection.
    cross_site = await ds.client.post(
        url, data={"keep": conflict["versions"][0]["op"]}, actor=carol, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert cross_site.status_code == 403
    assert list_conflicts(sqlite_utils.Database(conflicted_db))[0]["id"] == conflict["id"]

    keep = next(v for v in conflict["versions"] if v["values"]["title"] == "Buy oat milk")["op"]
    response = await ds.client.post(url, data={"keep": keep}, actor=carol, headers={"Sec-Fetch-Site": "same-origin"})
    assert response.status_code == 302
    assert response.headers["location"] == "/data/-/sync/conflicts"
    assert list_conflicts(sqlite_utils.Database(conflicted_db)) == []
    assert sqlite_utils.Database(conflicted_db)["todos"].get(1)["title"] == "Buy oat milk"
    after = await ds.client.get("/data/-/sync/conflicts", actor=carol, cookies=response.cookies)
    assert f"Resolved conflict {conflict['id']}" in after.text
