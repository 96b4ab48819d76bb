"""Every operation of every service's OpenAPI document, fuzzed with schemathesis over the running town.

Valid requests (drawn from the document's own schemas) and invalid ones (each breaking it somewhere) are sent
with a token of a principal the route is for, so they reach the handlers rather than stop at the door. Whatever is
sent, a service never answers 5xx, and every answer is one the document declares: its status code, content type
and body schema. ``GRIDLOOP_FUZZ_EXAMPLES`` examples per operation and mode (10 by default, so this fits in
``make test``; ``make fuzz`` runs 200).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, reject, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.common.auth import Role
from tests.e2e.conftest import Town

pytestmark = pytest.mark.kafka

EXAMPLES = int(os.environ.get("GRIDLOOP_FUZZ_EXAMPLES", "10"))
HEAD_BUDGET = 15 * 1024
"""The services' HTTP server (uvicorn over h11) is sure to take a request head (request line and headers) of up to
16 KiB; a longer one it may refuse before any route sees it, depending on how the bytes arrive: 400, the connection
closed — often reset while the client is still sending. The documents bound every query parameter so that valid
requests stay within this budget (1 KiB below, for what the estimate may miss); an invalid request over it (a
string far past its maxLength) is not the API's to answer, and is not sent."""
SERVICES = ("intake", "handling", "verification", "opscenter", "dispatch")
NOT_API = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/static")

CONFORMANCE = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
"""For valid requests: no 5xx, and the answer is as documented."""
ROBUSTNESS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
"""For invalid requests: no 5xx, and the refusal is as documented (422/400 with its reason)."""


def _token_for(town: Town, service: str, method: str, path: str, open311: str) -> str:
    """A principal the route is for: the operations center reads; each action as the one who takes it."""
    if path.startswith("/open311/"):
        return open311
    if method == "GET":
        return town.tokens.ops_center
    if service == "handling":
        return town.tokens.departments["city_ops"]  # department staff act on work orders
    if service == "dispatch":
        return town.tokens.ops_center  # only the operations center decides extensions
    return town.tokens.admin  # reports in anyone's name, verification decisions in the worker's name


def _authorize(case: Any, token: str) -> None:
    """Carry the token: as the bearer header, and as the form's api_key on Open311's POST."""
    headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
    headers["authorization"] = f"Bearer {token}"
    case.headers = headers
    if case.operation.path.startswith("/open311/") and isinstance(case.body, dict):
        case.body["api_key"] = token


def _head_size(case: Any, base: str) -> int:
    """The bytes of ``case``'s request head, as it goes on the wire (0 if it cannot be built: the call will say)."""
    kwargs = case.as_transport_kwargs(base_url=base)
    try:
        prepared = requests.Request(
            kwargs["method"], kwargs["url"], params=kwargs.get("params"), headers=kwargs["headers"]
        ).prepare()
    except Exception:
        return 0
    fields = [("Host", "127.0.0.1:00000"), *prepared.headers.items()]
    size = len(f"{prepared.method} {prepared.path_url} HTTP/1.1\r\n\r\n".encode())
    return size + sum(len(_wire(k)) + len(_wire(v)) + 4 for k, v in fields)


def _wire(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1", "replace")


def _run(strategy: Any, check: Callable[[Any], None]) -> None:
    @given(case=strategy)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=False,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        check(case)

    run()


def _describe(exc: BaseException) -> str:
    """What went wrong, each distinct failure Hypothesis found on its own, with the request that caused it."""
    if isinstance(exc, BaseExceptionGroup) and not isinstance(exc, FailureGroup):
        return "\n".join(_describe(e) for e in exc.exceptions)
    notes = "\n".join(getattr(exc, "__notes__", []))
    text = str(exc).strip() if isinstance(exc, FailureGroup) else f"{type(exc).__name__}: {exc}"
    return f"{text}\n{notes}".strip()


@pytest.mark.parametrize("service", SERVICES)
def test_no_request_makes_a_service_fail_or_answer_off_its_document(town: Town, service: str) -> None:
    base = f"http://127.0.0.1:{town.port[f'GRIDLOOP_{service.upper()}_HTTP_PORT']}"
    open311, _ = town.tokens.store.issue(Role.OPEN311, "fuzz-client", name="fuzz")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json", timeout=10)
    failures: list[str] = []
    tried = 0
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            failures.append(f"--- the document itself: {result.err()}")
            continue
        operation = result.ok()
        if any(operation.path == p or operation.path.startswith(p + "/") for p in NOT_API):
            continue
        tried += 1
        token = _token_for(town, service, operation.method.upper(), operation.path, open311)
        for mode, checks in ((GenerationMode.POSITIVE, CONFORMANCE), (GenerationMode.NEGATIVE, ROBUSTNESS)):

            def check(case: Any, checks: list[Any] = checks, token: str = token, mode: GenerationMode = mode) -> None:
                _authorize(case, token)
                size = _head_size(case, base)
                if size > HEAD_BUDGET:
                    assert mode is GenerationMode.NEGATIVE, f"the document allows a {size}-byte request head"
                    reject()
                case.call_and_validate(base_url=base, checks=checks, timeout=30)

            try:
                _run(operation.as_strategy(generation_mode=mode), check)
            except Unsatisfiable:  # nothing about it can be invalid (no constrained input): only valid requests
                assert mode is GenerationMode.NEGATIVE, f"{operation.method.upper()} {operation.path}: no valid request"
            except (Exception, BaseExceptionGroup) as exc:  # one operation's failure must not hide another's
                text = _describe(exc)
                failures.append(f"--- {operation.method.upper()} {operation.path} ({mode.value}):\n{text[:4000]}")
    assert tried, f"{service}: no operations in its OpenAPI document"
    assert not failures, f"{service}: {len(failures)} operation(s) failed\n" + "\n".join(failures)


def test_the_documents_declare_the_errors_every_route_may_answer(town: Town) -> None:
    """What the fuzzing relies on, stated: each authenticated route documents 401, 403, 422 and 503 as
    ``{"error": …}``."""
    problems = []
    for service in SERVICES:
        port = town.port[f"GRIDLOOP_{service.upper()}_HTTP_PORT"]
        spec = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).json()
        for path, item in spec["paths"].items():
            for method, op in item.items():
                names = {p["name"].lower() for p in op.get("parameters", [])}
                if "authorization" not in names:
                    continue
                for status in ("401", "403", "422", "503"):
                    content = op["responses"].get(status, {}).get("content", {}).get("application/json", {})
                    if "schema" not in content:
                        problems.append(f"{service} {method.upper()} {path}: {status} undocumented")
    assert not problems, "\n".join(problems)
