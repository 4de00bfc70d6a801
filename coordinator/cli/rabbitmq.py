"""``sagaplane rabbitmq-permissions``: least-privilege RabbitMQ users for the coordinator
and each participant service (who needs what, and why: :mod:`sagaplane.permissions`).

Without ``--apply`` it prints the rabbitmqctl commands as a shell script, to read, keep
and run. With ``--apply`` it runs them and then declares the core topology, which the
participants' users may not declare. It runs rabbitmqctl (on the broker's machine, or
through ``--rabbitmqctl``) rather than the management plugin's HTTP API, which a broker
may not have enabled.

Passwords never go on a command line (rabbitmqctl reads them on stdin; a command line
is visible to every user of the machine) nor to stderr. With ``--password-dir DIR``,
every user's password is read from ``DIR/USER``, and set on users that exist already
too. Without it, a user created by ``--apply`` gets a generated password, printed once
on stdout as ``USER PASSWORD``, and an existing user keeps its own. Progress goes to
stderr, so that stdout holds only the passwords.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import secrets
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import aio_pika
import aiormq.exceptions

from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import say
from coordinator.config import shown
from sagaplane import amqp, defaults, permissions, topology
from sagaplane.permissions import Grant
from sagaplane.rabbitmqctl import RabbitmqctlFailed, rabbitmqctl

__all__ = ["EPILOG", "add_rabbitmq_permissions", "grants", "run", "script"]

DEFAULT_COORDINATOR_USER = "sagaplane-coordinator"
DEFAULT_USER_PREFIX = "sagaplane-"
PASSWORD_DIR_VARIABLE = "PASSWORD_DIR"
"""The shell variable a printed script reads passwords from when no --password-dir is given."""

EPILOG = """\
The coordinator's user may declare the core topology (the exchanges sagaplane.commands,
.events, .replies, .dead-letter and the queues sagaplane.replies, .dead-letter), publish
commands and consume replies. A service's user may declare, consume and bind only its
own queues (sagaplane.participant.NAME, sagaplane.events.NAME and their .bindings
records), bind them only to the commands of its own actions (NAME.*, a topic permission)
and to events, and publish replies, events and dead letters. Nobody may publish to the
default exchange.

  sagaplane rabbitmq-permissions --vhost shop --service orders --service payment
  sagaplane rabbitmq-permissions --vhost shop --service orders --service payment \\
      --apply --password-dir /run/secrets/rabbitmq

Then give each process its own user in SAGAPLANE_AMQP_URL. Run `sagaplane dlq` as an
administrator: replaying a dead message publishes through the default exchange.
"""


def add_rabbitmq_permissions(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The flags of ``rabbitmq-permissions``."""
    parser.add_argument(
        "--service",
        metavar="NAME",
        action="append",
        default=[],
        help="a participant service, whose user is PREFIX + NAME (repeat for each)",
    )
    parser.add_argument(
        "--vhost", help="the vhost the permissions are for (default: the vhost of --amqp-url)"
    )
    parser.add_argument(
        "--coordinator-user",
        metavar="USER",
        default=DEFAULT_COORDINATOR_USER,
        help="the coordinator's user (default %(default)s)",
    )
    parser.add_argument(
        "--user-prefix",
        metavar="PREFIX",
        default=DEFAULT_USER_PREFIX,
        help="what each service's user name starts with (default %(default)s); users belong "
        "to the whole broker, so give each vhost a prefix of its own",
    )
    parser.add_argument(
        "--password-dir",
        metavar="DIR",
        help="each user's password is in the file DIR/USER (one line); with --apply it is "
        "set on existing users too. Without it a printed script reads "
        f"${PASSWORD_DIR_VARIABLE}/USER, and --apply generates the passwords of the users "
        "it creates and prints them once on stdout",
    )
    parser.add_argument(
        "--apply",
        action="store_true",
        help="run the commands with rabbitmqctl (creating missing users), then declare the "
        "core topology as the user of --amqp-url; without it, only print them",
    )
    parser.add_argument(
        "--amqp-url",
        default=env.get("SAGAPLANE_AMQP_URL", defaults.AMQP_URL),
        help="with --apply, the core topology is declared as this URL's user (an "
        "administrator, or the coordinator's user) on --vhost [SAGAPLANE_AMQP_URL; default "
        f"{shown(defaults.AMQP_URL)}]",
    )
    parser.add_argument(
        "--rabbitmqctl",
        metavar="COMMAND",
        default="rabbitmqctl",
        help="how to run rabbitmqctl, e.g. 'docker exec -i rabbitmq rabbitmqctl' or "
        "'rabbitmqctl -n rabbit@host' (default %(default)s)",
    )


def grants(services: Sequence[str], coordinator_user: str, user_prefix: str) -> list[Grant]:
    """The coordinator's grant, then each service's (once each, in the order given);
    CliError (usage) for a name that cannot be used, or two roles on one user."""
    try:
        found = [permissions.coordinator(coordinator_user)]
        for service in dict.fromkeys(services):
            found.append(permissions.participant(service, user_prefix + service))
    except ValueError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None
    users: dict[str, str] = {}
    for grant in found:
        if grant.user in users:
            raise CliError(
                f"user {grant.user} would be both the {users[grant.user]}'s and the "
                f"{grant.role}'s: choose another --user-prefix or --coordinator-user",
                ExitCode.USAGE,
            )
        users[grant.user] = grant.role
    return found


def script(
    found: Sequence[Grant], vhost: str, *, command: Sequence[str], password_dir: str | None
) -> str:
    """The shell script that creates the users of ``found`` and gives them their
    permissions on ``vhost`` (pure: what ``rabbitmq-permissions`` prints)."""
    ctl = shlex.join(command)
    if password_dir is None:
        where = f"${PASSWORD_DIR_VARIABLE}"
        source = f'"{where}/USER"'
    else:
        where = password_dir
        source = shlex.quote(f"{password_dir}/USER")
    lines = [
        f"# Least-privilege RabbitMQ users for Sagaplane on vhost {vhost!r}",
        "# (sagaplane rabbitmq-permissions). Run as the broker's administrator.",
        f"# add_user reads each user's password from {source}; for a user that exists",
        "# already, skip its add_user (or use change_password). set_permissions and",
        "# set_topic_permissions replace what the user had on this vhost. Users belong to the",
        "# whole broker: these permissions are for this vhost only.",
    ]
    if password_dir is None:
        lines.append(
            f': "${{{PASSWORD_DIR_VARIABLE}:?set it to a directory with one password file per '
            'user, named after the user}"'
        )
    for grant in found:
        password_file = (
            f'"{where}/{grant.user}"'
            if password_dir is None
            else shlex.quote(f"{where}/{grant.user}")
        )
        lines += [
            "",
            f"# {grant.role}: {grant.purpose}",
            f"{ctl} add_user {shlex.quote(grant.user)} < {password_file}",
        ]
        lines += [
            f"{ctl} {shlex.join(args)}" for args in permissions.rabbitmqctl_args(grant, vhost)
        ]
    lines += [
        "",
        "# The participants may not declare the core topology, only use it: start the",
        "# coordinator once (its user declares it), or run sagaplane rabbitmq-permissions",
        "# --apply, before the participants.",
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``sagaplane rabbitmq-permissions``."""
    found = grants(args.service, args.coordinator_user, args.user_prefix)
    vhost = args.vhost if args.vhost is not None else amqp.vhost_of(args.amqp_url)
    try:
        command = shlex.split(args.rabbitmqctl)
    except ValueError as exc:
        raise CliError(f"--rabbitmqctl: {exc}", ExitCode.USAGE) from None
    if not command:
        raise CliError("--rabbitmqctl must not be empty", ExitCode.USAGE)
    if not args.apply:
        say(script(found, vhost, command=command, password_dir=args.password_dir))
        return ExitCode.OK
    return asyncio.run(_apply(args, found, vhost, command))


async def _apply(
    args: argparse.Namespace, found: list[Grant], vhost: str, command: list[str]
) -> int:
    # Every password file is read before anything changes: a missing one must not leave
    # half of the users made.
    passwords: dict[str, str] = {}
    if args.password_dir is not None:
        directory = Path(args.password_dir)
        passwords = await asyncio.to_thread(_read_passwords, directory, [g.user for g in found])
    ctl = functools.partial(rabbitmqctl, command=command)
    try:
        # Also the first sign of a rabbitmqctl that cannot reach the broker.
        vhosts = json.loads(await ctl("list_vhosts", "name", "--formatter", "json"))
    except RabbitmqctlFailed as exc:
        raise CliError(str(exc), ExitCode.UNAVAILABLE) from exc
    if vhost not in {v["name"] for v in vhosts}:
        raise CliError(
            f"RabbitMQ has no vhost {vhost!r}: create it first (rabbitmqctl add_vhost "
            f"{shlex.quote(vhost)})",
            ExitCode.NOT_FOUND,
        )
    try:
        users = {u["user"] for u in json.loads(await ctl("list_users", "--formatter", "json"))}
        for grant in found:
            exists = grant.user in users
            await _user(command, grant.user, exists=exists, password=passwords.get(grant.user))
            for step in permissions.rabbitmqctl_args(grant, vhost):
                await ctl(*step)
            _note(f"user {grant.user} ({grant.role}): permissions set on vhost {vhost!r}")
    except RabbitmqctlFailed as exc:
        raise CliError(str(exc), ExitCode.ERROR) from exc
    await _declare_core(amqp.with_vhost(args.amqp_url, vhost), vhost)
    return ExitCode.OK


async def _user(command: Sequence[str], user: str, *, exists: bool, password: str | None) -> None:
    """Create ``user`` (with ``password``, else a generated one printed on stdout), or
    set an existing user's password when one is given."""
    if exists and password is None:
        _note(f"user {user}: exists, password unchanged")
        return
    if exists:
        await rabbitmqctl("change_password", user, stdin=f"{password}\n", command=command)
        _note(f"user {user}: exists, password set from its file")
        return
    generated = password is None
    password = password if password is not None else secrets.token_urlsafe(32)
    await rabbitmqctl("add_user", user, stdin=f"{password}\n", command=command)
    if generated:
        # The one place it is shown: stdout, which the operator asked for by not giving
        # a file (`... --apply > passwords` keeps them out of the terminal).
        say(f"{user} {password}")
    _note(f"user {user}: created" + (" (its password is on stdout)" if generated else ""))


def _read_passwords(directory: Path, users: list[str]) -> dict[str, str]:
    """Each user's password from ``directory/USER`` (one line); CliError if one cannot
    be used."""
    passwords: dict[str, str] = {}
    for user in users:
        path = directory / user
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CliError(f"{path}: {exc.strerror or exc}", ExitCode.USAGE) from None
        # `echo secret > file` ends it with a newline, which is not part of the password.
        password = text.removesuffix("\n").removesuffix("\r")
        if not password or "\n" in password or "\r" in password:
            # RabbitMQ takes an empty password as "no password login at all".
            raise CliError(f"{path}: must hold one line, the password", ExitCode.USAGE)
        passwords[user] = password
    return passwords


async def _declare_core(url: str, vhost: str) -> None:
    """Declare the core topology on ``url``'s vhost, so that the participants find it."""
    unfinished = (
        "users and permissions are set, but the core topology is not declared: start the "
        "coordinator (its user declares it), or run this again with an --amqp-url whose "
        "user may declare it"
    )
    try:
        connection = await aio_pika.connect(
            url, client_properties={"connection_name": "sagaplane-rabbitmq-permissions"}
        )
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
        raise CliError(
            f"{unfinished}. {amqp.describe_failure(url, exc)}", ExitCode.UNAVAILABLE
        ) from exc
    try:
        channel = await connection.channel()
        await topology.declare_core(channel)
    except aiormq.exceptions.ChannelAccessRefused as exc:
        raise CliError(f"{unfinished}. {amqp.reply_text(exc)}", ExitCode.ERROR) from exc
    finally:
        await connection.close()
    _note(f"core topology declared on vhost {vhost!r}")


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
