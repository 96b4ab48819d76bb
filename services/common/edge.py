"""The door of every service's API, before any route, token check or body parsing: the size of a request body.

A request whose ``Content-Length`` is over the limit is answered 413 at once, its body never read; one streamed
without a length (chunked) is counted as it is read and refused as soon as it passes the limit. The answer closes
the connection, so the server does not go on reading what the client still sends.
"""

from __future__ import annotations

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyTooLarge(HTTPException):
    """A body that passed the limit while it was read (answered 413 by whoever reads it: a route, or the door)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit), headers={"Connection": "close"})


def too_large(limit: int) -> str:
    size = f"{limit // 1024} KiB" if limit % 1024 == 0 else f"{limit} bytes"
    return f"the request body is larger than {size}: refused before it was read"


class Door:
    """ASGI middleware: refuses a request body over ``body_limit`` bytes (413) before it is read."""

    def __init__(self, app: ASGIApp, *, body_limit: int) -> None:
        self.app = app
        self.body_limit = body_limit
        self._refusal = orjson.dumps({"error": too_large(body_limit)})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = value
                break
        if length is not None:
            # the server reads no more than a declared length: only the declaration needs looking at
            if length.isdigit() and int(length) > self.body_limit:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        await self._counted(scope, receive, send)

    async def _counted(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A body of no declared length (chunked): counted as the app reads it."""
        limit = self.body_limit
        received = 0
        started = False

        async def counting() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def noting(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting, noting)
        except BodyTooLarge:  # read where no route answers for it (a mounted app): the door does
            if started:
                raise
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(self._refusal)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": self._refusal})


__all__ = ["BodyTooLarge", "Door", "too_large"]
