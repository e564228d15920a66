"""customers.email unique regardless of case

Two customers whose e-mail addresses differ only in case are one person; the
new unique index on lower(email) refuses them. A tenant whose data already
holds such a pair fails this revision and stays at the previous one until the
duplicates are merged.

Revision ID: 0006_customer_email_ci
Revises: 0005_reorder_level
Create Date: 2025-04-11 16:30:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_customer_email_ci"
down_revision: str | Sequence[str] | None = "0005_reorder_level"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        op.f("ix_customers_email_lower"), "customers", [sa.text("lower(email)")], unique=True
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_customers_email_lower"), table_name="customers")
