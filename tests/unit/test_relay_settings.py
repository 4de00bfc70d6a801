"""The relay's settings from the environment (SAGAPLANE_OUTBOX_*) and from the flags of
``sagaplane serve`` and ``sagaplane relay`` (one parser for both, flags over the
environment), refused by name when out of range; and the event wire."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from coordinator import config
from coordinator.cli import build_parser
from helpers.cli import exit_status
from sagaplane import ConfigurationError, Participant, topology, wire
from sagaplane.relay_settings import RelaySettings


def test_relay_settings_come_from_the_environment_with_documented_defaults() -> None:
    assert RelaySettings.from_env({}) == RelaySettings(
        batch_size=500, poll_interval=1.0, max_attempts=20, max_age=None
    )
    assert RelaySettings.from_env(
        {
            "SAGAPLANE_OUTBOX_BATCH_SIZE": "50",
            "SAGAPLANE_OUTBOX_POLL_INTERVAL": "0.5",
            "SAGAPLANE_OUTBOX_MAX_ATTEMPTS": "3",
            "SAGAPLANE_OUTBOX_MAX_AGE": "3600",
        }
    ) == RelaySettings(batch_size=50, poll_interval=0.5, max_attempts=3, max_age=3600.0)
    assert RelaySettings.from_env({"SAGAPLANE_OUTBOX_MAX_AGE": "0"}).max_age is None


def test_a_bad_setting_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGAPLANE_OUTBOX_BATCH_SIZE", "lots")
    with pytest.raises(ConfigurationError, match="SAGAPLANE_OUTBOX_BATCH_SIZE='lots'"):
        Participant("svc", database_url="postgresql:///x")


@pytest.mark.parametrize("command", ["serve", "relay"])
def test_serve_and_relay_take_the_relay_settings_from_flags_over_the_environment(
    command: str,
) -> None:
    env = {"SAGAPLANE_OUTBOX_BATCH_SIZE": "50", "SAGAPLANE_OUTBOX_MAX_AGE": "3600"}
    parser = build_parser(env)
    assert config.relay_from_args(parser.parse_args([command])) == RelaySettings(
        batch_size=50, max_age=3600.0
    )
    flags = ["--batch-size", "7", "--poll-interval", "0.25", "--max-attempts", "3"]
    assert config.relay_from_args(
        parser.parse_args([command, *flags, "--max-age", "0"])
    ) == RelaySettings(batch_size=7, poll_interval=0.25, max_attempts=3, max_age=None)
    assert config.relay_from_args(build_parser({}).parse_args([command])) == RelaySettings()


def test_the_coordinator_hands_its_relay_settings_on() -> None:
    args = build_parser({"SAGAPLANE_OUTBOX_MAX_ATTEMPTS": "4"}).parse_args(["serve"])
    assert config.from_args(args).relay == RelaySettings(max_attempts=4)
    assert config.Settings().relay == RelaySettings()


@pytest.mark.parametrize(
    ("argv", "env", "named"),
    [
        (["--batch-size", "0"], {}, "SAGAPLANE_OUTBOX_BATCH_SIZE"),
        (["--poll-interval", "0"], {}, "--poll-interval"),
        ([], {"SAGAPLANE_OUTBOX_MAX_ATTEMPTS": "0"}, "SAGAPLANE_OUTBOX_MAX_ATTEMPTS"),
        ([], {"SAGAPLANE_OUTBOX_MAX_AGE": "-5"}, "--max-age"),
        ([], {"SAGAPLANE_OUTBOX_BATCH_SIZE": "lots"}, "SAGAPLANE_OUTBOX_BATCH_SIZE='lots'"),
    ],
)
def test_a_relay_setting_out_of_range_is_a_usage_error_naming_it(
    argv: list[str],
    env: dict[str, str],
    named: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # Refused before anything is connected to (the URLs lead nowhere).
    nowhere = ["--database-url", "postgresql://nobody@127.0.0.1:1/x"]
    assert exit_status(["serve", *argv, *nowhere, "--listen", "127.0.0.1:0"]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("order.*", "order.created", True),
        ("order.*", "order.created.late", False),
        ("order.#", "order", True),
        ("order.#", "order.a.b", True),
        ("#", "anything.at.all", True),
        ("*.created", "order.created", True),
        ("*.created", "created", False),
        ("order.created", "order.cancelled", False),
    ],
)
def test_topic_patterns_match_as_the_broker_routes(pattern: str, key: str, matches: bool) -> None:
    assert topology.topic_matches(pattern, key) is matches


def test_an_event_survives_the_wire_and_garbage_is_refused_with_a_reason() -> None:
    at = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    event = wire.Event(type="a.b", source="s", id="1", time=at, subject="x", data={"k": [1]})
    assert wire.decode_event(wire.encode_event(event), topology.EVENT_CONTENT_TYPE) == event
    with pytest.raises(wire.Undecodable, match="no id"):
        wire.decode_event(
            b'{"specversion": "1.0", "type": "a", "source": "s"}',
            topology.EVENT_CONTENT_TYPE,
        )
    with pytest.raises(wire.Undecodable, match="not a CloudEvent"):
        wire.decode_event(b"{}", "application/x-protobuf")
