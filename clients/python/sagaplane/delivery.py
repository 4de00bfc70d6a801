"""Whether an outbox row's message was ever delivered, and withdrawing rows no longer wanted.

The proof. A row counts as *never delivered* only when, holding its lock, we see that
it is unsent, that at least one publish of it was made, and that every publish of it
was returned by the broker as unroutable. Why that is enough, and why nothing less is:

1. A relay publishes a row only while its claim's transaction holds the row's lock
   (``FOR UPDATE SKIP LOCKED``), and records the outcome in that same transaction.
   Whoever takes the row's lock (:func:`lock`) therefore sees no publish in flight:
   the relay that held it has committed what it learned, or has rolled back / died,
   and none can claim the row until we commit. A row that a relay holds right now is
   skipped rather than waited for, and proves nothing. The counts are read in a later
   statement (:func:`counts`), whose snapshot is taken once the lock is held.
2. A relay with ``track_delivery`` counts each publish in
   ``sagaplane_outbox_publishes.begun`` and COMMITS that count (on another connection,
   synchronously) before it publishes. So every publish that ever happened is counted,
   even one whose relay died right after the broker confirmed it.
3. A publish is counted in ``sagaplane_outbox.returned`` only when the broker returned
   it (``basic.return`` of a ``mandatory`` publish: no queue is bound to its routing
   key, so no queue holds it), in the relay's transaction that records the attempt.
   Any other outcome (confirmed and routed, nacked, the channel or connection lost
   before the confirm, a crash before the transaction committed) adds nothing there.
4. Hence ``returned == begun >= 1`` means every publish made was returned: no queue
   ever held the message. ``returned < begun`` means some publish's outcome is routed
   or unknown; ``begun == 0`` means nothing is known (a relay without tracking, or a
   row never tried), and both count as *maybe delivered*.

The row is then withdrawn (deleted) in the caller's transaction, so the verdict stays
true: no later publish can happen. A saga uses the proof to record a step as not run
instead of compensating it; anything short of it is compensated as before.

Every function here returns statements for the caller's transaction (see
:mod:`sagaplane.batch`); the caller commits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sagaplane import batch
from sagaplane.queries import q

__all__ = ["counts", "lock", "not_delivered", "problem", "withdraw"]


def problem(routing_key: str) -> str:
    """What GetSaga says about a command that the broker returned as unroutable."""
    return (
        f'command not delivered: no queue is bound to "{routing_key}" '
        "— is a participant for it running?"
    )


def lock(message_ids: Sequence[str]) -> batch.Statement:
    """Lock the unsent rows of ``message_ids`` that no relay is publishing now; its rows
    are their ids, for :func:`counts`."""
    return (q("delivery_lock"), {"message_ids": list(message_ids)})


def counts(ids: Sequence[int]) -> batch.Statement:
    """Read what the relays recorded of the rows :func:`lock` locked (``ids``), sent once
    it returned. Its rows go to :func:`not_delivered`."""
    return (q("delivery_counts"), {"ids": list(ids)})


def not_delivered(rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """The message ids that :func:`counts` proved were never delivered (its rows, as
    dictionaries)."""
    return {row["message_id"] for row in rows if row["undelivered"]}


def withdraw(message_ids: Sequence[str]) -> batch.Statement:
    """Delete the unsent rows of ``message_ids`` (those a relay is not publishing now, or
    that the caller locked): their messages are no longer wanted."""
    return (q("delivery_withdraw"), {"message_ids": list(message_ids)})
