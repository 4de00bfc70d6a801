"""``sagaplane token``: make the entries of the coordinator's access file
(``--auth-tokens``, see :mod:`coordinator.api.auth`)."""

from __future__ import annotations

import argparse
import sys

from coordinator.cli.errors import CliError, ExitCode
from coordinator.cli.output import say

TOKEN_EPILOG = """\
The access file (--auth-tokens FILE, YAML or JSON) stores only each token's SHA-256:

  tokens:
    - {name: ci, role: operator, sha256: 3b4c...}
  certificates:                          # mTLS client certificates, by subject or CN
    - {subject: billing-bot, role: reader}

`sagaplane token new --name ci --role operator` prints a fresh token (give it to the
caller; it is shown once) on stdout and the file's line for it on stderr; add the
line and send the coordinator SIGHUP. `sagaplane token hash` prints the SHA-256 of a
token read from stdin, for a token made elsewhere.
"""


def add_token(parser: argparse.ArgumentParser) -> None:
    """``token new`` and ``token hash``."""
    from coordinator.api.auth import Role

    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    new = actions.add_parser(
        "new", help="a fresh random token and its access file entry", epilog=TOKEN_EPILOG
    )
    new.add_argument("--name", required=True, help="who holds it; recorded in sagas' history")
    new.add_argument("--role", required=True, choices=[r.label for r in Role])
    new.set_defaults(run=new_token)
    hashed = actions.add_parser("hash", help="the SHA-256 of a token read from stdin")
    hashed.set_defaults(run=hash_token)


def new_token(args: argparse.Namespace) -> int:
    """``sagaplane token new --name NAME --role ROLE``."""
    from coordinator.api import auth

    token = auth.new_token()
    say(token)
    # The entry goes to stderr: `TOKEN=$(sagaplane token new ...)` keeps the token alone.
    print(auth.entry_text(args.name, auth.parse_role(args.role, "--role"), token), file=sys.stderr)
    return ExitCode.OK


def hash_token(args: argparse.Namespace) -> int:
    """``sagaplane token hash < token``."""
    from coordinator.api import auth

    token = sys.stdin.read().strip()
    if not token:
        raise CliError("no token on stdin: `echo -n TOKEN | sagaplane token hash`", ExitCode.USAGE)
    say(auth.hash_token(token))
    return ExitCode.OK
