"""Expected failures: the CLI prints their message on one line and exits non-zero.

Anything that is not a TenantctlError is a bug and keeps its traceback.
"""


def first_line(exc: BaseException) -> str:
    """The first line of an error (of the driver's own error when SQLAlchemy wraps
    one): what goes into one-line messages and the catalog, never a DETAIL/SQL dump."""
    orig = getattr(exc, "orig", None) or exc
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def printable(text: str) -> str:
    """``text`` on one printable line: anything else (a newline, an escape code, a
    byte that was not UTF-8) shown escaped, as Python would write it."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                   for c in text)


class TenantctlError(Exception):
    """Base for failures an operator can act on; the message is the whole story."""

    exit_code = 1

    def __str__(self) -> str:
        # Messages quote user input (a path, a config key, a name): whatever that
        # holds, the message stays one printable line — no newline, no escape code.
        return printable(super().__str__())


class ConfigError(TenantctlError):
    exit_code = 2


class InvalidInput(TenantctlError):
    exit_code = 2


class NotFound(TenantctlError):
    exit_code = 3


class Conflict(TenantctlError):
    """Already exists, or another process is working on the same thing."""

    exit_code = 4


class CapacityError(TenantctlError):
    exit_code = 5


class ServerUnavailable(TenantctlError):
    exit_code = 6


class MasterKeyError(TenantctlError):
    """A missing or wrong master key."""

    exit_code = 7


class CatalogIntegrityError(TenantctlError):
    """A catalog row contradicts itself (e.g. a tenant's database named after another
    tenant): refused before anything touches a server. `tenantctl doctor` lists them."""

    exit_code = 13
