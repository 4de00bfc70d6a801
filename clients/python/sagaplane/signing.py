"""Signed steps: HMAC-SHA256 over commands and replies, with a key per participant service.

Off unless configured. Once a side has keys, it requires a valid signature on everything
it consumes (default-deny): a participant runs only commands signed by the coordinator,
and the coordinator applies only replies signed by the service that owns the step's
action. Anyone else on the vhost can still read a command's token, but cannot make a
signature, so a forged reply or command is dead-lettered (cause ``signature``).

Keys: each participant service has its own, shared by the coordinator and that service
only (a compromised service cannot sign for another). A key is hex, at least 32 bytes
(``openssl rand -hex 32``). Each side holds a list per service: the first key signs, every
key verifies, so a key is rotated by adding the new one to the verifier, then making it
the first everywhere, then dropping the old one.

Which service owns an action: the action's name up to its first dot (``payment.charge``
belongs to the service ``payment``). That is the only link between an action and a
service the coordinator can check: the bindings that route it live in the broker, and
anyone on the vhost may bind.

The MAC covers the whole serialized body (every field of the envelope: ids, kind,
action, attempt, token, input, output, deadline, ...) together with who signs it, the
AMQP ``type``, the routing key and the ``message_id`` (receivers deduplicate on it: a
copy under a new id must not run again), each length-prefixed. It travels in the
:data:`SIGNATURE_HEADER`; a reply names its signing service in :data:`SIGNER_HEADER`.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from sagaplane import topology, wire
from sagaplane.limits import MAX_MESSAGE_BYTES

__all__ = [
    "COORDINATOR",
    "KEYS_ENV",
    "MIN_KEY_BYTES",
    "SIGNATURE_HEADER",
    "SIGNER_HEADER",
    "BadSignature",
    "InvalidKeys",
    "KeyRing",
    "owner",
    "parse_key",
    "parse_keys",
    "reply_headers",
    "sign",
    "verify",
    "verify_command",
]

SIGNATURE_HEADER: Final = "sagaplane-signature"
"""The AMQP header that holds a message's MAC (hex)."""
SIGNER_HEADER: Final = "sagaplane-signer"
"""The AMQP header of a reply that names the service that signed it."""
COORDINATOR: Final = "coordinator"
"""The signer of every command (in the MAC, never a service's name: see :func:`owner`)."""
KEYS_ENV: Final = "SAGAPLANE_SIGNING_KEY"
"""A participant's keys, comma-separated (the first signs, all verify)."""
MIN_KEY_BYTES: Final = 32
"""The shortest key accepted (HMAC-SHA256's block of security)."""

_DOMAIN = b"sagaplane-signature-v1"


class InvalidKeys(ValueError):
    """A key or keys file is unusable; the text says which and why."""


class BadSignature(ValueError):
    """A message is unsigned, or its signature matches none of the keys; the text says which."""


def owner(action: str) -> str:
    """The service that owns ``action``: its name up to the first dot (the whole name
    when it has none)."""
    return action.partition(".")[0]


def parse_key(text: str) -> bytes:
    """A key from its hex form; raises :class:`InvalidKeys`."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise InvalidKeys("a signing key must be hex (openssl rand -hex 32)") from None
    if len(key) < MIN_KEY_BYTES:
        raise InvalidKeys(
            f"a signing key must be at least {MIN_KEY_BYTES} bytes ({len(key)} given)"
        )
    return key


def parse_keys(keys: str | Iterable[str]) -> tuple[bytes, ...]:
    """Keys from a comma-separated string or a list of hex strings (first signs); raises
    :class:`InvalidKeys` when one is bad or there is none."""
    items = keys.split(",") if isinstance(keys, str) else list(keys)
    parsed = tuple(parse_key(item) for item in items if item.strip())
    if not parsed:
        raise InvalidKeys("no signing key given")
    return parsed


def _payload(
    signer: str, message_type: str, routing_key: str, message_id: str, body: bytes
) -> bytes:
    parts = [_DOMAIN, signer.encode(), message_type.encode(), routing_key.encode()]
    parts += [message_id.encode(), body]
    return b"".join(len(part).to_bytes(8, "big") + part for part in parts)


def sign(
    keys: Sequence[bytes],
    *,
    signer: str,
    message_type: str,
    routing_key: str,
    message_id: str,
    body: bytes,
) -> str:
    """The MAC (hex) of a message, with the first of ``keys``."""
    payload = _payload(signer, message_type, routing_key, message_id, body)
    return hmac.new(keys[0], payload, hashlib.sha256).hexdigest()


def verify(
    keys: Sequence[bytes],
    signature: object,
    *,
    signer: str,
    message_type: str,
    routing_key: str,
    message_id: str,
    body: bytes,
) -> None:
    """Raise :class:`BadSignature` unless ``signature`` (the header's value) is the MAC of
    the message under one of ``keys``; compared in constant time."""
    if len(body) > MAX_MESSAGE_BYTES:
        # Refused unread: a MAC over a huge body would hold the event loop.
        raise BadSignature(f"the body is {len(body)} bytes; at most {MAX_MESSAGE_BYTES}")
    if isinstance(signature, bytes):
        signature = signature.decode("ascii", "replace")
    if not isinstance(signature, str) or not signature:
        raise BadSignature("the message is not signed")
    try:
        given = binascii.unhexlify(signature)
    except (binascii.Error, ValueError):
        raise BadSignature("the signature is not hex") from None
    payload = _payload(signer, message_type, routing_key, message_id, body)
    matched = False
    for key in keys:  # every key, always: the time taken says nothing of which matched
        matched |= hmac.compare_digest(hmac.new(key, payload, hashlib.sha256).digest(), given)
    if not matched:
        raise BadSignature(f"the signature matches no key of {signer!r}")


@dataclass(frozen=True)
class KeyRing:
    """The coordinator's keys: each participant service's, first signs, all verify."""

    services: Mapping[str, tuple[bytes, ...]]

    @classmethod
    def parse(cls, data: Any, *, source: str = "signing keys") -> KeyRing:
        """From ``{service: [hex key, ...]}`` (a single string is one key); raises
        :class:`InvalidKeys` naming the service."""
        if not isinstance(data, Mapping) or not data:
            raise InvalidKeys(f"{source}: expected a map of service name -> list of hex keys")
        services: dict[str, tuple[bytes, ...]] = {}
        for service, keys in data.items():
            if not isinstance(service, str) or not service or "." in service:
                raise InvalidKeys(f"{source}: {service!r} is no service name (no dots)")
            if isinstance(keys, str):
                keys = [keys]
            if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
                raise InvalidKeys(f"{source}: {service}: expected a list of hex keys")
            try:
                services[service] = parse_keys(keys)
            except InvalidKeys as exc:
                raise InvalidKeys(f"{source}: {service}: {exc}") from None
        return cls(services)

    @classmethod
    def load(cls, path: Path) -> KeyRing:
        """From a YAML or JSON file (blocking: call it off the event loop)."""
        try:
            text = path.read_text()
        except OSError as exc:
            raise InvalidKeys(f"cannot read signing keys {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InvalidKeys(f"{path}: not YAML or JSON: {exc}") from None
        return cls.parse(data, source=str(path))

    def keys(self, service: str) -> tuple[bytes, ...] | None:
        """The keys of ``service``, or None when it has none."""
        return self.services.get(service)


def verify_command(
    keys: Sequence[bytes],
    body: bytes,
    headers: Mapping[str, object] | None,
    *,
    routing_key: str,
    message_id: str,
) -> None:
    """A participant's check that a delivered command was signed by the coordinator;
    raises :class:`BadSignature`."""
    verify(
        keys,
        (headers or {}).get(SIGNATURE_HEADER),
        signer=COORDINATOR,
        message_type=wire.COMMAND_TYPE,
        routing_key=routing_key,
        message_id=message_id,
        body=body,
    )


def reply_headers(
    keys: Sequence[bytes], service: str, *, message_id: str, body: bytes
) -> dict[str, str]:
    """The headers that sign a reply of ``service`` (checked by the coordinator)."""
    signature = sign(
        keys,
        signer=service,
        message_type=wire.REPLY_TYPE,
        routing_key=topology.REPLIES_ROUTING_KEY,
        message_id=message_id,
        body=body,
    )
    return {SIGNER_HEADER: service, SIGNATURE_HEADER: signature}
