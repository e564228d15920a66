"""The marks tenantctl leaves on server objects, as text: a role's COMMENT proving
it is ours, a database's COMMENT naming its schema revision (written and read by
adapters/postgres; judged by doctor)."""

from __future__ import annotations


def role_marker(tenant_id: int, slug: str) -> str:
    """Written as the role's COMMENT in the same transaction that creates it: proof
    that a role found after a crash is ours and not a stranger's of the same name."""
    return f"tenantctl tenant {slug} #{tenant_id}"


# -- revision marks (see adapters/postgres/revision_marks.py)

PREFIX = "tenantctl revision: "
BASE = "base"  # Alembic's own word for "no revision"; never a revision id


def mark(revision: str | None) -> str:
    return PREFIX + (revision or BASE)


def parse(comment: str | None) -> tuple[bool, str | None]:
    """(is a mark, the revision it names; None for base)."""
    if comment is None or not comment.startswith(PREFIX):
        return False, None
    revision = comment.removeprefix(PREFIX)
    return True, None if revision == BASE else revision
