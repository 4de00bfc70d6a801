"""Connection strings as they may be shown: without passwords."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:@/]*):[^@/]*@", re.I)
_KEYWORD = re.compile(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.I)


def redact(url: str) -> str:
    """``amqp://guest:guest@host/`` -> ``amqp://guest:***@host/`` (also ``password=`` in
    libpq key/value strings), so that errors and progress can print where they connect."""
    url = _USERINFO.sub(r"\g<scheme>\g<user>:***@", url)
    return _KEYWORD.sub("password=***", url)
