"""The RabbitMQ permissions each Sagaplane process needs, and no more.

Derived from the names in :mod:`sagaplane.topology`, so that they change together
(``sagaplane rabbitmq-permissions`` prints and applies them). RabbitMQ grants a user,
per vhost, three regular expressions over resource names, exchanges and queues alike
(RabbitMQ's access control guide, "How Permissions Work"):

- configure: declare (unless passive) or delete the resource;
- write: publish to an exchange (the default exchange counts as ``amq.default``); bind
  a queue (it is the destination); declare a queue whose dead-letter exchange it is;
- read: consume from or ``basic.get`` a queue; bind to an exchange (it is the source);
  declare a queue with a dead-letter exchange (the queue).

A passive declaration needs none of them. Topic permissions add, per topic exchange,
a regular expression over routing keys: for publishing (write) and, in AMQP 0-9-1,
for the routing key of a binding or unbinding of that exchange (read); checked on
RabbitMQ 3.10 by ``tests/integration/test_rabbitmq_permissions.py``.

What each process does, and what that takes::

    coordinator
      declares the core topology     configure the four exchanges, the replies and
                                     dead-letter queues; write the dead-letter exchange
                                     and both queues, read the replies and dead-letter
                                     exchanges and the replies queue (its bindings, its
                                     dead-letter exchange)
      publishes commands             write sagaplane.commands
      consumes replies               read sagaplane.replies (the queue)
      dead-letters a bad reply       write sagaplane.dead-letter (the exchange)

    participant SERVICE
      declares its own queues        configure, write and read its command queue, its
                                     events queue and their bindings records (queue and
                                     exchange of one name each; topology's docstring)
      binds its queues               read sagaplane.commands, only with routing keys
                                     SERVICE.* (a topic permission), and sagaplane.events
      publishes replies and events   write sagaplane.replies and sagaplane.events
      dead-letters a bad message     write sagaplane.dead-letter (the exchange)

Nobody gets the default exchange: publishing to it puts a message in any queue of the
vhost. Names are not typed: ``sagaplane.replies`` and ``sagaplane.dead-letter`` name an
exchange and a queue each, and a permission on the one is a permission on the other
(SECURITY.md says what a participant can do with that).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sagaplane import topology

__all__ = [
    "NOTHING",
    "Grant",
    "TopicPermission",
    "check_service",
    "check_user",
    "coordinator",
    "participant",
    "rabbitmqctl_args",
]

NOTHING = "^$"
"""The regular expression that matches no resource name (RabbitMQ's own idiom)."""

_SERVICE = re.compile(r"[A-Za-z0-9_-]+")
# Not '-' first: rabbitmqctl would take the name for an option.
_USER = re.compile(r"[A-Za-z0-9_@][A-Za-z0-9_.@-]*")


@dataclass(frozen=True, kw_only=True)
class TopicPermission:
    """What a user may do on one topic exchange, by routing key."""

    exchange: str
    """The topic exchange."""
    write: str
    """Routing keys the user may publish with (regular expression)."""
    read: str
    """Routing keys the user may bind (and unbind) with (regular expression)."""


@dataclass(frozen=True, kw_only=True)
class Grant:
    """What one user may do on a vhost: RabbitMQ's three regular expressions over
    resource names, and topic permissions."""

    user: str
    """The RabbitMQ user."""
    role: str
    """Who uses it: ``coordinator``, or ``service NAME``."""
    purpose: str
    """One line on what the permissions allow, for people."""
    configure: str
    """Resources the user may declare and delete."""
    write: str
    """Exchanges the user may publish to, queues it may bind."""
    read: str
    """Queues the user may consume from, exchanges it may bind to."""
    topics: tuple[TopicPermission, ...] = ()
    """Routing keys the user may use on topic exchanges (none: any)."""


def check_service(name: str) -> str:
    """``name`` if it can be a participant service here, else ValueError saying why."""
    if not _SERVICE.fullmatch(name):
        raise ValueError(
            f"service {name!r}: only letters, digits, '_' and '-' (no dot: a service owns "
            "the actions named SERVICE.*)"
        )
    return name


def check_user(name: str) -> str:
    """``name`` if it is a user name that prints and parses safely, else ValueError."""
    if not _USER.fullmatch(name):
        raise ValueError(
            f"user {name!r}: only letters, digits and '_', '@', '.', '-' (the last two not first)"
        )
    return name


def coordinator(user: str) -> Grant:
    """The coordinator's user: declares the core topology, publishes commands, consumes
    replies, dead-letters the replies it cannot apply."""
    return Grant(
        user=check_user(user),
        role="coordinator",
        purpose="declares the core topology, publishes commands, consumes replies",
        configure=_names(
            topology.COMMANDS_EXCHANGE,
            topology.EVENTS_EXCHANGE,
            topology.REPLIES_EXCHANGE,  # and the replies queue: the same name
            topology.DEAD_LETTER_EXCHANGE,  # and the dead-letter queue
        ),
        write=_names(
            topology.COMMANDS_EXCHANGE,
            topology.REPLIES_QUEUE,
            topology.DEAD_LETTER_EXCHANGE,
        ),
        read=_names(topology.REPLIES_QUEUE, topology.DEAD_LETTER_EXCHANGE),
    )


def participant(service: str, user: str) -> Grant:
    """The user of participant ``service``: its own queues, its own actions' commands,
    replies, events and dead letters out."""
    check_service(service)
    own = (
        topology.participant_queue(service),
        topology.bindings_queue(service),
        topology.events_queue(service),
        topology.events_bindings_queue(service),
    )
    return Grant(
        user=check_user(user),
        role=f"service {service}",
        purpose=(
            f"consumes its own queues, binds them to the commands of {service}.* and to "
            "events, publishes replies, events and dead letters"
        ),
        configure=_names(*own),
        write=_names(
            *own,
            topology.REPLIES_EXCHANGE,
            topology.EVENTS_EXCHANGE,
            topology.DEAD_LETTER_EXCHANGE,
        ),
        read=_names(*own, topology.COMMANDS_EXCHANGE, topology.EVENTS_EXCHANGE),
        topics=(
            TopicPermission(
                exchange=topology.COMMANDS_EXCHANGE,
                write=NOTHING,
                read=f"^{_literal(service)}\\.",
            ),
        ),
    )


def rabbitmqctl_args(grant: Grant, vhost: str) -> list[list[str]]:
    """The rabbitmqctl commands (arguments after ``rabbitmqctl``) that give ``grant``
    on ``vhost``; the user must exist. Each replaces what the user had before."""
    commands = [
        ["set_permissions", "-p", vhost, grant.user, grant.configure, grant.write, grant.read]
    ]
    for topic in grant.topics:
        commands.append(
            [
                "set_topic_permissions",
                "-p",
                vhost,
                grant.user,
                topic.exchange,
                topic.write,
                topic.read,
            ]
        )
    return commands


def _names(*names: str) -> str:
    """A regular expression that matches exactly ``names``."""
    return "^(" + "|".join(_literal(name) for name in names) + ")$"


def _literal(name: str) -> str:
    # Names here are letters, digits, '_', '-' and '.', of which only '.' is special
    # (outside a character class): kept readable, unlike re.escape's '\-'.
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", name), name
    return name.replace(".", r"\.")
