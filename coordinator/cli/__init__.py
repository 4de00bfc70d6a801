"""``sagaplane``: the command line.

Server commands run the coordinator (``serve``), update its schema (``migrate``) and
delete what has expired (``prune``);
client commands talk to a running coordinator through :class:`sagaplane.SagaClient`
(``start``, ``import``, ``get``, ``list``, ``compensate``, ``watch``, ``resolve``,
``health``); ``outbox`` and ``relay`` work on any database with Sagaplane's outbox,
``dlq`` on the broker's dead-letter queue; ``rabbitmq-permissions`` makes
least-privilege RabbitMQ users; ``token`` makes entries of the coordinator's access
file. Settings come from flags, else ``SAGAPLANE_*`` environment variables, else
defaults.

Output is for people by default; ``--json`` prints JSON for scripts (the proto JSON
mapping with the proto's field names, as ``grpcurl`` takes it). Errors go to stderr,
and the exit status says what went wrong (:class:`ExitCode`).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from collections.abc import Callable, Mapping, Sequence

from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import silence_stdout
from sagaplane import defaults
from sagaplane.sagas import SagaState
from sagaplane.urls import redact

__all__ = ["CliError", "ExitCode", "build_parser", "main"]

DEFAULT_COORDINATOR = defaults.COORDINATOR_ADDRESS
DEFAULT_TIMEOUT = 10.0

Command = Callable[[argparse.Namespace], int]


def _float_env(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None:
        return default
    try:
        return float(raw)
    except ValueError:
        raise CliError(f"{name}={raw!r} is not a number", ExitCode.USAGE) from None


def _client_options(env: Mapping[str, str]) -> argparse.ArgumentParser:
    """The flags every client command takes."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=env.get("SAGAPLANE_COORDINATOR") or DEFAULT_COORDINATOR,
        help="the coordinator's gRPC address; several replicas as IP:PORT,IP:PORT,... "
        "(calls go to those that answer), or dns:///NAME:PORT for every address of a name "
        "[SAGAPLANE_COORDINATOR; default %(default)s]",
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=float,
        default=_float_env(env, "SAGAPLANE_TIMEOUT", DEFAULT_TIMEOUT),
        help="deadline of each call to the coordinator [SAGAPLANE_TIMEOUT; default %(default)s]",
    )
    group.add_argument(
        "--json", action="store_true", help="print JSON (for scripts) instead of tables"
    )
    security = common.add_argument_group("security")
    security.add_argument(
        "--token",
        default=env.get("SAGAPLANE_TOKEN") or None,
        help="send `authorization: Bearer TOKEN` with every call [SAGAPLANE_TOKEN]",
    )
    security.add_argument(
        "--tls",
        action="store_true",
        default=env.get("SAGAPLANE_TLS", "0") in ("1", "true", "yes"),
        help="connect over TLS, trusting the system's CAs (implied by the flags below) "
        "[SAGAPLANE_TLS=1]",
    )
    security.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=env.get("SAGAPLANE_TLS_CA") or None,
        help="connect over TLS, trusting the CA in this file [SAGAPLANE_TLS_CA]",
    )
    security.add_argument(
        "--client-cert",
        metavar="PEM",
        default=env.get("SAGAPLANE_CLIENT_CERT") or None,
        help="present this client certificate (mTLS) [SAGAPLANE_CLIENT_CERT]",
    )
    security.add_argument(
        "--client-key",
        metavar="PEM",
        default=env.get("SAGAPLANE_CLIENT_KEY") or None,
        help="the private key of --client-cert [SAGAPLANE_CLIENT_KEY]",
    )
    security.add_argument(
        "--tls-server-name",
        metavar="NAME",
        default=env.get("SAGAPLANE_TLS_SERVER_NAME") or None,
        help="check the coordinators' certificates against this name rather than the "
        "--coordinator host (needed for replicas listed by different IP addresses) "
        "[SAGAPLANE_TLS_SERVER_NAME]",
    )
    return common


def _watch_options(parser: argparse.ArgumentParser, *, after: str = "") -> None:
    # Defaults of None: start and compensate refuse them without --watch, so a given
    # flag must be told from an absent one (the values used are in client.follow_args).
    only = f" (with {after})" if after else ""
    parser.add_argument(
        "--max-wait",
        metavar="SECONDS",
        type=float,
        help=f"give up waiting after this long, with exit status 7{only} "
        "(default: wait until it ends)",
    )
    parser.add_argument(
        "--interval",
        metavar="SECONDS",
        type=float,
        help=f"seconds before reconnecting to a lost coordinator{only}, then backing off "
        "(default 0.2)",
    )


_EPILOG = """\
exit status:
  0  success
  1  an unexpected error
  2  usage error or invalid input (bad flags, unreadable saga file, INVALID_ARGUMENT)
  3  the coordinator (serve/migrate: PostgreSQL or RabbitMQ) cannot be reached
  4  no saga has this id
  5  refused: an illegal transition, or an idempotency key reused for another request
  6  watched saga ended, but not as hoped (not completed; compensate: not compensated)
  7  --max-wait passed before the saga ended
  8  denied: no token or an unknown one (UNAUTHENTICATED), or a role too low for the call
     (PERMISSION_DENIED)

Run `sagaplane COMMAND --help` for a command's flags and environment variables.
"""


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; flag defaults come from ``env`` (the process's by default)."""
    from coordinator.cli import client, dlq, imports, outbox, rabbitmq, server, tokens

    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="sagaplane",
        description="Sagaplane: a saga coordinator for polyglot microservices.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    common = _client_options(env)

    def add(name: str, run: Command, summary: str, **kwargs: object) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            # The raw formatter keeps the epilogs' examples as written; wrap the rest here.
            description=textwrap.fill(summary, 88),
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kwargs,  # type: ignore[arg-type]
        )
        sub.set_defaults(run=run)
        return sub

    server.add_serve(
        add("serve", server.serve, "Run the coordinator until SIGTERM or Ctrl-C."), env
    )
    server.add_migrate(
        add("migrate", server.migrate, "Apply the coordinator's pending database migrations."),
        env,
    )
    server.add_prune(
        add(
            "prune",
            server.prune,
            "Delete what the retention rules say has expired (one pass, as every "
            "coordinator does every --prune-interval); with --dry-run, only say what.",
        ),
        env,
    )
    start = add(
        "start",
        client.start,
        "Start a saga from a JSON or YAML file (the StartSaga request, as grpcurl takes it).",
        parents=[common],
        epilog=client.START_EPILOG,
    )
    start.add_argument("file", metavar="FILE", help="the saga: a .json or .yaml file, - for stdin")
    start.add_argument("--name", help="the saga's name (overrides the file's)")
    start.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="starting again with the same key returns the same saga (overrides the file's)",
    )
    start.add_argument("--watch", action="store_true", help="then follow it until it ends")
    _watch_options(start, after="--watch")

    imports.add_import(
        add(
            "import",
            imports.run_import,
            "Start many sagas from a file: JSON Lines, a YAML or JSON list, or CSV rows "
            "that fill a saga template. Sent as StartSagas chunks, each started whole or "
            "not at all; running it again resumes it (nothing starts twice).",
            parents=[common],
            epilog=imports.IMPORT_EPILOG,
        )
    )

    get = add("get", client.get, "Show one saga: its state and steps.", parents=[common])
    get.add_argument("id", metavar="ID", help="the saga's id")
    get.add_argument("--history", action="store_true", help="also show every transition")

    listing = add(
        "list",
        client.list_active,
        "List active sagas (started, compensating, compensation_failed), newest first; "
        "with --all, --state or --since, every saga, finished ones too.",
        parents=[common],
    )
    listing.add_argument("--name", default="", help="only sagas of this name")
    listing.add_argument(
        "--limit",
        type=int,
        default=50,
        help="at most this many (default %(default)s)",
    )
    listing.add_argument(
        "--stale-for",
        metavar="DURATION",
        type=client.parse_duration,
        help="only sagas not updated for at least this long, e.g. 90s, 15m, 2h, 1d "
        "(active sagas only)",
    )
    listing.add_argument(
        "--all", action="store_true", help="every saga, finished ones too (not only active ones)"
    )
    listing.add_argument(
        "--state",
        action="append",
        default=[],
        choices=[state.value for state in SagaState],
        help="only sagas in this state (repeat for more); implies --all",
    )
    listing.add_argument(
        "--since",
        metavar="DURATION",
        type=client.parse_duration,
        help="only sagas started within this long, e.g. 15m, 2h, 7d; implies --all",
    )

    compensate = add(
        "compensate",
        client.compensate,
        "Undo a saga: stop it, then compensate its completed steps, newest first.",
        parents=[common],
    )
    compensate.add_argument("id", metavar="ID", help="the saga's id")
    compensate.add_argument("--reason", default="", help="why; recorded in the history")
    compensate.add_argument("--watch", action="store_true", help="then follow it until it ends")
    _watch_options(compensate, after="--watch")

    watch = add(
        "watch",
        client.watch,
        "Follow a saga, printing each transition as it happens, until it ends. "
        "Exit status 0 if it completed, 6 if it ended otherwise. With --json, prints "
        "only the final saga.",
        parents=[common],
    )
    watch.add_argument("id", metavar="ID", help="the saga's id")
    _watch_options(watch)

    resolve = add(
        "resolve",
        client.resolve,
        "Resolve a saga in compensation_failed: retry its failed compensation now, or "
        "record that a person undid the step by hand. Either way it is in the history.",
        parents=[common],
    )
    resolve.add_argument("id", metavar="ID", help="the saga's id")
    decision = resolve.add_mutually_exclusive_group(required=True)
    decision.add_argument(
        "--retry", action="store_true", help="send the failed compensation once more, now"
    )
    decision.add_argument(
        "--mark-compensated",
        action="store_true",
        help="the step was undone by hand: carry on with the older steps' compensations",
    )
    resolve.add_argument("--reason", required=True, help="who decided, and why (required)")

    outbox.add_outbox(
        add(
            "outbox",
            _subcommand,
            "An outbox's rows by status (the coordinator's or a participant's database): "
            "stats, list the failed, invalid and expired ones, retry or discard rows.",
        ),
        env,
    )
    outbox.add_relay(
        add(
            "relay",
            _subcommand,
            "Publish a database's outbox until SIGTERM: the relay on its own, for a "
            "service that emits events but runs no participant.",
        ),
        env,
    )

    dlq.add_dlq(
        add(
            "dlq",
            _subcommand,
            "The dead-letter queue: list what each message is and why it died, or replay "
            "messages back to the queue they came from.",
        ),
        env,
    )
    rabbitmq.add_rabbitmq_permissions(
        add(
            "rabbitmq-permissions",
            rabbitmq.run,
            "Least-privilege RabbitMQ users for the coordinator and each participant service: "
            "print the rabbitmqctl commands, or run them with --apply (which also declares "
            "the core topology that the participants may not declare).",
            epilog=rabbitmq.EPILOG,
        ),
        env,
    )
    tokens.add_token(
        add(
            "token",
            lambda args: ExitCode.USAGE,
            "Make tokens for the coordinator's access file (--auth-tokens).",
            epilog=tokens.TOKEN_EPILOG,
        )
    )

    add(
        "health",
        client.health,
        "Ask the coordinator's health service; exit status 0 if SERVING, 3 otherwise.",
        parents=[common],
    )
    return parser


def _subcommand(args: argparse.Namespace) -> int:
    # Replaced by the subcommand's own run (set_defaults on the subparser wins).
    raise CliError("no command given", ExitCode.USAGE)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``sagaplane`` console script; exits with an :class:`ExitCode`."""
    try:
        parser = build_parser()
    except CliError as exc:
        # Masked again here: an error that quotes a URL must not show its password.
        print(f"sagaplane: error: {redact(exc.message)}", file=sys.stderr)
        sys.exit(exc.code)
    except ValueError as exc:
        # A SAGAPLANE_* variable that a flag's default is parsed from holds garbage.
        print(
            f"sagaplane: error: a SAGAPLANE_* environment variable is invalid: {exc}",
            file=sys.stderr,
        )
        sys.exit(ExitCode.USAGE)
    args = parser.parse_args(argv)
    run: Command = args.run
    try:
        code = run(args)
    except CliError as exc:
        # Masked again here: an error that quotes a URL must not show its password.
        print(f"sagaplane: error: {redact(exc.message)}", file=sys.stderr)
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    except BrokenPipeError:
        # The commands print through output.say, which carries on when the reader goes
        # away (`| head`); this is for output that does not, and whose command stopped
        # half way: no traceback, but not a success either.
        silence_stdout()
        code = ExitCode.ERROR
    sys.exit(code)
