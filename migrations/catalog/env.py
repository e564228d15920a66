"""Alembic environment for the catalog. The orchestrator passes a live connection
in ``config.attributes["connection"]``; nothing is read from alembic.ini."""

from alembic import context

from orchestrator.adapters.catalog.models import Base

config = context.config
connection = config.attributes.get("connection")

if context.is_offline_mode():
    context.configure(url="postgresql://", literal_binds=True, target_metadata=Base.metadata,
                      version_table="alembic_version")
    with context.begin_transaction():
        context.run_migrations()
else:
    if connection is None:
        raise RuntimeError("catalog migrations need config.attributes['connection']")
    context.configure(connection=connection, target_metadata=Base.metadata,
                      version_table="alembic_version")
    with context.begin_transaction():
        context.run_migrations()
