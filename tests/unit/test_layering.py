"""The layering rules of the house, enforced by reading every module's imports (shared/DESIGN.md §2).

Why these rules exist. The agent is a functional core in an imperative shell: decisions (retention, schedules,
the stream format, the manifest, part planning, the DR state machine) are PURE functions of their arguments,
so they are exhaustively tested without a database, a store or a clock, and the shell only executes what they
decide. A PURE module that imports an event loop, a socket or a subprocess has stopped being pure, even if no
test notices yet. Components (``backup/``, ``dr/``) are built on lower layers (``storage/``, ``postgres/``),
talk to each other through events and register their routes with ``control/``, a framework that knows no
component. The composition root (``app`` and ``daemon``) is the only place that picks
implementations; a component that imports it, or the CLI, can no longer be built or tested without the whole
agent, and adding a component would mean editing the others. And tests inject time and collaborators instead of
patching our modules, so a test never depends on how a module spells its own internals.

How. Every file under ``kybdr_agent/`` is parsed with :mod:`ast` (nothing is imported, so the check takes a
fraction of a second and cannot be fooled by import side effects). Every import counts: module level, inside
functions, and under ``if TYPE_CHECKING:`` (marked as such in the report, since a type-only import still ties
the layers together). Relative imports are resolved, and ``from package import name`` resolves to the submodule
when ``name`` is one. The rule checkers are plain functions from sources to violations, so the self-tests at
the end feed them synthetic snippets through the very same code and check each rule both fires and stays quiet.
"""

from __future__ import annotations

import ast
import functools
import re
import textwrap
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import pytest

REPO_ROOT: Final = Path(__file__).resolve().parents[2]
PACKAGE: Final = "kybdr_agent"

# Pure by decree, whatever their docstrings say; a file that does not exist (yet) is skipped.
EXPLICITLY_PURE: Final = (
    "kybdr_agent/backup/streamfmt.py",
    "kybdr_agent/backup/manifest.py",
    "kybdr_agent/backup/retention.py",
    "kybdr_agent/backup/schedule.py",
    "kybdr_agent/storage/parts.py",
    "kybdr_agent/backup/slots.py",
    "kybdr_agent/dr/machine.py",
    "kybdr_agent/dr/machine_types.py",
    "kybdr_agent/dr/observations.py",
    "kybdr_agent/wal/names.py",
    "kybdr_agent/wal/timeline.py",
    "kybdr_agent/wal/targets.py",
    "kybdr_agent/wal/window.py",
    "kybdr_agent/wal/fetch_plan.py",
    "kybdr_agent/wal/retention.py",
    "kybdr_agent/wal/recovery.py",
    "kybdr_agent/wal/records.py",
    "kybdr_agent/wal/pageheader.py",
)
# Libraries that do I/O (or run an event loop); a pure module imports none of them.
IO_LIBRARIES: Final = frozenset(
    {"asyncio", "anyio", "aiohttp", "aiobotocore", "botocore", "asyncpg", "subprocess", "socket"}
)
# The one project module every pure module may import besides other pure ones.
PURE_ALLOWED: Final = frozenset({"kybdr_agent.errors"})

COMPONENTS: Final = (
    "kybdr_agent.backup",
    "kybdr_agent.storage",
    "kybdr_agent.postgres",
    "kybdr_agent.dr",
    "kybdr_agent.wal",
)
# The composition root, the CLI and everything that drives the agent from outside.
ROOT_MODULES: Final = (
    "kybdr_agent.app",
    "kybdr_agent.wiring",
    "kybdr_agent.daemon",
    "kybdr_agent.cli",
    "kybdr_agent.cli_output",
    "kybdr_agent.cli_dr",
    "kybdr_agent.operations",
)
CONTROL: Final = "kybdr_agent.control"
# The framework's public route and problem types: a component's own routes.py may import these, and only these.
CONTROL_PUBLIC: Final = (
    "kybdr_agent.control.http",
    "kybdr_agent.control.problems",
    "kybdr_agent.control.requests",
    "kybdr_agent.control.routes",
)

RULE_PURE: Final = "1 (PURE modules import no I/O library and no project module that is not itself pure)"
RULE_COMPONENT: Final = (
    "2 (backup/, storage/, postgres/, dr/ never import the composition root, the CLI or control/; "
    "only a component's own routes.py may import control.http, .problems, .requests, .routes)"
)
RULE_STORAGE: Final = "3 (storage/ imports nothing from backup/ or dr/)"
RULE_POSTGRES: Final = "4 (postgres/ imports nothing from backup/, storage/ or dr/)"
RULE_CONTROL: Final = "5 (control/ is the framework and imports no component: nothing from backup/ or dr/)"
RULE_PATCH: Final = "6 (no test patches a project module: inject the collaborator instead)"

_PURE_MARK: Final = re.compile(r"\bPURE\b")
_PARAGRAPH_BREAK: Final = re.compile(r"\n[ \t]*\n")
_TYPE_CHECKING: Final = "TYPE_CHECKING"


@dataclass(frozen=True)
class Import:
    """One module an import statement loads: a project module resolved to its file's dotted name."""

    target: str
    line: int
    type_checking: bool


@dataclass(frozen=True)
class Module:
    """A parsed module of the package: where it lives, whether its docstring says PURE, what it imports."""

    name: str
    path: str
    declares_pure: bool
    imports: tuple[Import, ...]


@dataclass(frozen=True)
class Violation:
    """One broken rule, with everything needed to find and fix it."""

    rule: str
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what} — breaks rule {self.rule}"


Project = Mapping[str, Module]


# ---------------------------------------------------------------------------------------------------------------
# Collecting imports


def module_name(path: str) -> str:
    """``kybdr_agent/backup/manifest.py`` → ``kybdr_agent.backup.manifest``; a package's ``__init__`` → the package."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def within(name: str, prefix: str) -> bool:
    """Whether dotted ``name`` is ``prefix`` or below it; ``control.routes_backup`` is not within ``control.routes``."""
    return name == prefix or name.startswith(prefix + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == _TYPE_CHECKING) or (
        isinstance(test, ast.Attribute) and test.attr == _TYPE_CHECKING
    )


def import_statements(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import statement at any depth, with whether it sits in the body of an ``if TYPE_CHECKING:``."""
    pending: list[tuple[ast.AST, bool]] = [(tree, False)]
    while pending:
        node, type_checking = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, type_checking
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            pending.extend((child, True) for child in node.body)
            pending.extend((child, type_checking) for child in node.orelse)
        else:
            pending.extend((child, type_checking) for child in ast.iter_child_nodes(node))


def _import_base(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The absolute module a ``from … import`` names, relative imports resolved against the importer's package."""
    if node.level == 0:
        return node.module or ""
    package = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level - 1 >= len(package):
        raise ValueError(f"{importer}:{node.lineno}: relative import goes above the top-level package")
    base = package[: len(package) - (node.level - 1)]
    if node.module:
        base.append(node.module)
    return ".".join(base)


def imports_of(tree: ast.Module, importer: str, is_package: bool, project_names: frozenset[str]) -> tuple[Import, ...]:
    """What a module imports; ``from pkg import name`` counts as ``pkg.name`` when that is a project module."""
    found: list[Import] = []
    for node, type_checking in import_statements(tree):
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, type_checking) for alias in node.names)
            continue
        base = _import_base(node, importer, is_package)
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            target = submodule if submodule in project_names else base
            found.append(Import(target, node.lineno, type_checking))
    return tuple(sorted(set(found), key=lambda imp: (imp.line, imp.target)))


def declares_pure(tree: ast.Module) -> bool:
    """Whether the module docstring's opening says ``PURE``.

    The opening is the summary line and the first paragraph of the body: by PEP 257 the summary stands alone,
    and the house style puts the marker first in the paragraph after it ("PURE. ``decide(...)`` is ...").
    Function docstrings that say PURE (a pure helper inside a shell module) do not make the module pure.
    """
    docstring = ast.get_docstring(tree)
    if not docstring:
        return False
    opening = _PARAGRAPH_BREAK.split(docstring.strip())[:2]
    return any(_PURE_MARK.search(paragraph) for paragraph in opening)


def build_project(sources: Mapping[str, str]) -> dict[str, Module]:
    """Parse sources keyed by repository-relative path (``kybdr_agent/x/y.py``) into modules keyed by dotted name."""
    names = {path: module_name(path) for path in sources}
    project_names = frozenset(names.values())
    project: dict[str, Module] = {}
    for path, source in sources.items():
        tree = ast.parse(source, filename=path)
        is_package = path.endswith("/__init__.py")
        name = names[path]
        project[name] = Module(name, path, declares_pure(tree), imports_of(tree, name, is_package, project_names))
    return project


def pure_modules(project: Project, explicit: tuple[str, ...] = EXPLICITLY_PURE) -> frozenset[str]:
    """The pure modules: listed explicitly (when they exist) or marked PURE in their docstring."""
    listed = {module_name(path) for path in explicit}
    return frozenset(name for name, module in project.items() if module.declares_pure or name in listed)


def read_sources(folder: str) -> dict[str, str]:
    """Every ``.py`` file under ``folder`` of the repository, keyed by repository-relative POSIX path."""
    return {
        path.relative_to(REPO_ROOT).as_posix(): path.read_text(encoding="utf-8")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
    }


@functools.cache
def real_project() -> dict[str, Module]:
    return build_project(read_sources(PACKAGE))


# ---------------------------------------------------------------------------------------------------------------
# Rules 1–5: imports of the package


def _describe(imp: Import) -> str:
    return f"imports {imp.target}" + (" (under TYPE_CHECKING)" if imp.type_checking else "")


def _imports_within(
    project: Project, importers: tuple[str, ...], forbidden: tuple[str, ...], rule: str
) -> list[Violation]:
    """Each import by a module within ``importers`` of a module within ``forbidden``."""
    return [
        Violation(rule, module.path, imp.line, _describe(imp))
        for module in project.values()
        if any(within(module.name, prefix) for prefix in importers)
        for imp in module.imports
        if any(within(imp.target, prefix) for prefix in forbidden)
    ]


def check_pure(project: Project, explicit: tuple[str, ...] = EXPLICITLY_PURE) -> list[Violation]:
    """Rule 1: pure modules import no I/O library, and of the project only other pure modules and errors."""
    pure = pure_modules(project, explicit)
    violations: list[Violation] = []
    for name in sorted(pure):
        module = project[name]
        for imp in module.imports:
            if imp.target.split(".")[0] in IO_LIBRARIES:
                violations.append(Violation(RULE_PURE, module.path, imp.line, _describe(imp) + ", an I/O library"))
            elif within(imp.target, PACKAGE) and imp.target not in pure and imp.target not in PURE_ALLOWED:
                what = _describe(imp) + ", a project module that is not pure"
                violations.append(Violation(RULE_PURE, module.path, imp.line, what))
    return violations


def check_components(project: Project) -> list[Violation]:
    """Rule 2: components never import the root, the CLI or control/; their routes.py may import its public types."""
    violations: list[Violation] = []
    for module in project.values():
        component = next((prefix for prefix in COMPONENTS if within(module.name, prefix)), None)
        if component is None:
            continue
        is_routes = module.name in (f"{component}.routes", f"{component}.status_routes")
        for imp in module.imports:
            public = is_routes and any(within(imp.target, allowed) for allowed in CONTROL_PUBLIC)
            to_control = within(imp.target, CONTROL) and not public
            if to_control or any(within(imp.target, root) for root in ROOT_MODULES):
                violations.append(Violation(RULE_COMPONENT, module.path, imp.line, _describe(imp)))
    return violations


def check_storage(project: Project) -> list[Violation]:
    """Rule 3: storage/ knows nothing of backups (nor of DR)."""
    return _imports_within(project, ("kybdr_agent.storage",), ("kybdr_agent.backup", "kybdr_agent.dr"), RULE_STORAGE)


def check_postgres(project: Project) -> list[Violation]:
    """Rule 4: postgres/ is the layer below backup/ and dr/, beside storage/."""
    forbidden = ("kybdr_agent.backup", "kybdr_agent.storage", "kybdr_agent.dr")
    return _imports_within(project, ("kybdr_agent.postgres",), forbidden, RULE_POSTGRES)


def check_control(project: Project) -> list[Violation]:
    """Rule 5: the HTTP framework imports no component."""
    return _imports_within(project, (CONTROL,), ("kybdr_agent.backup", "kybdr_agent.dr"), RULE_CONTROL)


# ---------------------------------------------------------------------------------------------------------------
# Rule 6: tests patch none of our modules


def _project_module_aliases(tree: ast.Module, project_names: frozenset[str]) -> dict[str, str]:
    """Names a test file binds to project modules (``from kybdr_agent import daemon`` → ``daemon``)."""
    aliases: dict[str, str] = {}
    for node, _ in import_statements(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if within(alias.name, PACKAGE):
                    bound = alias.asname or alias.name.split(".")[0]
                    aliases[bound] = alias.name if alias.asname else PACKAGE
        elif node.level == 0 and node.module and within(node.module, PACKAGE):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in project_names:
                    aliases[alias.asname or alias.name] = submodule
    return aliases


def _is_patch(func: ast.expr) -> bool:
    """``x.setattr``/``x.delattr`` (monkeypatch), builtin ``setattr``, ``mock.patch``, ``patch.object`` & co."""
    if isinstance(func, ast.Name):
        return func.id in {"patch", "setattr"}
    if not isinstance(func, ast.Attribute):
        return False
    if func.attr in {"setattr", "delattr", "patch"}:
        return True
    owner = func.value
    names_patch = (isinstance(owner, ast.Name) and owner.id == "patch") or (
        isinstance(owner, ast.Attribute) and owner.attr == "patch"
    )
    return func.attr in {"object", "dict", "multiple"} and names_patch


def _patched(target: ast.expr, aliases: Mapping[str, str]) -> str | None:
    """The dotted project name a patch target reaches through a module alias (``daemon.Daemon`` → ``kybdr_agent…``)."""
    attributes: list[str] = []
    node = target
    while isinstance(node, ast.Attribute):
        attributes.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        return ".".join([aliases[node.id], *reversed(attributes)])
    while isinstance(node, ast.Attribute | ast.Subscript | ast.Call):
        node = node.func if isinstance(node, ast.Call) else node.value
    if isinstance(node, ast.Name) and node.id in aliases:
        return f"{aliases[node.id]} (through {ast.unparse(target)})"
    return None


def check_test_patches(sources: Mapping[str, str], project_names: frozenset[str]) -> list[Violation]:
    """Rule 6: each patch call whose target is a ``"kybdr_agent…"`` string or rooted in a project module."""
    violations: list[Violation] = []
    for path, source in sources.items():
        tree = ast.parse(source, filename=path)
        aliases = _project_module_aliases(tree, project_names)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and _is_patch(node.func)):
                continue
            target = node.args[0] if node.args else next((k.value for k in node.keywords if k.arg == "target"), None)
            if target is None:
                continue
            patched: str | None = None
            if isinstance(target, ast.Constant) and isinstance(target.value, str):
                patched = target.value if within(target.value, PACKAGE) else None
            elif (patched := _patched(target, aliases)) is not None and len(node.args) > 1:
                name = node.args[1]
                if isinstance(name, ast.Constant) and isinstance(name.value, str) and "(" not in patched:
                    patched = f"{patched}.{name.value}"
            if patched is not None:
                what = f"patches {patched} with {ast.unparse(node.func)}()"
                violations.append(Violation(RULE_PATCH, path, node.lineno, what))
    return violations


# ---------------------------------------------------------------------------------------------------------------
# The rules, on the real code


def _report(violations: list[Violation]) -> str:
    lines = "\n".join(f"  {violation}" for violation in sorted(violations, key=lambda v: (v.path, v.line, v.what)))
    return f"{len(violations)} layering violation(s):\n{lines}"


def walker_problems(project: Project) -> list[str]:
    """Why a parsed package is too small to be the real one: an empty walk must not pass every rule vacuously."""
    pure = pure_modules(project)
    problems = []
    if len(project) <= 40:
        problems.append(f"only {len(project)} modules found under {PACKAGE}/")
    if len(pure) <= 5:
        problems.append(f"only {len(pure)} pure modules found: {sorted(pure)}")
    if sum(len(module.imports) for module in project.values()) <= 200:
        problems.append("fewer than 200 imports found")
    return problems


def test_the_walker_sees_the_whole_package() -> None:
    project = real_project()
    assert not walker_problems(project), walker_problems(project)
    # Found through its docstring, not the explicit list: marker detection works on the real files.
    assert "kybdr_agent.postgres.conninfo" in pure_modules(project)


def test_rule_1_pure_modules_import_no_io() -> None:
    violations = check_pure(real_project())
    assert not violations, _report(violations)


def test_rule_2_components_import_no_root_cli_or_control_internals() -> None:
    violations = check_components(real_project())
    assert not violations, _report(violations)


def test_rule_3_storage_imports_nothing_from_backup() -> None:
    violations = check_storage(real_project())
    assert not violations, _report(violations)


def test_rule_4_postgres_imports_no_component_and_no_storage() -> None:
    violations = check_postgres(real_project())
    assert not violations, _report(violations)


def test_rule_5_control_imports_no_component() -> None:
    violations = check_control(real_project())
    assert not violations, _report(violations)


def test_rule_6_no_test_patches_a_project_module() -> None:
    tests = read_sources("tests")
    assert len(tests) > 20, f"only {len(tests)} test files found"
    violations = check_test_patches(tests, frozenset(real_project()))
    assert not violations, _report(violations)


# ---------------------------------------------------------------------------------------------------------------
# Self-tests: each rule fires on a synthetic violation and stays quiet on the allowed shapes


def _snippet(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


PURE_DOC = '"""A pure helper.\n\nPURE. A function of its arguments only.\n"""\n'
SHELL_DOC = '"""A shell module: it does I/O."""\n'

Checker = Callable[[Mapping[str, str]], list[Violation]]


def _on_package(check: Callable[[Project], list[Violation]]) -> Checker:
    def run(sources: Mapping[str, str]) -> list[Violation]:
        return check(build_project(sources))

    return run


def _pure_listing(path: str) -> Checker:
    def run(sources: Mapping[str, str]) -> list[Violation]:
        return check_pure(build_project(sources), explicit=(path, "kybdr_agent/never/there.py"))

    return run


def _on_tests(sources: Mapping[str, str]) -> list[Violation]:
    package = frozenset({"kybdr_agent", "kybdr_agent.daemon", "kybdr_agent.backup", "kybdr_agent.backup.service"})
    return check_test_patches(sources, package)


_BASE: Final = {
    "kybdr_agent/__init__.py": "",
    "kybdr_agent/errors.py": '"""Errors."""\n',
    "kybdr_agent/daemon.py": SHELL_DOC,
    "kybdr_agent/wiring.py": SHELL_DOC,
    "kybdr_agent/backup/__init__.py": "",
    "kybdr_agent/backup/pipeline.py": SHELL_DOC,
    "kybdr_agent/backup/manifest.py": PURE_DOC,
    "kybdr_agent/storage/__init__.py": "",
    "kybdr_agent/storage/parts.py": PURE_DOC,
    "kybdr_agent/control/__init__.py": "",
    "kybdr_agent/control/http.py": SHELL_DOC,
    "kybdr_agent/control/problems.py": SHELL_DOC,
    "kybdr_agent/control/requests.py": SHELL_DOC,
    "kybdr_agent/control/routes.py": SHELL_DOC,
    "kybdr_agent/control/routes_backup.py": SHELL_DOC,
    "kybdr_agent/control/server.py": SHELL_DOC,
    "kybdr_agent/control/client.py": SHELL_DOC,
    "kybdr_agent/dr/__init__.py": "",
    "kybdr_agent/dr/service.py": SHELL_DOC,
}


@dataclass(frozen=True)
class Case:
    check: Checker
    rule: str
    path: str
    source: str
    expected: frozenset[tuple[int, str]]  # (line, start of the violation's description)


CASES: Final = {
    "1-fires-on-io-at-every-depth": Case(
        _on_package(check_pure),
        RULE_PURE,
        "kybdr_agent/backup/retention.py",
        PURE_DOC
        + _snippet("""
            from typing import TYPE_CHECKING
            import asyncio
            if TYPE_CHECKING:
                from anyio.abc import TaskGroup
            def run() -> None:
                import subprocess
                from socket import socket
            """),
        frozenset(
            {
                (6, "imports asyncio"),
                (8, "imports anyio.abc (under TYPE_CHECKING)"),
                (10, "imports subprocess"),
                (11, "imports socket"),
            }
        ),
    ),
    "1-fires-on-impure-project-modules-absolute-and-relative": Case(
        _on_package(check_pure),
        RULE_PURE,
        "kybdr_agent/backup/retention.py",
        PURE_DOC
        + _snippet("""
            from kybdr_agent.backup import pipeline
            from .pipeline import run
            from .. import daemon
            import kybdr_agent.backup
            """),
        frozenset(
            {
                (5, "imports kybdr_agent.backup.pipeline"),
                (6, "imports kybdr_agent.backup.pipeline"),
                (7, "imports kybdr_agent.daemon"),
                (8, "imports kybdr_agent.backup,"),
            }
        ),
    ),
    "1-quiet-on-stdlib-pydantic-errors-and-pure-modules": Case(
        _on_package(check_pure),
        RULE_PURE,
        "kybdr_agent/backup/retention.py",
        PURE_DOC
        + _snippet("""
            import json, os, shutil
            from datetime import UTC
            from pydantic import BaseModel
            from kybdr_agent.errors import KybdrError
            from . import manifest
            from ..storage.parts import PartRun
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM
            """),
        frozenset(),
    ),
    "1-quiet-when-only-a-function-docstring-says-pure": Case(
        _on_package(check_pure),
        RULE_PURE,
        "kybdr_agent/backup/sweep.py",
        SHELL_DOC
        + _snippet('''
            import asyncio
            def plan() -> None:
                """PURE. The folders to sweep."""
            '''),
        frozenset(),
    ),
    "1-quiet-when-pure-is-said-late-in-the-docstring": Case(
        _on_package(check_pure),
        RULE_PURE,
        "kybdr_agent/backup/sweep.py",
        '"""Sweeping.\n\nThe shell.\n\nIts plan() is PURE.\n"""\nimport asyncio\n',
        frozenset(),
    ),
    "1-fires-on-an-explicitly-listed-module-without-marker": Case(
        _pure_listing("kybdr_agent/backup/slots.py"),
        RULE_PURE,
        "kybdr_agent/backup/slots.py",
        '"""Slots."""\nimport aiohttp.web\nfrom botocore import config\nimport asyncpg\n',
        frozenset({(2, "imports aiohttp.web"), (3, "imports botocore"), (4, "imports asyncpg")}),
    ),
    "2-fires-on-root-cli-and-control": Case(
        _on_package(check_components),
        RULE_COMPONENT,
        "kybdr_agent/backup/service.py",
        _snippet("""
            from kybdr_agent import daemon, wiring
            from kybdr_agent.cli_output import show
            import kybdr_agent.operations
            from kybdr_agent.control.http import Route
            def f() -> None:
                from kybdr_agent.app import App
                from ..control import server
            """),
        frozenset(
            {
                (1, "imports kybdr_agent.daemon"),
                (1, "imports kybdr_agent.wiring"),
                (2, "imports kybdr_agent.cli_output"),
                (3, "imports kybdr_agent.operations"),
                (4, "imports kybdr_agent.control.http"),
                (6, "imports kybdr_agent.app"),
                (7, "imports kybdr_agent.control.server"),
            }
        ),
    ),
    "2-routes-may-import-the-public-framework-only": Case(
        _on_package(check_components),
        RULE_COMPONENT,
        "kybdr_agent/dr/routes.py",
        _snippet("""
            from kybdr_agent.control.http import Route
            from kybdr_agent.control import problems, requests
            from kybdr_agent.control.routes import RouteTable
            from kybdr_agent.control.server import serve
            from kybdr_agent.control.routes_backup import ROUTES
            from kybdr_agent.control import client
            from kybdr_agent import control
            from kybdr_agent.wiring import build
            """),
        frozenset(
            {
                (4, "imports kybdr_agent.control.server"),
                (5, "imports kybdr_agent.control.routes_backup"),
                (6, "imports kybdr_agent.control.client"),
                (7, "imports kybdr_agent.control"),
                (8, "imports kybdr_agent.wiring"),
            }
        ),
    ),
    "2-a-nested-routes-module-gets-no-exception": Case(
        _on_package(check_components),
        RULE_COMPONENT,
        "kybdr_agent/backup/http/routes.py",
        "from kybdr_agent.control.http import Route\n",
        frozenset({(1, "imports kybdr_agent.control.http")}),
    ),
    "2-quiet-on-errors-own-layer-and-libraries": Case(
        _on_package(check_components),
        RULE_COMPONENT,
        "kybdr_agent/storage/s3.py",
        "from kybdr_agent.errors import KybdrError\nfrom kybdr_agent.storage.parts import PartRun\nimport aiohttp\n",
        frozenset(),
    ),
    "2-quiet-outside-components": Case(
        _on_package(check_components),
        RULE_COMPONENT,
        "kybdr_agent/operations.py",
        "from kybdr_agent.control.server import serve\nfrom kybdr_agent import daemon\n",
        frozenset(),
    ),
    "3-fires-on-backup-and-dr": Case(
        _on_package(check_storage),
        RULE_STORAGE,
        "kybdr_agent/storage/local.py",
        _snippet("""
            from ..backup.manifest import Manifest
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from kybdr_agent.dr import machine
            """),
        frozenset({(1, "imports kybdr_agent.backup.manifest"), (4, "imports kybdr_agent.dr (under TYPE_CHECKING)")}),
    ),
    "3-quiet-on-storage-and-errors": Case(
        _on_package(check_storage),
        RULE_STORAGE,
        "kybdr_agent/storage/local.py",
        "from . import parts\nfrom kybdr_agent.errors import KybdrError\nimport kybdr_agent.backupx\n",
        frozenset(),
    ),
    "4-fires-on-backup-storage-dr": Case(
        _on_package(check_postgres),
        RULE_POSTGRES,
        "kybdr_agent/postgres/cluster.py",
        "from kybdr_agent.storage import parts\nfrom ..backup import pipeline\nimport kybdr_agent.dr.probes\n",
        frozenset(
            {
                (1, "imports kybdr_agent.storage.parts"),
                (2, "imports kybdr_agent.backup.pipeline"),
                (3, "imports kybdr_agent.dr.probes"),
            }
        ),
    ),
    "4-quiet-on-postgres-and-errors": Case(
        _on_package(check_postgres),
        RULE_POSTGRES,
        "kybdr_agent/postgres/cluster.py",
        "from .conninfo import libpq_env\nfrom kybdr_agent.errors import KybdrError\nimport asyncpg\n",
        frozenset(),
    ),
    "5-fires-on-components": Case(
        _on_package(check_control),
        RULE_CONTROL,
        "kybdr_agent/control/requests.py",
        "from kybdr_agent.backup.manifest import BACKUP_ID_PATTERN\ndef f() -> None:\n    from ..dr import service\n",
        frozenset({(1, "imports kybdr_agent.backup.manifest"), (3, "imports kybdr_agent.dr.service")}),
    ),
    "5-quiet-on-the-framework-itself": Case(
        _on_package(check_control),
        RULE_CONTROL,
        "kybdr_agent/control/server.py",
        "from . import http\nfrom kybdr_agent.errors import KybdrError\nfrom kybdr_agent.jobs import Job\n",
        frozenset(),
    ),
    "6-fires-on-module-objects-and-strings": Case(
        _on_tests,
        RULE_PATCH,
        "tests/unit/test_x.py",
        _snippet("""
            from unittest import mock
            from unittest.mock import patch
            import kybdr_agent.backup.service as svc
            import kybdr_agent.daemon
            from kybdr_agent import daemon
            def test(monkeypatch) -> None:
                monkeypatch.setattr(daemon, "X", 1)
                monkeypatch.setattr(daemon.Daemon, "run", None)
                monkeypatch.setattr("kybdr_agent.daemon.X", 1)
                monkeypatch.delattr(svc, "Y")
                mock.patch("kybdr_agent.backup.service.Z")
                patch.object(svc.BackupService, "run")
                mock.patch.object(kybdr_agent.daemon, "W")
                setattr(daemon, "V", 2)
                monkeypatch.setattr(daemon.registry(), "U", 3)
            """),
        frozenset(
            {
                (7, "patches kybdr_agent.daemon.X with monkeypatch.setattr()"),
                (8, "patches kybdr_agent.daemon.Daemon.run with monkeypatch.setattr()"),
                (9, "patches kybdr_agent.daemon.X with monkeypatch.setattr()"),
                (10, "patches kybdr_agent.backup.service.Y with monkeypatch.delattr()"),
                (11, "patches kybdr_agent.backup.service.Z with mock.patch()"),
                (12, "patches kybdr_agent.backup.service.BackupService.run with patch.object()"),
                (13, "patches kybdr_agent.daemon.W with mock.patch.object()"),
                (14, "patches kybdr_agent.daemon.V with setattr()"),
                (15, "patches kybdr_agent.daemon (through daemon.registry()) with monkeypatch.setattr()"),
            }
        ),
    ),
    "6-quiet-on-other-targets": Case(
        _on_tests,
        RULE_PATCH,
        "tests/unit/test_x.py",
        _snippet("""
            import os
            from unittest import mock
            from kybdr_agent.backup.service import BackupService
            def test(monkeypatch, service) -> None:
                monkeypatch.setattr(os, "getpid", lambda: 1)
                monkeypatch.setattr("os.getpid", lambda: 1)
                monkeypatch.setenv("KYBDR_CONFIG", "x")
                mock.patch("time.monotonic")
                monkeypatch.setattr(service, "clock", None)
                text = "monkeypatch.setattr('kybdr_agent.daemon.X', 1)"
            """),
        frozenset(),
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_checker_fires_and_stays_quiet(case: Case) -> None:
    sources = {**_BASE, case.path: case.source}
    violations = case.check(sources)
    found = {(v.line, v.what) for v in violations}
    for line, start in case.expected:
        assert any(found_line == line and what.startswith(start) for found_line, what in found), (
            f"expected a violation at line {line} starting {start!r}; found {sorted(found)}"
        )
    assert len(found) == len(case.expected), f"expected {sorted(case.expected)}; found {sorted(found)}"
    assert all(violation.rule == case.rule for violation in violations)


def test_a_violation_names_module_import_line_and_rule() -> None:
    sources = {**_BASE, "kybdr_agent/storage/s3.py": "import os\nfrom kybdr_agent.backup import manifest\n"}
    (violation,) = check_storage(build_project(sources))
    assert str(violation) == (
        "kybdr_agent/storage/s3.py:2: imports kybdr_agent.backup.manifest"
        " — breaks rule 3 (storage/ imports nothing from backup/ or dr/)"
    )


def test_an_empty_or_partial_walk_fails_the_sanity_check() -> None:
    assert len(walker_problems(build_project({}))) == 3
    base = build_project(_BASE)
    assert pure_modules(base) == {"kybdr_agent.backup.manifest", "kybdr_agent.storage.parts"}
    assert walker_problems(base)
