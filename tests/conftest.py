"""What every test session shares."""

from __future__ import annotations

import sys

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Delete the topics the session's tests created over the real broker (a broker keeping every run's topics
    grows without end). Only when some test made a namespace: a unit-only session never reaches the broker."""
    support = sys.modules.get("tests.kafka_support")
    if support is None or not support.NAMESPACES:
        return
    try:
        support.drop_namespaces()
    except Exception as exc:  # the broker may be gone already; the results stand
        print(f"\ntest topics not deleted: {type(exc).__name__}: {exc}", file=sys.stderr)
