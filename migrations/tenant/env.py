"""Alembic environment for the tenant schema.

There is no alembic.ini: the orchestrator builds ``alembic.config.Config()`` in
code, sets ``script_location`` to this directory and hands over the target
database through ``Config.attributes``:

* online mode: ``config.attributes["connection"]`` is a SQLAlchemy
  ``Connection`` that is already inside a transaction owned by the caller
  (who has also done ``SET ROLE``). Because that transaction is already open
  when ``context.configure()`` runs, Alembic treats it as external:
  ``begin_transaction()`` (the outer one and the per-migration ones) is a
  no-op, nothing here begins, commits or rolls back, and the caller's
  commit or rollback decides the fate of every revision and of the
  ``alembic_version`` row together.
* offline mode (``--sql`` / ``sql=True``): ``config.attributes["url"]``
  (default ``"postgresql://"``, only the dialect matters) and the SQL is
  printed instead of executed.

Revisions must not use ``op.get_context().autocommit_block()``: it needs a
transaction that Alembic began itself, and would otherwise commit the
caller's transaction halfway through.
"""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import context
from sqlalchemy.engine import Connection

try:
    from tenant_schema.models import metadata
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tenant_schema.models import metadata

config = context.config


def run_migrations_offline() -> None:
    """Print the SQL of the migrations instead of running it."""
    context.configure(
        url=config.attributes.get("url", "postgresql://"),
        target_metadata=metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        transaction_per_migration=False,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run the migrations on the caller's connection, inside the caller's transaction."""
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError(
            "tenant migrations: no database connection given; the caller must set "
            'config.attributes["connection"] to a SQLAlchemy Connection inside an '
            "open transaction (the URL is never read from alembic.ini), or run "
            "offline with sql=True / --sql"
        )
    if not isinstance(connection, Connection):
        raise RuntimeError(
            'tenant migrations: config.attributes["connection"] must be a SQLAlchemy '
            f"Connection, not {type(connection).__name__}"
        )
    if not connection.in_transaction():
        # Alembic would then begin and COMMIT a transaction of its own, taking
        # the commit/rollback decision away from the caller.
        raise RuntimeError(
            'tenant migrations: config.attributes["connection"] is not inside a '
            "transaction; open one first (e.g. `with engine.begin() as conn:`) so "
            "that the caller alone commits or rolls back"
        )

    context.configure(
        connection=connection,
        target_metadata=metadata,
        transaction_per_migration=False,
    )
    # A no-op here: the connection was already in a transaction at configure()
    # time, so Alembic neither begins nor commits anything.
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
