"""Page tokens of ListActive and ListSagas: opaque, and authenticated with the
coordinator's key.

A token is ``base64url(version | after | filter | mac)``: the id the next page starts
below, a digest of the filters it was issued for (ListActive: its name filter; ListSagas:
:func:`coordinator.api.validation.filter_digest`, which no name can equal), and an
HMAC-SHA256 (cut to 16 bytes) over both with a key that every coordinator replica reads
from its database (``sagaplane_keys``, made by a migration). A token is never parsed as anything but
these fixed-size fields, so a forged, tampered or truncated one is refused before any
of it is used.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from coordinator.errors import BadRequest

MAX_TOKEN_CHARS = 128
"""Longer page tokens are refused unread (a real one has 68 characters)."""

_VERSION = b"\x01"
_ID_BYTES = 26
_FILTER_BYTES = 8
_MAC_BYTES = 16
_SIZE = len(_VERSION) + _ID_BYTES + _FILTER_BYTES + _MAC_BYTES


class PageTokens:
    """Issues and checks page tokens with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("a page token key needs at least 16 bytes")
        self._key = key

    def encode(self, after: str, name: str) -> str:
        """A token to continue a listing filtered by ``name`` (its filters as one string)
        after the saga ``after``."""
        raw = _VERSION + after.encode("ascii") + _filter(name)
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
        if (
            len(data) != _SIZE
            or not raw.startswith(_VERSION)
            or not hmac.compare_digest(mac, self._mac(raw))
        ):
            raise BadRequest("page_token", foreign)
        after = raw[len(_VERSION) : len(_VERSION) + _ID_BYTES].decode("ascii")
        if raw[-_FILTER_BYTES:] != _filter(name):
            raise BadRequest("page_token", f"was issued for {filters}")
        return after

    def _mac(self, raw: bytes) -> bytes:
        return hmac.new(self._key, raw, hashlib.sha256).digest()[:_MAC_BYTES]


def _filter(name: str) -> bytes:
    return hashlib.sha256(name.encode("utf-8")).digest()[:_FILTER_BYTES]
