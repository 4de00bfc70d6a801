"""The relay's settings from the environment (SAGAPLANE_OUTBOX_*), and the event wire."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

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
