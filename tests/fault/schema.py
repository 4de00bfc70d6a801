"""The fault participants' own tables: every effect and every delivery, no unique constraints.

A duplicated effect or a redelivered command therefore stays visible as a second row.
"""

from __future__ import annotations

TABLES = """
CREATE TABLE IF NOT EXISTS fault_effects (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id   text NOT NULL,
    step_id   text NOT NULL,
    action    text NOT NULL,
    kind      text NOT NULL,
    position  integer NOT NULL,
    attempt   integer NOT NULL,
    pid       integer NOT NULL DEFAULT pg_backend_pid(),
    at        timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS fault_deliveries (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    process      integer NOT NULL,
    message_id   text,
    redelivered  boolean NOT NULL,
    saga_id      text,
    step_id      text,
    action       text,
    kind         text,
    attempt      integer,
    at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Commands answered from the inbox without running the handler (after their commit).
CREATE TABLE IF NOT EXISTS fault_replays (
    id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    saga_id  text NOT NULL,
    step_id  text NOT NULL,
    kind     text NOT NULL,
    attempt  integer NOT NULL,
    at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Rows here "fix" the flaky service's compensation of a saga (see runner.py).
CREATE TABLE IF NOT EXISTS fault_fixed (
    saga_id  text NOT NULL
);
"""

SERVICES = ("orders", "inventory", "payment", "flaky")
"""Every service of the fault suite; each has its own database."""

PAYMENT_LIMIT = 1000
"""payment.charge fails non-retryably above this amount (as in the demo shop)."""
