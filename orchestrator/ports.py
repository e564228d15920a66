"""Ports: what the services need from the world, as ``typing.Protocol``s: the catalog,
server administration, object stores, the backup pipeline's entry points and the
clock (what lifecycle, retention and access use), the Postgres client tools and the
key vault (every service). Adapters implement them (``adapters/catalog/repository.py``,
``adapters/postgres/server_admin.py``, ``backups/stores.py``, ``adapters/clock.py``,
``adapters/postgres/pgtools.py``, ``adapters/crypto/tenant_keys.py``; the backup
pipeline's entry points in ``backups/service.py``); ``bootstrap.Deps`` carries one
of each; the fast test tier (``tests/fakes.py``) carries in-memory ones.

Small on purpose: a method is here because one of those services calls it. Records
are read-only views with the catalog's column names, so the SQLAlchemy rows (and
plain frozen rows) satisfy them as they are.

Below the adapters: this module imports only the domain.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, Protocol

from backups.policy import Verdict
from orchestrator.domain.errors import TenantctlError
from orchestrator.domain.names import TenantNames

# -- records -------------------------------------------------------------------------


class TenantRecord(Protocol):
    """A row of ``tenants`` as the services read it."""

    @property
    def id(self) -> int: ...
    @property
    def slug(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def server(self) -> str: ...
    @property
    def database(self) -> str: ...
    @property
    def login_role(self) -> str: ...
    @property
    def owner_role(self) -> str: ...
    @property
    def state(self) -> str: ...
    @property
    def step(self) -> str | None: ...
    @property
    def cancelled_at(self) -> datetime | None: ...
    @property
    def hold_until(self) -> datetime | None: ...
    @property
    def suspended_at(self) -> datetime | None: ...
    @property
    def deleted_at(self) -> datetime | None: ...
    @property
    def purge_after(self) -> datetime | None: ...
    @property
    def purged_at(self) -> datetime | None: ...
    @property
    def legal_hold(self) -> bool: ...
    @property
    def legal_hold_reason(self) -> str | None: ...
    @property
    def final_backup_id(self) -> int | None: ...
    @property
    def plan(self) -> str: ...
    @property
    def over_quota(self) -> bool: ...
    @property
    def over_quota_since(self) -> datetime | None: ...


class BackupRecord(Protocol):
    """A row of ``backups`` as the services read it."""

    @property
    def id(self) -> int: ...
    @property
    def tenant_id(self) -> int: ...
    @property
    def store_url(self) -> str: ...
    @property
    def object_key(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def started_at(self) -> datetime: ...
    @property
    def verified_at(self) -> datetime | None: ...


class GrantRecord(Protocol):
    """A row of ``support_grants``."""

    @property
    def id(self) -> int: ...
    @property
    def tenant_id(self) -> int: ...
    @property
    def slug(self) -> str: ...
    @property
    def server(self) -> str: ...
    @property
    def role_name(self) -> str: ...
    @property
    def grantee(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def read_only(self) -> bool: ...
    @property
    def actor(self) -> str: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def expires_at(self) -> datetime: ...
    @property
    def revoked_at(self) -> datetime | None: ...
    @property
    def dropped_at(self) -> datetime | None: ...


class ServerRecord(Protocol):
    """A row of ``servers``: ``available`` is the config's say (in it or not),
    ``accepting`` the operator's (false once drained or retired)."""

    @property
    def name(self) -> str: ...
    @property
    def region(self) -> str: ...
    @property
    def capacity(self) -> int: ...
    @property
    def available(self) -> bool: ...
    @property
    def accepting(self) -> bool: ...
    @property
    def retired_at(self) -> datetime | None: ...


# -- the catalog ---------------------------------------------------------------------


class TenantRepository(Protocol):
    def get(self, slug: str) -> TenantRecord:
        """The tenant, its slug validated and its row checked for integrity
        (``names.check_integrity``); NotFound when there is none."""
        ...

    def due(self, state: str, column: str, now: datetime) -> list[TenantRecord]:
        """Tenants in ``state`` whose date ``column`` (hold_until or purge_after) is at
        or before ``now``, earliest first (read through partial indexes: what is due
        only)."""
        ...

    def dated(self, state: str, column: str, *, limit: int | None = None
              ) -> list[TenantRecord]:
        """Tenants in ``state`` with ``column`` set, earliest first, at most ``limit``."""
        ...

    def count_by_state(self) -> dict[str, int]: ...


class BackupRepository(Protocol):
    def of_tenant(self, tenant_id: int) -> list[BackupRecord]: ...

    def any_since(self, tenant_id: int, since: datetime | None,
                  statuses: Collection[str]) -> bool:
        """Whether a backup of the tenant in one of ``statuses`` started at or after
        ``since``."""
        ...


class GrantRepository(Protocol):
    def get(self, grant_id: int) -> GrantRecord | None: ...

    def listed(self, *, include_ended: bool = False) -> list[GrantRecord]:
        """Every grant (or only live ones: role not dropped yet), by id."""
        ...

    def live(self, *, tenant_id: int | None = None, read_write: bool | None = None,
             expired_at: datetime | None = None) -> list[GrantRecord]:
        """Grants whose role is not dropped yet; of one tenant, only read-write ones
        (``read_write=True``), only those expired at ``expired_at`` if given; by id."""
        ...


class ServerRepository(Protocol):
    def get(self, name: str) -> ServerRecord:
        """The server; NotFound when the catalog has none of that name."""
        ...

    def in_region(self, region: str) -> list[ServerRecord]:
        """The region's servers, by name."""
        ...

    def placed(self, region: str) -> list[TenantRecord]:
        """The region's tenants that hold a place on a server (``PLACED_STATES``),
        by slug."""
        ...

    def unfinished_moves(self, region: str) -> dict[str, str]:
        """Tenants of ``region`` with an unfinished move (a row of ``tenant_moves``
        not finished: a move that died half-way): slug -> the server it moves to."""
        ...


class CatalogWrites(Protocol):
    """The writes of one catalog transaction: all of them, or (an exception, or the
    process killed inside the block) none."""

    def update_tenant(self, tenant_id: int, **values: Any) -> None: ...

    def delete_credential(self, tenant_id: int) -> None: ...

    def destroy_key(self, tenant_id: int, now: datetime) -> None:
        """Crypto-shredding: the wrapped identity goes (its public half stays: it names
        the key old backups were written to), stamped destroyed at ``now``."""
        ...

    def mark_backups_deleted(self, tenant_id: int) -> None:
        """Every backup row of the tenant not yet deleted says deleted."""
        ...

    def add_grant(self, *, tenant_id: int, slug: str, server: str, grantee: str,
                  reason: str, read_only: bool, expires_at: datetime) -> int:
        """A new support grant (its role name still empty); its id."""
        ...

    def update_grant(self, grant_id: int, **values: Any) -> None: ...

    def update_server(self, name: str, **values: Any) -> None: ...

    def audit(self, action: str, *, tenant: str | None = None, region: str | None = None,
              outcome: str = "ok", at: datetime | None = None, **detail: Any) -> None:
        """One audit record, at ``at`` (a run's ``now``) or else when the catalog
        records it."""
        ...


class Locks(Protocol):
    def advisory_lock(self, name: str, *, shared: bool = False, wait: bool = False
                      ) -> AbstractContextManager[bool]:
        """A lock held for the block (dies with the process); yields whether it was
        acquired (always True with ``wait``)."""
        ...


class CatalogPort(Locks, Protocol):
    """The catalog: repositories, transactions, locks, the audit log."""

    @property
    def tenants(self) -> TenantRepository: ...
    @property
    def backups(self) -> BackupRepository: ...
    @property
    def grants(self) -> GrantRepository: ...
    @property
    def servers(self) -> ServerRepository: ...

    def transaction(self) -> AbstractContextManager[CatalogWrites]: ...

    def audit(self, action: str, *, tenant: str | None = None, region: str | None = None,
              outcome: str = "ok", at: datetime | None = None, **detail: Any) -> None:
        """One audit record, in a transaction of its own; at ``at`` (a run's ``now``)
        or else when the catalog records it."""
        ...

    def audit_count_before(self, cutoff: datetime) -> int: ...

    def purge_audit_before(self, cutoff: datetime, batch: int) -> int:
        """Delete at most ``batch`` audit records older than ``cutoff`` (one
        transaction); how many went."""
        ...


# -- server administration -----------------------------------------------------------


class ServerOperationFailed(TenantctlError):
    """A statement on a server failed (the adapter's error, in one line)."""


class ServerAdmin(Protocol):
    """Every statement the services run on a tenant's server. Identifiers come from
    ``names`` (derived from a slug) or from catalog ids, never from user input."""

    # a tenant's database and roles
    def restrict_to_reads(self, server: str, names: TenantNames) -> None:
        """The login role keeps reading and loses every write (the hold)."""
        ...

    def secure_tenant_database(self, server: str, names: TenantNames) -> None:
        """PUBLIC locked out, the login role's writes given (back)."""
        ...

    def set_login(self, server: str, role: str, allowed: bool) -> None:
        """LOGIN or NOLOGIN; NOLOGIN also ends the role's sessions."""
        ...

    def terminate_sessions(self, server: str, *, role: str | None = None,
                           database: str | None = None, wait: bool = False) -> int: ...

    def terminate_other_sessions(self, server: str, database: str) -> int:
        """Every session in ``database`` but tenantctl's own, waited for."""
        ...

    def database_owner(self, server: str, database: str) -> str | None: ...

    def role_exists(self, server: str, role: str) -> bool: ...

    def role_comment(self, server: str, role: str) -> str | None:
        """The role's comment (our marker), None without one or without the role;
        a failure raises ServerOperationFailed."""
        ...

    def drop_database(self, server: str, database: str) -> None: ...

    def drop_marked_roles(self, server: str, names: TenantNames, marker: str) -> None:
        """The tenant's login and owner roles, each only if it carries ``marker``."""
        ...

    # support roles
    def create_support_role(self, server: str, names: TenantNames, role: str, password: str,
                            *, comment: str, connection_limit: int, valid_until: datetime,
                            settings: dict[str, str], read_only: bool) -> None:
        """A login role that may read (or write, not ``read_only``) the tenant's
        tables, its password expiring at ``valid_until``, marked with ``comment``."""
        ...

    def lock_out_role(self, server: str, role: str) -> None:
        """NOLOGIN, then its sessions ended and waited for; failures raise
        ServerOperationFailed."""
        ...

    def drop_role_everywhere(self, server: str, role: str) -> None:
        """What it owns to each database's owner, its privileges, then the role;
        failures raise ServerOperationFailed."""
        ...

    def role_settings(self, server: str, roles: Sequence[str]) -> dict[str, list[str]]:
        """Each existing role's settings (rolconfig and per-database ones); failures
        raise ServerOperationFailed."""
        ...


# -- object stores, backups, clock ---------------------------------------------------


class StoredObject(Protocol):
    @property
    def key(self) -> str: ...


class ObjectStore(Protocol):
    """The part of ``backups.stores.ObjectStore`` the services use."""

    url: str

    def objects(self, prefix: str = "") -> Iterator[StoredObject]: ...

    def delete(self, key: str) -> None: ...

    def abort_uploads(self, key: str) -> int: ...


class StoreOpener(Protocol):
    def __call__(self, url: str) -> ObjectStore: ...


class BackupJobs(Protocol):
    """The backup pipeline's entry points that lifecycle and retention call."""

    def run(self, slug: str, *, kind: str, now: datetime | None = None) -> int:
        """Take a backup; its id."""
        ...

    def verify(self, backup_id: int, now: datetime | None = None) -> None:
        """Check it can be restored (checksum, decryption, archive listing); raises
        when it cannot. Stamped verified at ``now`` if given."""
        ...

    def get(self, backup_id: int) -> BackupRecord: ...

    def delete(self, backup_id: int, *, reason: str, now: datetime | None = None) -> None:
        """Its objects deleted, its row marked deleted, audited at ``now`` if given."""
        ...

    def reap_dead(self, slug: str, now: datetime | None = None) -> int:
        """Backups a dead process left running: marked failed, objects aborted."""
        ...

    def prune_verdicts(self, now: datetime) -> list[Verdict]:
        """The backups the configured retention policy prunes at ``now`` (the prunes
        only)."""
        ...


class Clock(Protocol):
    def now(self) -> datetime: ...


# -- Postgres client tools -----------------------------------------------------------


class PgTools(Protocol):
    """The Postgres client binaries the services run (pg_dump, pg_restore, psql)."""

    def path(self, name: str) -> str:
        """The binary ``name``'s path; ConfigError when it is not there."""
        ...

    def version(self, name: str) -> str:
        """Its ``--version`` line (as a backup's manifest records it)."""
        ...


# -- the key vault -------------------------------------------------------------------


class SecretWrapper(Protocol):
    """A master key: wraps the secrets the catalog stores, each bound to a context
    (``tenant:<slug>:password``)."""

    @property
    def key_id(self) -> str: ...

    def wrap(self, plaintext: bytes, context: str) -> str: ...

    def unwrap(self, wrapped: str, context: str) -> bytes: ...


class TenantKeyRecord(Protocol):
    """A row of ``tenant_keys``: the tenant's age key, its identity wrapped."""

    @property
    def key_id(self) -> str: ...
    @property
    def recipient(self) -> str: ...
    @property
    def identity_wrapped(self) -> str | None: ...
    @property
    def destroyed_at(self) -> datetime | None: ...


class KeyVault(Protocol):
    """The configured master key and the tenant keys it wraps. The methods given a
    ``session`` read or write the catalog in the caller's transaction (a SQLAlchemy
    session: the services that call them still speak it)."""

    @property
    def master(self) -> SecretWrapper:
        """The configured master key, loaded on first use (MasterKeyError when it
        cannot be)."""
        ...

    def new_password(self) -> str:
        """A fresh random password (a tenant's, a support grant's)."""
        ...

    def writing_key(self, session: Any) -> SecretWrapper:
        """The master key, once the catalog agrees it is the fleet's (a stray one is
        refused before it wraps anything)."""
        ...

    def new_key(self, master: SecretWrapper, tenant_id: int, slug: str) -> Any:
        """A new age key for the tenant: the ``tenant_keys`` row to add."""
        ...

    def ensure_key(self, session: Any, tenant_id: int, slug: str) -> TenantKeyRecord:
        """The tenant's key, made now if it predates keys; a destroyed one refused."""
        ...

    def identity(self, key: TenantKeyRecord, slug: str) -> Any:
        """The tenant's age identity (a ``pyrage`` identity), unwrapped."""
        ...

    def catalog_key_id(self, session: Any) -> str | None:
        """The fleet's master key id as the catalog records it."""
        ...

    def wrapped_key_ids(self, session: Any) -> dict[str, int]:
        """How many stored secrets each master key id wraps."""
        ...
