"""The fault suite (issue 5): sagas under load while things break; nothing lost, nothing twice.

A package (unlike the other test directories) so that its ``conftest.py`` is imported as
``fault.conftest`` and does not replace ``tests/conftest.py`` under the module name
``conftest``, which the integration helpers import from.
"""
