"""The two services of the users example, and the sagas that use them.

``users`` (its own database: ``users``, ``user_profile``, ``actions``):

- ``users.create`` is the pgx article's transaction, as a saga step: insert the user
  and its profile, compute a new score for every other user and update them all in ONE
  round trip (``ctx.batch``), insert the action record; all in the step's one local
  transaction, under the step's deadline (the article's 2-second context timeout is the
  step's ``timeout``). A lock or a traffic spike ends the attempt at its deadline with
  everything rolled back, instead of piling up.
- ``users.import`` is the maniflex guide's bulk import: one saga per chunk of rows,
  whose first step imports the chunk all or nothing (every row is checked first, and a
  bad chunk fails with an error per row, ``row 17: username is required``), in one
  batched INSERT; ``users.import.undo``, its compensation, deletes the chunk's users.

``partner`` (its own database): ``partner.notify``, the import saga's second step, tells
a partner that a chunk arrived. A partner that refuses fails the step for good, so the
saga compensates: the imported chunk is deleted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

import psycopg

from sagaplane import NonRetryableError, Participant, RetryPolicy, StepContext, StepSpec
from sagaplane.queries import load

Q = load("examples.users", "queries.sql")

CREATE_TIMEOUT = 2.0
"""The pgx article's deadline, in seconds: each attempt of users.create."""

MAX_NAME = 100
"""What the tables' varchar(100) columns hold."""

PARTNERS = {"acme": "accepts imports", "globex": "refuses imports"}
"""The partners partner.notify knows, and what each does."""


def score_formula(score: Decimal, users: int) -> Decimal:
    """The article's dummy formula: a user's new score when another user joins."""
    return (score + Decimal(1) / users).quantize(Decimal("0.000001"))


# -- the users service -------------------------------------------------------------------


async def create_user(ctx: StepContext) -> dict[str, Any]:
    """users.create: the pgx article's transaction (see the module docstring)."""
    username = _name(ctx.input, "username")
    firstname, lastname = _name(ctx.input, "firstname"), _name(ctx.input, "lastname")
    score = Decimal(str(ctx.input.get("score", 0)))
    tx = ctx.tx
    cur = await tx.execute(Q["username_used"], {"username": username})
    if (await cur.fetchone()) == (True,):
        raise NonRetryableError(f"username {username!r} is already used")
    # The user and its profile: one round trip.
    [[(user_id, created)]] = await ctx.batch(
        [
            (Q["create_user"], {"username": username, "score": score}),
            (Q["create_profile"], {"firstname": firstname, "lastname": lastname}),
        ]
    )
    cur = await tx.execute(Q["other_users"], {"id": user_id})
    others = await cur.fetchall()
    # Every other user's new score, all sent in one round trip (the article's batch).
    if others:
        await ctx.batch(
            (Q["update_user_score"], {"id": other, "score": score_formula(old, len(others))})
            for other, old in others
        )
    await tx.execute(
        Q["log_action"],
        {"description": f"new user created with id {user_id} and username {username}"},
    )
    return {
        "user_id": user_id,
        "username": username,
        "created": created.isoformat(),
        "scores_updated": len(others),
    }


async def import_chunk(ctx: StepContext) -> dict[str, Any]:
    """users.import: the chunk's users and profiles, all or none; per-row errors."""
    rows = ctx.input.get("rows")
    if not isinstance(rows, list) or not rows:
        raise NonRetryableError("input.rows must be a non-empty list of users")
    first_row = int(ctx.input.get("first_row", 1))
    chunk = int(ctx.input.get("chunk", 0))
    users, errors = _checked_rows(rows, first_row)
    cur = await ctx.tx.execute(
        Q["usernames_used"], {"usernames": [u["username"] for u in users.values()]}
    )
    for (used,) in await cur.fetchall():
        errors.setdefault(_row_of(users, used), f"username {used!r} is already used")
    if errors:
        raise NonRetryableError(_row_errors(errors))
    await ctx.batch(
        [
            (Q["import_chunk"], {"rows": json.dumps(list(users.values())), "step_id": ctx.step_id}),
            (Q["log_action"], {"description": f"imported chunk {chunk}: {len(users)} users"}),
        ]
    )
    return {"chunk": chunk, "first_row": first_row, "imported": len(users)}


async def undo_import(ctx: StepContext) -> None:
    """users.import.undo: delete the chunk's users (nothing, if none was imported)."""
    chunk = (ctx.output or {}).get("chunk", ctx.input.get("chunk"))
    cur = await ctx.tx.execute(Q["delete_chunk"], {"step_id": ctx.step_id})
    await ctx.tx.execute(
        Q["log_action"],
        {"description": f"import of chunk {chunk} undone: {cur.rowcount} users deleted"},
    )


def users_service(amqp_url: str, database_url: str, **options: Any) -> Participant:
    """The users participant (``options`` go to :class:`~sagaplane.Participant`)."""
    p = Participant("users", amqp_url=amqp_url, database_url=database_url, **options)
    p.step("users.create")(create_user)
    p.step("users.import")(import_chunk)
    p.compensation("users.import.undo")(undo_import)
    return p


# -- the partner service -----------------------------------------------------------------


async def notify_partner(ctx: StepContext) -> dict[str, Any]:
    """partner.notify: record that the partner was told of an imported chunk."""
    partner = str(ctx.input.get("partner", ""))
    if partner not in PARTNERS:
        raise NonRetryableError(f"unknown partner {partner!r}")
    chunk, users = int(ctx.input["chunk"]), int(ctx.input["imported"])
    if PARTNERS[partner] == "refuses imports":
        raise NonRetryableError(f"partner {partner} refused chunk {chunk} ({users} users)")
    await ctx.tx.execute(
        Q["notify_partner"],
        {
            "step_id": ctx.step_id,
            "saga_id": ctx.saga_id,
            "partner": partner,
            "chunk": chunk,
            "users": users,
        },
    )
    return {"partner": partner, "notified": users}


def partner_service(amqp_url: str, database_url: str, **options: Any) -> Participant:
    """The partner participant."""
    p = Participant("partner", amqp_url=amqp_url, database_url=database_url, **options)
    p.step("partner.notify")(notify_partner)
    return p


BUILDERS = {"users": users_service, "partner": partner_service}
SCHEMAS = {"users": "users_schema", "partner": "partner_schema"}


async def create_tables(service: str, database_url: str) -> None:
    """Create the service's tables (idempotent)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(Q[SCHEMAS[service]])


async def seed_users(database_url: str, count: int) -> None:
    """``count`` existing users (user-1 ... user-N), as the article's table holds."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(Q["seed_users"], {"count": count})


# -- the sagas ----------------------------------------------------------------------------


def create_user_steps(
    username: str, firstname: str, lastname: str, *, attempts: int = 3
) -> list[StepSpec]:
    """The one step of a ``users.create`` saga, with the article's 2-second deadline."""
    return [
        StepSpec(
            "create",
            "users.create",
            input={"username": username, "firstname": firstname, "lastname": lastname},
            timeout=CREATE_TIMEOUT,
            retry_policy=RetryPolicy(max_attempts=attempts, initial_interval=0.2),
        )
    ]


def import_steps(
    rows: Sequence[Mapping[str, Any]], *, chunk: int, first_row: int, partner: str
) -> list[StepSpec]:
    """A ``users.import`` saga for one chunk: import it, then notify the partner with
    what the import step returned."""
    return [
        StepSpec(
            "import",
            "users.import",
            "users.import.undo",
            {"rows": [dict(r) for r in rows], "chunk": chunk, "first_row": first_row},
            timeout=30,
        ),
        StepSpec(
            "notify",
            "partner.notify",
            input={
                "partner": partner,
                "chunk": "${steps.import.output.chunk}",
                "imported": "${steps.import.output.imported}",
            },
            retry_policy=RetryPolicy(max_attempts=3, initial_interval=0.2),
        ),
    ]


# -- checking rows --------------------------------------------------------------------------


def _name(source: Mapping[str, Any], field: str) -> str:
    value = source.get(field)
    if not isinstance(value, str) or not value.strip():
        raise NonRetryableError(f"{field} is required")
    if len(value) > MAX_NAME:
        raise NonRetryableError(f"{field} is longer than {MAX_NAME} characters")
    return value


def _checked_rows(
    rows: list[Any], first_row: int
) -> tuple[dict[int, dict[str, Any]], dict[int, str]]:
    """The rows fit to insert by row number, and what is wrong with the others."""
    users: dict[int, dict[str, Any]] = {}
    errors: dict[int, str] = {}
    seen: dict[str, int] = {}
    for number, row in enumerate(rows, start=first_row):
        try:
            if not isinstance(row, Mapping):
                raise NonRetryableError("is not an object")
            user: dict[str, Any] = {
                field: _name(row, field) for field in ("username", "firstname", "lastname")
            }
            score = row.get("score", 0)
            if isinstance(score, bool) or not isinstance(score, int | float):
                raise NonRetryableError("score must be a number")
            user["score"] = score
            if user["username"] in seen:
                raise NonRetryableError(
                    f"username {user['username']!r} is also in row {seen[user['username']]}"
                )
        except NonRetryableError as exc:
            errors[number] = exc.message
            continue
        seen[user["username"]] = number
        users[number] = user
    return users, errors


def _row_of(users: Mapping[int, Mapping[str, Any]], username: str) -> int:
    return next(number for number, user in users.items() if user["username"] == username)


def _row_errors(errors: Mapping[int, str], shown: int = 10) -> str:
    """``3 rows refused, nothing imported: row 17: username is required; ...``"""
    listed = [f"row {n}: {errors[n]}" for n in sorted(errors)[:shown]]
    more = f"; and {len(errors) - shown} more" if len(errors) > shown else ""
    plural = "row" if len(errors) == 1 else "rows"
    return f"{len(errors)} {plural} refused, nothing imported: " + "; ".join(listed) + more
