"""Who is calling: bearer tokens issued by an administrator, stored hashed, expiring, rotatable, revocable.

Principals are grid workers (bound to their grid cells), department staff (bound to one department), the
operations center, administrators, sensors and Open311 client applications. Every API asks for a principal
(``Authorization: Bearer <token>``, in that header only) except /health and /metrics; each route says which roles
may call it, and the rules (a department sees only its own work orders, a worker verifies only in its own grid)
use the principal's binding. The token store is one database all services read (``GRIDLOOP_AUTH_DATABASE_URL``,
default ``var/db/auth.sqlite``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Annotated

import sqlalchemy as sa
from fastapi import Header, Query
from pydantic import BaseModel
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col, select

from schemas import Actor, ActorKind, utcnow
from schemas.reference import default_town

from .db import add_missing_columns, as_utc, create_missing, make_engine
from .errors import Forbidden, GridloopError

TOKEN_PREFIX = "glt_"
SUBJECT_MAX = 64
"""A subject is written as the actor of every transition and as a report's reporter: at most this long."""
SUBJECT = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.:@-]{{0,{SUBJECT_MAX - 1}}}$")
"""What a subject may be: an ASCII letter or digit, then letters, digits and ``_ . : @ -``, as ids are written
(``w-a01-1``, ``zhang@roads``, ``sensor-a03-water-7``). Every event's actor id and a report's reporter_id
take it as it is: nothing is stripped, nothing is too long."""
DEFAULT_LIFETIME = timedelta(days=90)
"""How long a token is good for unless its issuer says otherwise."""
MAX_LIFETIME = timedelta(days=366)
"""The longest a token may be issued for; only a sensor's may never expire (a device in the field)."""
_SPAN = re.compile(r"^(\d{1,6})([dhm]?)$")
_UNITS = {"d": "days", "": "days", "h": "hours", "m": "minutes"}


class Role(StrEnum):
    GRID_WORKER = "grid_worker"
    DEPARTMENT = "department"
    OPS_CENTER = "ops_center"
    ADMIN = "admin"
    SENSOR = "sensor"
    OPEN311 = "open311"


class Unauthenticated(GridloopError):
    """No token, an unknown, revoked or expired one, or one in the URL: answered 401 with the reason."""


def check_subject(subject: str) -> str:
    """``subject`` if a token may be issued for it; ValueError saying why not."""
    if not subject:
        raise ValueError("a subject is required: the person's or system's id, e.g. w-a01-1")
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


def parse_span(text: str) -> timedelta | None:
    """A lifetime as the admin CLI takes it: ``30d`` or ``30`` (days), ``12h``, ``15m``; ``never`` is None."""
    value = text.strip().lower()
    if value == "never":
        return None
    match = _SPAN.match(value)
    if match is None:
        raise ValueError(f"a span is a whole number of days (30 or 30d), hours (12h) or minutes (15m), not {text!r}")
    return timedelta(**{_UNITS[match[2]]: int(match[1])})


def _check_lifetime(role: Role, lifetime: timedelta | None) -> None:
    if lifetime is None:
        if role is not Role.SENSOR:
            raise ValueError("only a sensor's token may never expire; give the others a lifetime (e.g. 90d)")
    elif not timedelta(0) < lifetime <= MAX_LIFETIME:
        raise ValueError(f"a token lives more than nothing and at most {MAX_LIFETIME.days} days, not {lifetime}")


class _Same:
    """``rotate``'s default lifetime: as long as the token it replaces was given."""


SAME_LIFETIME = _Same()


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
    expires_at: datetime | None = Field(default=None, sa_type=sa.DateTime(timezone=True))
    """From then on the token is refused (401 "token expired"). None: never (a sensor's, or one issued before
    tokens expired; the column is added to a token store made earlier)."""

    @property
    def lifetime(self) -> timedelta | None:
        return None if self.expires_at is None else as_utc(self.expires_at) - as_utc(self.created_at)

    def state(self, now: datetime) -> str:
        """How ``tokens list`` shows it: revoked, expired, or until when it is good."""
        if self.revoked_at is not None:
            return f"revoked {as_utc(self.revoked_at):%Y-%m-%d %H:%M}"
        if self.expires_at is None:
            return "active, never expires"
        expires = as_utc(self.expires_at)
        return f"expired {expires:%Y-%m-%d %H:%M}" if expires <= now else f"active, expires {expires:%Y-%m-%d %H:%M}"


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
    """Issues, lists, rotates, revokes and checks tokens. Checks are cached briefly so revocation lands within
    seconds; expiry is looked at on every check."""

    def __init__(self, engine: Engine, cache_s: float = 2.0, clock: Callable[[], datetime] = utcnow) -> None:
        self.engine = engine
        self.cache_s = cache_s
        self.clock = clock
        self._cache: dict[str, tuple[float, Principal | None, str, float | None]] = {}
        """token hash → (when read, principal or None, why None, when it expires as a POSIX timestamp)"""
        self._lock = threading.Lock()
        table: sa.Table = AuthToken.__table__  # type: ignore[attr-defined]
        create_missing(engine, [table])
        add_missing_columns(engine, [table])  # expires_at, in a token store made before tokens expired

    @classmethod
    def from_env(cls) -> TokenStore:
        from .settings import ServiceSettings

        return cls(make_engine(ServiceSettings().auth_database_url))

    def issue(
        self,
        role: Role,
        subject: str,
        *,
        department: str | None = None,
        grids: tuple[str, ...] = (),
        name: str = "",
        expires_in: timedelta | None = DEFAULT_LIFETIME,
    ) -> tuple[str, AuthToken]:
        """A new token good for ``expires_in`` (None: for ever, a sensor's only): the secret is returned once and
        only its hash is kept."""
        secret, row = self._new(role, subject, department, grids, name, expires_in)
        with Session(self.engine, expire_on_commit=False) as s:
            s.add(row)
            s.commit()
        return secret, row

    def rotate(
        self, token_id: str, *, expires_in: timedelta | _Same | None = SAME_LIFETIME, grace: timedelta = timedelta(0)
    ) -> tuple[str, AuthToken]:
        """A new secret for the same principal (role, subject, department, grids, name), good for as long as the
        old one was given unless ``expires_in`` says otherwise. The old token is revoked, or, with a ``grace``,
        expires that much later (while its holder changes over). One transaction: both, or neither."""
        if not timedelta(0) <= grace <= timedelta(days=30):
            raise ValueError(f"a grace is at most 30 days, not {grace}")
        with Session(self.engine, expire_on_commit=False) as s:
            old = s.get(AuthToken, token_id)
            now = self.clock()
            if old is None or old.revoked_at is not None:
                raise ValueError(f"no active token {token_id}")
            role = Role(old.role)
            if isinstance(expires_in, _Same):
                expires_in = old.lifetime
                if expires_in is None and role is not Role.SENSOR:  # issued before tokens expired
                    expires_in = DEFAULT_LIFETIME
                elif expires_in is not None:
                    expires_in = min(expires_in, MAX_LIFETIME)
            grids = tuple(g for g in old.grids.split() if g)
            secret, row = self._new(role, old.subject, old.department, grids, old.name, expires_in)
            if grace:
                ends = now + grace
                old.expires_at = ends if old.expires_at is None else min(as_utc(old.expires_at), ends)
            else:
                old.revoked_at = now
            s.add(row)
            s.commit()
        with self._lock:
            self._cache.clear()
        return secret, row

    def _new(
        self,
        role: Role,
        subject: str,
        department: str | None,
        grids: tuple[str, ...],
        name: str,
        expires_in: timedelta | None,
    ) -> tuple[str, AuthToken]:
        check_subject(subject)
        _check_lifetime(role, expires_in)
        if len(name) > 100:
            raise ValueError(f"a token's name is at most 100 characters, not {len(name)}")
        if role is Role.DEPARTMENT:
            if department not in default_town().departments:
                raise ValueError(f"department staff need a known department, not {department!r}")
        elif department is not None:
            raise ValueError("only department staff are bound to a department")
        if role is Role.GRID_WORKER:
            town = default_town()
            if not grids:
                person = town.roster.get(subject)
                home = town.grid_of_worker(subject)
                grids = person.grids if person and person.grids else (home.code,) if home else ()
            if not grids or any(g not in town.grids for g in grids):
                raise ValueError(f"a grid worker needs known grid cells, not {grids!r}")
        elif grids:
            raise ValueError("only grid workers are bound to grid cells")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = self.clock()
        row = AuthToken(
            token_id=secrets.token_hex(6),
            token_hash=hash_token(secret),
            role=role.value,
            subject=subject,
            department=department,
            grids=" ".join(grids),
            name=name,
            created_at=now,
            expires_at=None if expires_in is None else now + expires_in,
        )
        return secret, row

    def revoke(self, token_id: str) -> bool:
        with Session(self.engine) as s:
            row = s.get(AuthToken, token_id)
            if row is None or row.revoked_at is not None:
                return False
            row.revoked_at = self.clock()
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
        _, principal, reason, expires = hit
        if principal is None:
            raise Unauthenticated(reason)
        if expires is not None and self.clock().timestamp() >= expires:
            when = datetime.fromtimestamp(expires, tz=as_utc(self.clock()).tzinfo)
            raise Unauthenticated(f"token expired at {when:%Y-%m-%d %H:%M %Z}: ask an administrator for a new one")
        return principal

    def _read(self, key: str) -> tuple[Principal | None, str, float | None]:
        with Session(self.engine) as s:
            row = s.exec(select(AuthToken).where(AuthToken.token_hash == key)).first()
        if row is None or row.revoked_at is not None:
            return None, "unknown or revoked token", None
        if not SUBJECT.match(row.subject):  # issued before subjects were checked: no event could carry it
            return None, f"this token's subject {row.subject[:20]!r} is not a valid id: ask for a new token", None
        principal = Principal(
            token_id=row.token_id,
            role=Role(row.role),
            subject=row.subject,
            department=row.department,
            grids=tuple(g for g in row.grids.split() if g),
        )
        return principal, "", None if row.expires_at is None else as_utc(row.expires_at).timestamp()


TOKEN_IN_URL = (
    "a token goes in the Authorization header (Authorization: Bearer <token>), never in the URL, where proxies and "
    "servers log it: ?api_key= is refused"
)


def _principal(store: TokenStore, authorization: str | None) -> Principal:
    if not authorization:
        raise Unauthenticated("a token is required: Authorization: Bearer <token>")
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthenticated("Authorization must be 'Bearer <token>'")
    return store.authenticate(value.strip())


Authorization = Annotated[str | None, Header(description="Bearer <token>")]
ApiKey = Annotated[str | None, Query(include_in_schema=False)]
"""Read only to be refused: a token in the URL is written to every access log it passes."""


def require(store: TokenStore, *roles: Role) -> Callable[..., Awaitable[Principal]]:
    """A FastAPI dependency resolving the caller from ``Authorization: Bearer …`` and admitting only the given
    roles (401 without a valid token, 403 for any other valid principal). A token is taken from that header only:
    a request with ``?api_key=`` is refused (401), whatever else it carries."""

    async def check(authorization: Authorization = None, api_key: ApiKey = None) -> Principal:
        if api_key is not None:
            raise Unauthenticated(TOKEN_IN_URL)
        principal = _principal(store, authorization)
        if principal.role not in roles:
            allowed = ", ".join(r.value for r in roles)
            raise Forbidden(f"a {principal.role.value} may not do this (allowed: {allowed})")
        return principal

    return check


__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_LIFETIME",
    "SAME_LIFETIME",
    "TOKEN_IN_URL",
    "AuthToken",
    "Principal",
    "Role",
    "TokenStore",
    "Unauthenticated",
    "as_utc",
    "check_subject",
    "hash_token",
    "parse_span",
    "require",
]
