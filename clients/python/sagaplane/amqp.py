"""Opening a connection to RabbitMQ, with one clear error for every way it can fail.

aio-pika reports a wrong password as a clean ``ACCESS_REFUSED``, but a vhost that does
not exist (or that the user may not use) as an ``InvalidFrameError`` about an
unexpected ``Connection.Close`` frame, a refused TCP connection as an ``OSError`` tuple,
and a silent broker as a bare ``TimeoutError``. :func:`connect` turns each into a
:class:`~sagaplane.errors.BrokerUnavailable` whose one line names the broker (password
masked), the vhost and what to check, so that a process can print it and exit.

Only the first connection goes through here: once open, a robust connection reconnects
by itself, and the loops that use it back off on their own errors.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import aio_pika
import aiormq.exceptions
from aio_pika.abc import AbstractRobustConnection

from sagaplane.errors import BrokerUnavailable
from sagaplane.urls import redact

__all__ = ["connect", "describe_failure", "reply_text", "vhost_of", "with_vhost"]


# The timeout is the connection's own (aio-pika's, also used for its handshake), so an
# argument rather than a scope around the call.
async def connect(
    url: str,
    *,
    name: str,
    timeout: float = 30.0,  # noqa: ASYNC109
    **options: Any,
) -> AbstractRobustConnection:
    """A robust connection to ``url``, named ``name`` in the broker's management UI.

    Raises :class:`~sagaplane.errors.BrokerUnavailable` (one line: the broker, the vhost,
    why) when the broker cannot be reached, does not answer within ``timeout`` seconds,
    refuses the login or the vhost. ``options`` go to ``aio_pika.connect_robust``.
    """
    try:
        connection: AbstractRobustConnection = await aio_pika.connect_robust(
            url, timeout=timeout, client_properties={"connection_name": name}, **options
        )
    except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(describe_failure(url, exc, timeout=timeout)) from exc
    return connection


def vhost_of(url: str) -> str:
    """The vhost an AMQP URL names (``/`` when its path is empty), as RabbitMQ sees it."""
    path = urlsplit(url).path
    return "/" if path in ("", "/") else unquote(path[1:])


def with_vhost(url: str, vhost: str) -> str:
    """The same broker and user, another vhost."""
    return urlunsplit(urlsplit(url)._replace(path="/" + quote(vhost, safe="")))


def describe_failure(url: str, exc: BaseException, *, timeout: float | None = None) -> str:
    """One line on why connecting to ``url`` failed with ``exc``."""
    parts = urlsplit(url)
    user = unquote(parts.username) if parts.username else "guest"
    vhost = vhost_of(url)
    where = f"cannot connect to RabbitMQ at {redact(url)} (vhost {vhost!r})"
    return f"{where}: {_why(exc, user, vhost, timeout)}"


def _why(exc: BaseException, user: str, vhost: str, timeout: float | None) -> str:
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError):
        return f"login refused for user {user!r} (wrong user name or password?)"
    if isinstance(exc, aiormq.exceptions.InvalidFrameError) and "Connection.Close" in str(exc):
        # aiormq drops the broker's reply text here; this is what it says (NOT_ALLOWED).
        return (
            f"the broker refused vhost {vhost!r}: it does not exist, or user {user!r} may "
            f"not use it (see `rabbitmqctl list_vhosts`, `rabbitmqctl list_permissions -p "
            f"{vhost}`)"
        )
    if isinstance(exc, aiormq.exceptions.ConnectionClosed) and len(exc.args) >= 2:
        return f"the broker closed the connection: {exc.args[0]} {exc.args[1]}"
    if isinstance(exc, TimeoutError):
        within = f" within {timeout:g}s" if timeout else ""
        return f"no answer{within} (is it running, and is this its AMQP port?)"
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if isinstance(cause, socket.gaierror):
        return f"cannot resolve its host name ({cause.strerror or cause})"
    if isinstance(cause, OSError) and cause.errno and cause.errno > 0:
        return f"{os.strerror(cause.errno).lower()} (is it running, on this port?)"
    if isinstance(exc, aiormq.exceptions.AMQPError) and exc.args:
        return _first_line(" ".join(str(a) for a in exc.args))
    return _first_line(str(exc)) or type(exc).__name__


def reply_text(exc: BaseException) -> str:
    """The broker's own words in an aiormq channel error (``ACCESS_REFUSED - access to
    queue 'q' in vhost 'v' refused for user 'u'``), without aiormq's framing."""
    return next((a for a in exc.args if isinstance(a, str)), str(exc))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""
