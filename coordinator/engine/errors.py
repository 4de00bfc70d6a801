"""The engine's one error: an event the saga's state does not allow.

It lives here, not in ``coordinator.errors``, because the engine raises it and the
engine imports nothing from the layers above it. The API maps it to
FAILED_PRECONDITION (``coordinator.api.interceptors``).
"""

from __future__ import annotations


class WrongState(Exception):
    """The request is not allowed in the saga's current state."""

    def __init__(self, message: str | None = None) -> None:
        # The class docstring is the default message, as for coordinator.errors.
        super().__init__(message or (type(self).__doc__ or "").strip())
