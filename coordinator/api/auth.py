"""Who may call what: bearer tokens and client certificates mapped to roles, checked by
one interceptor; default-deny once configured.

The access file (``--auth-tokens FILE``, YAML or JSON) names every caller and its role,
and stores tokens only as their SHA-256::

    tokens:
      - {name: ci, role: operator, sha256: 9f86d081884c7d659a2feaa0c55ad015...}
    certificates:   # with --tls-client-ca: a client certificate stands for a caller too
      - {subject: "CN=billing,O=Shop", role: reader}   # the full subject, or
      - {subject: billing-bot, role: admin}            # only its common name

Roles are ordered, each allowing what the one below allows: ``reader`` (GetSaga,
ListActive, ListSagas, WatchSaga), ``operator`` (+ StartSaga, StartSagas, Compensate),
``admin`` (+ ResolveCompensation, and any method of the service that this table does not
list yet: a new RPC is denied until placed). Health and server reflection are open to
everyone (:data:`OPEN_PREFIXES`).

A call without a token (and without a listed certificate) or with a token not in the
file is UNAUTHENTICATED; a known caller asking for more than its role is
PERMISSION_DENIED. A presented token is hashed and compared with every stored hash
(``hmac.compare_digest``, no early exit), so the time taken does not tell how much of a
guess was right. The caller's name is what the history records (:func:`caller`).

:meth:`AccessControl.reload` rereads the file (the coordinator calls it on SIGHUP); a
file that no longer parses is reported and the table in force is kept, so a typo never
opens the door nor locks everyone out.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, cast

import grpc
import yaml

log = logging.getLogger(__name__)

SERVICE = "/sagaplane.v1.SagaCoordinatorService/"
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
"""Methods anyone may call, token or not: health (load balancers have no token), and
server reflection, which tells only the public schema (the protos are published) and
without which grpcurl could not call even the health check."""


class Role(IntEnum):
    """What a caller may do; each role may do what the ones below it may."""

    READER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        """The role's name as the access file spells it."""
        return self.name.lower()


METHOD_ROLES: Mapping[str, Role] = {
    SERVICE + "GetSaga": Role.READER,
    SERVICE + "ListActive": Role.READER,
    SERVICE + "ListSagas": Role.READER,
    SERVICE + "WatchSaga": Role.READER,
    SERVICE + "StartSaga": Role.OPERATOR,
    SERVICE + "StartSagas": Role.OPERATOR,
    SERVICE + "Compensate": Role.OPERATOR,
    SERVICE + "ResolveCompensation": Role.ADMIN,
}
"""The role each method needs; any other method of the service needs an admin."""


def required_role(method: str) -> Role | None:
    """The role ``method`` needs; None when it is open to everyone."""
    if method.startswith(OPEN_PREFIXES):
        return None
    return METHOD_ROLES.get(method, Role.ADMIN)


_CALLER: ContextVar[str | None] = ContextVar("sagaplane_caller", default=None)


def caller() -> str | None:
    """The name of the caller of the call being served; None when access control is off."""
    return _CALLER.get()


# -- the access file -------------------------------------------------------------------


class AccessFileError(ValueError):
    """The access file cannot be read or does not say who may do what."""


@dataclass(frozen=True, kw_only=True)
class Caller:
    """One entry of the access file."""

    name: str
    """Recorded in the history of what the caller does."""
    role: Role


@dataclass(frozen=True)
class AccessTable:
    """The access file as parsed: tokens by their SHA-256, certificates by subject."""

    tokens: Sequence[tuple[bytes, Caller]]
    certificates: Mapping[str, Caller]

    def by_token(self, token: str) -> Caller | None:
        """The caller whose token this is; the same work whatever ``token`` is."""
        digest = hashlib.sha256(token.encode()).digest()
        found: Caller | None = None
        for stored, entry in self.tokens:
            if hmac.compare_digest(stored, digest):
                found = entry
        return found

    def by_certificate(self, subject: str, common_name: str) -> Caller | None:
        """The caller a verified client certificate stands for, by its full subject or
        its common name."""
        return self.certificates.get(subject) or self.certificates.get(common_name)


def hash_token(token: str) -> str:
    """The SHA-256 of a token in hex, as the access file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh random token (256 bits, URL-safe)."""
    return "sp_" + secrets.token_urlsafe(32)


def entry_text(name: str, role: Role, token: str) -> str:
    """The access file's line for a token (``sagaplane token new`` prints it)."""
    return f"  - {{name: {json.dumps(name)}, role: {role.label}, sha256: {hash_token(token)}}}"


def parse_role(value: object, where: str) -> Role:
    """A role from its name; AccessFileError naming ``where`` otherwise."""
    if isinstance(value, str):
        try:
            return Role[value.upper()]
        except KeyError:
            pass
    roles = ", ".join(r.label for r in Role)
    raise AccessFileError(f"{where}.role: must be one of {roles}, not {value!r}")


def parse_access(text: str, source: str) -> AccessTable:
    """The access table in ``text`` (YAML or JSON); AccessFileError naming the bad entry."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise AccessFileError(f"{source} is not valid YAML or JSON: {exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise AccessFileError(f"{source}: must be a mapping with `tokens` (and `certificates`)")
    unknown = set(data) - {"tokens", "certificates"}
    if unknown:
        raise AccessFileError(f"{source}: unknown keys {', '.join(sorted(map(str, unknown)))}")
    tokens: list[tuple[bytes, Caller]] = []
    names: set[str] = set()
    for i, entry in enumerate(_entries(data, "tokens", source)):
        where = f"{source}: tokens[{i}]"
        name = _text(entry, "name", where)
        digest = _text(entry, "sha256", where).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise AccessFileError(
                f"{where}.sha256: must be 64 hex digits (`sagaplane token hash` makes it)"
            )
        if name in names:
            raise AccessFileError(f"{where}.name: {name!r} is given twice")
        names.add(name)
        _no_other_keys(entry, {"name", "role", "sha256"}, where)
        tokens.append(
            (bytes.fromhex(digest), Caller(name=name, role=parse_role(entry.get("role"), where)))
        )
    certificates: dict[str, Caller] = {}
    for i, entry in enumerate(_entries(data, "certificates", source)):
        where = f"{source}: certificates[{i}]"
        subject = _text(entry, "subject", where)
        name = entry.get("name", subject)
        if not isinstance(name, str) or not name:
            raise AccessFileError(f"{where}.name: must be a non-empty string")
        if subject in certificates:
            raise AccessFileError(f"{where}.subject: {subject!r} is given twice")
        _no_other_keys(entry, {"subject", "role", "name"}, where)
        certificates[subject] = Caller(name=name, role=parse_role(entry.get("role"), where))
    return AccessTable(tokens=tuple(tokens), certificates=certificates)


def _entries(data: dict[str, Any], key: str, source: str) -> list[dict[str, Any]]:
    entries = data.get(key) or []
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise AccessFileError(f"{source}: `{key}` must be a list of mappings")
    return cast(list[dict[str, Any]], entries)


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise AccessFileError(f"{where}.{key}: is required (a non-empty string)")
    return value


def _no_other_keys(entry: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(entry) - allowed
    if unknown:
        raise AccessFileError(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}")


def read_access(path: Path) -> AccessTable:
    """The access table in the file at ``path`` (blocking: call it off the loop)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise AccessFileError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise AccessFileError(f"{path} is not UTF-8 text: {exc}") from None
    return parse_access(text, str(path))


class AccessControl:
    """The access table in force, and how to reload it from its file."""

    def __init__(self, path: Path, table: AccessTable) -> None:
        self.path = path
        self.table = table

    @classmethod
    def load(cls, path: Path) -> AccessControl:
        """Read ``path`` (blocking); AccessFileError when it is not a valid access file."""
        return cls(path, read_access(path))

    def reload(self) -> bool:
        """Reread the file (blocking); True if the new table is in force. A file that no
        longer parses is logged and the table in force is kept."""
        try:
            table = read_access(self.path)
        except AccessFileError as exc:
            log.error("access file not reloaded, the previous one stays in force: %s", exc)
            return False
        self.table = table
        log.info(
            "access file %s reloaded: %d tokens, %d certificates",
            self.path,
            len(table.tokens),
            len(table.certificates),
        )
        return True

    def identify(
        self, metadata: Iterable[tuple[str, str | bytes]], auth: Mapping[str, Iterable[bytes]]
    ) -> Caller | None:
        """Who makes a call: its bearer token's caller, else its verified client
        certificate's; None when neither is known (a token given but unknown is None
        even with a known certificate: the caller said who it is, and it is not)."""
        table = self.table
        for key, value in metadata:
            if key == "authorization":
                text = value.decode(errors="replace") if isinstance(value, bytes) else value
                scheme, _, token = text.strip().partition(" ")
                if scheme.lower() != "bearer" or not token.strip():
                    return None
                return table.by_token(token.strip())
        subject = _first(auth.get("x509_subject"))
        common_name = _first(auth.get("x509_common_name"))
        if subject or common_name:
            return table.by_certificate(subject, common_name)
        return None


def _first(values: Iterable[bytes] | None) -> str:
    first = next(iter(values or ()), b"")
    return first.decode(errors="replace")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through only when its caller's role allows its method (see the module
    docstring), and makes the caller's name known to the servicer (:func:`caller`)."""

    def __init__(self, access: AccessControl) -> None:
        self._access = access

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        needed = required_role(method)
        if handler is None or needed is None:
            return handler
        access = self._access

        async def check(context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
            metadata = cast(Iterable[tuple[str, str | bytes]], context.invocation_metadata() or ())
            who = access.identify(metadata, context.auth_context())
            if who is None:
                await context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "a known token is required: send `authorization: Bearer <token>` "
                    "(sagaplane --token, SAGAPLANE_TOKEN)",
                )
            assert who is not None
            if who.role < needed:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{method.rsplit('/', 1)[-1]} needs the role {needed.label}; "
                    f"{who.name!r} is a {who.role.label}",
                )
            return who

        if handler.unary_unary is not None:
            unary = cast(Callable[[Any, Any], Awaitable[Any]], handler.unary_unary)

            async def unary_guarded(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                who = await check(context)
                mark = _CALLER.set(who.name)
                try:
                    return await unary(request, context)
                finally:
                    _CALLER.reset(mark)

            return grpc.unary_unary_rpc_method_handler(
                unary_guarded,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            stream = cast(Callable[[Any, Any], Any], handler.unary_stream)

            async def stream_guarded(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                who = await check(context)
                mark = _CALLER.set(who.name)
                try:
                    # Our own handlers write with context.write and return None (see
                    # interceptors.py); reflection's is an async generator.
                    result = stream(request, context)
                    if hasattr(result, "__aiter__"):
                        async for message in result:
                            await context.write(message)
                        return None
                    return await result
                finally:
                    _CALLER.reset(mark)

            return grpc.unary_stream_rpc_method_handler(
                stream_guarded,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            # No method of ours streams both ways; guarded all the same (default-deny).
            both = cast(Callable[[Any, Any], Any], handler.stream_stream)

            async def both_guarded(
                requests: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> Any:
                await check(context)
                result = both(requests, context)
                if hasattr(result, "__aiter__"):
                    async for message in result:
                        await context.write(message)
                    return None
                return await result

            return grpc.stream_stream_rpc_method_handler(
                both_guarded,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
