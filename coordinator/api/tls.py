"""Transport security of the gRPC server: its TLS credentials.

``--tls-cert``/``--tls-key`` (PEM files) serve TLS; ``--tls-client-ca`` also requires
every client to present a certificate signed by that CA (mTLS). Without TLS the
coordinator listens only on a loopback address unless told ``--insecure``
(:func:`coordinator.config.check`).
"""

from __future__ import annotations

from pathlib import Path

import grpc


class TlsFileError(ValueError):
    """A TLS file cannot be read."""


def _read(path: Path, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TlsFileError(f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise TlsFileError(f"the {what} {path} is not PEM (no -----BEGIN line)")
    return data


def server_credentials(cert: Path, key: Path, client_ca: Path | None) -> grpc.ServerCredentials:
    """TLS credentials from PEM files (blocking reads); with ``client_ca``, clients must
    present a certificate that CA signed."""
    pair = (_read(key, "TLS key"), _read(cert, "TLS certificate"))
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair],
        root_certificates=_read(client_ca, "client CA certificate"),
        require_client_auth=True,
    )
