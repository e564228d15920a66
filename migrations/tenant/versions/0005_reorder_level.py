"""products.reorder_level: the stock level below which a product is reordered

Added with a default, so existing products get 0 without a table rewrite; the
index serves the "what must be reordered" report.

Revision ID: 0005_reorder_level
Revises: 0004_order_status_idx
Create Date: 2025-03-02 09:00:00

"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_reorder_level"
down_revision: str | Sequence[str] | None = "0004_order_status_idx"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "products",
        sa.Column("reorder_level", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.create_index(op.f("ix_products_reorder_level"), "products", ["reorder_level"])


def downgrade() -> None:
    op.drop_index(op.f("ix_products_reorder_level"), table_name="products")
    op.drop_column("products", "reorder_level")
