"""What TLS, tokens and signing cost (``--phases security``; issue 17: at most 5% of
sagas/s against all off, in the same run).

Two variants through :mod:`bench.variants` (alternating rounds, a fresh system per run):

- ``off``: plaintext gRPC, no access control, unsigned steps (the settings blanked, in
  case the harness's environment sets them);
- ``on``: the coordinator serves gRPC over TLS (a server certificate for 127.0.0.1 signed
  by a CA made for the run with the ``openssl`` command, in the run's folder), requires
  a token (an access file with one ``operator`` token: the harness's, which its
  ``SagaClient`` sends over TLS trusting that CA), and signs every command and requires
  every reply signed (a signing keys file with a key per service; each participant gets
  its service's key in ``SAGAPLANE_SIGNING_KEY``).

So that the comparison cannot silently measure "off" twice, every run is checked after
its measured loop, on the system still running (:func:`check`): GetSaga without a token
over plaintext (and, when the variant serves TLS, over TLS without and with the token);
the newest outbox rows of the coordinator's database (commands) and of each
participant's (replies) that carry the :data:`~sagaplane.signing.SIGNATURE_HEADER`; and
the messages dead-lettered during the run (a refused signature is one). :func:`verified`
says whether each variant was what its name says.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import grpc
import psycopg
from aiormq.exceptions import AMQPError

from bench.infra import run_command
from coordinator.api.auth import Role, entry_text, new_token
from sagaplane import SagaClient, signing, topology
from sagaplane.client import tls_credentials
from sagaplane.errors import CoordinatorError

BUDGET = 0.05
"""Issue 17: TLS, tokens and signing on may cost at most this share of sagas/s."""

LABELS = {"off": "TLS, tokens and signing off", "on": "TLS, tokens and signing on"}

OFF_COORDINATOR = {
    "SAGAPLANE_TLS_CERT": "",
    "SAGAPLANE_TLS_KEY": "",
    "SAGAPLANE_TLS_CLIENT_CA": "",
    "SAGAPLANE_AUTH_TOKENS": "",
    "SAGAPLANE_SIGNING_KEYS": "",
}
"""The coordinator's environment with all three off (an empty value means unset)."""
OFF_PARTICIPANT = {signing.KEYS_ENV: ""}
"""A participant's environment with signing off."""

SAMPLE_ROWS = 1000
"""Outbox rows sampled per database for their signature header (the newest)."""

_EC = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True, kw_only=True)
class Certificates:
    """A CA and a server certificate for 127.0.0.1 it signed (PEM files)."""

    ca: Path
    """What the harness's clients trust."""
    cert: Path
    """The coordinator's certificate."""
    key: Path
    """Its private key."""


async def certificates(folder: Path) -> Certificates:
    """A fresh CA and a server certificate for 127.0.0.1 and localhost, made with the
    ``openssl`` command into ``folder`` (EC P-256, valid for 2 days)."""
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, csr = folder / "server.pem", folder / "server.key", folder / "server.csr"
    ext = folder / "server.ext"
    await asyncio.to_thread(
        _write,
        {ext: "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"},
    )
    await run_command(
        "openssl", "req", "-x509", *_EC, "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=sagaplane bench CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    await run_command(
        "openssl", "req", *_EC, "-keyout", str(key), "-out", str(csr),
        "-subj", "/O=Sagaplane bench/CN=127.0.0.1",
    )  # fmt: skip
    await run_command(
        "openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        # A random serial instead of -CAcreateserial, which leaves a serial file behind.
        "-set_serial", f"0x{secrets.token_hex(8)}", "-out", str(cert),
        "-days", "2", "-extfile", str(ext),
    )  # fmt: skip
    return Certificates(ca=ca, cert=cert, key=key)


def _write(files: Mapping[Path, str], private: Sequence[Path] = ()) -> None:
    """Write the files (their folders made first), and make the ``private`` ones (these
    or others already there) readable by their owner only (blocking)."""
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for path in private:
        os.chmod(path, 0o600)


@dataclass(frozen=True, kw_only=True)
class Secured:
    """What the ``on`` variant runs with: made once per benchmark run (:func:`secure`)."""

    certificates: Certificates
    access_file: Path
    """``--auth-tokens``: one operator token, the harness's (stored as its SHA-256)."""
    keys_file: Path
    """``--signing-keys``: a key per service."""
    token: str
    """The harness's bearer token."""
    service_keys: Mapping[str, str]
    """Each service's signing key (hex), for its ``SAGAPLANE_SIGNING_KEY``."""

    def coordinator_env(self) -> dict[str, str]:
        """The coordinator's environment: TLS, the access file, the signing keys."""
        return {
            **OFF_COORDINATOR,
            "SAGAPLANE_TLS_CERT": str(self.certificates.cert),
            "SAGAPLANE_TLS_KEY": str(self.certificates.key),
            "SAGAPLANE_AUTH_TOKENS": str(self.access_file),
            "SAGAPLANE_SIGNING_KEYS": str(self.keys_file),
        }

    def participant_env(self, service: str) -> dict[str, str]:
        """A participant's environment: its service's signing key."""
        return {signing.KEYS_ENV: self.service_keys[service]}

    def credentials(self) -> grpc.ChannelCredentials:
        """TLS credentials that trust the run's CA (reads it: blocking, but small)."""
        return tls_credentials(self.certificates.ca)


async def secure(folder: Path, services: Sequence[str]) -> Secured:
    """Certificates, a token and its access file, and a signing key per service, written
    into ``folder`` (files with secrets readable by their owner only)."""
    made = await certificates(folder)
    token = new_token()
    access = folder / "access.yaml"
    keys = {service: secrets.token_hex(signing.MIN_KEY_BYTES) for service in services}
    keys_file = folder / "signing-keys.json"
    await asyncio.to_thread(
        _write,
        {
            access: "tokens:\n" + entry_text("bench", Role.OPERATOR, token) + "\n",
            keys_file: json.dumps({service: [key] for service, key in keys.items()}),
        },
        private=(keys_file, made.key, folder / "ca.key"),
    )
    return Secured(
        certificates=made, access_file=access, keys_file=keys_file, token=token, service_keys=keys
    )


# -- checks: was the variant what its name says? ------------------------------------------


async def get_saga(
    target: str, saga_id: str, *, credentials: grpc.ChannelCredentials | None, token: str | None
) -> str:
    """One GetSaga: ``"answered"``, or ``"refused: <status code>"``. ``token`` None sends
    none at all (not even ``$SAGAPLANE_TOKEN``)."""
    async with SagaClient(target, credentials=credentials, timeout=5.0) as client:
        try:
            await client.with_token(token).get_saga(saga_id)
        except CoordinatorError as exc:
            return f"refused: {exc.code.name if exc.code is not None else exc.message}"
    return "answered"


async def probes(
    target: str, saga_id: str, *, credentials: grpc.ChannelCredentials | None, token: str | None
) -> dict[str, str]:
    """GetSaga over plaintext without a token, and when the coordinator serves TLS
    (``credentials``), over TLS without and with ``token``."""
    found = {"plaintext, no token": await get_saga(target, saga_id, credentials=None, token=None)}
    if credentials is not None:
        found["TLS, no token"] = await get_saga(
            target, saga_id, credentials=credentials, token=None
        )
        found["TLS, the token"] = await get_saga(
            target, saga_id, credentials=credentials, token=token
        )
    return found


_SIGNED = """
SELECT count(*), count(*) FILTER (WHERE headers ? %s)
FROM (SELECT headers FROM sagaplane_outbox ORDER BY id DESC LIMIT %s) AS newest
"""


async def signed_rows(database_url: str, sample: int = SAMPLE_ROWS) -> dict[str, int]:
    """Of the newest ``sample`` outbox rows of a database, how many there are and how
    many carry a signature header."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as c:
        row = await (await c.execute(_SIGNED, (signing.SIGNATURE_HEADER, sample))).fetchone()
    assert row is not None
    return {"rows": int(row[0]), "signed": int(row[1])}


async def check(
    target: str,
    *,
    coordinator_url: str,
    participant_urls: Mapping[str, str],
    credentials: grpc.ChannelCredentials | None,
    token: str | None,
) -> dict[str, Any]:
    """A run's checks on its system still running: ``probes`` (:func:`probes` on the
    newest saga) and ``signed_rows`` (:func:`signed_rows` of the coordinator's database
    and of each participant's, by service)."""
    async with await psycopg.AsyncConnection.connect(coordinator_url, autocommit=True) as c:
        row = await (
            await c.execute("SELECT id FROM sagaplane_sagas ORDER BY id DESC LIMIT 1")
        ).fetchone()
    saga_id = str(row[0]) if row else "no-saga-was-started"
    rows = {"coordinator": await signed_rows(coordinator_url)}
    for service, url in participant_urls.items():
        rows[service] = await signed_rows(url)
    return {
        "probes": await probes(target, saga_id, credentials=credentials, token=token),
        "signed_rows": rows,
    }


async def dead_letters(amqp_url: str) -> int:
    """Messages in the vhost's dead-letter queue (0 when it is not declared yet)."""
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        try:
            queue = await channel.declare_queue(topology.DEAD_LETTER_QUEUE, passive=True)
        except AMQPError:
            return 0
        return queue.declaration_result.message_count or 0


def verified(name: str, run: Mapping[str, Any]) -> list[str]:
    """What contradicts a run being the variant ``name`` says (empty: it was): ``on``
    must refuse GetSaga without TLS or without the token, answer it with both, and have
    every sampled outbox row signed; ``off`` must answer plaintext GetSaga and have none
    signed; neither may have dead-lettered anything."""
    problems: list[str] = []
    probed = run.get("probes") or {}
    expected = (
        {"plaintext, no token": False, "TLS, no token": False, "TLS, the token": True}
        if name == "on"
        else {"plaintext, no token": True}
    )
    for way, answers in expected.items():
        got = probed.get(way, "not tried")
        # Not tried proves nothing, even where a refusal is expected.
        if got == "not tried" or (got == "answered") != answers:
            problems.append(f"GetSaga {way}: {got}")
    if not run.get("signed_rows"):
        problems.append("no outbox rows sampled")
    for database, counts in (run.get("signed_rows") or {}).items():
        want = counts["rows"] if name == "on" else 0
        if counts["rows"] == 0 or counts["signed"] != want:
            problems.append(f"{database}: {counts['signed']} of {counts['rows']} rows signed")
    if run.get("dead_letters"):
        problems.append(f"{run['dead_letters']} messages dead-lettered")
    return problems


def notes(found: Mapping[str, Any]) -> dict[str, list[str]]:
    """The report's lines per variant: what each run's checks found."""
    out: dict[str, list[str]] = {}
    for name, runs in found["runs"].items():
        lines = []
        for n, run in enumerate(runs, 1):
            probed = ", ".join(f"{way} {got}" for way, got in (run.get("probes") or {}).items())
            rows = (run.get("signed_rows") or {}).items()
            signed = ", ".join(f"{db} {c['signed']}/{c['rows']}" for db, c in rows)
            lines.append(
                f"r{n}: GetSaga {probed}; outbox rows signed {signed};"
                f" dead letters {run.get('dead_letters', '-')}"
            )
        problems = found.get("problems", {}).get(name)
        lines.append(
            "checked: " + ("NOT AS NAMED: " + "; ".join(problems) if problems else "as named")
        )
        out[name] = lines
    return out
