"""The coordinator's schema: the shared outbox, then its own tables."""

from __future__ import annotations

from psycopg import AsyncConnection

from sagaplane import migrations


def coordinator_migrations() -> list[migrations.Migration]:
    """Every migration the coordinator's database needs, in order."""
    return migrations.outbox_migrations() + migrations.load(
        "coordinator.store", "sql", "coordinator"
    )


async def migrate(database_url: str) -> list[migrations.Migration]:
    """Bring the coordinator's database up to date; returns what was applied."""
    async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
        return await migrations.apply(conn, coordinator_migrations())
