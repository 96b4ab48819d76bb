"""The shape every service keeps, checked on its source: a pure domain, one door to the database.

- ``domain.py`` holds the rules: it imports no database library, no web or Kafka library and nothing of
  ``services.common`` (the rules take a town, a clock's time and typed state; they return events and new state).
- ``store.py`` (or a ``store`` package) is the only module of a service that builds SQL or opens the unit of
  work's doors to the tables; ``models.py`` declares the tables (column types, indexes) and builds no query.
- Nothing else in a service imports SQLAlchemy, or reaches into a unit of work past emitting, telling time and
  naming what changed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"
RULED = ("intake", "dispatch", "handling", "verification", "opscenter")
"""The services of the loop, each with rules of its own."""

_SQL_BUILDERS = frozenset(
    {"select", "insert", "update", "delete", "text", "func", "and_", "or_", "not_", "bindparam", "exists", "case"}
)
_UOW_OPEN = frozenset({"emit", "now", "touch", "moment", "emitted", "clock"})
"""What a handler may ask of a unit of work itself; reading and writing rows goes through the store."""
_NOT_IN_DOMAIN = ("sqlalchemy", "sqlmodel", "fastapi", "faust", "aiokafka", "kafka", "httpx", "services.common")


def _modules(service: str) -> Iterator[Path]:
    yield from sorted((SERVICES / service).rglob("*.py"))


def _is_store(path: Path, service: str) -> bool:
    relative = path.relative_to(SERVICES / service)
    return relative.parts[0] in ("store.py", "store")


def _imports(tree: ast.AST) -> Iterator[tuple[str, tuple[str, ...]]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, tuple(a.name for a in node.names)


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("service", RULED)
def test_a_service_has_a_domain_a_store_and_handlers(service: str) -> None:
    for name in ("domain.py", "handlers.py"):
        assert (SERVICES / service / name).is_file(), f"services/{service}/{name}"
    assert (SERVICES / service / "store.py").is_file() or (SERVICES / service / "store").is_dir()


@pytest.mark.parametrize("service", RULED)
def test_the_domain_imports_no_database_no_io_and_nothing_of_common(service: str) -> None:
    path = SERVICES / service / "domain.py"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    bad = [m for m, _ in _imports(tree) if any(_under(m, p) for p in _NOT_IN_DOMAIN)]
    relative = [
        f"{'.' * n.level}{n.module or ''}"
        for n in ast.walk(tree)
        if isinstance(n, ast.ImportFrom) and n.level and (n.module or "").split(".")[0] in ("store", "handlers", "api")
    ]
    assert not bad + relative, f"services/{service}/domain.py imports {bad + relative}"


@pytest.mark.parametrize("service", RULED)
def test_only_the_store_builds_sql(service: str) -> None:
    offenders: list[str] = []
    for path in _modules(service):
        if _is_store(path, service):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = f"services/{service}/{path.relative_to(SERVICES / service)}"
        for module, names in _imports(tree):
            if _under(module, "sqlalchemy") or _under(module, "sqlmodel"):
                if path.name != "models.py":
                    offenders.append(f"{where} imports {module}")
                elif built := _SQL_BUILDERS.intersection(names):
                    offenders.append(f"{where} imports {sorted(built)} from {module}")
        if path.name == "models.py":
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr in _SQL_BUILDERS
                    and isinstance(node.value, ast.Name)
                    and node.value.id in ("sa", "sqlalchemy", "sqlmodel")
                ):
                    offenders.append(f"{where}:{node.lineno} builds {node.value.id}.{node.attr}")
    assert not offenders, "\n".join(offenders)


@pytest.mark.parametrize("service", RULED)
def test_only_the_store_reads_and_writes_rows_through_the_unit_of_work(service: str) -> None:
    offenders: list[str] = []
    for path in _modules(service):
        if _is_store(path, service):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "uow"
                and node.attr not in _UOW_OPEN
            ):
                offenders.append(
                    f"services/{service}/{path.relative_to(SERVICES / service)}:{node.lineno} uow.{node.attr}"
                )
    assert not offenders, "\n".join(offenders)


def test_no_service_outside_the_loop_builds_sql() -> None:
    """The tools (bench, chaos, simulator, supervisor, admin) speak to the services' APIs and the broker."""
    offenders = []
    for path in sorted(SERVICES.rglob("*.py")):
        top = path.relative_to(SERVICES).parts[0]
        if top in (*RULED, "common") or not path.is_file():
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        offenders += [
            f"{path.relative_to(SERVICES)} imports {m}"
            for m, _ in _imports(tree)
            if _under(m, "sqlalchemy") or _under(m, "sqlmodel")
        ]
    assert not offenders, "\n".join(offenders)
