"""The door of every service's API (create_api): a body over the limit is refused before it is read and before the
caller's token is looked at; a token, and an address, that ask too often are told to come back later."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from services.common import edge
from services.common.auth import Principal, Role, TokenStore, require
from services.common.db import make_engine
from services.common.edge import WindowCounts
from services.common.http import create_api, settings_for
from services.common.settings import ServiceSettings, rate_limits

LIMIT = 64 * 1024
FIFTY_MB = 50 * 1024 * 1024


class Note(BaseModel):
    text: str


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TokenStore]:
    engine = make_engine(f"sqlite:///{tmp_path / 'auth.sqlite'}")
    yield TokenStore(engine)
    engine.dispose()


def make_api(store: TokenStore, **settings: Any) -> FastAPI:
    api = create_api("edgetest", title="edge test", settings=ServiceSettings(**settings))

    @api.post("/notes", status_code=202)
    async def note(body: Note, who: Principal = Depends(require(store, Role.OPS_CENTER))) -> dict[str, int]:
        return {"length": len(body.text)}

    return api


@pytest.fixture
def api(store: TokenStore) -> FastAPI:
    return make_api(store, body_limit_bytes=LIMIT)


@pytest.fixture
async def client(api: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://edge") as c:
        yield c


class Exchange:
    """One request straight through the ASGI app: what it read of the body, and what it answered."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.reads = 0
        self.sent: list[MutableMapping[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        self.reads += 1
        if self.reads > len(self.chunks):
            return {"type": "http.disconnect"}
        return {"type": "http.request", "body": self.chunks[self.reads - 1], "more_body": self.reads < len(self.chunks)}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(next(m["status"] for m in self.sent if m["type"] == "http.response.start"))

    @property
    def headers(self) -> dict[str, str]:
        start = next(m for m in self.sent if m["type"] == "http.response.start")
        return {k.decode().lower(): v.decode() for k, v in start["headers"]}

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


async def post(
    api: FastAPI,
    headers: list[tuple[bytes, bytes]],
    chunks: list[bytes],
    path: str = "/notes",
    content_type: bytes = b"application/json",
) -> Exchange:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"edge"), (b"content-type", content_type), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8100),
    }
    exchange = Exchange(chunks)
    await api(scope, exchange.receive, exchange.send)
    return exchange


async def test_a_body_declared_over_the_limit_is_refused_before_a_byte_of_it_is_read(api: FastAPI) -> None:
    """Four anonymous 50 MB POSTs took intake from 123 MB to 368 MB: each was read whole, then refused 401."""
    exchange = await post(api, [(b"content-length", str(FIFTY_MB).encode())], [b'{"text": "x"}'])
    assert exchange.status == 413
    assert exchange.reads == 0
    assert b"larger than 64 KiB" in exchange.body
    assert exchange.headers["connection"] == "close"  # the server does not read the rest to keep the connection


async def test_a_streamed_body_is_refused_as_soon_as_it_passes_the_limit(api: FastAPI) -> None:
    chunk = b" " * 16 * 1024
    exchange = await post(api, [(b"transfer-encoding", b"chunked")], [chunk] * 1000)
    assert exchange.status == 413
    assert exchange.reads == LIMIT // len(chunk) + 1  # not one chunk more than it took to pass the limit
    assert b"larger than 64 KiB" in exchange.body


async def test_a_body_within_the_limit_is_read_and_reaches_the_route(api: FastAPI, store: TokenStore) -> None:
    token = store.issue(Role.OPS_CENTER, "ops-duty")[0]
    text = "x" * (LIMIT - 20)
    body = b'{"text": "' + text.encode() + b'"}'
    auth = (b"authorization", f"Bearer {token}".encode())
    for framing in ((b"content-length", str(len(body)).encode()), (b"transfer-encoding", b"chunked")):
        exchange = await post(api, [auth, framing], [body[:1000], body[1000:]])
        assert (exchange.status, exchange.body) == (202, f'{{"length":{len(text)}}}'.encode())


async def test_the_limit_comes_before_the_token(client: httpx.AsyncClient) -> None:
    big = b'{"text": "' + b"x" * LIMIT + b'"}'
    r = await client.post("/notes", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"].startswith("the request body is larger than 64 KiB")
    r = await client.post("/notes", json={"text": "x"})
    assert r.status_code == 401


def test_the_limit_is_a_setting() -> None:
    assert ServiceSettings().body_limit_bytes == 1024 * 1024
    with pytest.raises(ValueError, match="body_limit_bytes"):
        ServiceSettings(body_limit_bytes=0)


# -- rate limits ---------------------------------------------------------------------------------------------------


def _client(api: FastAPI, address: str = "127.0.0.1") -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api, client=(address, 40000)), base_url="http://edge")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_a_token_that_asks_too_often_is_told_when_to_come_back(store: TokenStore) -> None:
    api = make_api(store, rate_limit_per_token="3/minute", rate_limit_per_address="")
    busy, other = (store.issue(Role.OPS_CENTER, f"ops-{n}")[0] for n in (1, 2))
    async with _client(api) as client:
        for _ in range(3):
            assert (await client.post("/notes", json={"text": "x"}, headers=_bearer(busy))).status_code == 202
        r = await client.post("/notes", json={"text": "x"}, headers=_bearer(busy))
        assert r.status_code == 429
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert r.json()["error"].startswith("too many requests with this token: at most 3 per 1 minute; retry in")
        r = await client.post("/notes", json={"text": "x"}, headers={"Authorization": f"bearer   {busy} "})
        assert r.status_code == 429  # the same token, however the header is written
        assert (await client.post("/notes", json={"text": "x"}, headers=_bearer(other))).status_code == 202
        for _ in range(5):  # no token: nothing to hold to a token's rate (and no address limit here)
            assert (await client.post("/notes", json={"text": "x"})).status_code == 401


async def test_an_address_that_asks_too_often_is_refused_whatever_tokens_it_sends(store: TokenStore) -> None:
    api = make_api(store, rate_limit_per_token="", rate_limit_per_address="5/minute")
    async with _client(api) as client, _client(api, "10.0.0.2") as neighbour:
        for n in range(5):
            r = await client.post("/notes", json={"text": "x"}, headers=_bearer(f"glt_forged-{n}"))
            assert r.status_code == 401
        r = await client.post("/notes", json={"text": "x"}, headers=_bearer("glt_forged-6"))
        assert r.status_code == 429 and "retry-after" in r.headers
        assert r.json()["error"].startswith("too many requests from this address: at most 5 per 1 minute")
        assert (await client.get("/nowhere")).status_code == 429
        assert (await neighbour.post("/notes", json={"text": "x"})).status_code == 401
        for _ in range(10):  # what watches the service is never held
            assert (await client.get("/health")).status_code == 200
            assert (await client.get("/metrics/")).status_code == 200


async def test_429_is_documented_with_its_retry_after(store: TokenStore) -> None:
    api = make_api(store)
    async with _client(api) as client:
        spec = (await client.get("/openapi.json")).json()
    answer = spec["paths"]["/notes"]["post"]["responses"]["429"]
    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorReply"}
    assert "Retry-After" in answer["headers"]


async def test_the_limits_are_settings_and_empty_ones_hold_nobody(store: TokenStore) -> None:
    defaults = ServiceSettings()
    assert (defaults.rate_limit_per_token, defaults.rate_limit_per_address) == ("6000/minute", "12000/minute")
    assert ServiceSettings(rate_limit_per_token="10/second;600/minute").rate_limit_per_token
    with pytest.raises(ValueError, match="rate_limit_per_address"):
        ServiceSettings(rate_limit_per_address="lots")
    api = make_api(store, rate_limit_per_token="", rate_limit_per_address="")
    token = store.issue(Role.OPS_CENTER, "ops-duty")[0]
    async with _client(api) as client:
        for _ in range(200):
            assert (await client.post("/notes", json={"text": "x"}, headers=_bearer(token))).status_code == 202


def test_the_counts_of_windows_that_are_over_are_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """A spray of forged tokens leaves one count each: they go once their window is over, no thread needed."""
    now = [1_000_000.0]
    monkeypatch.setattr(edge, "time", SimpleNamespace(time=lambda: now[0]))
    counts = WindowCounts(sweep_s=5)
    for n in range(1000):
        assert counts.incr(f"token/{n}", 60) == 1
    assert counts.incr("token/7", 60) == 2 and counts.get("token/7") == 2
    assert counts.get_expiry("token/7") == now[0] + 60
    now[0] += 61
    assert counts.get("token/7") == 0 and len(counts) == 1000
    assert counts.incr("address/127.0.0.1", 60) == 1  # the first count past a sweep's time sweeps
    assert len(counts) == 1


def test_the_benchmark_and_the_chaos_run_are_never_held(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """They drive each service hundreds of times a second with a few tokens from one address."""
    from services.bench.harness import Options as BenchOptions
    from services.bench.harness import service_env
    from services.chaos.runner import Chaos
    from services.chaos.runner import Options as ChaosOptions

    chaos = Chaos(ChaosOptions(var_dir=tmp_path / "chaos"), io.StringIO())
    for env in (service_env("bench1", tmp_path, BenchOptions()), chaos._service_env()):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        settings = settings_for("intake")
        for limit in (settings.rate_limit_per_token, settings.rate_limit_per_address):
            assert all(item.amount / item.get_expiry() >= 10_000 for item in rate_limits(limit)), limit
            assert rate_limits(limit)  # held to a limit still: its cost is in what they measure


# -- security headers and the docs ---------------------------------------------------------------------------------

STRICT = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


def _secured(r: httpx.Response, csp: str = STRICT) -> bool:
    h = r.headers
    return (h.get("content-security-policy"), h.get("x-content-type-options"), h.get("referrer-policy")) == (
        csp,
        "nosniff",
        "no-referrer",
    ) and h.get("x-frame-options") == "DENY"


async def test_every_answer_carries_the_security_headers(store: TokenStore) -> None:
    api = make_api(store, rate_limit_per_address="40/minute", body_limit_bytes=LIMIT)

    @api.get("/broken")
    async def broken() -> None:
        raise RuntimeError("a bug")

    token = store.issue(Role.OPS_CENTER, "ops-duty")[0]
    transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://edge") as client:
        answers = {
            "202": await client.post("/notes", json={"text": "x"}, headers=_bearer(token)),
            "401": await client.post("/notes", json={"text": "x"}),
            "422": await client.post("/notes", json={"text": 1}, headers=_bearer(token)),
            "404": await client.get("/nowhere"),
            "405": await client.get("/notes"),
            "413": await client.post("/notes", content=b"x" * (LIMIT + 1), headers={"content-type": "text/plain"}),
            "500": await client.get("/broken"),
            "health": await client.get("/health"),
            "metrics": await client.get("/metrics/"),
            "openapi": await client.get("/openapi.json"),
        }
        for _ in range(40):
            answers["429"] = await client.get("/nowhere")
            if answers["429"].status_code == 429:
                break
    assert (answers["500"].status_code, answers["429"].status_code) == (500, 429)
    unsecured = sorted(name for name, r in answers.items() if not _secured(r))
    assert not unsecured, {name: dict(answers[name].headers) for name in unsecured}


async def test_only_the_docs_pages_may_run_their_inline_scripts_from_their_cdn(store: TokenStore) -> None:
    async with _client(make_api(store)) as client:
        docs, redoc, spec = [await client.get(p) for p in ("/docs", "/redoc", "/openapi.json")]
    assert docs.status_code == redoc.status_code == spec.status_code == 200
    assert _secured(spec)
    for page in (docs, redoc):
        csp = page.headers["content-security-policy"]
        assert "https://cdn.jsdelivr.net" in csp and "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        assert page.headers["x-content-type-options"] == "nosniff" and page.headers["x-frame-options"] == "DENY"


async def test_the_docs_can_be_switched_off(store: TokenStore) -> None:
    async with _client(make_api(store, docs_enabled=False)) as client:
        for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
            r = await client.get(path)
            assert r.status_code == 404 and _secured(r), path
        assert (await client.get("/openapi.json")).status_code == 200  # the document stays: clients read it
    assert ServiceSettings().docs_enabled
