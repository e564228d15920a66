"""order status indexes: (status, ordered_at) on sales_orders and purchase_orders

For the "open orders, oldest first" queries of the order screens.

Revision ID: 0004_order_status_idx
Revises: 0003_orders
Create Date: 2025-01-20 14:00:00

"""

from collections.abc import Sequence

from alembic import op

# revision identifiers, used by Alembic.
revision: str = "0004_order_status_idx"
down_revision: str | Sequence[str] | None = "0003_orders"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index(
        op.f("ix_sales_orders_status_ordered_at"), "sales_orders", ["status", "ordered_at"]
    )
    op.create_index(
        op.f("ix_purchase_orders_status_ordered_at"), "purchase_orders", ["status", "ordered_at"]
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index(op.f("ix_purchase_orders_status_ordered_at"), table_name="purchase_orders")
    op.drop_index(op.f("ix_sales_orders_status_ordered_at"), table_name="sales_orders")
