"""The demo shop: three participant services that place an order as a saga.

- ``orders``:    ``orders.create`` / ``orders.delete``
- ``inventory``: ``inventory.reserve`` / ``inventory.release``
- ``payment``:   ``payment.charge`` / ``payment.refund``

Each service owns its database and tables. ``payment.charge`` refuses amounts
over :data:`PAYMENT_LIMIT` with a non-retryable error, which is how the demo
shows compensation: start an order with ``"amount": 5000``.
"""
