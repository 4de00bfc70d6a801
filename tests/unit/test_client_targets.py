"""The coordinator target forms of SagaClient, the CLI and SAGAPLANE_COORDINATOR
(:mod:`sagaplane.targets`): what gRPC gets, what is refused and why, and the authority
TLS checks the replicas' certificates against."""

from __future__ import annotations

import json

import grpc
import pytest

from sagaplane import SagaClient
from sagaplane.errors import ConfigurationError
from sagaplane.targets import RETRIED_METHODS, Target, authority, channel_options, parse


@pytest.mark.parametrize(
    ("given", "uri"),
    [
        # One address: handed to gRPC as before (it resolves names itself).
        ("127.0.0.1:50051", "127.0.0.1:50051"),
        ("coordinator.internal:50051", "coordinator.internal:50051"),
        ("[::1]:50051", "[::1]:50051"),
        ("dns:///coordinator.internal:50051", "dns:///coordinator.internal:50051"),
        ("unix:/run/sagaplane.sock", "unix:/run/sagaplane.sock"),
        # Several replicas by IP: gRPC's ipv4:/ipv6: targets.
        (
            "127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053",
            "ipv4:127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053",
        ),
        ("10.0.0.1:50051, 10.0.0.2:50051", "ipv4:10.0.0.1:50051,10.0.0.2:50051"),
        ("[fd00::1]:50051,[fd00::2]:50051", "ipv6:[fd00::1]:50051,[fd00::2]:50051"),
        ("ipv4:10.0.0.1:1,10.0.0.2:2", "ipv4:10.0.0.1:1,10.0.0.2:2"),
        ("IPV6:[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2"),
        ("ipv4:10.0.0.1:1", "ipv4:10.0.0.1:1"),
    ],
)
def test_supported_forms(given: str, uri: str) -> None:
    assert parse(given).uri == uri


def test_a_list_knows_its_hosts() -> None:
    target = parse("10.0.0.1:50051,10.0.0.2:50051")
    assert target.hosts == ("10.0.0.1", "10.0.0.2") and target.several
    assert not parse("10.0.0.1:50051").several
    assert not parse("ipv4:10.0.0.1:50051").several


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("a.internal:50051,b.internal:50051", "'a.internal' is not an IP address"),
        ("localhost:50051,localhost:50052", "one DNS name that resolves to all of them"),
        ("10.0.0.1:50051,[fd00::1]:50051", "mixes IPv4 and IPv6"),
        ("ipv4:[::1]:50051,[::2]:50051", "ipv4: lists IPv4 addresses only"),
        ("10.0.0.1,10.0.0.2:50051", "'10.0.0.1' has no port"),
        ("10.0.0.1:50051,", "'' has no port"),
        ("10.0.0.1:50051,10.0.0.2:http", "'http' in '10.0.0.2:http' is not a port"),
        ("10.0.0.1:50051,10.0.0.2:70000", "is not a port"),
        ("::1:50051,::2:50051", "in brackets"),
        ("dns:///a:1,b:2", "a dns: target names one host"),
        ("  ", "is empty"),
    ],
)
def test_unsupported_forms_are_refused_naming_the_target(given: str, says: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        parse(given)
    assert says in str(refused.value)
    if given.strip():
        assert repr(given) in str(refused.value)


def test_the_client_refuses_an_unsupported_target_when_made() -> None:
    with pytest.raises(ConfigurationError, match=r"a\.internal"):
        SagaClient("a.internal:1,b.internal:2")


def test_the_environment_takes_the_same_forms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAPLANE_COORDINATOR", "127.0.0.1:50051,127.0.0.1:50052")
    client = SagaClient()
    assert client.target == "127.0.0.1:50051,127.0.0.1:50052"


def test_tls_checks_one_name_for_every_replica() -> None:
    one_host = parse("127.0.0.1:50051,127.0.0.1:50052")
    assert authority(one_host, None) == "127.0.0.1"
    assert authority(one_host, "coordinator.internal") == "coordinator.internal"
    # One address: gRPC's own authority (its host), unless a name is given.
    assert authority(parse("10.0.0.1:50051"), None) is None
    assert authority(parse("10.0.0.1:50051"), "coordinator.internal") == "coordinator.internal"
    several = parse("10.0.0.1:50051,10.0.0.2:50051")
    assert authority(several, "coordinator.internal") == "coordinator.internal"
    with pytest.raises(ConfigurationError, match="--tls-server-name"):
        authority(several, None)
    assert authority(parse("[fd00::1]:1,[fd00::1]:2"), None) == "[fd00::1]"


def test_a_tls_client_of_replicas_on_different_hosts_needs_their_name() -> None:
    credentials = grpc.ssl_channel_credentials()
    with pytest.raises(ConfigurationError, match="server_name="):
        SagaClient("10.0.0.1:50051,10.0.0.2:50051", credentials=credentials)
    SagaClient("10.0.0.1:50051,10.0.0.2:50051", credentials=credentials, server_name="c.internal")
    # In plaintext there is nothing to check.
    SagaClient("10.0.0.1:50051,10.0.0.2:50051")


def _options(target: Target, **kw: object) -> dict[str, object]:
    return dict(channel_options(target, **kw))  # type: ignore[arg-type]


def test_every_channel_balances_and_retries_only_what_is_safe() -> None:
    options = _options(parse("127.0.0.1:50051"), tls=False)
    config = json.loads(str(options["grpc.service_config"]))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    retried = {n["method"] for n in method["name"]}
    assert retried == set(RETRIED_METHODS)
    assert retried.isdisjoint({"StartSaga", "StartSagas", "ResolveCompensation"})
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert method["retryPolicy"]["maxAttempts"] <= 5  # gRPC's limit
    assert "grpc.default_authority" not in options


def test_options_of_the_caller_come_last_and_a_service_config_of_theirs_wins() -> None:
    target = parse("127.0.0.1:50051,127.0.0.1:50052")
    mine = ("grpc.service_config", '{"loadBalancingConfig": [{"pick_first": {}}]}')
    options = channel_options(target, tls=True, options=[mine, ("grpc.x", 1)])
    assert [name for name, _ in options] == [
        "grpc.default_authority",
        "grpc.service_config",
        "grpc.x",
    ]
    assert dict(options)["grpc.service_config"] == mine[1]
    assert dict(options)["grpc.default_authority"] == "127.0.0.1"
