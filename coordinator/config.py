"""Settings: command-line flags win over SAGAPLANE_* environment variables, which win
over the defaults. ``sagaplane serve`` (and ``python -m coordinator``, which runs it)
parses them (``coordinator.cli.server``)."""

from __future__ import annotations

import argparse
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from coordinator import retention
from coordinator.retention import Retention
from sagaplane import defaults
from sagaplane.relay_settings import RelaySettings
from sagaplane.runtime import EVENT_LOOPS
from sagaplane.urls import redact

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/sagaplane"
DEFAULT_AMQP_URL = defaults.AMQP_URL
DEFAULT_LISTEN = defaults.COORDINATOR_ADDRESS


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the coordinator process needs to know."""

    database_url: str = DEFAULT_DATABASE_URL
    """libpq URL of the coordinator's PostgreSQL (SAGAPLANE_DATABASE_URL)."""
    amqp_url: str = DEFAULT_AMQP_URL
    """RabbitMQ URL (SAGAPLANE_AMQP_URL)."""
    listen: str = DEFAULT_LISTEN
    """gRPC address host:port; port 0 picks a free one (SAGAPLANE_LISTEN)."""
    pool_size: int = 10
    """PostgreSQL connections (SAGAPLANE_POOL_SIZE)."""
    prefetch: int = 256
    """Replies taken from RabbitMQ before acking; bounds a batch (SAGAPLANE_PREFETCH)."""
    timer_interval: float = 0.5
    """Seconds between looks for due timeouts, retries and deadlines
    (SAGAPLANE_TIMER_INTERVAL)."""
    grace: float = 10.0
    """Seconds in-flight calls get to finish on shutdown (SAGAPLANE_GRACE)."""
    migrate: bool = True
    """Apply pending migrations at start (SAGAPLANE_MIGRATE=0 to skip)."""
    watch_send_timeout: float = 30.0
    """Seconds a WatchSaga client may leave a message unread before it is cut off with
    RESOURCE_EXHAUSTED (SAGAPLANE_WATCH_SEND_TIMEOUT)."""
    event_loop: str = "uvloop"
    """``uvloop`` or ``asyncio`` (SAGAPLANE_EVENT_LOOP); see sagaplane.runtime."""
    metrics_listen: str | None = None
    """Prometheus ``/metrics`` address host:port; None serves no metrics and opens no
    port (SAGAPLANE_METRICS_LISTEN)."""
    retention: Retention = field(default_factory=Retention)
    """What is deleted when (``--retention``, ``--retention-for``, ``--outbox-retention``;
    see coordinator.retention)."""
    relay: RelaySettings = field(default_factory=RelaySettings)
    """The outbox relay's batch size, poll interval, max attempts and max age
    (``--batch-size`` etc., ``SAGAPLANE_OUTBOX_*``: :func:`add_relay_arguments`)."""
    http_listen: str | None = None
    """The operator web page's address host:port; None serves no page and opens no port
    (SAGAPLANE_HTTP_LISTEN)."""
    tls_cert: str | None = None
    """PEM certificate (chain) of the gRPC server; with ``tls_key``, gRPC is served over
    TLS (SAGAPLANE_TLS_CERT)."""
    tls_key: str | None = None
    """PEM private key of ``tls_cert`` (SAGAPLANE_TLS_KEY)."""
    tls_client_ca: str | None = None
    """PEM CA certificate(s): every client must present a certificate they signed (mTLS;
    needs ``tls_cert``) (SAGAPLANE_TLS_CLIENT_CA)."""
    insecure: bool = False
    """Serve plaintext gRPC on a non-loopback address (SAGAPLANE_INSECURE=1); without it
    the coordinator refuses to (see coordinator.api.tls)."""
    auth_tokens: str | None = None
    """The access file: who may call what (coordinator.api.auth); None: everyone may do
    everything (SAGAPLANE_AUTH_TOKENS). Reread on SIGHUP."""
    signing_keys: str | None = None
    """The signing keys file, service -> hex keys (sagaplane.signing); with it every
    command is signed and every reply must be (SAGAPLANE_SIGNING_KEYS). None: unsigned."""


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """Add the coordinator's flags, with defaults taken from ``env``."""
    d = Settings()
    add_database_url(parser, env)
    amqp_url = env.get("SAGAPLANE_AMQP_URL", d.amqp_url)
    parser.add_argument(
        "--amqp-url",
        default=amqp_url,
        help=f"RabbitMQ URL [SAGAPLANE_AMQP_URL; default {shown(amqp_url)}]",
    )
    parser.add_argument(
        "--listen",
        default=env.get("SAGAPLANE_LISTEN", d.listen),
        help="gRPC listen address host:port [SAGAPLANE_LISTEN; default %(default)s]",
    )
    parser.add_argument(
        "--pool-size",
        type=int,
        default=int(env.get("SAGAPLANE_POOL_SIZE", d.pool_size)),
        help="PostgreSQL connections [SAGAPLANE_POOL_SIZE; default %(default)s]",
    )
    parser.add_argument(
        "--prefetch",
        type=int,
        default=int(env.get("SAGAPLANE_PREFETCH", d.prefetch)),
        help="unacked replies in flight [SAGAPLANE_PREFETCH; default %(default)s]",
    )
    parser.add_argument(
        "--timer-interval",
        type=float,
        default=float(env.get("SAGAPLANE_TIMER_INTERVAL", d.timer_interval)),
        help="seconds between timer rounds [SAGAPLANE_TIMER_INTERVAL; default %(default)s]",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=float(env.get("SAGAPLANE_GRACE", d.grace)),
        help="seconds to finish in-flight calls on shutdown [SAGAPLANE_GRACE; default %(default)s]",
    )
    parser.add_argument(
        "--watch-send-timeout",
        type=float,
        default=float(env.get("SAGAPLANE_WATCH_SEND_TIMEOUT", d.watch_send_timeout)),
        help="seconds a WatchSaga client may leave a message unread before it is cut off "
        "[SAGAPLANE_WATCH_SEND_TIMEOUT; default %(default)s]",
    )
    parser.add_argument(
        "--no-migrate",
        action="store_true",
        default=env.get("SAGAPLANE_MIGRATE", "1") in ("0", "false", "no"),
        help="do not apply pending migrations at start [SAGAPLANE_MIGRATE=0]",
    )
    parser.add_argument(
        "--event-loop",
        choices=EVENT_LOOPS,
        default=_choice(env, "SAGAPLANE_EVENT_LOOP", EVENT_LOOPS, d.event_loop),
        help="event loop to run on [SAGAPLANE_EVENT_LOOP; default %(default)s]",
    )
    parser.add_argument(
        "--metrics-listen",
        default=env.get("SAGAPLANE_METRICS_LISTEN") or d.metrics_listen,
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics "
        "[SAGAPLANE_METRICS_LISTEN; default: off]",
    )
    retention.add_arguments(parser, env)
    add_relay_arguments(parser, env)
    parser.add_argument(
        "--http-listen",
        default=env.get("SAGAPLANE_HTTP_LISTEN") or d.http_listen,
        metavar="HOST:PORT",
        help="serve the operator web page at http://HOST:PORT/ "
        "[SAGAPLANE_HTTP_LISTEN; default: off]",
    )
    add_security_arguments(parser, env)


def add_relay_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The outbox relay's flags (``serve`` and ``relay`` share them), defaults from the
    ``SAGAPLANE_OUTBOX_*`` variables of ``env`` (ValueError naming one that is bad)."""
    d = RelaySettings.from_env(env)
    group = parser.add_argument_group(
        "outbox relay", "How the outbox's rows are published (see `sagaplane outbox`)."
    )
    group.add_argument(
        "--batch-size",
        metavar="ROWS",
        type=int,
        default=d.batch_size,
        help="rows claimed and published per cycle "
        "[SAGAPLANE_OUTBOX_BATCH_SIZE; default %(default)s]",
    )
    group.add_argument(
        "--poll-interval",
        metavar="SECONDS",
        type=float,
        default=d.poll_interval,
        help="longest wait when no NOTIFY comes [SAGAPLANE_OUTBOX_POLL_INTERVAL; "
        "default %(default)s]",
    )
    group.add_argument(
        "--max-attempts",
        metavar="N",
        type=int,
        default=d.max_attempts,
        help="publishes refused by the broker (no queue bound, a nack) before a row is "
        "parked; a broker outage counts none [SAGAPLANE_OUTBOX_MAX_ATTEMPTS; "
        "default %(default)s]",
    )
    group.add_argument(
        "--max-age",
        metavar="SECONDS",
        type=float,
        default=d.max_age or 0.0,
        help="park rows not published this long after they were written as expired, "
        "0 for never [SAGAPLANE_OUTBOX_MAX_AGE; default %(default)s]",
    )


def relay_from_args(args: argparse.Namespace) -> RelaySettings:
    """The relay settings the flags of :func:`add_relay_arguments` say (ValueError for
    one out of range)."""
    return RelaySettings(
        batch_size=args.batch_size,
        poll_interval=args.poll_interval,
        max_attempts=args.max_attempts,
        max_age=args.max_age or None,
    )


def add_security_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """TLS and access control flags (see the README's Security section)."""
    group = parser.add_argument_group("security")
    group.add_argument(
        "--tls-cert",
        metavar="PEM",
        default=env.get("SAGAPLANE_TLS_CERT") or None,
        help="serve gRPC over TLS with this certificate (chain) [SAGAPLANE_TLS_CERT]",
    )
    group.add_argument(
        "--tls-key",
        metavar="PEM",
        default=env.get("SAGAPLANE_TLS_KEY") or None,
        help="the private key of --tls-cert [SAGAPLANE_TLS_KEY]",
    )
    group.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        default=env.get("SAGAPLANE_TLS_CLIENT_CA") or None,
        help="require client certificates signed by this CA (mTLS) [SAGAPLANE_TLS_CLIENT_CA]",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        default=env.get("SAGAPLANE_INSECURE", "0") in ("1", "true", "yes"),
        help="allow plaintext gRPC on a non-loopback --listen address [SAGAPLANE_INSECURE=1]",
    )
    group.add_argument(
        "--auth-tokens",
        metavar="FILE",
        default=env.get("SAGAPLANE_AUTH_TOKENS") or None,
        help="who may call what (tokens by SHA-256 and certificate subjects, each with a "
        "role); every call needs a known caller; reread on SIGHUP [SAGAPLANE_AUTH_TOKENS]",
    )
    group.add_argument(
        "--signing-keys",
        metavar="FILE",
        default=env.get("SAGAPLANE_SIGNING_KEYS") or None,
        help="sign every command and apply only replies signed by the service that owns "
        "the action; YAML/JSON map service -> hex keys, the first signs, all verify "
        "[SAGAPLANE_SIGNING_KEYS]",
    )


class ConfigError(ValueError):
    """The settings contradict each other or name files that do not do."""


def check(settings: Settings) -> None:
    """Raise ConfigError when the settings cannot be served as asked."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both, or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise ConfigError("--tls-client-ca (mTLS) needs TLS: give --tls-cert and --tls-key too")
    if settings.tls_cert is None and not settings.insecure and not is_loopback(settings.listen):
        raise ConfigError(
            f"refusing to serve plaintext gRPC on {settings.listen}, which is not a loopback "
            "address: anyone who can reach it could read and change every saga. Give "
            "--tls-cert and --tls-key (SAGAPLANE_TLS_CERT, SAGAPLANE_TLS_KEY), or "
            "--insecure (SAGAPLANE_INSECURE=1) if the network is trusted"
        )
    if settings.http_listen is not None:
        if settings.tls_cert is not None:
            # The page acts through the gRPC API over a connection of its own, which
            # cannot yet verify the server's certificate or present a client's.
            raise ConfigError(
                "--http-listen cannot be used with --tls-cert yet: the web page would reach "
                "the TLS API without verifying it; serve the page from a coordinator "
                "without TLS on a trusted network, or leave it off"
            )
        if not settings.insecure and not is_loopback(settings.http_listen):
            raise ConfigError(
                f"refusing to serve the web page on {settings.http_listen}, which is not a "
                "loopback address: it is plain HTTP, and callers' tokens would cross the "
                "network in clear. Serve it on 127.0.0.1 (behind a TLS proxy), or give "
                "--insecure (SAGAPLANE_INSECURE=1) if the network is trusted"
            )


def is_loopback(listen: str) -> bool:
    """Whether ``host:port`` accepts connections from this machine only (127.0.0.0/8,
    ::1, localhost). Without TLS the coordinator listens only there, unless told
    ``--insecure``: anyone who can reach the port could read every saga and forge
    requests on the wire."""
    host = listen.rpartition(":")[0].removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or empty (every interface)


def add_database_url(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The ``--database-url`` flag (``serve`` and ``migrate`` share it)."""
    database_url = env.get("SAGAPLANE_DATABASE_URL", DEFAULT_DATABASE_URL)
    parser.add_argument(
        "--database-url",
        default=database_url,
        help=f"PostgreSQL URL [SAGAPLANE_DATABASE_URL; default {shown(database_url)}]",
    )


def shown(url: str) -> str:
    """``url`` as ``--help`` may print it: password masked, ``%`` kept from argparse."""
    return redact(url).replace("%", "%%")


def _choice(env: Mapping[str, str], name: str, choices: Sequence[str], default: str) -> str:
    # argparse checks a flag's value against its choices, never a default taken from env.
    value = env.get(name, default)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, not {value!r}")
    return value


def from_args(args: argparse.Namespace) -> Settings:
    """Settings from parsed flags (ValueError for a relay setting out of range)."""
    return Settings(
        database_url=args.database_url,
        amqp_url=args.amqp_url,
        listen=args.listen,
        pool_size=args.pool_size,
        prefetch=args.prefetch,
        timer_interval=args.timer_interval,
        grace=args.grace,
        watch_send_timeout=args.watch_send_timeout,
        migrate=not args.no_migrate,
        event_loop=args.event_loop,
        metrics_listen=args.metrics_listen or None,
        retention=retention.from_args(args),
        relay=relay_from_args(args),
        http_listen=args.http_listen or None,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        insecure=args.insecure,
        auth_tokens=args.auth_tokens,
        signing_keys=args.signing_keys,
    )
