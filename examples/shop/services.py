"""The demo services. Every handler does its business write and records an effect row
in the SDK's local transaction, so both commit (or roll back) with the inbox row and the
reply. The tables have no unique constraints on purpose: a duplicated effect would stay
visible.

Two handlers announce what they did as domain events, in the same transaction
(``ctx.emit``): ``orders.create`` emits ``order.created`` and ``payment.charge`` emits
``payment.charged``. The fifth service, ``notifications``, runs no saga step: it
consumes those events (``on_event``) and records (and logs) a notification for each,
once per event however often it is delivered.

The shop's order saga (:func:`order_steps`) is a graph::

                ┌─> reserve ──> gift_wrap? ─┐
      create ───┤                           ├──> charge
                └─> validate_address ───────┘

``charge`` takes the order id from ``create``'s output by reference, and ``gift_wrap``
runs only when the saga's context says ``gift: true``. :func:`line_order_steps` is the
same order as a plain line of three steps.
"""

from __future__ import annotations

import logging
from typing import Any

from sagaplane import EventContext, NonRetryableError, Participant, StepContext

log = logging.getLogger("examples.shop.notifications")

PAYMENT_LIMIT = 1000
"""payment.charge fails (non-retryable) for amounts above this."""

SERVICES = ("orders", "inventory", "fulfillment", "payment", "notifications")

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
    "fulfillment": """
        CREATE TABLE IF NOT EXISTS shop_addresses (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            saga_id text NOT NULL, order_id bigint, address text NOT NULL,
            status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
        CREATE TABLE IF NOT EXISTS shop_gift_wraps (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            saga_id text NOT NULL, order_id bigint, status text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now());
    """,
    "payment": """
        CREATE TABLE IF NOT EXISTS shop_payments (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            saga_id text NOT NULL, order_id bigint, amount numeric NOT NULL,
            status text NOT NULL, created_at timestamptz NOT NULL DEFAULT now());
        -- A database of an earlier demo (docker compose keeps its volume) lacks it.
        ALTER TABLE shop_payments ADD COLUMN IF NOT EXISTS order_id bigint;
    """,
    "notifications": """
        CREATE TABLE IF NOT EXISTS shop_notifications (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id text NOT NULL, type text NOT NULL, saga_id text, text text NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now());
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
        order_id = row[0] if row else None
        await _effect(ctx)
        # Published once this step's outcome commits; never if the transaction rolls back.
        await ctx.emit(
            "order.created",
            {"order_id": order_id, "saga_id": ctx.saga_id, "sku": sku, "qty": qty},
            subject=str(order_id),
        )
        return {"order_id": order_id}

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


def fulfillment(amqp_url: str, database_url: str) -> Participant:
    """The fulfillment service: checks the address (nothing to undo) and gift-wraps the
    order (unwrapped on compensation).

    Not "shipping": that service is the Node.js participant of examples/node-participant,
    and two services must not share a queue."""
    p = Participant("fulfillment", amqp_url=amqp_url, database_url=database_url)

    @p.step("fulfillment.validate_address")
    async def validate_address(ctx: StepContext) -> dict[str, Any]:
        address = str(ctx.input.get("address", "")).strip()
        if not address:
            raise NonRetryableError("no address to ship to")
        await ctx.tx.execute(
            "INSERT INTO shop_addresses (saga_id, order_id, address, status)"
            " VALUES (%s, %s, %s, 'valid')",
            (ctx.saga_id, _order_id(ctx), address),
        )
        await _effect(ctx)
        return {"address": address}

    @p.step("fulfillment.gift_wrap")
    async def gift_wrap(ctx: StepContext) -> dict[str, Any]:
        await ctx.tx.execute(
            "INSERT INTO shop_gift_wraps (saga_id, order_id, status) VALUES (%s, %s, 'wrapped')",
            (ctx.saga_id, _order_id(ctx)),
        )
        await _effect(ctx)
        return {"wrapped": True}

    @p.compensation("fulfillment.unwrap")
    async def unwrap(ctx: StepContext) -> None:
        await ctx.tx.execute(
            "UPDATE shop_gift_wraps SET status = 'unwrapped' WHERE saga_id = %s", (ctx.saga_id,)
        )
        await _effect(ctx)

    return p


def _order_id(ctx: StepContext) -> int | None:
    """The order id the step's input was given (by reference to create's output)."""
    value = ctx.input.get("order_id")
    return None if value is None else int(value)


def payment(amqp_url: str, database_url: str) -> Participant:
    """The payment service: charges, refunds on compensation; refuses big amounts."""
    p = Participant("payment", amqp_url=amqp_url, database_url=database_url)

    @p.step("payment.charge")
    async def charge(ctx: StepContext) -> dict[str, Any]:
        amount = float(ctx.input.get("amount", 0))
        if amount > PAYMENT_LIMIT:
            raise NonRetryableError(f"amount {amount:g} is over the limit of {PAYMENT_LIMIT}")
        await ctx.tx.execute(
            "INSERT INTO shop_payments (saga_id, order_id, amount, status)"
            " VALUES (%s, %s, %s, 'charged')",
            (ctx.saga_id, _order_id(ctx), amount),
        )
        await _effect(ctx)
        await ctx.emit(
            "payment.charged",
            {"order_id": _order_id(ctx), "saga_id": ctx.saga_id, "amount": amount},
            subject=str(_order_id(ctx)),
        )
        return {"charged": amount}

    @p.compensation("payment.refund")
    async def refund(ctx: StepContext) -> None:
        await ctx.tx.execute(
            "UPDATE shop_payments SET status = 'refunded' WHERE saga_id = %s", (ctx.saga_id,)
        )
        await _effect(ctx)

    return p


def notifications(amqp_url: str, database_url: str) -> Participant:
    """The notifications service: tells the customer about new orders and payments, from
    the events the other services emit. Each event is recorded once in
    ``shop_notifications`` (the SDK's event inbox drops redeliveries)."""
    p = Participant("notifications", amqp_url=amqp_url, database_url=database_url)

    @p.on_event("order.created")
    @p.on_event("payment.charged")
    async def notify(ctx: EventContext) -> None:
        event, data = ctx.event, ctx.event.data or {}
        if event.type == "order.created":
            text = f"order {data.get('order_id')} received: {data.get('qty')} x {data.get('sku')}"
        else:
            text = f"payment of {data.get('amount')} taken for order {data.get('order_id')}"
        await ctx.tx.execute(
            "INSERT INTO shop_notifications (event_id, type, saga_id, text)"
            " VALUES (%s, %s, %s, %s)",
            (event.id, event.type, data.get("saga_id"), text),
        )
        log.info("notification: %s (event %s from %s)", text, event.id, event.source)

    return p


BUILDERS = {
    "orders": orders,
    "inventory": inventory,
    "fulfillment": fulfillment,
    "payment": payment,
    "notifications": notifications,
}


async def create_tables(service: str, database_url: str) -> None:
    """Create the service's business tables (idempotent)."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(SCHEMAS[service].encode())
        await conn.execute(EFFECTS.encode())


ORDER_ID = "${steps.create.output.order_id}"
"""A reference the coordinator replaces, at dispatch, by the id ``create`` returned."""


def order_steps(
    *, sku: str = "book", qty: int = 1, amount: float = 42, address: str = "1 Main St"
) -> list[dict[str, Any]]:
    """The steps of one order saga, as StartSaga takes them: the graph in this module's
    docstring. Its context must say ``gift`` (:func:`order_context`)."""
    create, reserve, charge = line_order_steps(sku=sku, qty=qty, amount=amount)
    return [
        create,
        reserve,  # after create: the step before it
        {
            "name": "validate_address",
            "action": "fulfillment.validate_address",
            "depends_on": ["create"],  # beside reserve, not after it
            "input": {"address": address, "order_id": ORDER_ID},
        },
        {
            "name": "gift_wrap",
            "action": "fulfillment.gift_wrap",
            "compensation": "fulfillment.unwrap",
            "depends_on": ["reserve"],
            "when": "context.gift == true",
            "input": {"order_id": ORDER_ID},
        },
        {
            **charge,
            "depends_on": ["reserve", "validate_address", "gift_wrap"],
            "input": {**charge["input"], "order_id": ORDER_ID},
        },
    ]


def order_context(*, customer: str = "demo", gift: bool = False) -> dict[str, Any]:
    """The context of an order saga of :func:`order_steps`."""
    return {"customer": customer, "gift": gift}


def line_order_steps(
    *, sku: str = "book", qty: int = 1, amount: float = 42
) -> list[dict[str, Any]]:
    """The order as three steps in a line (create, reserve, charge), as StartSaga takes
    them."""
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
