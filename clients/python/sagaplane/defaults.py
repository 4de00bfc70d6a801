"""Where things are unless configured otherwise: one definition for the coordinator,
the SDK, the CLI and the examples (the coordinator imports these; never the reverse)."""

from __future__ import annotations

COORDINATOR_ADDRESS = "127.0.0.1:50051"
"""The coordinator's gRPC ``host:port``: where it listens (``SAGAPLANE_LISTEN``) and
where clients look for it (``SAGAPLANE_COORDINATOR``)."""

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
"""RabbitMQ, for the coordinator and participants (``SAGAPLANE_AMQP_URL``)."""
