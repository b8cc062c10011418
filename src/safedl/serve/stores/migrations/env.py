"""Alembic's environment for safedl's schema: migrations run only on a connection that serve/stores/migrate.py
opened and locked (``safedl db upgrade``, or schema creation on an empty database), inside its transaction."""
from __future__ import annotations

from alembic import context

from safedl.serve.stores.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("safedl's migrations run through `safedl db upgrade PATH_OR_URL`, not the alembic command")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True,
                  transaction_per_migration=False)
with context.begin_transaction():
    context.run_migrations()
