"""Who is calling: bearer tokens issued by an administrator, stored hashed, revocable.

Principals are grid workers (bound to their grid cells), department staff (bound to one department), the
operations center, administrators, sensors and Open311 client applications. Every API asks for a principal
(``Authorization: Bearer <token>``) except /health and /metrics; each route says which roles may call it, and
the rules (a department sees only its own work orders, a worker verifies only in its own grid) use the
principal's binding. The token store is one database all services read (``GRIDLOOP_AUTH_DATABASE_URL``,
default ``var/db/auth.sqlite``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from enum import StrEnum
from typing import Annotated

import sqlalchemy as sa
from fastapi import Header, Query
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col, select

from schemas import Actor, ActorKind, utcnow
from schemas.reference import DEPARTMENTS, GRIDS, grid_of_worker

from .db import as_utc, create_missing, make_engine
from .errors import Forbidden, GridloopError

TOKEN_PREFIX = "glt_"
SUBJECT_MAX = 64
"""A subject is written as the actor of every transition and as a report's reporter: at most this long."""
SUBJECT = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.:@-]{{0,{SUBJECT_MAX - 1}}}$")
"""What a subject may be: an ASCII letter or digit, then letters, digits and ``_ . : @ -``, as ids are written
(``w-gh01-1``, ``zhang@city_ops``, ``sensor-gh03-water-7``). Every event's actor id and a report's reporter_id
take it as it is: nothing is stripped, nothing is too long."""


class Role(StrEnum):
    GRID_WORKER = "grid_worker"
    DEPARTMENT = "department"
    OPS_CENTER = "ops_center"
    ADMIN = "admin"
    SENSOR = "sensor"
    OPEN311 = "open311"


class Unauthenticated(GridloopError):
    """No token, an unknown one, or a revoked one: answered 401."""


def check_subject(subject: str) -> str:
    """``subject`` if a token may be issued for it; ValueError saying why not."""
    if not subject:
        raise ValueError("a subject is required: the person's or system's id, e.g. w-gh01-1")
    if len(subject) > SUBJECT_MAX:
        raise ValueError(
            f"a subject is at most {SUBJECT_MAX} characters (it is every event's actor id), "
            f"not {len(subject)}: {subject[:20]!r}…"
        )
    if not SUBJECT.match(subject):
        raise ValueError(
            f"a subject is an id of ASCII letters, digits and _ . : @ - (starting with a letter or digit), "
            f"not {subject!r}"
        )
    return subject


class AuthToken(SQLModel, table=True):
    __tablename__ = "auth_token"

    token_id: str = Field(primary_key=True, max_length=24)
    """Public handle of the token (for listing and revoking); never the secret."""
    token_hash: str = Field(max_length=64, unique=True)
    role: str = Field(max_length=20)
    subject: str = Field(max_length=64)
    """The person or system: a worker id, a staff id, a client application's name."""
    department: str | None = Field(default=None, max_length=40)
    grids: str = ""
    name: str = Field(default="", max_length=100)
    created_at: datetime = Field(default_factory=utcnow, sa_type=sa.DateTime(timezone=True))
    revoked_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))


class Principal(BaseModel):
    model_config = {"frozen": True}

    token_id: str
    role: Role
    subject: str
    department: str | None = None
    grids: tuple[str, ...] = ()

    def actor(self) -> Actor:
        kind = {
            Role.GRID_WORKER: ActorKind.GRID_WORKER,
            Role.DEPARTMENT: ActorKind.DEPARTMENT,
            Role.OPS_CENTER: ActorKind.OPS_CENTER,
            Role.SENSOR: ActorKind.SENSOR,
            Role.OPEN311: ActorKind.CITIZEN,
        }.get(self.role, ActorKind.SYSTEM)
        return Actor(kind=kind, id=self.subject, department=self.department)

    @property
    def sees_everything(self) -> bool:
        return self.role in (Role.OPS_CENTER, Role.ADMIN)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class TokenStore:
    """Issues, lists, revokes and checks tokens. Checks are cached briefly so revocation lands within seconds."""

    def __init__(self, engine: Engine, cache_s: float = 2.0) -> None:
        self.engine = engine
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, Principal | None, str]] = {}
        self._lock = threading.Lock()
        create_missing(engine, [AuthToken.__table__])  # type: ignore[attr-defined]

    @classmethod
    def from_env(cls) -> TokenStore:
        from .settings import ServiceSettings

        return cls(make_engine(ServiceSettings().auth_database_url))

    def issue(
        self, role: Role, subject: str, *, department: str | None = None, grids: tuple[str, ...] = (), name: str = ""
    ) -> tuple[str, AuthToken]:
        """A new token: the secret is returned once and only its hash is kept."""
        check_subject(subject)
        if len(name) > 100:
            raise ValueError(f"a token's name is at most 100 characters, not {len(name)}")
        if role is Role.DEPARTMENT:
            if department not in DEPARTMENTS:
                raise ValueError(f"department staff need a known department, not {department!r}")
        elif department is not None:
            raise ValueError("only department staff are bound to a department")
        if role is Role.GRID_WORKER:
            if not grids:
                home = grid_of_worker(subject)
                grids = (home.code,) if home else ()
            if not grids or any(g not in GRIDS for g in grids):
                raise ValueError(f"a grid worker needs known grid cells, not {grids!r}")
        elif grids:
            raise ValueError("only grid workers are bound to grid cells")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = AuthToken(
            token_id=secrets.token_hex(6),
            token_hash=hash_token(secret),
            role=role.value,
            subject=subject,
            department=department,
            grids=" ".join(grids),
            name=name,
        )
        with Session(self.engine, expire_on_commit=False) as s:
            s.add(row)
            s.commit()
        return secret, row

    def revoke(self, token_id: str) -> bool:
        with Session(self.engine) as s:
            row = s.get(AuthToken, token_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = utcnow()
            s.commit()
        with self._lock:
            self._cache.clear()
        return True

    def list(self) -> list[AuthToken]:
        with Session(self.engine) as s:
            return list(s.exec(select(AuthToken).order_by(col(AuthToken.created_at))).all())

    def check(self, token: str) -> Principal | None:
        """The principal ``token`` stands for, or None (unknown, revoked, unusable)."""
        try:
            return self.authenticate(token)
        except Unauthenticated:
            return None

    def authenticate(self, token: str) -> Principal:
        """The principal ``token`` stands for; Unauthenticated with the reason when it stands for none."""
        key = hash_token(token)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(key)
        if hit is None or now - hit[0] >= self.cache_s:
            hit = (now, *self._read(key))
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[key] = hit
        _, principal, reason = hit
        if principal is None:
            raise Unauthenticated(reason)
        return principal

    def _read(self, key: str) -> tuple[Principal | None, str]:
        with Session(self.engine) as s:
            row = s.exec(select(AuthToken).where(AuthToken.token_hash == key)).first()
        if row is None or row.revoked_at is not None:
            return None, "unknown or revoked token"
        if not SUBJECT.match(row.subject):  # issued before subjects were checked: no event could carry it
            return None, f"this token's subject {row.subject[:20]!r} is not a valid id: ask for a new token"
        principal = Principal(
            token_id=row.token_id,
            role=Role(row.role),
            subject=row.subject,
            department=row.department,
            grids=tuple(g for g in row.grids.split() if g),
        )
        return principal, ""


def _principal(store: TokenStore, authorization: str | None, api_key: str | None) -> Principal:
    token = None
    if authorization:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthenticated("Authorization must be 'Bearer <token>'")
        token = value.strip()
    elif api_key:
        token = api_key
    if not token:
        raise Unauthenticated("a token is required: Authorization: Bearer <token>")
    return store.authenticate(token)


Authorization = Annotated[str | None, Header(description="Bearer <token>")]
ApiKey = Annotated[str | None, Query(include_in_schema=False)]


def require(store: TokenStore, *roles: Role) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency resolving the caller from ``Authorization: Bearer …`` (or ``api_key``) and admitting
    only the given roles (401 without a valid token, 403 for any other valid principal)."""

    async def check(authorization: Authorization = None, api_key: ApiKey = None) -> Principal:
        principal = _principal(store, authorization, api_key)
        if principal.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise Forbidden(f"a {principal.role.value} may not do this (allowed: {allowed})")
        return principal

    return check


__all__ = [
    "AuthToken",
    "Principal",
    "Role",
    "TokenStore",
    "Unauthenticated",
    "as_utc",
    "check_subject",
    "hash_token",
    "require",
]
