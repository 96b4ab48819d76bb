"""The door of every service's API (create_api): a body over the limit is refused before it is read and before the
caller's token is looked at."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from pydantic import BaseModel

from services.common.api import create_api
from services.common.auth import Principal, Role, TokenStore, require
from services.common.db import make_engine
from services.common.settings import ServiceSettings

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
