"""The coordinator's PostgreSQL connection pool."""

from __future__ import annotations

from typing import Any

from psycopg import AsyncConnection
from psycopg_pool import AsyncConnectionPool


async def open_pool(
    database_url: str, *, size: int, connect_timeout: float = 10.0
) -> AsyncConnectionPool[AsyncConnection[Any]]:
    """Open a pool of ``size`` connections and wait until the first one works.

    A request that cannot get a connection within ``connect_timeout`` seconds fails with
    UNAVAILABLE instead of queueing forever.
    """
    pool: AsyncConnectionPool[AsyncConnection[Any]] = AsyncConnectionPool(
        database_url,
        min_size=size,
        max_size=size,
        timeout=connect_timeout,
        open=False,
        name="sagaplane-coordinator",
        # The store sends BEGIN itself, batched with its first statements (see
        # sagaplane.batch); reads then need no transaction at all.
        kwargs={"autocommit": True},
    )
    await pool.open(wait=True, timeout=connect_timeout)
    return pool
