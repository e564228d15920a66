"""Whether a server can take part in a tenant move by logical replication. Pure.

The logical method needs, on both servers: Postgres >= 16 (a non-superuser in
pg_create_subscription may CREATE SUBSCRIPTION), ``wal_level = logical`` (a
restart), room for a slot and a WAL sender per move in flight, and an admin role
with REPLICATION (the subscription connects back to the source as it) and member
of pg_create_subscription. A server without it is not broken: its tenants move
with pg_dump, with a write pause as long as the copy. `config check` and
`doctor` say which servers cannot, and why.
"""

from __future__ import annotations

from dataclasses import dataclass

LOGICAL_MIN_VERSION = 160000
# a move holds one slot and one sender, and one more of each while its table sync runs
MIN_SLOTS = 2


@dataclass(frozen=True)
class LogicalReadiness:
    """What a server's admin connection reads of the logical method's needs."""

    version: int  # server_version_num
    wal_level: str
    replication: bool  # the admin role has REPLICATION
    create_subscription: bool  # the admin has pg_create_subscription's privileges
    max_replication_slots: int
    max_wal_senders: int
    wal_level_pending: bool = False  # wal_level changed, waiting for a restart

    def blockers(self) -> list[str]:
        """Why the logical method cannot run here, one short clause each; [] if it can."""
        out = []
        if self.version < LOGICAL_MIN_VERSION:
            out.append(f"Postgres {self.version // 10000} < 16")
        if self.wal_level != "logical":
            out.append(f"wal_level is {self.wal_level}, not logical"
                       + (" (changed; takes effect at the next restart)"
                          if self.wal_level_pending else ""))
        if not self.replication:
            out.append("the admin role lacks REPLICATION")
        if self.version >= LOGICAL_MIN_VERSION and not self.create_subscription:
            out.append("the admin role is not a member of pg_create_subscription")
        if self.max_replication_slots < MIN_SLOTS:
            out.append(f"max_replication_slots is {self.max_replication_slots}")
        if self.max_wal_senders < MIN_SLOTS:
            out.append(f"max_wal_senders is {self.max_wal_senders}")
        return out

    @property
    def ready(self) -> bool:
        return not self.blockers()

    def describe(self) -> str:
        """One line: whether, and why not."""
        why = self.blockers()
        if not why:
            return "can move tenants by logical replication"
        return ("cannot move tenants by logical replication (" + "; ".join(why)
                + "): its moves use pg_dump, pausing writes for the whole copy")


LOGICAL_REMEDY = ("as a superuser: ALTER SYSTEM SET wal_level = logical (and "
                  "max_replication_slots, max_wal_senders >= 10), restart, ALTER ROLE "
                  "{admin} REPLICATION, GRANT pg_create_subscription TO {admin} (Postgres "
                  ">= 16); `tenantctl local up` and the Ansible role do this")
