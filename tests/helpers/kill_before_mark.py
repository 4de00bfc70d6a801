"""``sagaplane serve``, except that its outbox relay dies (SIGKILL, its own) as soon as the
broker has confirmed a publish, before the relay records it: the crash between a
confirmed publish and its mark, as a real process death (tests/integration/test_undelivered.py).

Run as a script: ``python kill_before_mark.py [serve flags]``, settings from the
environment as for ``python -m coordinator``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from coordinator.cli import main
from sagaplane import relay

_record = relay.OutboxRelay._record


def _die_once_confirmed(self: relay.OutboxRelay, outcome: Any) -> Any:
    if outcome.sent:
        os.kill(os.getpid(), signal.SIGKILL)
    return _record(self, outcome)


relay.OutboxRelay._record = _die_once_confirmed  # type: ignore[method-assign]

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
