"""The tenant application schema (SQLAlchemy models).

``metadata`` is what the tenant Alembic revisions in ``migrations/tenant`` build;
the two are kept in step (see ``tenant_schema.models``).
"""

from tenant_schema.models import (
    NAMING_CONVENTION,
    PURCHASE_ORDER_STATUSES,
    SALES_ORDER_STATUSES,
    Base,
    Category,
    Customer,
    Product,
    PurchaseOrder,
    PurchaseOrderLine,
    SalesOrder,
    SalesOrderLine,
    StockLevel,
    Supplier,
    Warehouse,
    metadata,
)

__all__ = [
    "NAMING_CONVENTION",
    "PURCHASE_ORDER_STATUSES",
    "SALES_ORDER_STATUSES",
    "Base",
    "Category",
    "Customer",
    "Product",
    "PurchaseOrder",
    "PurchaseOrderLine",
    "SalesOrder",
    "SalesOrderLine",
    "StockLevel",
    "Supplier",
    "Warehouse",
    "metadata",
]
