"""``python -m coordinator``: exactly ``sagaplane serve``, with the same flags.

One path starts the server (``coordinator.cli.server``), so both entry points take the
same settings, log alike and exit with the same statuses (``sagaplane --help``).
"""

from __future__ import annotations

import sys

from coordinator.cli import main

if __name__ == "__main__":
    main(["serve", *sys.argv[1:]])
