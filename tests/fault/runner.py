"""``python -m fault.runner``: demo-style participants for the fault suite, in a process.

Four services, each with its own database (``--service NAME=DATABASE_URL``, repeatable):

- ``orders``     orders.create / orders.delete
- ``inventory``  inventory.reserve / inventory.release
- ``payment``    payment.charge / payment.refund; the charge fails non-retryably above
  :data:`~fault.schema.PAYMENT_LIMIT`
- ``flaky``      flaky.hold / flaky.release, whose compensation fails on purpose, by the
  step input's ``mode``: ``fail3`` fails (retryably) its first three attempts;
  ``broken`` fails non-retryably; ``until_fixed`` fails retryably until the test
  inserts the saga's id into ``fault_fixed``.

Every handler records its effect in ``fault_effects`` inside the SDK's transaction (so
it commits with the inbox row and the reply, or not at all). A middleware of the SDK's
(:func:`fault_middleware`) records every message delivered to a participant (poison
ones included; only those delivered while it stops are returned unseen) in
``fault_deliveries``, in a transaction of its own before the processing, so
redeliveries stay visible; and a command answered without running its handler (the
inbox re-sent its stored outcome, or refused an execute after its compensation) in
``fault_replays``, after its commit.

Test-only hooks:

- ``FAULT_KILL_AFTER_COMMITS=N`` (environment): after the N-th command transaction of
  this process has COMMITTED, and before its message is acked, the process SIGKILLs
  itself. The broker redelivers the command; the inbox must answer it without a
  second effect.
- ``--reply-exchange``: publish replies there instead of ``sagaplane.replies`` (for the
  chaos forwarder of the reply-fault tests).
- ``--ready-file``: touched once every participant consumes.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import psycopg
from aio_pika.abc import AbstractIncomingMessage
from google.protobuf.message import DecodeError
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from fault.schema import PAYMENT_LIMIT
from sagaplane import (
    CallNext,
    Delivery,
    Middleware,
    NonRetryableError,
    Participant,
    Processed,
    RetryableError,
    StepContext,
    topology,
    wire,
)
from sagaplane.v1 import messages_pb2

log = logging.getLogger("fault.runner")

KILL_ENV = "FAULT_KILL_AFTER_COMMITS"


class KillSwitch:
    """Counts committed command transactions; SIGKILLs the process after the N-th."""

    def __init__(self, after: int | None) -> None:
        self.after = after
        self.commits = 0

    def committed(self, service: str, message_id: str | None) -> None:
        self.commits += 1
        if self.after is not None and self.commits >= self.after:
            log.warning(
                "%s: commit %d of message %s done, not acked: SIGKILL (test hook)",
                service,
                self.commits,
                message_id,
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class DeliveryLog:
    """Records every delivered message in the service's ``fault_deliveries``."""

    def __init__(self, database_url: str) -> None:
        self._pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            database_url, min_size=1, max_size=2, open=False, timeout=5, kwargs={"autocommit": True}
        )

    async def open(self) -> None:
        await self._pool.open(wait=True, timeout=30)

    async def close(self) -> None:
        await self._pool.close()

    async def replayed(self, command: messages_pb2.StepCommand, kind: str) -> None:
        await self._insert(
            "INSERT INTO fault_replays (saga_id, step_id, kind, attempt)"
            " VALUES (%(saga_id)s, %(step_id)s, %(kind)s, %(attempt)s)",
            {
                "saga_id": _clean(command.saga_id),
                "step_id": _clean(command.step_id),
                "kind": kind,
                "attempt": command.attempt,
            },
            command.step_id,
        )

    async def record(self, message: AbstractIncomingMessage) -> None:
        fields: dict[str, Any] = {
            "saga_id": None,
            "step_id": None,
            "action": None,
            "kind": None,
            "attempt": None,
        }
        command = messages_pb2.StepCommand()
        try:
            command.ParseFromString(message.body)
            kind = wire.KIND_FROM_PROTO.get(command.kind)
            fields |= {
                "saga_id": _clean(command.saga_id),
                "step_id": _clean(command.step_id),
                "action": _clean(command.action),
                "kind": None if kind is None else kind.value,
                "attempt": command.attempt,
            }
        except (DecodeError, ValueError, TypeError):
            pass  # a poison message: recorded with its message id only
        params = fields | {
            "process": os.getpid(),
            "message_id": _clean(message.message_id),
            "redelivered": bool(message.redelivered),
        }
        await self._insert(
            "INSERT INTO fault_deliveries (process, message_id, redelivered,"
            " saga_id, step_id, action, kind, attempt) VALUES (%(process)s,"
            " %(message_id)s, %(redelivered)s, %(saga_id)s, %(step_id)s,"
            " %(action)s, %(kind)s, %(attempt)s)",
            params,
            message.message_id,
        )

    async def _insert(self, statement: str, params: dict[str, Any], what: str | None) -> None:
        delay = 0.1
        while True:
            try:
                async with self._pool.connection() as conn:
                    await conn.execute(statement, params)
                return
            except (psycopg.OperationalError, PoolTimeout) as exc:
                # PostgreSQL restarting: hold the message (unacked) and try again.
                log.warning("recording %s: %s; retrying", what, exc)
                await asyncio.sleep(delay)
                delay = min(2.0, delay * 2)


def _clean(value: str | None) -> str | None:
    # PostgreSQL text cannot hold NUL, which the poison messages of the suite contain.
    return None if value is None else value.replace("\x00", "\\0")


def fault_middleware(service: str, deliveries: DeliveryLog, kill: KillSwitch) -> Middleware:
    """The SDK middleware that records each delivery and can die between commit and ack."""

    async def record_and_maybe_die(delivery: Delivery, call_next: CallNext) -> None:
        try:
            await deliveries.record(delivery.message)
        except Exception:
            log.exception("could not record delivery %s", delivery.message.message_id)
        processed = await call_next()
        if not processed.committed:
            return  # dead-lettered or requeued: no command transaction committed
        # Returned: the command's transaction has committed; the SDK acks after we return.
        if processed is not Processed.HANDLED:
            # Answered without running the handler: the inbox re-sent its stored outcome
            # (or refused an execute after its compensation).
            assert delivery.command is not None and delivery.kind is not None
            await deliveries.replayed(delivery.command, delivery.kind.value)
        kill.committed(service, delivery.message.message_id)

    return record_and_maybe_die


async def _effect(ctx: StepContext) -> None:
    await ctx.tx.execute(
        "INSERT INTO fault_effects (saga_id, step_id, action, kind, position, attempt)"
        " VALUES (%s, %s, %s, %s, %s, %s)",
        (
            ctx.saga_id,
            ctx.step_id,
            ctx.action,
            ctx.kind.value,
            int(ctx.input.get("position", -1)),
            ctx.attempt,
        ),
    )


def _simple(p: Participant, action: str, undo: str, output: dict[str, Any]) -> None:
    @p.step(action)
    async def do(ctx: StepContext) -> dict[str, Any]:
        await _effect(ctx)
        return output

    @p.compensation(undo)
    async def undo_(ctx: StepContext) -> None:
        await _effect(ctx)


def register(p: Participant, service: str) -> None:
    """Register the handlers of ``service`` on ``p``."""
    if service == "orders":
        _simple(p, "orders.create", "orders.delete", {"order": "created"})
        _simple(p, "orders.confirm", "orders.unconfirm", {"order": "confirmed"})
    elif service == "inventory":
        _simple(p, "inventory.reserve", "inventory.release", {"reserved": 1})
    elif service == "payment":

        @p.step("payment.charge")
        async def charge(ctx: StepContext) -> dict[str, Any]:
            amount = float(ctx.input.get("amount", 0))
            if amount > PAYMENT_LIMIT:
                raise NonRetryableError(f"amount {amount:g} is over the limit of {PAYMENT_LIMIT}")
            await _effect(ctx)
            return {"charged": amount}

        @p.compensation("payment.refund")
        async def refund(ctx: StepContext) -> None:
            await _effect(ctx)

    elif service == "flaky":

        @p.step("flaky.hold")
        async def hold(ctx: StepContext) -> dict[str, Any]:
            await _effect(ctx)
            return {"held": True}

        @p.compensation("flaky.release")
        async def release(ctx: StepContext) -> None:
            mode = ctx.input.get("mode", "")
            if mode == "fail3" and ctx.attempt <= 3:
                raise RetryableError(f"flaky release: transient failure {ctx.attempt} of 3")
            if mode in ("broken", "until_fixed"):
                cur = await ctx.tx.execute(
                    "SELECT EXISTS (SELECT FROM fault_fixed WHERE saga_id = %s)", (ctx.saga_id,)
                )
                row = await cur.fetchone()
                if not (row and row[0]):
                    if mode == "broken":
                        raise NonRetryableError("flaky release: broken for good")
                    raise RetryableError(f"flaky release: still broken (attempt {ctx.attempt})")
            await _effect(ctx)

    else:
        raise SystemExit(f"unknown service {service!r}")


async def _run(args: argparse.Namespace) -> None:
    kill_after = os.environ.get(KILL_ENV)
    kill = KillSwitch(int(kill_after) if kill_after else None)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with AsyncExitStack() as stack:
        for spec in args.service:
            service, _, database_url = spec.partition("=")
            deliveries = DeliveryLog(database_url)
            await deliveries.open()
            stack.push_async_callback(deliveries.close)
            participant = Participant(
                service,
                middleware=[fault_middleware(service, deliveries, kill)],
                amqp_url=args.amqp_url,
                database_url=database_url,
                reply_exchange=args.reply_exchange,
                shutdown_timeout=5.0,
                pool_size=3,
            )
            register(participant, service)
            await stack.enter_async_context(participant)
        if args.ready_file:
            _touch(args.ready_file)
        log.info("participants running: %s (kill after %s commits)", args.service, kill.after)
        await stop.wait()


def _touch(path: str) -> None:
    Path(path).touch()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fault.runner")
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument(
        "--service", action="append", required=True, help="NAME=DATABASE_URL (repeatable)"
    )
    parser.add_argument("--reply-exchange", default=topology.REPLIES_EXCHANGE)
    parser.add_argument("--ready-file", default="")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("aiormq").setLevel(logging.WARNING)
    asyncio.run(_run(args))


if __name__ == "__main__":
    main()
