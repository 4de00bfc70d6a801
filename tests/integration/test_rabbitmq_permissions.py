"""Least-privilege RabbitMQ users (issue 17, item 3): ``sagaplane rabbitmq-permissions
--apply`` on the real broker, then the coordinator and two participants each with their
own user.

Least privilege is usable (a saga runs end to end, with replies, a domain event and
dead letters from each side) and restrictive: with ``orders``'s credentials the broker
refuses (``ACCESS_REFUSED``) to let it consume ``payment``'s queue or the replies,
publish to ``sagaplane.commands`` or through the default exchange, or bind its queue to
``payment``'s actions (a topic permission, which RabbitMQ checks on bindings).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import aiormq.exceptions
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from coordinator.app import Coordinator
from helpers.broker import AMQP_HOST, rabbitmqctl
from helpers.cli import sagaplane
from helpers.coordinators import coordinator_settings
from helpers.database import create_database, drop_database, server_url, unique_name
from sagaplane import (
    ConfigurationError,
    EventContext,
    Participant,
    SagaClient,
    SagaState,
    StepContext,
    StepSpec,
    TopologyMissing,
    permissions,
    topology,
)
from sagaplane.amqp import reply_text, vhost_of
from sagaplane.consuming import REASON_HEADER
from sagaplane.testing import RabbitmqctlFailed
from sagaplane.urls import redact

SERVICES = ("orders", "payment")


@dataclass
class Users:
    """The users ``--apply`` made on the test's vhost: name -> AMQP URL as that user."""

    vhost: str
    prefix: str
    urls: dict[str, str]

    def url(self, role: str) -> str:
        """The URL of ``coordinator``, ``orders`` or ``payment``."""
        return self.urls[self.prefix + role]


def _url(user: str, password: str, vhost: str) -> str:
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return f"amqp://{credentials}@{AMQP_HOST}/{quote(vhost, safe='')}"


async def _delete_users(names: list[str]) -> None:
    for name in names:
        with contextlib.suppress(RabbitmqctlFailed):  # never made, if the apply failed
            await rabbitmqctl("delete_user", name)


async def _apply(amqp_url: str, prefix: str, *extra: str) -> Any:
    services = [arg for service in SERVICES for arg in ("--service", service)]
    return await sagaplane(
        "rabbitmq-permissions",
        *services,
        "--coordinator-user",
        f"{prefix}coordinator",
        "--user-prefix",
        prefix,
        "--apply",
        *extra,
        SAGAPLANE_AMQP_URL=amqp_url,  # an administrator (guest); its vhost is the default
    )


@pytest.fixture
async def users(amqp_url: str) -> AsyncIterator[Users]:
    """The coordinator's and each service's users, made by --apply with generated
    passwords (deleted after: users belong to the whole broker, not to the vhost)."""
    prefix = unique_name("perms").replace("_", "-") + "-"
    names = [prefix + role for role in ("coordinator", *SERVICES)]
    try:
        applied = await _apply(amqp_url, prefix)
        assert applied.status == 0, applied.err
        # stdout holds the generated passwords and nothing else, one "USER PASSWORD" each.
        passwords = dict(line.split(" ") for line in applied.out.splitlines())
        assert sorted(passwords) == sorted(names)
        assert f"core topology declared on vhost {vhost_of(amqp_url)!r}" in applied.err
        vhost = vhost_of(amqp_url)
        yield Users(
            vhost=vhost,
            prefix=prefix,
            urls={name: _url(name, passwords[name], vhost) for name in names},
        )
    finally:
        await _delete_users(names)


@pytest.fixture
async def service_databases() -> AsyncIterator[dict[str, str]]:
    names = {service: unique_name(f"sagaplane_{service}") for service in SERVICES}
    for name in names.values():
        await create_database(name)
    yield {service: server_url(name) for service, name in names.items()}
    for name in names.values():
        await drop_database(name)


class Shop:
    """``orders`` and ``payment``, each with its own user; what their handlers saw."""

    def __init__(self) -> None:
        self.created: list[str] = []
        self.charged_events: list[dict[str, Any]] = []

    def orders(self, amqp_url: str, database_url: str) -> Participant:
        p = Participant(
            "orders", amqp_url=amqp_url, database_url=database_url, relay_poll_interval=0.1
        )

        @p.step("orders.create")
        async def create(ctx: StepContext) -> dict[str, Any]:
            self.created.append(ctx.saga_id)
            return {"order_id": 7}

        @p.on_event("payment.charged")
        async def charged(ctx: EventContext) -> None:
            self.charged_events.append(dict(ctx.event.data or {}))

        return p

    def payment(self, amqp_url: str, database_url: str) -> Participant:
        p = Participant(
            "payment", amqp_url=amqp_url, database_url=database_url, relay_poll_interval=0.1
        )

        @p.step("payment.charge")
        async def charge(ctx: StepContext) -> dict[str, Any]:
            await ctx.emit("payment.charged", {"saga": ctx.saga_id})
            return {"charged": True}

        return p


async def _eventually(check: Callable[[], bool], what: str, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"still not {what} after {within}s")
        await asyncio.sleep(0.05)


async def _dead_letter(channel: AbstractChannel, message_id: str) -> dict[str, Any]:
    """The headers of the dead letter with ``message_id`` (the others are dropped)."""
    queue = await channel.get_queue(topology.DEAD_LETTER_QUEUE)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.05)
        elif message.message_id == message_id:
            return dict(message.headers or {})
    pytest.fail(f"{message_id} was not dead-lettered")


async def test_least_privilege_users_run_a_saga_end_to_end(
    users: Users, amqp_url: str, database_url: str, service_databases: dict[str, str]
) -> None:
    shop = Shop()
    settings = coordinator_settings(database_url, users.url("coordinator"))
    async with (
        Coordinator(settings) as coordinator,
        shop.orders(users.url("orders"), service_databases["orders"]) as orders,
        shop.payment(users.url("payment"), service_databases["payment"]),
        SagaClient(f"127.0.0.1:{coordinator.port}") as client,
    ):
        saga = await client.start_saga(
            "checkout",
            [
                StepSpec("create", "orders.create", input={"item": "pen"}),
                StepSpec("charge", "payment.charge"),
            ],
        )
        done = await client.wait(saga.id)
        assert done.state is SagaState.COMPLETED
        assert [step.output for step in done.steps] == [{"order_id": 7}, {"charged": True}]
        assert shop.created == [saga.id]
        # payment published an event; orders' events queue (bound with its own user) got it.
        await _eventually(lambda: shop.charged_events == [{"saga": saga.id}], "delivered")

        # Each side dead-letters with its reason: its user may publish to the dead-letter
        # exchange (a refused publish would fall back to a reject, without the reason).
        async with await aio_pika.connect(amqp_url) as admin:
            channel = await admin.channel()
            commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE)
            await commands.publish(
                aio_pika.Message(b"garbage", message_id="bad-command"), "orders.create"
            )
            replies = await channel.get_exchange(topology.REPLIES_EXCHANGE)
            await replies.publish(
                aio_pika.Message(b"garbage", message_id="bad-reply"),
                topology.REPLIES_ROUTING_KEY,
            )
            for message_id in ("bad-command", "bad-reply"):
                headers = await _dead_letter(channel, message_id)
                assert REASON_HEADER in headers, headers
        assert orders.dead_lettered == {"undecodable": 1}
        assert coordinator.dead_lettered == {"undecodable": 1}

    # An action named for another service cannot be bound with this service's user.
    rogue = Participant(
        "orders", amqp_url=users.url("orders"), database_url=service_databases["orders"]
    )

    @rogue.step("payment.refund")
    async def refund(ctx: StepContext) -> None:
        pass

    with pytest.raises(ConfigurationError) as refused:
        await rogue.start()
    assert refused.value.message == (
        "RabbitMQ refused this service's user: ACCESS_REFUSED - access to topic "
        f"'payment.refund' in exchange 'sagaplane.commands' in vhost '{users.vhost}' refused "
        f"for user '{users.prefix}orders'. It needs the permissions that `sagaplane "
        "rabbitmq-permissions --service orders` prints, and actions named orders.*"
    )


async def _refusal(
    connection: AbstractConnection, act: Callable[[AbstractChannel], Awaitable[Any]]
) -> str:
    """What the broker said when it refused ``act`` (which must be refused)."""
    # The broker closes the channel of a refused operation: each on a channel of its own.
    channel = await connection.channel(publisher_confirms=True)
    with pytest.raises(aiormq.exceptions.ChannelAccessRefused) as refused:
        await act(channel)
    return reply_text(refused.value)


async def test_a_services_user_is_refused_what_belongs_to_others(
    users: Users, amqp_url: str, database_url: str
) -> None:
    async with await aio_pika.connect(amqp_url) as admin:
        # payment's queue, as payment's own start would declare it.
        channel = await admin.channel()
        await topology.declare_participant_queue(channel, "payment", ["payment.charge"])

    orders_user = users.prefix + "orders"
    where = f"in vhost '{users.vhost}' refused for user '{orders_user}'"
    async with await aio_pika.connect(users.url("orders")) as orders:

        async def ignore(message: AbstractIncomingMessage) -> None:
            pass

        async def consume_payments(channel: AbstractChannel) -> None:
            queue = await channel.get_queue(topology.participant_queue("payment"), ensure=False)
            await queue.consume(ignore)

        async def get_payment(channel: AbstractChannel) -> None:
            queue = await channel.get_queue(topology.participant_queue("payment"), ensure=False)
            await queue.get(fail=False)

        async def consume_replies(channel: AbstractChannel) -> None:
            queue = await channel.get_queue(topology.REPLIES_QUEUE, ensure=False)
            await queue.get(fail=False)

        async def publish_command(channel: AbstractChannel) -> None:
            commands = await channel.get_exchange(topology.COMMANDS_EXCHANGE, ensure=False)
            await commands.publish(aio_pika.Message(b"x"), "payment.refund")

        async def publish_to_payments_queue(channel: AbstractChannel) -> None:
            await channel.default_exchange.publish(
                aio_pika.Message(b"x"), topology.participant_queue("payment")
            )

        def bind(key: str) -> Callable[[AbstractChannel], Awaitable[Any]]:
            async def act(channel: AbstractChannel) -> None:
                await topology.declare_participant_queue(channel, "orders", [key])

            return act

        payment_queue = "queue 'sagaplane.participant.payment'"
        assert await _refusal(orders, consume_payments) == (
            f"ACCESS_REFUSED - access to {payment_queue} {where}"
        )
        assert await _refusal(orders, get_payment) == (
            f"ACCESS_REFUSED - access to {payment_queue} {where}"
        )
        assert await _refusal(orders, consume_replies) == (
            f"ACCESS_REFUSED - access to queue 'sagaplane.replies' {where}"
        )
        assert await _refusal(orders, publish_command) == (
            f"ACCESS_REFUSED - access to exchange 'sagaplane.commands' {where}"
        )
        # The default exchange reaches every queue: nobody may publish to it.
        assert await _refusal(orders, publish_to_payments_queue) == (
            f"ACCESS_REFUSED - access to exchange 'amq.default' {where}"
        )
        # Its queue may be bound to its own actions only: not to payment's, nor to all.
        for key in ("payment.charge", "#", "*.charge"):
            assert await _refusal(orders, bind(key)) == (
                f"ACCESS_REFUSED - access to topic '{key}' in exchange 'sagaplane.commands' {where}"
            )
        # What is its own it may do.
        channel = await orders.channel()
        await topology.declare_participant_queue(channel, "orders", ["orders.create"])

    async with await aio_pika.connect(amqp_url) as admin:
        channel = await admin.channel()
        queue = await channel.declare_queue(topology.participant_queue("payment"), passive=True)
        assert queue.declaration_result.message_count == 0  # nothing got in

    # Nor can it be the coordinator: `serve` says so in one line.
    serve = await sagaplane(
        "serve",
        "--database-url",
        database_url,
        "--amqp-url",
        users.url("orders"),
        "--listen",
        "127.0.0.1:0",
    )
    assert serve.status == 2
    assert serve.err.splitlines()[-1] == (
        f"sagaplane: error: RabbitMQ at {redact(users.url('orders'))} refused the "
        "coordinator's user: ACCESS_REFUSED - access to exchange 'sagaplane.commands' "
        f"{where}; it needs the permissions that `sagaplane rabbitmq-permissions` prints "
        "for --coordinator-user"
    )


async def test_a_participant_checks_the_core_topology_it_may_not_declare(
    amqp_url: str,
) -> None:
    """Permissions alone (no --apply): the participant's start says what to do."""
    user = unique_name("perms").replace("_", "-") + "-orders"
    vhost = vhost_of(amqp_url)
    try:
        await rabbitmqctl("add_user", user, stdin="secret\n")
        for args in permissions.rabbitmqctl_args(permissions.participant("orders", user), vhost):
            await rabbitmqctl(*args)
        async with await aio_pika.connect(_url(user, "secret", vhost)) as orders:
            with pytest.raises(TopologyMissing) as missing:
                await topology.ensure_core(orders)
            message = missing.value.message
            assert message.startswith(
                "RabbitMQ lacks exchange sagaplane.commands, exchange sagaplane.events, "
                "exchange sagaplane.replies, exchange sagaplane.dead-letter, queue "
                "sagaplane.replies, queue sagaplane.dead-letter, and this user may not "
                "declare them (ACCESS_REFUSED - access to exchange 'sagaplane.commands'"
            )
            assert message.endswith(
                "start the coordinator first (it declares them), or run `sagaplane "
                "rabbitmq-permissions --apply` as the broker's administrator"
            )

            async with await aio_pika.connect(amqp_url) as admin:
                await topology.declare_core(await admin.channel())
            await topology.ensure_core(orders)  # now only checked, and found
            channel = await orders.channel()
            await topology.declare_participant_queue(channel, "orders", ["orders.create"])
    finally:
        await _delete_users([user])


async def test_apply_again_converges_and_takes_passwords_from_files(
    users: Users, amqp_url: str, tmp_path: Path
) -> None:
    again = await _apply(amqp_url, users.prefix)
    assert again.status == 0, again.err
    assert again.out == ""  # no user made, no password shown
    assert f"user {users.prefix}orders: exists, password unchanged" in again.err

    # A missing file stops it before anything changes.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / f"{users.prefix}coordinator").write_text("coordinator-secret\n")
    incomplete = await _apply(amqp_url, users.prefix, "--password-dir", str(secrets_dir))
    assert incomplete.status == 2
    assert f"{secrets_dir / (users.prefix + 'orders')}: No such file" in incomplete.err

    for service in SERVICES:
        (secrets_dir / f"{users.prefix}{service}").write_text(f"{service}-secret\n")
    from_files = await _apply(amqp_url, users.prefix, "--password-dir", str(secrets_dir))
    assert from_files.status == 0, from_files.err
    assert from_files.out == ""
    async with await aio_pika.connect(_url(users.prefix + "orders", "orders-secret", users.vhost)):
        pass
    with pytest.raises(aiormq.exceptions.ProbableAuthenticationError):
        await aio_pika.connect(users.url("orders"))  # the generated password is gone

    missing_vhost = await sagaplane(
        "rabbitmq-permissions", "--vhost", unique_name("nowhere"), "--apply"
    )
    assert missing_vhost.status == 4
    assert "RabbitMQ has no vhost" in missing_vhost.err
