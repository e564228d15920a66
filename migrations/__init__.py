"""Alembic script directories shipped with tenantctl."""
