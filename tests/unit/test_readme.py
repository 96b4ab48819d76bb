"""The README's configuration tables name every setting a service reads from the environment."""

from __future__ import annotations

import importlib
import itertools

import pytest

from services.common.settings import REPO_ROOT, ServiceSettings

SERVICES = ("intake", "dispatch", "handling", "verification", "opscenter")


def _settings_class(service: str) -> type[ServiceSettings]:
    module = importlib.import_module(f"services.{service}.settings")
    (cls,) = (
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, ServiceSettings) and v is not ServiceSettings
    )
    return cls


@pytest.mark.parametrize("service", SERVICES)
def test_every_setting_is_documented(service: str) -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    missing = [
        name
        for name in _settings_class(service).model_fields
        if not any(
            f"`{variable}" in readme
            for variable in (
                f"GRIDLOOP_{name.upper()}",
                f"GRIDLOOP_<SERVICE>_{name.upper()}",
                f"GRIDLOOP_{service.upper()}_{name.upper()}",
            )
        )
    ]
    assert not missing, f"README.md does not document {service}'s settings: {missing}"


def _mermaid_edges() -> set[tuple[str, str]]:
    """The ``a --> b`` (and ``a --> b --> c``) edges of the README's architecture diagram, by node id."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```mermaid", 1)[1].split("```", 1)[0]
    edges: set[tuple[str, str]] = set()
    for line in block.splitlines():
        nodes = [part.strip().split("[", 1)[0].split("(", 1)[0] for part in line.split("-->")]
        edges.update((a, b) for a, b in itertools.pairwise(nodes) if a and b and " " not in a + b)
    return edges


def test_the_architecture_diagram_draws_who_writes_and_who_reads_every_topic() -> None:
    from schemas.topics import CATALOG, DEADLETTER

    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    block = readme.split("```mermaid", 1)[1].split("```", 1)[0]
    ids = {
        line.strip().split("[[", 1)[1].rstrip("]"): line.strip().split("[[", 1)[0]
        for line in block.splitlines()
        if "[[" in line
    }
    edges = _mermaid_edges()
    for topic in CATALOG:
        if topic is DEADLETTER:
            continue
        node = ids[topic.suffix]
        assert {a for a, b in edges if b == node} == set(topic.producers), topic.suffix
        assert {b for a, b in edges if a == node} == set(topic.consumers), topic.suffix


@pytest.mark.parametrize("service", SERVICES)
def test_every_tuning_knob_is_documented_under_its_nested_name(service: str) -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    tuning = _settings_class(service).model_fields["tuning"].annotation
    assert tuning is not None
    missing = [name for name in tuning.model_fields if f"`GRIDLOOP_TUNING__{name.upper()}`" not in readme]
    assert not missing, f"README.md does not document {service}'s tuning: {missing}"
