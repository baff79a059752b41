"""The house rules of the code layout, checked on the source with ``ast`` (nothing is imported).

- no import circles among keyrotor's modules, and no function-local import that hides one;
- imports point worker -> jobs -> keyrotor: the core never imports keyrotor.worker or
  keyrotor.jobs, and the jobs never import the worker;
- only the modules that talk to the queue (keyrotor.queue, the worker, the jobs) import arq;
- no module over 500 lines, no function over 60 (alembic migrations exempt);
- no SQL outside keyrotor/store/;
- the distribution installs the ``keyrotor`` package alone (worker/ and jobs/ inside it).

Each test fails with the full list of offenders, one a line.
"""

from __future__ import annotations

import ast
import importlib.metadata
import sysconfig
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# worker/ and jobs/ are linked into keyrotor/ and import as keyrotor.worker and keyrotor.jobs.
LINKED = {"worker": "keyrotor.worker", "jobs": "keyrotor.jobs"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
MIGRATIONS = "keyrotor.store.migrations"
STORE = "keyrotor.store"
QUEUE_TALKERS = ("keyrotor.queue", "keyrotor.worker", "keyrotor.jobs")
SQL_KEYWORDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "CREATE", "ALTER", "LOCK")
# SQLAlchemy's statement builders: a call of one of these builds SQL.
SQL_BUILDERS = {"text", "select", "insert", "update", "delete"}


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    # (target module, line) of imports run when the module is imported; TYPE_CHECKING blocks excluded
    imports: list[tuple[str, int]] = field(default_factory=list)
    # (target module, line, function) of imports inside a function
    local_imports: list[tuple[str, int, str]] = field(default_factory=list)
    # every module named by any import, wherever it is (TYPE_CHECKING too), with its line
    all_imports: list[tuple[str, int]] = field(default_factory=list)

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(ROOT))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in LINKED:
        parts = [*LINKED[parts[0]].split("."), *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _source_files() -> Iterator[Path]:
    for path in sorted((ROOT / "keyrotor").rglob("*.py")):
        # The links themselves: their files are read from worker/ and jobs/ below.
        if path.relative_to(ROOT / "keyrotor").parts[0] not in LINKED:
            yield path
    for folder in LINKED:
        yield from sorted((ROOT / folder).rglob("*.py"))


@cache
def modules() -> dict[str, Module]:
    found: dict[str, Module] = {}
    for path in _source_files():
        source = path.read_text()
        name = _module_name(path)
        found[name] = Module(name, path, ast.parse(source, str(path)), len(source.splitlines()))
    for mod in found.values():
        _collect_imports(mod, set(found))
    return found


def _is_package(mod: Module) -> bool:
    return mod.path.name == "__init__.py"


def _targets(node: ast.Import | ast.ImportFrom, mod: Module, known: set[str]) -> list[str]:
    """The modules an import statement names: ``from pkg import sub`` names ``pkg.sub`` when it
    is a module, ``pkg`` otherwise (the name is an attribute of its ``__init__``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = mod.name.split(".") if _is_package(mod) else mod.name.split(".")[:-1]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, base] if base else package)
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.append(sub if sub in known else base)
    return targets


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _collect_imports(mod: Module, known: set[str]) -> None:
    def visit(node: ast.AST, function: str | None, typing_only: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in _targets(child, mod, known):
                    mod.all_imports.append((target, child.lineno))
                    if function is not None:
                        mod.local_imports.append((target, child.lineno, function))
                    elif not typing_only:
                        mod.imports.append((target, child.lineno))
            elif isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                inner = function or getattr(child, "name", "<lambda>")
                visit(child, inner, typing_only)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, function, True)
            else:
                visit(child, function, typing_only)

    visit(mod.tree, None, False)


def _within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _graph(*, with_local: bool) -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for mod in mods.values():
        edges = [t for t, _ in mod.imports]
        if with_local:
            edges += [t for t, _, _ in mod.local_imports]
        graph[mod.name] |= {t for t in edges if t in mods and t != mod.name}
    return graph


def _path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A shortest import path from ``start`` to ``goal``, or None."""
    came_from: dict[str, str | None] = {start: None}
    todo = [start]
    while todo:
        nxt = []
        for node in todo:
            for succ in sorted(graph[node]):
                if succ in came_from:
                    continue
                came_from[succ] = node
                if succ == goal:
                    path = [goal]
                    while (prev := came_from[path[-1]]) is not None:
                        path.append(prev)
                    return path[::-1]
                nxt.append(succ)
        todo = nxt
    return None


def _fail(what: str, offenders: list[str]) -> None:
    if offenders:
        pytest.fail(f"{len(offenders)} {what}:\n  " + "\n  ".join(offenders), pytrace=False)


def test_the_finder_sees_the_code() -> None:
    # Guards the checks below against passing on nothing.
    mods = modules()
    expected = {"keyrotor.keys", "keyrotor.worker.main", "keyrotor.jobs.rotate_dek", "keyrotor.store.db"}
    assert expected <= set(mods)
    assert any(t == "keyrotor.jobs.common" for t, _ in mods["keyrotor.worker.main"].imports)


def test_no_import_circles() -> None:
    graph = _graph(with_local=False)
    offenders = []
    for mod in modules().values():
        for target, line in mod.imports:
            if target not in graph or target == mod.name:
                continue
            back = _path(graph, target, mod.name)
            if back is not None:
                offenders.append(f"{mod.rel}:{line}: {mod.name} -> {' -> '.join(back)}")
    _fail("module-level imports close a circle", sorted(set(offenders)))


def test_no_function_local_import_hides_a_circle() -> None:
    graph = _graph(with_local=True)
    offenders = []
    for mod in modules().values():
        for target, line, function in mod.local_imports:
            if target not in graph or target == mod.name:
                continue
            back = _path(graph, target, mod.name)
            if back is not None:
                offenders.append(
                    f"{mod.rel}:{line}: {function}() imports {target}, which leads back: {' -> '.join(back)}"
                )
    _fail("function-local imports hide an import circle", offenders)


def test_imports_point_worker_to_jobs_to_the_core() -> None:
    offenders = []
    for mod in modules().values():
        if _within(mod.name, "keyrotor.worker"):
            continue
        if _within(mod.name, "keyrotor.jobs"):
            forbidden: tuple[str, ...] = ("keyrotor.worker", "worker")
        else:
            forbidden = ("keyrotor.worker", "keyrotor.jobs", "worker", "jobs")
        for target, line in mod.all_imports:
            if _within(target, *forbidden):
                offenders.append(f"{mod.rel}:{line}: {mod.name} imports {target}")
    _fail("imports against the worker -> jobs -> keyrotor direction", offenders)


def test_only_the_queue_modules_import_arq() -> None:
    offenders = [
        f"{mod.rel}:{line}: {mod.name} imports {target}"
        for mod in modules().values()
        if not _within(mod.name, *QUEUE_TALKERS)
        for target, line in mod.all_imports
        if _within(target, "arq")
    ]
    _fail("modules outside keyrotor.queue, the worker and the jobs import arq", offenders)


def test_no_module_over_500_lines() -> None:
    offenders = [
        f"{mod.rel}: {mod.lines} lines"
        for mod in modules().values()
        if mod.lines > MAX_MODULE_LINES and not _within(mod.name, MIGRATIONS)
    ]
    _fail(f"modules over {MAX_MODULE_LINES} lines", offenders)


def test_no_function_over_60_lines() -> None:
    offenders = []
    for mod in modules().values():
        if _within(mod.name, MIGRATIONS):
            continue
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{mod.rel}:{node.lineno}: {node.name}() {length} lines")
    _fail(f"functions over {MAX_FUNCTION_LINES} lines", offenders)


def _sqlalchemy_builders(tree: ast.Module) -> tuple[set[str], set[str]]:
    """Names bound to SQLAlchemy's statement builders (``text``, ``select``, ...), and names
    bound to SQLAlchemy modules (``sa`` in ``import sqlalchemy as sa``)."""
    builders: set[str] = set()
    modules_: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and _within(node.module or "", "sqlalchemy"):
            builders |= {a.asname or a.name for a in node.names if a.name in SQL_BUILDERS}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _within(alias.name, "sqlalchemy"):
                    modules_.add(alias.asname or alias.name.split(".")[0])
    return builders, modules_


def _docstrings(tree: ast.Module) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _starts_like_sql(value: str) -> bool:
    words = value.lstrip().split(None, 1)
    return len(words) == 2 and words[0] in SQL_KEYWORDS


def _head(call: ast.Call) -> str:
    """The start of a call's first argument, to name the statement in a report."""
    if not call.args:
        return ""
    text = ast.unparse(call.args[0])
    return text if len(text) <= 44 else text[:40] + "..."


def _builder_call(node: ast.AST, builders: set[str], sa_modules: set[str]) -> str | None:
    """``text`` for ``text(...)`` (or ``sa.text(...)``) when it builds SQL, else None."""
    if not isinstance(node, ast.Call):
        return None
    func = node.func
    if isinstance(func, ast.Name) and func.id in builders:
        return func.id
    if (
        isinstance(func, ast.Attribute)
        and func.attr in SQL_BUILDERS
        and isinstance(func.value, ast.Name)
        and func.value.id in sa_modules
    ):
        return f"{func.value.id}.{func.attr}"
    return None


def _sql_in(tree: ast.Module) -> Iterator[tuple[int, str]]:
    builders, sa_modules = _sqlalchemy_builders(tree)
    # Docstrings, and strings reported with the builder call or the f-string they are part of.
    covered = _docstrings(tree)
    for node in ast.walk(tree):
        if _builder_call(node, builders, sa_modules) and isinstance(node, ast.Call):
            covered |= {id(sub) for arg in node.args[:1] for sub in ast.walk(arg)}
        elif isinstance(node, ast.JoinedStr):
            covered |= {id(part) for part in node.values}
    for node in ast.walk(tree):
        name = _builder_call(node, builders, sa_modules)
        if name is not None and isinstance(node, ast.Call):
            yield node.lineno, f"{name}({_head(node)})"
        elif id(node) in covered:
            continue
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _starts_like_sql(node.value):
            yield node.lineno, repr(node.value[:40])
        elif isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            head = first.value if isinstance(first, ast.Constant) else None
            if isinstance(head, str) and _starts_like_sql(head):
                yield node.lineno, "f" + repr(head[:40])


def test_no_sql_outside_the_store() -> None:
    offenders = []
    for mod in modules().values():
        if not _within(mod.name, STORE):
            # One entry a line: a text("SELECT ...") call is both a builder and a literal.
            first: dict[int, str] = {}
            for line, what in _sql_in(mod.tree):
                first.setdefault(line, what)
            offenders += [f"{mod.rel}:{line}: {what}" for line, what in sorted(first.items())]
    _fail("SQL statements outside keyrotor/store/", offenders)


def _editable_mapping(finder: Path) -> set[str]:
    """The packages setuptools' editable finder maps (its ``MAPPING = {"keyrotor": ...}``)."""
    for node in ast.walk(ast.parse(finder.read_text())):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and node.target.id == "MAPPING"
            and node.value is not None
        ):
            return set(ast.literal_eval(node.value))
    return set()


def _installed_top_level() -> set[str]:
    """The top-level names the installed distribution puts on the path: the packages its RECORD
    lists, or, for an editable install, the packages its import finder maps."""
    # From site-packages: the source tree on sys.path holds a keyrotor.egg-info of its own.
    purelib = sysconfig.get_paths()["purelib"]
    dist = next(iter(importlib.metadata.distributions(name="keyrotor", path=[purelib])))
    names: set[str] = set()
    for file in dist.files or []:
        top = file.parts[0]
        if file.name.startswith("__editable__") and file.suffix == ".py":
            names |= _editable_mapping(Path(str(file.locate())))
        elif len(file.parts) > 1 and not top.endswith(".dist-info") and top not in ("..", "__pycache__"):
            names.add(top)
    return names


def test_the_distribution_installs_keyrotor_alone() -> None:
    assert _installed_top_level() == {"keyrotor"}
    # What a wheel would hold: setuptools' discovery with pyproject's settings. It follows the
    # links, so worker/ and jobs/ ship inside keyrotor.
    setuptools = pytest.importorskip("setuptools")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    find = config["tool"]["setuptools"]["packages"]["find"]
    packages = setuptools.find_packages(
        str(ROOT), include=find.get("include", ["*"]), exclude=find.get("exclude", [])
    )
    assert sorted({p.split(".")[0] for p in packages}) == ["keyrotor"], packages
    assert {"keyrotor.worker", "keyrotor.worker.cli", "keyrotor.jobs", "keyrotor.store"} <= set(packages)
