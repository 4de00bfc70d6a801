"""Real services for tests, demos and benchmarks: child processes, databases, vhosts.

What running a coordinator and participants for real takes, in one place, used by the
demo (``examples/shop``), Sagaplane's own tests and its benchmark, and usable in a
service's own tests:

- :mod:`sagaplane.testing.processes`: a child process with its logs kept (and what it
  wrote since a mark), stopped with SIGTERM (or another signal) then SIGKILL (or killed
  at once), and a free TCP port for it;
- :mod:`sagaplane.testing.resources`: PostgreSQL databases and RabbitMQ vhosts created
  and dropped, URLs pointed at them, and waiting until a queue has its consumer.

Waiting for a coordinator is :meth:`sagaplane.SagaClient.wait_until_serving`.
"""

from sagaplane.testing.processes import Child, ChildExited, free_port
from sagaplane.testing.resources import (
    RabbitmqctlFailed,
    create_database,
    create_vhost,
    database_name,
    delete_vhost,
    drop_database,
    has_consumer,
    rabbitmqctl,
    wait_for_consumers,
    with_database,
    with_vhost,
)

__all__ = [
    "Child",
    "ChildExited",
    "RabbitmqctlFailed",
    "create_database",
    "create_vhost",
    "database_name",
    "delete_vhost",
    "drop_database",
    "free_port",
    "has_consumer",
    "rabbitmqctl",
    "wait_for_consumers",
    "with_database",
    "with_vhost",
]
