"""What one tenant's login role may take of its server (plain data)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TenantBounds:
    """What one tenant's login role may take of its server, applied at provisioning
    and re-applied by `doctor --fix`. ``connection_limit`` and ``temp_file_limit``
    are hard (a tenant cannot change them); the others are its sessions' defaults,
    which a session may SET otherwise. Values are Postgres setting strings (durations
    in Postgres's spelling: 5m is kept as 5min), stored verbatim in
    pg_db_role_setting (that is how doctor compares them)."""

    connection_limit: int = 20
    support_connection_limit: int = 5
    statement_timeout: str = "5min"
    idle_in_transaction_session_timeout: str = "5min"
    temp_file_limit: str = "1GB"
    work_mem: str = "16MB"

    @property
    def role_settings(self) -> dict[str, str]:
        """The login role's settings (ALTER ROLE … SET), by parameter name."""
        return {"statement_timeout": self.statement_timeout,
                "idle_in_transaction_session_timeout":
                    self.idle_in_transaction_session_timeout,
                "temp_file_limit": self.temp_file_limit, "work_mem": self.work_mem}


# Role settings a session cannot SET itself (PGC_SUSET): a bound, not a default. The
# admin (not a superuser) may store them for a role only with SET on the parameter,
# granted by a superuser (Postgres >= 15): without it they are left out, and doctor says so.
SUSET_SETTINGS = frozenset({"temp_file_limit"})


# the plan every tenant has unless given another: derived from [tenants]' bounds
# (connection_limit, statement_timeout, ...) unless [plans.default] is written out, so
# a config without [plans] keeps its tenants exactly as bounded as before
DEFAULT_PLAN = "default"


@dataclass(frozen=True)
class Plan:
    """A named set of per-tenant limits ([plans.NAME]): the login role's bounds, and
    a storage quota and pool size (recorded and shown; not enforced here)."""

    name: str
    bounds: TenantBounds = TenantBounds()
    storage_quota: int | None = None  # bytes
    pool_size: int | None = None

    def to_json(self) -> dict[str, object]:
        b = self.bounds
        return {"name": self.name, "connection_limit": b.connection_limit,
                **b.role_settings, "storage_quota": self.storage_quota,
                "pool_size": self.pool_size}
