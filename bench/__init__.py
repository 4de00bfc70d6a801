"""Sagaplane's benchmark harness: the standard saga workload against the real local
PostgreSQL and RabbitMQ, with this machine's own limits as baselines (see README.md)."""
