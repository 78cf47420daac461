from setuptools import setup

setup(
    name="datasette-sync",
    description="Offline-first sync for SQLite databases: sqlite-utils commands and a Datasette hub",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    version="0.1",
    license="Apache License, Version 2.0",
    packages=["sqlite_utils_sync", "datasette_sync"],
    package_data={"datasette_sync": ["templates/*.html"]},
    entry_points={
        "sqlite_utils": ["sync = sqlite_utils_sync.cli"],
        "datasette": ["sync = datasette_sync"],
    },
    install_requires=["sqlite-utils>=4", "msgpack>=1.0", "zstandard>=0.19", "httpx", "datasette>=1.0a41"],
    extras_require={
        "test": ["pytest", "pytest-asyncio", "pytest-xdist", "hypothesis", "playwright", "wheel", "nats-py"],
        # Cluster mode (several hubs sharing bundles through NATS JetStream).
        "cluster": ["nats-py"],
    },
    python_requires=">=3.10",
)
