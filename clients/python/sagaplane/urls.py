"""Connection strings as they may be shown: without passwords."""

from __future__ import annotations

import re

# Anywhere in a text, not only at its start: log lines and error messages hold URLs too.
# The password runs to the last "@" of the URL's authority (a raw "@" in it stays hidden).
_USERINFO = re.compile(
    r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<user>[^:@/\s\"']*):[^/\s\"']*@", re.I
)
_KEYWORD = re.compile(r"\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.I)


def redact(url: str) -> str:
    """``amqp://guest:guest@host/`` -> ``amqp://guest:***@host/`` (also ``password=`` in
    libpq key/value strings), so that errors and progress can print where they connect.
    Every such URL in a longer text (a log line, an error message) is masked too."""
    url = _USERINFO.sub(r"\g<scheme>\g<user>:***@", url)
    return _KEYWORD.sub("password=***", url)
