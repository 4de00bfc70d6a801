"""The three demo services. Every handler does its business write and records an
effect row in the SDK's local transaction, so both commit (or roll back) with the
inbox row and the reply. The tables have no unique constraints on purpose: a
duplicated effect would stay visible."""

from __future__ import annotations

from typing import Any

from sagaplane import NonRetryableError, Participant, StepContext

PAYMENT_LIMIT = 1000
"""payment.charge fails (non-retryable) for amounts above this."""

SERVICES = ("orders", "inventory", "payment")

SCHEMAS = {
    "orders": """
        CREATE TABLE IF NOT EXISTS shop_orders (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            saga_id text NOT NULL, sku text NOT NULL, qty integer NOT NULL,
            status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
    """,
    "inventory": """
        CREATE TABLE IF NOT EXISTS shop_reservations (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            saga_id text NOT NULL, sku text NOT NULL, qty integer NOT NULL,
            status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
    """,
    "payment": """
        CREATE TABLE IF NOT EXISTS shop_payments (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            saga_id text NOT NULL, amount numeric NOT NULL,
            status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
    """,
}

EFFECTS = """
    CREATE TABLE IF NOT EXISTS shop_effects (
        id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        saga_id text NOT NULL, action text NOT NULL, attempt integer NOT NULL,
        at timestamptz NOT NULL DEFAULT clock_timestamp());
"""


async def _effect(ctx: StepContext) -> None:
    await ctx.tx.execute(
        "INSERT INTO shop_effects (saga_id, action, attempt) VALUES (%s, %s, %s)",
        (ctx.saga_id, ctx.action, ctx.attempt),
    )


def orders(amqp_url: str, database_url: str) -> Participant:
    """The orders service: creates an order, deletes (cancels) it on compensation."""
    p = Participant("orders", amqp_url=amqp_url, database_url=database_url)

    @p.step("orders.create")
    async def create(ctx: StepContext) -> dict[str, Any]:
        sku, qty = str(ctx.input.get("sku", "book")), int(ctx.input.get("qty", 1))
        cur = await ctx.tx.execute(
            "INSERT INTO shop_orders (saga_id, sku, qty, status) VALUES (%s, %s, %s, 'created')"
            " RETURNING id",
            (ctx.saga_id, sku, qty),
        )
        row = await cur.fetchone()
        await _effect(ctx)
        return {"order_id": row[0] if row else None}

    @p.compensation("orders.delete")
    async def delete(ctx: StepContext) -> None:
        await ctx.tx.execute(
            "UPDATE shop_orders SET status = 'cancelled' WHERE saga_id = %s", (ctx.saga_id,)
        )
        await _effect(ctx)

    return p


def inventory(amqp_url: str, database_url: str) -> Participant:
    """The inventory service: reserves stock, releases it on compensation."""
    p = Participant("inventory", amqp_url=amqp_url, database_url=database_url)

    @p.step("inventory.reserve")
    async def reserve(ctx: StepContext) -> dict[str, Any]:
        sku, qty = str(ctx.input.get("sku", "book")), int(ctx.input.get("qty", 1))
        await ctx.tx.execute(
            "INSERT INTO shop_reservations (saga_id, sku, qty, status)"
            " VALUES (%s, %s, %s, 'reserved')",
            (ctx.saga_id, sku, qty),
        )
        await _effect(ctx)
        return {"reserved": qty}

    @p.compensation("inventory.release")
    async def release(ctx: StepContext) -> None:
        await ctx.tx.execute(
            "UPDATE shop_reservations SET status = 'released' WHERE saga_id = %s",
            (ctx.saga_id,),
        )
        await _effect(ctx)

    return p


def payment(amqp_url: str, database_url: str) -> Participant:
    """The payment service: charges, refunds on compensation; refuses big amounts."""
    p = Participant("payment", amqp_url=amqp_url, database_url=database_url)

    @p.step("payment.charge")
    async def charge(ctx: StepContext) -> dict[str, Any]:
        amount = float(ctx.input.get("amount", 0))
        if amount > PAYMENT_LIMIT:
            raise NonRetryableError(f"amount {amount:g} is over the limit of {PAYMENT_LIMIT}")
        await ctx.tx.execute(
            "INSERT INTO shop_payments (saga_id, amount, status) VALUES (%s, %s, 'charged')",
            (ctx.saga_id, amount),
        )
        await _effect(ctx)
        return {"charged": amount}

    @p.compensation("payment.refund")
    async def refund(ctx: StepContext) -> None:
        await ctx.tx.execute(
            "UPDATE shop_payments SET status = 'refunded' WHERE saga_id = %s", (ctx.saga_id,)
        )
        await _effect(ctx)

    return p


BUILDERS = {"orders": orders, "inventory": inventory, "payment": payment}


async def create_tables(service: str, database_url: str) -> None:
    """Create the service's business tables (idempotent)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(SCHEMAS[service].encode())
        await conn.execute(EFFECTS.encode())


def order_steps(*, sku: str = "book", qty: int = 1, amount: float = 42) -> list[dict[str, Any]]:
    """The steps of one order saga, as StartSaga takes them."""
    return [
        {
            "name": "create",
            "action": "orders.create",
            "compensation": "orders.delete",
            "input": {"sku": sku, "qty": qty},
        },
        {
            "name": "reserve",
            "action": "inventory.reserve",
            "compensation": "inventory.release",
            "input": {"sku": sku, "qty": qty},
        },
        {
            "name": "charge",
            "action": "payment.charge",
            "compensation": "payment.refund",
            "input": {"amount": amount},
        },
    ]
