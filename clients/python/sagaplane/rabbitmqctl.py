"""Running ``rabbitmqctl``, RabbitMQ's administration tool, from asyncio.

One runner for everything that administers the broker: the tests' and demos' vhosts
(:mod:`sagaplane.testing`) and ``sagaplane rabbitmq-permissions --apply``. It runs on
the broker's machine (or wherever ``command`` reaches it: ``docker exec -i rabbitmq
rabbitmqctl``, ``rabbitmqctl -n rabbit@host``), as the broker's administrator.

Secrets go on standard input, never in the arguments: a command line is visible to
every user of the machine (``ps``), and :class:`RabbitmqctlFailed` quotes the arguments.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

__all__ = ["DEFAULT_COMMAND", "RabbitmqctlFailed", "rabbitmqctl"]

DEFAULT_COMMAND: tuple[str, ...] = ("rabbitmqctl",)
"""How rabbitmqctl is run unless told otherwise."""


class RabbitmqctlFailed(RuntimeError):
    """rabbitmqctl exited with an error, or could not be run; the message says why."""


async def rabbitmqctl(
    *args: str,
    within: float = 60.0,
    stdin: str | None = None,
    command: Sequence[str] = DEFAULT_COMMAND,
) -> str:
    """Run ``command -q args`` (``rabbitmqctl -q args`` by default); its output, or
    :class:`RabbitmqctlFailed` with what it said.

    ``stdin`` is written to its standard input (rabbitmqctl reads a password there when
    ``add_user`` or ``change_password`` is given none); without it, standard input is
    empty. ``within`` bounds the whole run, in seconds.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            "-q",
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise RabbitmqctlFailed(f"{' '.join(command)} cannot run: {exc}") from exc
    try:
        async with asyncio.timeout(within):
            out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise RabbitmqctlFailed(f"rabbitmqctl {' '.join(args)}: no answer in {within:g}s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RabbitmqctlFailed(f"rabbitmqctl {' '.join(args)}: {text.strip() or 'failed'}")
    return text
