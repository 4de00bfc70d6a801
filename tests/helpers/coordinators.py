"""An in-process coordinator's settings for a test (see ``tests/conftest.py``)."""

from __future__ import annotations

from typing import Any

from coordinator.config import Settings


def coordinator_settings(database_url: str, amqp_url: str, **overrides: Any) -> Settings:
    """Any free port, a small pool, a short grace on stop; ``overrides`` on top (say
    ``timer_interval=0.05`` for timeouts that show quickly)."""
    values: dict[str, Any] = {"listen": "127.0.0.1:0", "pool_size": 4, "grace": 1.0}
    return Settings(database_url=database_url, amqp_url=amqp_url, **(values | overrides))
