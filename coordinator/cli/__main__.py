"""``python -m coordinator.cli``: the ``sagaplane`` command without its console script."""

from coordinator.cli import main

main()
