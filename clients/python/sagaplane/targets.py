"""Where a client finds the coordinator: the target forms that :class:`~sagaplane.SagaClient`,
the CLI's ``--coordinator`` and ``SAGAPLANE_COORDINATOR`` take, and the channel options
that go with them.

The forms (:func:`parse`):

- ``host:port``: one address, as gRPC resolves it (a DNS name that resolves to several
  addresses is spread over all of them, see below);
- ``ip:port,ip:port,...``: several coordinator replicas by IP address, all IPv4
  (``10.0.0.1:50051,10.0.0.2:50051``) or all IPv6 in brackets
  (``[fd00::1]:50051,[fd00::2]:50051``); gRPC's own ``ipv4:`` and ``ipv6:`` prefixes
  are accepted in front of such a list too;
- gRPC target URIs, as they are: ``dns:///coordinator.internal:50051`` (every A/AAAA
  record of the name), ``unix:/path``, ``unix-abstract:name``.

A list of host names (``a.internal:50051,b.internal:50051``) is refused, as is a list
that mixes IPv4 and IPv6: gRPC's name resolvers take a list of IP addresses of one
family, or one DNS name, per channel, and Python's gRPC has no way to plug in another.
Give the replicas one DNS name with a record for each (a Kubernetes headless service
is one), or put a load balancer in front of them.

Every channel balances its calls over the addresses its target resolves to with gRPC's
``round_robin`` policy, which sends calls only to replicas whose connection is ready:
a replica that dies is left out as soon as its connection drops, and taken back once it
accepts connections again. gRPC's retry policy (:data:`RETRIED_METHODS`) repeats, on
UNAVAILABLE, the calls that are safe to repeat; gRPC repeats on its own, for every
method, a call that never left the client ("transparent retries").

With TLS, gRPC checks each replica's certificate against one name, the channel's
authority: for a single address, its host (as before); for a list, ``server_name``
when given (``--tls-server-name``), else the list's host when every entry has the same
one, else the list is refused (see :func:`authority`).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sagaplane.errors import ConfigurationError

__all__ = [
    "RETRIED_METHODS",
    "RETRY_ATTEMPTS",
    "SERVICE",
    "Target",
    "authority",
    "channel_options",
    "parse",
    "service_config",
]

SERVICE = "sagaplane.v1.SagaCoordinatorService"
"""The coordinator's gRPC service."""

RETRIED_METHODS = ("GetSaga", "ListActive", "ListSagas", "WatchSaga", "Compensate")
"""The methods gRPC repeats when a call fails with UNAVAILABLE (a replica died under it,
or none could be reached): the reads, and Compensate, which the coordinator answers
again without a second effect (a saga already compensating stays as it is). A
WatchSaga stream is repeated only until its first message: a stream cut later is
resumed by the caller with ``after_position``.

Not here: StartSaga and StartSagas, which could start a saga twice (a repeat is safe
only with an idempotency key, so :class:`~sagaplane.SagaClient` repeats keyed starts
itself); and ResolveCompensation, a person's decision about the step stuck now, which
a late repeat could apply to the next step that gets stuck."""

RETRY_ATTEMPTS = 4
"""Tries of a retried call, the first included (gRPC allows at most 5)."""

_RETRY_POLICY: dict[str, Any] = {
    "maxAttempts": RETRY_ATTEMPTS,
    # gRPC waits a random time up to the backoff: at most 0.1 + 0.2 + 0.4 s in all, so a
    # coordinator that cannot be reached at all is still reported within a second.
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}

_PASSED_ON = ("dns:", "unix:", "unix-abstract:")
"""Target URI schemes handed to gRPC as they are."""


@dataclass(frozen=True)
class Target:
    """A parsed target: what the channel connects to."""

    given: str
    """As the caller wrote it (what messages name)."""
    uri: str
    """What gRPC's channel gets."""
    hosts: tuple[str, ...] = ()
    """The host of each entry of a list (IPv6 ones in brackets); empty for one address
    or a gRPC URI."""

    @property
    def several(self) -> bool:
        """A list of addresses rather than one."""
        return len(self.hosts) > 1


def parse(text: str) -> Target:
    """The target of ``text`` in one of the forms above; ConfigurationError naming it for
    a form gRPC cannot resolve."""
    given = text
    text = text.strip()
    if not text:
        raise ConfigurationError("the coordinator's address is empty: give HOST:PORT")
    lowered = text.lower()
    if lowered.startswith(_PASSED_ON):
        if "," in text:
            raise ConfigurationError(
                f"coordinator address {given!r}: a {text.split(':', 1)[0]}: target names one "
                "host; list replicas by IP address (IP:PORT,IP:PORT), or give one DNS name "
                "that resolves to all of them"
            )
        return Target(given, text)
    family = None
    body = text
    for prefix in ("ipv4:", "ipv6:"):
        if lowered.startswith(prefix):
            family, body = int(prefix[3]), text[len(prefix) :]
    if family is None and "," not in text:
        return Target(given, text)  # one address: gRPC resolves it as before
    entries = [_entry(given, e.strip()) for e in body.split(",")]
    versions = {version for version, _, _ in entries}
    if len(versions) > 1:
        raise ConfigurationError(
            f"coordinator address {given!r} mixes IPv4 and IPv6 addresses; gRPC takes a "
            "list of one family: list the replicas' IPv4 addresses, or their IPv6 ones"
        )
    version = versions.pop()
    if family is not None and family != version:
        raise ConfigurationError(
            f"coordinator address {given!r}: ipv{family}: lists IPv{family} addresses only"
        )
    hosts = tuple(host for _, host, _ in entries)
    uri = f"ipv{version}:" + ",".join(f"{host}:{port}" for _, host, port in entries)
    return Target(given, uri, hosts)


def _entry(given: str, entry: str) -> tuple[int, str, int]:
    """(IP version, host as written in a URI, port) of one ``IP:PORT`` of a list."""
    host, colon, port = entry.rpartition(":")
    if not colon or not host:
        raise ConfigurationError(
            f"coordinator address {given!r}: {entry!r} has no port; each address of a "
            "list is IP:PORT ([IPV6]:PORT)"
        )
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        address = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ConfigurationError(
            f"coordinator address {given!r}: {host!r} is not an IP address. gRPC resolves "
            "one host name per channel, not a list of them: list the replicas by IP "
            "address, give one DNS name that resolves to all of them "
            "(dns:///coordinator.internal:50051), or put a load balancer in front"
        ) from None
    if address.version == 6 and not bracketed:
        raise ConfigurationError(
            f"coordinator address {given!r}: write the IPv6 address {host!r} in brackets, "
            f"[{host}]:PORT"
        )
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigurationError(
            f"coordinator address {given!r}: {port!r} in {entry!r} is not a port (1-65535)"
        )
    return address.version, host, int(port)


def authority(target: Target, server_name: str | None) -> str | None:
    """The name TLS checks every replica's certificate against (gRPC's default
    authority), when it is not the target's own: ``server_name`` when given; for a list,
    its one host when every entry has the same (``127.0.0.1:50051,127.0.0.1:50052``).

    A list of several hosts without ``server_name`` is refused: gRPC would check every
    certificate against the whole list, which no certificate names (and picking one of
    the hosts would fail on the other replicas' certificates, unless each names all).
    """
    if server_name:
        return server_name
    if not target.several:
        return None
    hosts = set(target.hosts)
    if len(hosts) == 1:
        return hosts.pop()
    raise ConfigurationError(
        f"coordinator address {target.given!r}: over TLS, every replica's certificate is "
        "checked against one name: give the name the replicas' certificates carry "
        "(server_name=, --tls-server-name, SAGAPLANE_TLS_SERVER_NAME)"
    )


def service_config() -> str:
    """gRPC's service config of every client channel: round_robin over the resolved
    addresses, and the retry policy of :data:`RETRIED_METHODS`."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": SERVICE, "method": m} for m in RETRIED_METHODS],
                    "retryPolicy": _RETRY_POLICY,
                }
            ],
        }
    )


def channel_options(
    target: Target,
    *,
    tls: bool,
    server_name: str | None = None,
    options: Iterable[tuple[str, Any]] = (),
) -> list[tuple[str, Any]]:
    """The channel options for ``target``: the service config (unless ``options`` bring
    their own), the authority TLS checks (see :func:`authority`), then ``options``."""
    given = list(options)
    names = {name for name, _ in given}
    found: list[tuple[str, Any]] = []
    if not names & {"grpc.service_config", "grpc.lb_policy_name"}:
        found.append(("grpc.service_config", service_config()))
    name = authority(target, server_name) if tls else server_name or None
    if name is not None and "grpc.default_authority" not in names:
        found.append(("grpc.default_authority", name))
    return found + given
