"""The engine's errors: an event the saga's state does not allow, and a saga that
cannot be started as asked.

They live here, not in ``coordinator.errors``, because the engine raises them and the
engine imports nothing from the layers above it. The API maps :class:`WrongState` to
FAILED_PRECONDITION (``coordinator.api.interceptors``) and turns :class:`InvalidSpec`
into INVALID_ARGUMENT while validating a request, before anything is written.
"""

from __future__ import annotations


class WrongState(Exception):
    """The request is not allowed in the saga's current state."""

    def __init__(self, message: str | None = None) -> None:
        # The class docstring is the default message, as for coordinator.errors.
        super().__init__(message or (type(self).__doc__ or "").strip())


class InvalidSpec(ValueError):
    """A saga cannot be started as asked; ``field`` names the place (for example
    ``steps[2].depends_on[0]``) and ``problem`` says what is wrong there."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
