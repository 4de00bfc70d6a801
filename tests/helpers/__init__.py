"""What Sagaplane's tests share: the test database server, the broker, processes.

``from helpers.database import ...`` etc.; ``tests/`` is on the import path (pytest's
``pythonpath`` setting). Each module is thin: the work is done by
:mod:`sagaplane.testing`, which the demo and the benchmark use too.

- :mod:`helpers.database`: URLs on the test PostgreSQL, unique names, create/drop;
- :mod:`helpers.broker`: ``rabbitmqctl``, a fresh vhost, the AMQP URL for one;
- :mod:`helpers.processes`: a coordinator as a child process, free ports;
- :mod:`helpers.coordinators`: an in-process coordinator's settings;
- :mod:`helpers.participants`: commands published and replies read as the coordinator
  would, to drive a participant without one;
- :mod:`helpers.shop`: the demo shop's participants in-process, as fixtures.
"""
