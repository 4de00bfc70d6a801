"""What ``sagaplane rabbitmq-permissions`` prints, and the permissions behind it (pure).

RabbitMQ matches a permission's regular expression anywhere in a name (``re:run``,
unanchored), as :func:`re.search` does; ours are anchored, so the matches here are the
broker's. What the broker then allows is in tests/integration/test_rabbitmq_permissions.py.
"""

from __future__ import annotations

import re
import shlex

import pytest

from coordinator.cli import CliError, ExitCode, build_parser
from coordinator.cli.rabbitmq import grants, script
from sagaplane import permissions, topology
from sagaplane.amqp import vhost_of

ORDERS_OWN = [
    "sagaplane.participant.orders",
    "sagaplane.participant.orders.bindings",
    "sagaplane.events.orders",
    "sagaplane.events.orders.bindings",
]
OTHERS = [
    "sagaplane.participant.payment",
    "sagaplane.participant.payment.bindings",
    "sagaplane.events.payment",
    "sagaplane.participant.orders2",
    "sagaplane.participant.ordersXbindings",
    "xsagaplane.participant.orders",
    "sagaplane.participant.orders.bindings.x",
    "amq.default",
    "amq.topic",
]
CORE = ["sagaplane.commands", "sagaplane.events", "sagaplane.replies", "sagaplane.dead-letter"]


def matching(pattern: str, names: list[str]) -> list[str]:
    return [name for name in names if re.search(pattern, name)]


def test_a_services_user_may_use_its_own_names_and_the_exchanges_it_publishes_to() -> None:
    grant = permissions.participant("orders", "sagaplane-orders")
    everything = ORDERS_OWN + OTHERS + CORE
    assert matching(grant.configure, everything) == ORDERS_OWN
    published = ["sagaplane.events", "sagaplane.replies", "sagaplane.dead-letter"]
    assert matching(grant.write, everything) == [*ORDERS_OWN, *published]
    bound = ["sagaplane.commands", "sagaplane.events"]
    assert matching(grant.read, everything) == [*ORDERS_OWN, *bound]
    [topic] = grant.topics
    assert topic.exchange == topology.COMMANDS_EXCHANGE
    keys = ["orders.create", "orders.a.b", "orders.#", "payment.charge", "#", "*.create", "orders"]
    assert matching(topic.read, keys) == ["orders.create", "orders.a.b", "orders.#"]
    assert matching(topic.write, keys) == []


def test_every_name_the_sdk_declares_for_a_service_is_its_own() -> None:
    own = [
        topology.participant_queue("orders"),
        topology.bindings_queue("orders"),
        topology.events_queue("orders"),
        topology.events_bindings_queue("orders"),
    ]
    assert own == ORDERS_OWN


def test_the_coordinators_user_may_declare_the_core_publish_commands_consume_replies() -> None:
    grant = permissions.coordinator("sagaplane-coordinator")
    everything = CORE + ORDERS_OWN + OTHERS
    assert matching(grant.configure, everything) == CORE
    assert matching(grant.write, everything) == [
        "sagaplane.commands",
        "sagaplane.replies",
        "sagaplane.dead-letter",
    ]
    assert matching(grant.read, everything) == ["sagaplane.replies", "sagaplane.dead-letter"]
    assert grant.topics == ()


def test_the_script_creates_each_user_then_sets_its_permissions() -> None:
    found = grants(["orders", "payment", "orders"], "sagaplane-coordinator", "shop-")
    text = script(found, "shop", command=["rabbitmqctl"], password_dir=None)
    commands = [
        shlex.split(line) for line in text.splitlines() if line and not line.startswith(("#", ":"))
    ]
    orders = permissions.participant("orders", "shop-orders")
    assert commands == [
        ["rabbitmqctl", "add_user", "sagaplane-coordinator",
         "<", "$PASSWORD_DIR/sagaplane-coordinator"],
        ["rabbitmqctl", "set_permissions", "-p", "shop", "sagaplane-coordinator",
         r"^(sagaplane\.commands|sagaplane\.events|sagaplane\.replies|sagaplane\.dead-letter)$",
         r"^(sagaplane\.commands|sagaplane\.replies|sagaplane\.dead-letter)$",
         r"^(sagaplane\.replies|sagaplane\.dead-letter)$"],
        ["rabbitmqctl", "add_user", "shop-orders", "<", "$PASSWORD_DIR/shop-orders"],
        ["rabbitmqctl", "set_permissions", "-p", "shop", "shop-orders",
         orders.configure, orders.write, orders.read],
        ["rabbitmqctl", "set_topic_permissions", "-p", "shop", "shop-orders",
         "sagaplane.commands", "^$", r"^orders\."],
        ["rabbitmqctl", "add_user", "shop-payment", "<", "$PASSWORD_DIR/shop-payment"],
        *[["rabbitmqctl", *args] for args in permissions.rabbitmqctl_args(found[2], "shop")],
    ]  # fmt: skip
    # Passwords come from files, never from the script's own input (piped to sh, the
    # next lines would be read as the password), and an unset directory stops it.
    assert 'rabbitmqctl add_user shop-orders < "$PASSWORD_DIR/shop-orders"' in text
    assert ': "${PASSWORD_DIR:?' in text


def test_the_script_quotes_what_the_shell_would_split() -> None:
    found = grants(["orders"], "coordinator", "sagaplane-")
    text = script(
        found,
        "/",
        command=["docker", "exec", "-i", "my rabbit", "rabbitmqctl"],
        password_dir="/run/my secrets",
    )
    assert (
        "docker exec -i 'my rabbit' rabbitmqctl add_user sagaplane-orders "
        "< '/run/my secrets/sagaplane-orders'"
    ) in text
    assert "rabbitmqctl set_topic_permissions -p / sagaplane-orders sagaplane.commands" in text
    assert "PASSWORD_DIR" not in text


@pytest.mark.parametrize(
    ("services", "coordinator", "prefix", "error"),
    [
        (["pay.ment"], "c", "s-", "service 'pay.ment': only letters, digits, '_' and '-'"),
        ([""], "c", "s-", "service '': only letters"),
        (["orders"], "-p", "s-", "user '-p': only letters"),
        (["orders"], "c", "a b ", "user 'a b orders': only letters"),
        (["coordinator"], "sagaplane-coordinator", "sagaplane-", "would be both"),
    ],
)
def test_names_that_cannot_be_used_are_refused(
    services: list[str], coordinator: str, prefix: str, error: str
) -> None:
    with pytest.raises(CliError) as refused:
        grants(services, coordinator, prefix)
    assert refused.value.code == ExitCode.USAGE
    assert error in refused.value.message


def test_the_vhost_defaults_to_the_amqp_urls() -> None:
    args = build_parser(env={"SAGAPLANE_AMQP_URL": "amqp://u:p@h/shop%2Fprod"}).parse_args(
        ["rabbitmq-permissions", "--service", "orders"]
    )
    assert args.vhost is None and args.service == ["orders"] and not args.apply
    assert vhost_of(args.amqp_url) == "shop/prod"
