"""The users example: two of Sagaplane's seed documents as participants and sagas.

The pgx article's transaction (create a user and its profile, re-score every other
user in one batched round trip, log the action, all under a 2-second deadline) is the
``users.create`` step; the maniflex guide's bulk import (all or nothing, an error per
row) is a saga per chunk whose second step notifies a partner and whose compensation
deletes the chunk. See :mod:`examples.users.service`; ``python -m examples.users demo``
runs it all.
"""
