"""The MAC of sagaplane.signing covers every fact a receiver acts on: change any one of
them and the signature no longer verifies; any of a service's keys verifies."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest

from sagaplane import signing, wire
from sagaplane.limits import MAX_MESSAGE_BYTES

KEY, OTHER = bytes.fromhex(secrets.token_hex(32)), bytes.fromhex(secrets.token_hex(32))
FACTS: dict[str, Any] = {
    "signer": signing.COORDINATOR,
    "message_type": wire.COMMAND_TYPE,
    "routing_key": "pay.refund",
    "message_id": "01J0:compensate:1",
    "body": b"\x0a\x04saga",
}


def test_a_signature_verifies_under_any_of_the_keys() -> None:
    signature = signing.sign([KEY], **FACTS)
    signing.verify([KEY], signature, **FACTS)
    signing.verify([OTHER, KEY], signature, **FACTS)
    signing.verify([OTHER, KEY], signature.encode(), **FACTS)  # as a header may hold it
    with pytest.raises(signing.BadSignature, match="matches no key"):
        signing.verify([OTHER], signature, **FACTS)


@pytest.mark.parametrize(
    ("fact", "changed"),
    [
        ("signer", "pay"),
        ("message_type", wire.REPLY_TYPE),
        ("routing_key", "pay.charge"),
        ("message_id", "01J0:compensate:2"),
        ("body", b"\x0a\x04sagb"),
    ],
)
def test_changing_any_fact_breaks_the_signature(fact: str, changed: object) -> None:
    signature = signing.sign([KEY], **FACTS)
    with pytest.raises(signing.BadSignature):
        signing.verify([KEY], signature, **(FACTS | {fact: changed}))


def test_fields_cannot_be_shifted_between_facts() -> None:
    # Length-prefixed: "a.b" + "c" is not "a" + ".bc".
    one = signing.sign([KEY], **(FACTS | {"routing_key": "a.b", "message_id": "c"}))
    with pytest.raises(signing.BadSignature):
        signing.verify([KEY], one, **(FACTS | {"routing_key": "a", "message_id": ".bc"}))


@pytest.mark.parametrize("header", [None, "", 42, "not hex", b""])
def test_a_missing_or_malformed_signature_is_refused(header: object) -> None:
    with pytest.raises(signing.BadSignature):
        signing.verify([KEY], header, **FACTS)


def test_the_owner_of_an_action_is_its_prefix() -> None:
    assert signing.owner("payment.charge") == "payment"
    assert signing.owner("payment.card.charge") == "payment"
    assert signing.owner("solo") == "solo"


def test_a_key_ring_refuses_bad_entries() -> None:
    with pytest.raises(signing.InvalidKeys, match="service name"):
        signing.KeyRing.parse({"pay.x": [KEY.hex()]})
    with pytest.raises(signing.InvalidKeys, match="pay: expected a list"):
        signing.KeyRing.parse({"pay": [1]})
    with pytest.raises(signing.InvalidKeys, match="map of service"):
        signing.KeyRing.parse([KEY.hex()])
    with pytest.raises(signing.InvalidKeys, match="no signing key"):
        signing.KeyRing.parse({"pay": []})
    ring = signing.KeyRing.parse({"pay": [KEY.hex(), OTHER.hex()]})
    assert ring.keys("pay") == (KEY, OTHER) and ring.keys("nobody") is None


def test_keys_are_checked_when_loaded(tmp_path: Path) -> None:
    with pytest.raises(signing.InvalidKeys, match="at least 32 bytes"):
        signing.parse_keys("abcd")
    with pytest.raises(signing.InvalidKeys, match="hex"):
        signing.parse_keys("not hex")
    path = tmp_path / "keys.yaml"
    path.write_text("pay: [abcd]\n")
    with pytest.raises(signing.InvalidKeys, match="pay: a signing key"):
        signing.KeyRing.load(path)
    path.write_text(f"pay: {KEY.hex()}\n")
    assert signing.KeyRing.load(path).keys("pay") == (bytes.fromhex(KEY.hex()),)


def test_an_oversized_body_is_refused_unread() -> None:
    body = b"x" * (MAX_MESSAGE_BYTES + 1)
    signature = signing.sign([KEY], **(FACTS | {"body": body}))
    with pytest.raises(signing.BadSignature, match="bytes; at most"):
        signing.verify([KEY], signature, **(FACTS | {"body": body}))
