"""Publish readiness, offline: ``datasette publish heroku --generate-dir`` with a stub ``heroku``,
then the generated app's own commands run against the generated files (immutable database)."""

from __future__ import annotations

import json
import pathlib
import shlex
import shutil
import sys
import subprocess
import stat

import pytest
import yaml


ROOT = pathlib.Path(__file__).resolve().parent.parent
DEMO_METADATA = ROOT / "demo" / "metadata.yml"
BUILD_HUB = ROOT / "demo" / "build_hub.py"

STUB_HEROKU = """#!/bin/sh
# Stub of the Heroku CLI: 'heroku plugins' must list heroku-builds; nothing else may run.
if [ "$1" = "plugins" ]; then
    echo "heroku-builds 0.0.0"
    exit 0
fi
echo "stub heroku: unexpected call: $*" >&2
exit 1
"""


def test_publish_heroku_generate_dir_then_serve_immutable(tmp_path, clean_env, make_todos_db, run):
    db_path = tmp_path / "hub.db"
    if DEMO_METADATA.exists() and BUILD_HUB.exists():
        # Publish the demo hub, built fresh the way the README says.
        subprocess.run([sys.executable, str(BUILD_HUB), str(db_path)], check=True, capture_output=True)
        metadata_path = DEMO_METADATA
    else:
        make_todos_db(db_path, [{"id": 1, "title": "Published", "done": 0}])
        metadata_path = tmp_path / "metadata.yml"
        metadata_path.write_text(
            "title: Synced todos\n"
            "description: A datasette-sync hub, published read-only\n"
            "databases:\n"
            "  hub:\n"
            "    tables:\n"
            "      todos:\n"
            "        description: Todos synced from devices\n"
        )
    device_id = json.loads(run(["sqlite-utils", "sync-status", db_path, "--json"]).stdout)["device_id"]
    assert device_id
    expected_metadata = yaml.safe_load(metadata_path.read_text())

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    heroku = bin_dir / "heroku"
    heroku.write_text(STUB_HEROKU)
    heroku.chmod(heroku.stat().st_mode | stat.S_IEXEC)
    env = clean_env()
    env["PATH"] = f"{bin_dir}:{env['PATH']}"

    out = tmp_path / "generated"
    result = run(
        [
            "datasette", "publish", "heroku", db_path,
            "--generate-dir", out,
            "--install", "datasette-sync",
            "-m", metadata_path,
        ],
        env=env,
        cwd=tmp_path,
    )
    assert f"Generated files written to {out}" in result.stderr

    # The app installs datasette (1.0 alpha resolution is pip's job) and this plugin.
    requirements = (out / "requirements.txt").read_text().split()
    assert requirements == ["datasette", "datasette-sync"]
    # The metadata travels as-is, and the database file itself (sync log included).
    assert json.loads((out / "metadata.json").read_text()) == expected_metadata
    assert (out / "hub.db").read_bytes() == db_path.read_bytes()
    procfile = (out / "Procfile").read_text()
    assert procfile.startswith("web: datasette serve")
    command = shlex.split(procfile[len("web:"):])
    assert "-i" in command and command[command.index("-i") + 1] == "hub.db"
    assert command[command.index("--metadata") + 1] == "metadata.json"

    # Run the app as the platform would: post_compile, then the Procfile command, but with
    # --get instead of binding a port.
    post_compile = shlex.split((out / "bin" / "post_compile").read_text())
    run(post_compile, env=env, cwd=out)
    serve = [arg.replace("$PORT", "8001") for arg in command]
    result = run([*serve, "--get", "/hub/-/sync.json"], env=env, cwd=out, check=False)
    assert result.returncode == 0, result
    status = json.loads(result.stdout)
    assert status["enabled"] is True
    assert status["device_id"] == device_id
    assert "todos" in json.dumps(status)
    # Serving immutably must not have written to the file.
    assert (out / "hub.db").read_bytes() == db_path.read_bytes()

    # The plain form from the brief, straight on the source files.
    result = run(
        ["datasette", "serve", "-i", db_path, "-m", metadata_path, "--get", "/hub/-/sync.json"],
        env=env,
        check=False,
    )
    assert result.returncode == 0, result
    assert json.loads(result.stdout)["device_id"] == device_id
    # An HTML page of the published app renders too.
    result = run(["datasette", "serve", "-i", db_path, "-m", metadata_path, "--get", "/hub/-/sync"], env=env, check=False)
    assert result.returncode == 0, result
    assert device_id in result.stdout
    result = run(["datasette", "serve", "-i", db_path, "-m", metadata_path, "--get", "/"], env=env)
    assert expected_metadata["title"] in result.stdout


def wheel_builder_available() -> bool:
    """An offline wheel build needs setuptools' bdist_wheel (setuptools >= 70.1, or the wheel package)."""
    import importlib.util

    import setuptools

    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def test_publish_with_a_wheel_serves_the_plugin_from_that_wheel(tmp_path, clean_env, make_todos_db, run):
    """README "Publishing", the recipe that works before the package is on an index: build a
    wheel, ship it with ``--static dist:dist`` and install it with ``--install dist/<wheel>``."""
    if not wheel_builder_available():
        pytest.skip("building a wheel offline needs setuptools >= 70.1 or the wheel package (pip install wheel)")
    # Build from a copy of the source, as a checkout would (no build/ or egg-info left here).
    source = tmp_path / "checkout"
    source.mkdir()
    for name in ("setup.py", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("sqlite_utils_sync", "datasette_sync"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    build = [sys.executable, "-m", "pip", "wheel", ".", "-w", "dist", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run(build, cwd=source, check=True, capture_output=True, timeout=120)
    [wheel] = (source / "dist").glob("datasette_sync-*-py3-none-any.whl")

    make_todos_db(source / "hub.db", [{"id": 1, "title": "From the wheel", "done": 0}])
    env = clean_env()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "heroku").write_text(STUB_HEROKU)
    (bin_dir / "heroku").chmod(0o755)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    out = tmp_path / "generated"
    run(
        [
            "datasette", "publish", "heroku", "hub.db", "--generate-dir", out,
            "--static", "dist:dist", "--install", f"dist/{wheel.name}",
        ],
        env=env,
        cwd=source,
    )
    assert (out / "requirements.txt").read_text().split() == ["datasette", f"dist/{wheel.name}"]
    assert (out / "dist" / wheel.name).read_bytes() == wheel.read_bytes()
    procfile = (out / "Procfile").read_text()
    assert "--static dist:dist" in procfile

    # Install the requirements as the platform would, from the generated directory (relative
    # paths resolve there), into a directory of their own; datasette itself is already here.
    site = tmp_path / "site"
    wheels = [line for line in (out / "requirements.txt").read_text().split() if line != "datasette"]
    pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(site), *wheels]
    subprocess.run(pip, cwd=out, check=True, capture_output=True, timeout=120)
    served = {**env, "PYTHONPATH": str(site)}  # this checkout is not on the path: only the wheel is
    where = subprocess.run(
        [sys.executable, "-c", "import datasette_sync as d, sqlite_utils_sync as s; print(d.__file__, s.__file__)"],
        env=served, capture_output=True, text=True, check=True, cwd=out,
    ).stdout.split()
    assert all(path.startswith(str(site)) for path in where), where

    post_compile = shlex.split((out / "bin" / "post_compile").read_text())
    run(post_compile, env=served, cwd=out)
    command = [arg.replace("$PORT", "8001") for arg in shlex.split(procfile[len("web:"):])]
    assert command[command.index("-i") + 1] == "hub.db"
    before = (out / "hub.db").read_bytes()
    page = run([*command, "--get", "/hub/-/sync"], env=served, cwd=out)
    assert "Sync status: hub" in page.stdout and "1 edit by 1 device" in page.stdout  # the wheel's templates
    plugins = json.loads(run([*command, "--get", "/-/plugins.json"], env=served, cwd=out).stdout)
    assert "datasette-sync" in [plugin["name"] for plugin in plugins]
    assert (out / "hub.db").read_bytes() == before  # served immutable
