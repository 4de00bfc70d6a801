"""PostgreSQL persistence: pool, migrations, named queries, the saga repository."""
