"""Page tokens of ListActive and ListSagas: opaque, and authenticated with the
coordinator's key.

A token is ``base64url(version | after | [created_at |] filter | mac)``: the id the next
page starts below; for ListSagas (version 2) also that saga's created_at (microseconds
since the epoch), so that a page continues where it should even when that saga has been
deleted since (retention); a digest of the filters it was issued for (ListActive: its
name filter; ListSagas: :func:`coordinator.api.validation.filter_digest`, which no name
can equal); and an HMAC-SHA256 (cut to 16 bytes) over all of it with a key that every
coordinator replica reads from its database (``sagaplane_keys``, made by a migration). A
token is never parsed as anything but these fixed-size fields, so a forged, tampered or
truncated one is refused before any of it is used. Version 1 tokens (no created_at) are
still accepted: the saga's created_at is then looked up.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from datetime import UTC, datetime, timedelta

from coordinator.errors import BadRequest

MAX_TOKEN_CHARS = 128
"""Longer page tokens are refused unread (a real one has 68 characters)."""

_VERSION = b"\x01"
_VERSION_AT = b"\x02"
"""A token that carries its saga's created_at (ListSagas)."""
_ID_BYTES = 26
_AT_BYTES = 8
_FILTER_BYTES = 8
_MAC_BYTES = 16
_SIZE = len(_VERSION) + _ID_BYTES + _FILTER_BYTES + _MAC_BYTES
_SIZES = {_VERSION: _SIZE, _VERSION_AT: _SIZE + _AT_BYTES}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class PageTokens:
    """Issues and checks page tokens with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a page token key needs at least 16 bytes")
        self._key = key

    def encode(self, after: str, name: str, *, created_at: datetime | None = None) -> str:
        """A token to continue a listing filtered by ``name`` (its filters as one string)
        after the saga ``after`` (created at ``created_at``, for a listing in that order)."""
        if created_at is None:
            raw = _VERSION + after.encode("ascii") + _filter(name)
        else:
            micros = (created_at - _EPOCH) // timedelta(microseconds=1)
            raw = _VERSION_AT + after.encode("ascii") + struct.pack(">q", micros) + _filter(name)
        return base64.urlsafe_b64encode(raw + self._mac(raw)).decode("ascii").rstrip("=")

    def decode(
        self,
        token: str,
        name: str,
        *,
        listing: str = "ListActive",
        filters: str = "a different name filter",
    ) -> str | None:
        """The id to continue after (None for the first page); BadRequest otherwise,
        saying the token is not one of ``listing``, or was issued for ``filters``."""
        found = self.position(token, name, listing=listing, filters=filters)
        return None if found is None else found[0]

    def position(
        self,
        token: str,
        name: str,
        *,
        listing: str = "ListActive",
        filters: str = "a different name filter",
    ) -> tuple[str, datetime | None] | None:
        """As :meth:`decode`, with the saga's created_at when the token carries it."""
        if not token:
            return None
        foreign = f"is not a token returned by {listing}"
        if len(token) > MAX_TOKEN_CHARS:
            raise BadRequest("page_token", foreign)
        try:
            data = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest("page_token", foreign) from exc
        raw, mac = data[:-_MAC_BYTES], data[-_MAC_BYTES:]
        version = raw[: len(_VERSION)]
        if len(data) != _SIZES.get(version) or not hmac.compare_digest(mac, self._mac(raw)):
            raise BadRequest("page_token", foreign)
        start = len(_VERSION)
        after = raw[start : start + _ID_BYTES].decode("ascii")
        if raw[-_FILTER_BYTES:] != _filter(name):
            raise BadRequest("page_token", f"was issued for {filters}")
        created_at = None
        if version == _VERSION_AT:
            [micros] = struct.unpack(">q", raw[start + _ID_BYTES : start + _ID_BYTES + _AT_BYTES])
            try:
                created_at = _EPOCH + timedelta(microseconds=micros)
            except OverflowError:  # only a token made with our key gets here: never
                raise BadRequest("page_token", foreign) from None
        return after, created_at

    def _mac(self, raw: bytes) -> bytes:
        return hmac.new(self._key, raw, hashlib.sha256).digest()[:_MAC_BYTES]


def _filter(name: str) -> bytes:
    return hashlib.sha256(name.encode("utf-8")).digest()[:_FILTER_BYTES]
