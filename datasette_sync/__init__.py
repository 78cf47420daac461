"""Datasette plugin: sync views and bundle endpoints (hook implementations only)."""
