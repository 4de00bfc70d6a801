"""The test PostgreSQL: URLs (libpq's PG* variables, or defaults), names, databases."""

from __future__ import annotations

import os
import uuid

from sagaplane import testing


def server_url(dbname: str) -> str:
    """A libpq URL for ``dbname`` on the test server (PGHOST/PGPORT/PGUSER or defaults)."""
    host = os.environ.get("PGHOST", "127.0.0.1")
    port = os.environ.get("PGPORT", "5432")
    user = os.environ.get("PGUSER", "postgres")
    return f"postgresql://{user}@{host}:{port}/{dbname}"


def unique_name(prefix: str) -> str:
    """A name no other test run uses."""
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


async def create_database(name: str, template: str | None = None) -> None:
    """CREATE DATABASE, optionally as a copy of ``template``."""
    await testing.create_database(server_url(name), template=template)


async def drop_database(name: str) -> None:
    """DROP DATABASE, disconnecting whoever is still connected."""
    await testing.drop_database(server_url(name))
