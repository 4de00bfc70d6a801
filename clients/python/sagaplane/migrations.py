"""Versioned SQL migrations, shared by the coordinator and the SDK.

A *component* is a folder of ``NNNN_name.sql`` files inside a Python package.
Applied versions are recorded per component in ``sagaplane_migrations``; an
advisory lock serialises concurrent migrators (several replicas starting at once).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from psycopg import AsyncConnection

from sagaplane.queries import q

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Any fixed number works; it only has to be the same for every migrator.
_LOCK_KEY = 0x5A6A_0001


@dataclass(frozen=True, kw_only=True)
class Migration:
    """One versioned SQL script."""

    component: str
    """Which set it belongs to, e.g. ``"outbox"`` or ``"coordinator"``."""
    version: int
    """Its number; applied in increasing order, once."""
    name: str
    """The file name's description part."""
    sql: str
    """The script itself."""


def load(package: str, folder: str, component: str) -> list[Migration]:
    """Read the migrations of ``component`` from ``package``/``folder``, ordered by version."""
    found = []
    for entry in resources.files(package).joinpath(folder).iterdir():
        match = _FILE.match(entry.name)
        if match:
            found.append(
                Migration(
                    component=component,
                    version=int(match.group(1)),
                    name=match.group(2),
                    sql=entry.read_text(encoding="utf-8"),
                )
            )
    return sorted(found, key=lambda m: m.version)


def outbox_migrations() -> list[Migration]:
    """The outbox table that every relay reads (coordinator and participants alike)."""
    return load("sagaplane", "sql/outbox", "outbox")


async def apply(conn: AsyncConnection[object], migrations: list[Migration]) -> list[Migration]:
    """Apply the migrations not applied yet; returns those it applied.

    Runs its own transaction on ``conn`` (which must not be inside one) and commits.
    """
    applied: list[Migration] = []
    async with conn.transaction():
        await conn.execute(q("migrations_lock"), (_LOCK_KEY,))
        await conn.execute(q("migrations_table"))
        cur = await conn.execute(q("migrations_applied"))
        done = {(str(row[0]), int(row[1])) async for row in cur}  # type: ignore[index]
        for migration in migrations:
            if (migration.component, migration.version) in done:
                continue
            await conn.execute(migration.sql.encode())
            await conn.execute(
                q("migrations_record"), (migration.component, migration.version, migration.name)
            )
            applied.append(migration)
    return applied
