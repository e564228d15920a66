"""The head of an Alembic script directory, read from its revision files' text.

Alembic finds the head by importing every revision file (and Alembic itself,
~0.5 s of start-up for a command that only reads). Revision files declare
``revision`` and ``down_revision`` as literals (Alembic's template writes them
so): reading those with ``ast`` gives the same answer without executing
anything. Whatever this cannot decide for certain (a value computed at import
time, a file it cannot parse, no versions directory, several heads) raises
``Undecided``; ``head_revision`` then asks Alembic.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from orchestrator.domain.revisions import Revision

# the files Alembic loads from a versions directory (its _only_source_rev_file)
REVISION_FILE = re.compile(r"(?!\.\#|__init__)(.*\.py)$")


class Undecided(Exception):
    """The files alone do not say; ask Alembic."""


def head_revision(script_location: Path) -> str | None:
    """The head of ``script_location``: from its files when they say, else Alembic's."""
    try:
        return head(script_location)
    except Undecided:
        # start-up: Alembic (~0.5 s to import) only when the files do not say
        from orchestrator.adapters.postgres import alembic_runner

        return alembic_runner.head_revision(script_location)


def head(script_location: Path) -> str | None:
    """The single head revision of ``script_location``/versions (None: no revisions)."""
    versions = script_location / "versions"
    if not versions.is_dir():
        raise Undecided(f"{versions} is not a directory")
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted(versions.iterdir()):
        if not REVISION_FILE.match(path.name) or not path.is_file():
            continue
        revision, down = _declared(path)
        if revision in revisions:
            raise Undecided(f"revision {revision} declared twice")
        revisions.add(revision)
        parents.update(down)
    if not parents <= revisions:
        raise Undecided("a down_revision names no revision file")
    heads = revisions - parents
    if len(heads) > 1 or (revisions and not heads):
        raise Undecided(f"{len(heads)} heads")
    return next(iter(heads), None)


def revisions(script_location: Path) -> list[Revision]:
    """Every revision of ``script_location`` (id, parents, message): from the files
    when they say, else Alembic's."""
    try:
        return _revisions(script_location)
    except Undecided:
        # start-up: Alembic (~0.5 s to import) only when the files do not say
        from orchestrator.adapters.postgres import alembic_runner

        return alembic_runner.revisions(script_location)


def _revisions(script_location: Path) -> list[Revision]:
    versions = script_location / "versions"
    if not versions.is_dir():
        raise Undecided(f"{versions} is not a directory")
    found: dict[str, Revision] = {}
    for path in sorted(versions.iterdir()):
        if not REVISION_FILE.match(path.name) or not path.is_file():
            continue
        tree = _parse(path)
        revision, down = _declared(path, tree)
        if revision in found:
            raise Undecided(f"revision {revision} declared twice")
        found[revision] = Revision(revision, down, message(ast.get_docstring(tree) or ""))
    return list(found.values())


def message(doc: str) -> str:
    """A revision's message as Alembic gives it (``Script.doc``): its docstring's
    first paragraph, on one line."""
    return " ".join(re.split(r"\n\n", doc.strip())[0].split())


def _parse(path: Path) -> ast.Module:
    try:
        return ast.parse(path.read_bytes(), str(path))
    except (SyntaxError, ValueError, OSError) as exc:
        raise Undecided(f"{path.name}: {exc}") from None


def _declared(path: Path, tree: ast.Module | None = None) -> tuple[str, tuple[str, ...]]:
    """(revision, down_revisions) as the file assigns them at module level, once each."""
    if tree is None:
        tree = _parse(path)
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            if target.id in found:
                raise Undecided(f"{path.name}: {target.id} assigned twice")
            try:
                found[target.id] = ast.literal_eval(value)
            except ValueError:
                raise Undecided(f"{path.name}: {target.id} is not a literal") from None
    revision, down = found.get("revision"), found.get("down_revision", ...)
    if not isinstance(revision, str) or down is ...:
        raise Undecided(f"{path.name}: no literal revision/down_revision")
    if down is None:
        return revision, ()
    if isinstance(down, str):
        return revision, (down,)
    if isinstance(down, tuple | list) and all(isinstance(d, str) for d in down):
        return revision, tuple(down)
    raise Undecided(f"{path.name}: down_revision is {down!r}")
