"""The dependency rule, executable (docs/ARCHITECTURE.md): no import circle between
modules, few imports inside functions (each saying why), the import contracts of
pyproject.toml [tool.importlinter] really fail on a violating import, and the internals
of pinned dependencies that we patch are still there. Pure: no Postgres."""

from __future__ import annotations

import ast
import io
import shutil
import subprocess
import sys
import threading
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "backups", "cli")  # what the rules below read
LINTED = (*PACKAGES, "tenant_schema")  # [tool.importlinter] root_packages
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


# -- reading imports from source -----------------------------------------------------


@dataclass(frozen=True)
class Import:
    path: str  # relative to the repo root
    function: str | None  # qualified name of the enclosing function, None at module level
    module: str  # what the statement imports (ours or not)
    node: ast.Import | ast.ImportFrom


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> Iterator[Path]:
    for package in packages:
        yield from sorted((root / package).rglob("*.py"))


def imports_in(root: Path, path: Path) -> Iterator[Import]:
    """Every import statement of a file, wherever it stands: module level, under
    ``if TYPE_CHECKING:``, inside functions and classes."""
    tree = ast.parse(path.read_text(), filename=str(path))
    rel, here = str(path.relative_to(root)), module_name(root, path)
    is_package = path.name == "__init__.py"

    def walk(node: ast.AST, scope: list[str], function: str | None) -> Iterator[Import]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                inner = [*scope, child.name]
                yield from walk(child, inner, ".".join(inner))
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, [*scope, child.name], function)
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    yield Import(rel, function, alias.name, child)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:  # relative: resolve against this module's package
                    package = here.split(".")
                    package = package if is_package else package[:-1]
                    package = package[:len(package) - child.level + 1]
                    base = ".".join([*package, base] if base else package)
                for alias in child.names:
                    # `from a import b`: b is the module a.b when there is one
                    yield Import(rel, function, f"{base}.{alias.name}", child)
            else:
                yield from walk(child, scope, function)

    yield from walk(tree, [], None)


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (each import resolved to the longest
    name that is one of our modules; a package's __init__ counts only when named)."""
    files = list(source_files(root, packages))
    modules = {module_name(root, p) for p in files}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in files:
        here = module_name(root, path)
        for imp in imports_in(root, path):
            parts = imp.module.split(".")
            for n in range(len(parts), 0, -1):
                target = ".".join(parts[:n])
                if target in modules:
                    if target != here:
                        graph[here].add(target)
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A readable path round the component: a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    path, seen = [start], {start}
    while True:
        nxt = sorted(graph[path[-1]] & members)
        back = [m for m in nxt if m == start]
        if back and len(path) > 1:
            return [*path, start]
        unseen = [m for m in nxt if m not in seen]
        if not unseen:  # close at the first repeat
            target = next(m for m in nxt if m in seen)
            return [*path[path.index(target):], target]
        path.append(unseen[0])
        seen.add(unseen[0])


# -- (a) no import circle ------------------------------------------------------------


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph(REPO)
    assert len(graph) > 50, sorted(graph)  # really read the packages
    found = [" -> ".join(one_cycle(graph, c)) for c in cycles(graph)]
    assert not found, ("import cycles (imports under TYPE_CHECKING and inside functions "
                       "count):\n" + "\n".join(found))


def test_cycle_check_counts_type_checking_and_function_imports(tmp_path: Path) -> None:
    """The check above would see a circle made only of the imports that dodge one."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from pkg.b import B\n")
    (pkg / "b.py").write_text("class B:\n    def f(self):\n        from . import c\n")
    (pkg / "c.py").write_text("def g():\n    import pkg.a\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert one_cycle(graph, ["pkg.a", "pkg.b", "pkg.c"]) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]


# -- (b) imports inside functions ----------------------------------------------------

# Outside cli/ (whose commands import inside functions for `--help` speed), an import
# stays inside a function only to keep a heavy library off the start-up of commands
# that do not need it. Each says so in a comment on its line or the line above.
FUNCTION_IMPORTS_ALLOWED: dict[tuple[str, str, str], str] = {
    ("orchestrator/api.py", "Fleet.provision", "orchestrator.services.provisioning"):
        "Alembic (~0.5 s) only for commands that create tenants",
    ("orchestrator/api.py", "Fleet.credentials", "orchestrator.services.credentials"):
        "as Fleet.provision",
    ("orchestrator/api.py", "Fleet.set_plan", "orchestrator.services.plans"):
        "as Fleet.provision",
    ("orchestrator/api.py", "_refill", "orchestrator.services.spares"):
        "as Fleet.provision",
    ("orchestrator/api.py", "Fleet.pipeline_jobs", "backups.service.PipelineJobs"):
        "the backup pipeline (pyrage, pg tools) only for commands that back up",
    ("orchestrator/adapters/postgres/revision_files.py", "head_revision",
     "orchestrator.adapters.postgres.alembic_runner"):
        "Alembic only when the revision files do not say",
    ("orchestrator/adapters/postgres/revision_files.py", "revisions",
     "orchestrator.adapters.postgres.alembic_runner"):
        "Alembic only when the revision files do not say",
    ("orchestrator/adapters/catalog/db.py", "Catalog.alembic_config", "alembic.config.Config"):
        "Alembic only to migrate the catalog",
    ("orchestrator/adapters/catalog/db.py", "Catalog.upgrade", "alembic.command"):
        "Alembic only to migrate the catalog",
    ("orchestrator/adapters/postgres/alembic_threads.py", "install", "alembic"):
        "Alembic only once something migrates (catalog/db imports this module)",
    ("orchestrator/adapters/postgres/alembic_threads.py", "install",
     "alembic.operations.base.Operations"): "as above",
    ("orchestrator/adapters/postgres/alembic_threads.py", "install",
     "alembic.runtime.environment.EnvironmentContext"): "as above",
    ("orchestrator/adapters/crypto/masterkey.py", "_kms_client", "boto3"):
        "boto3 (~0.3 s) only for a KMS-held master key",
    ("backups/stores.py", "S3Store.client", "boto3"): "boto3 only for an s3:// store",
    ("backups/stores.py", "S3Store.client", "botocore.config.Config"): "as above",
    ("backups/stores.py", "_S3Writer.__init__", "boto3.s3.transfer.TransferConfig"):
        "as above",
    ("backups/stores.py", "_S3Writer.__init__", "boto3.s3.transfer.create_transfer_manager"):
        "as above",
}


def function_imports(root: Path) -> list[Import]:
    return [imp for path in source_files(root) for imp in imports_in(root, path)
            if imp.function is not None and not imp.path.startswith("cli/")]


def comment_lines(source: str) -> tuple[set[int], set[int]]:
    """(lines with a comment, lines that are only a comment)."""
    with_comment, only_comment = set(), set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            with_comment.add(tok.start[0])
            if not tok.line[:tok.start[1]].strip():
                only_comment.add(tok.start[0])
    return with_comment, only_comment


def has_reason(source: str, node: ast.stmt, siblings: list[ast.stmt]) -> bool:
    """A comment on the statement's own lines, or alone on the line above the run of
    import statements it belongs to."""
    with_comment, only_comment = comment_lines(source)
    if with_comment & set(range(node.lineno, (node.end_lineno or node.lineno) + 1)):
        return True
    first = siblings.index(node)
    while first > 0 and isinstance(siblings[first - 1], ast.Import | ast.ImportFrom) \
            and siblings[first - 1].end_lineno == siblings[first].lineno - 1:
        first -= 1
    return siblings[first].lineno - 1 in only_comment


def enclosing_body(tree: ast.AST, node: ast.stmt) -> list[ast.stmt]:
    for parent in ast.walk(tree):
        for field in ("body", "orelse", "finalbody", "handlers"):
            body = getattr(parent, field, None)
            if isinstance(body, list) and node in body:
                return body
    raise AssertionError(f"no parent for line {node.lineno}")


def test_imports_inside_functions_are_few_and_say_why() -> None:
    found = function_imports(REPO)
    assert found, "the scan found no import inside a function at all: is it reading?"
    unlisted = sorted(f"{i.path}:{i.node.lineno} in {i.function}: {i.module}" for i in found
                      if (i.path, i.function, i.module) not in FUNCTION_IMPORTS_ALLOWED)
    assert not unlisted, (
        "imports inside functions outside cli/ (move them to the top of the module; one "
        "that must stay, for start-up time, goes into FUNCTION_IMPORTS_ALLOWED with its "
        "reason as a comment on its line or the line above):\n" + "\n".join(unlisted))
    stale = sorted(set(FUNCTION_IMPORTS_ALLOWED) - {(i.path, i.function, i.module)
                                                    for i in found})
    assert not stale, f"FUNCTION_IMPORTS_ALLOWED names imports that are gone: {stale}"
    silent = []
    for imp in found:
        source = (REPO / imp.path).read_text()
        tree = ast.parse(source)
        node = next(n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)
                    and n.lineno == imp.node.lineno)
        if not has_reason(source, node, enclosing_body(tree, node)):
            silent.append(f"{imp.path}:{imp.node.lineno} ({imp.module})")
    assert not silent, ("an import inside a function needs a one-line reason, as a comment "
                        "on its line or the line above:\n" + "\n".join(silent))


def test_reason_check_reads_the_line_above_a_run_of_imports() -> None:
    source = ("def f():\n"
              "    # start-up: heavy\n"
              "    import a\n"
              "    from b import c\n"
              "\n"
              "def g():\n"
              "    x = 1  # unrelated\n"
              "    import d\n"
              "    import e  # start-up\n")
    tree = ast.parse(source)
    f, g = tree.body
    assert isinstance(f, ast.FunctionDef) and isinstance(g, ast.FunctionDef)
    assert has_reason(source, f.body[0], f.body) and has_reason(source, f.body[1], f.body)
    assert not has_reason(source, g.body[1], g.body)
    assert has_reason(source, g.body[2], g.body)


# -- (c) the contracts fail on a violating import ------------------------------------


def _lint_copy(tmp_path: Path, edit: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """lint-imports over a copy of the packages and pyproject.toml, with ``edit``
    (path -> text) appended to or creating files of the copy."""
    assert LINT_IMPORTS.exists(), f"{LINT_IMPORTS} missing: `make .venv/.installed`"
    for package in LINTED:
        shutil.copytree(REPO / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    for rel, text in edit.items():
        with (tmp_path / rel).open("a") as f:
            f.write(text)
    # cwd first on sys.path: the copy is analysed, not the installed packages
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--no-logo"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def test_contracts_hold_on_an_unchanged_copy(tmp_path: Path) -> None:
    proc = _lint_copy(tmp_path, {})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout, proc.stdout


@pytest.mark.parametrize(("edit", "broken", "named"), [
    # the domain reaching up, even from under TYPE_CHECKING
    ({"orchestrator/domain/names.py":
      "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import orchestrator.api\n"},
     "The domain imports nothing of ours but itself",
     "orchestrator.domain.names -> orchestrator.api"),
    # an adapter calling a service, from inside a function
    ({"orchestrator/adapters/clock.py":
      "\n\ndef _sneak() -> None:\n    from orchestrator.services import retention  # noqa\n"},
     "Adapters never import services",
     "orchestrator.adapters.clock -> orchestrator.services.retention"),
    # a service reaching the dev fleet
    ({"orchestrator/services/report.py": "\nimport orchestrator.devfleet.quickstart\n"},
     "Only the CLI imports the dev fleet",
     "orchestrator.services.report -> orchestrator.devfleet.quickstart"),
    # a new top-level module nobody placed on a floor
    ({"orchestrator/helpers.py": "import orchestrator.domain.errors\n"},
     "Every module of orchestrator/ and backups/ sits on a declared floor",
     "orchestrator.helpers"),
], ids=["domain-reaches-up", "adapter-calls-service", "service-uses-devfleet", "unplaced"])
def test_contracts_fail_on_a_violating_import(tmp_path: Path, edit: dict[str, str],
                                              broken: str, named: str) -> None:
    proc = _lint_copy(tmp_path, edit)
    out = " ".join(proc.stdout.split())  # rich wraps long names
    assert proc.returncode != 0, proc.stdout
    assert f"{broken}" in out and "BROKEN" in out, proc.stdout
    assert named in out, proc.stdout


# -- patched internals of pinned dependencies ----------------------------------------
# alembic and typer are pinned to one minor version (pyproject.toml) because we patch
# their internals. These fail first, and say where to look, when an upgrade moves them.


def test_alembic_internals_that_alembic_threads_patches_exist() -> None:
    import alembic
    from alembic.operations.base import Operations
    from alembic.runtime.environment import EnvironmentContext

    what = (f"alembic {alembic.__version__} changed its proxy internals: re-check "
            "orchestrator/adapters/postgres/alembic_threads.py before raising the pin "
            "(pyproject.toml alembic>=1.20,<1.21)")
    for cls in (EnvironmentContext, Operations):
        for name in ("_install_proxy", "_remove_proxy"):
            assert callable(getattr(cls, name, None)), f"{cls.__name__}.{name} removed: {what}"
    # the hooks are where "the current" context/op is published: alembic must call them
    # when an environment is entered/left and when Operations.context runs a migration
    migration = Operations.context.__wrapped__  # under @contextmanager
    for fn, names in ((EnvironmentContext.__enter__, ["_install_proxy"]),
                      (EnvironmentContext.__exit__, ["_remove_proxy"]),
                      (migration, ["_install_proxy", "_remove_proxy"])):
        for name in names:
            assert name in fn.__code__.co_names, \
                f"{fn.__qualname__} no longer calls {name}: {what}"
    for kind in ("context", "op"):
        assert f"alembic.{kind}" in sys.modules and hasattr(alembic, kind), \
            f"alembic.{kind} is no longer a module: {what}"


def test_alembic_threads_gives_each_thread_its_own_context() -> None:
    """Behaviour the patch exists for: two threads inside their own environment at the
    same time each see their own ``alembic.context``."""
    import alembic
    from alembic.config import Config as AlembicConfig
    from alembic.runtime.environment import EnvironmentContext
    from alembic.script import ScriptDirectory

    from orchestrator.adapters.postgres import alembic_threads

    alembic_threads.install()
    script_dir = REPO / "migrations" / "tenant"
    inside = threading.Barrier(2, timeout=30)
    seen: dict[int, object] = {}

    def run(i: int) -> None:
        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(script_dir))
        with EnvironmentContext(cfg, ScriptDirectory.from_config(cfg)):
            inside.wait()  # both environments are entered now
            seen[i] = alembic.context.config is cfg
            inside.wait()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert seen == {0: True, 1: True}, (
        f"alembic {alembic.__version__}: a thread saw another thread's alembic.context: "
        "re-check orchestrator/adapters/postgres/alembic_threads.py before raising the pin")


def test_typer_internals_that_plain_params_patches_exist() -> None:
    import dataclasses
    import inspect
    from importlib.metadata import version

    import typer.core
    from typer import _coercion
    from typer.models import ParameterInfo

    import cli.main  # noqa: F401  (applies the patch at import)

    what = (f"typer {version('typer')} changed the internals cli/main.py _plain_params "
            "patches (parameter coercion through pydantic, ~0.15 s a command): re-check it "
            "before raising the pin (pyproject.toml typer>=0.29,<0.30)")
    assert hasattr(_coercion, "RuntimeParam") and hasattr(_coercion, "TypeDescriptor"), what
    fields = {f.name for f in dataclasses.fields(_coercion.TypeDescriptor)}
    assert {"annotation", "parameter_info", "file_annotation"} <= fields, what
    fields = {f.name for f in dataclasses.fields(_coercion.RuntimeParam)}
    assert fields == {"parameter_info", "annotation"}, what
    params = list(inspect.signature(_coercion.RuntimeParam._coerce_value).parameters)
    assert params == ["self", "value", "param", "ctx"], what
    assert "parser" in vars(ParameterInfo()), what
    # typer.core looks build_runtime_param up as its module global: that is what we replace
    runtime = next(v for v in vars(typer.core).values() if inspect.isclass(v)
                   and "get_runtime_param" in vars(v))
    assert "build_runtime_param" in runtime.get_runtime_param.__code__.co_names, what
    assert getattr(typer.core.build_runtime_param, "plain", False), \
        f"_plain_params did not install itself: {what}"
    built = typer.core.build_runtime_param(
        _coercion.TypeDescriptor(str, ParameterInfo(), None))
    assert type(built).__name__ == "Plain", what
    assert built._coerce_value("acme", param=None, ctx=None) == "acme", what
