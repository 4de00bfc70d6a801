"""Test certificates made with the ``openssl`` command: a CA, a server certificate for
127.0.0.1 and localhost, and client certificates (for mTLS) by common name."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


@dataclass(frozen=True)
class Pair:
    """A certificate and its private key (PEM files)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA that signs certificates into ``folder``."""

    folder: Path
    name: str

    @property
    def pem(self) -> Path:
        """The CA's certificate: what a peer trusts."""
        return self.folder / f"{self.name}.pem"

    @classmethod
    def create(cls, folder: Path, name: str = "ca") -> Authority:
        """A fresh self-signed CA."""
        folder.mkdir(parents=True, exist_ok=True)
        _openssl(
            folder,
            "req", "-x509", *_EC, "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "2", "-subj", f"/CN={name} test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        return cls(folder, name)

    def issue(self, name: str, *, server: bool) -> Pair:
        """A certificate with common name ``name``: for a server (of 127.0.0.1 and
        localhost), or for a client."""
        stem = f"{self.name}-{name}"
        usage = "serverAuth" if server else "clientAuth"
        names = "subjectAltName=DNS:localhost,IP:127.0.0.1\n" if server else ""
        (self.folder / f"{stem}.ext").write_text(f"{names}extendedKeyUsage={usage}\n")
        _openssl(
            self.folder,
            "req", *_EC, "-keyout", f"{stem}.key", "-out", f"{stem}.csr",
            "-subj", f"/O=Sagaplane tests/CN={name}",
        )  # fmt: skip
        _openssl(
            self.folder,
            "x509", "-req", "-in", f"{stem}.csr", "-CA", f"{self.name}.pem",
            "-CAkey", f"{self.name}.key", "-CAcreateserial", "-out", f"{stem}.pem",
            "-days", "2", "-extfile", f"{stem}.ext",
        )  # fmt: skip
        return Pair(cert=self.folder / f"{stem}.pem", key=self.folder / f"{stem}.key")
