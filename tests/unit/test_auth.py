"""The token store and the admin CLI's tokens commands: what a token may be issued for, how it ends, how it is
renewed, and where a service takes it from."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi import Depends
from sqlmodel import Session, col
from typer.testing import CliRunner

from schemas import Actor, ActorKind
from schemas import events as ev
from services.admin.__main__ import cli
from services.common.auth import (
    DEFAULT_LIFETIME,
    MAX_LIFETIME,
    AuthToken,
    Principal,
    Role,
    TokenStore,
    Unauthenticated,
    hash_token,
    parse_span,
    require,
)
from services.common.db import make_engine
from services.common.http import create_api
from services.intake.models import ReportCreate

from .conftest import FakeClock


@pytest.fixture
def auth_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'auth.sqlite'}"


@pytest.fixture
def store(auth_url: str) -> Iterator[TokenStore]:
    engine = make_engine(auth_url)
    yield TokenStore(engine)
    engine.dispose()


@pytest.fixture
def admin(auth_url: str, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """The admin CLI, on the test's token store."""
    monkeypatch.setenv("GRIDLOOP_AUTH_DATABASE_URL", auth_url)
    return CliRunner()


# -- subjects ------------------------------------------------------------------------------------------------------

LONGEST = "a" + "b" * 62 + "z"


@pytest.mark.parametrize(
    "subject",
    ["w-gh01-1", "staff-city_ops", "zhang@city_ops", "duty@ops_center", "sensor-gh03-water-7", "app:fms.v2", LONGEST],
)
def test_a_subject_every_event_can_carry_is_issued(store: TokenStore, subject: str) -> None:
    role = Role.OPS_CENTER if subject != "w-gh01-1" else Role.GRID_WORKER
    secret, row = store.issue(role, subject)
    who = store.check(secret)
    assert who is not None and who.subject == row.subject == subject
    # what the services write with it: the actor of every transition, a report's reporter
    assert who.actor().id == subject
    ev.IncidentReported(
        incident_id="GL1",
        actor=Actor(kind=ActorKind.SENSOR, id=subject),
        correlation_id="c",
        source=ev.Source.SENSOR,
        category_code="flooding",
        location={"lat": 31.28, "lon": 121.57},
        description="积水",
        reporter_id=subject,
        client_report_id="r-1",
    )
    ReportCreate(
        category_code="flooding", lat=31.28, lon=121.57, description="积水", reporter_id=subject, client_report_id="r-1"
    )


@pytest.mark.parametrize(
    ("subject", "why"),
    [
        ("a" * 70, "at most 64"),
        (LONGEST + "x", "at most 64"),
        ("", "a subject is required"),
        (" ops-duty", "letters, digits"),
        ("ops duty", "letters, digits"),
        ("张三", "letters, digits"),
        ("-leading-dash", "letters, digits"),
        ("ops\nduty", "letters, digits"),
    ],
)
def test_a_subject_that_would_break_an_event_is_refused_at_issue(store: TokenStore, subject: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        store.issue(Role.OPS_CENTER, subject)
    assert store.list() == []


def test_the_cli_refuses_a_long_subject_with_the_reason(admin: CliRunner) -> None:
    result = admin.invoke(cli, ["tokens", "issue", "--role", "ops_center", "--subject", "d" * 70])
    assert result.exit_code != 0
    assert "at most 64 characters" in result.output
    assert "glt_" not in result.output


def test_a_token_issued_earlier_for_a_subject_no_event_can_carry_is_refused_with_the_reason(store: TokenStore) -> None:
    """Before subjects were checked, a 70-character subject was issued: every write with it failed (500)."""
    secret, row = store.issue(Role.OPS_CENTER, "ops-duty")
    with Session(store.engine) as s:
        s.execute(sa.update(AuthToken).where(col(AuthToken.token_id) == row.token_id).values(subject="d" * 70))
        s.commit()
    with pytest.raises(Unauthenticated, match="not a valid id: ask for a new token"):
        store.authenticate(secret)
    assert store.check(secret) is None


# -- expiry --------------------------------------------------------------------------------------------------------

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
def timed(auth_url: str) -> Iterator[tuple[TokenStore, FakeClock]]:
    clock = FakeClock(T0)
    engine = make_engine(auth_url)
    yield TokenStore(engine, clock=clock), clock
    engine.dispose()


def test_a_token_expires_90_days_after_it_is_issued_unless_told(timed: tuple[TokenStore, FakeClock]) -> None:
    store, clock = timed
    secret, row = store.issue(Role.OPS_CENTER, "ops-duty")
    assert row.expires_at == T0 + DEFAULT_LIFETIME == T0 + timedelta(days=90)
    clock.advance(days=90, seconds=-1)
    assert store.authenticate(secret).subject == "ops-duty"
    clock.advance(seconds=1)  # the answer above is cached: expiry is looked at all the same
    with pytest.raises(Unauthenticated, match="token expired"):
        store.authenticate(secret)
    assert store.check(secret) is None


def test_a_token_may_live_shorter_or_longer_and_only_a_sensor_for_ever(timed: tuple[TokenStore, FakeClock]) -> None:
    store, clock = timed
    _, month = store.issue(Role.OPEN311, "fixmystreet", expires_in=timedelta(days=30))
    assert month.expires_at == T0 + timedelta(days=30)
    sensor, row = store.issue(Role.SENSOR, "sensor-gh03-water-7", expires_in=None)
    assert row.expires_at is None
    clock.advance(days=3000)
    assert store.check(sensor) is not None
    for role, subject in ((Role.OPS_CENTER, "ops-duty"), (Role.GRID_WORKER, "w-gh01-1"), (Role.OPEN311, "app")):
        with pytest.raises(ValueError, match="only a sensor's token may never expire"):
            store.issue(role, subject, expires_in=None)
    for wrong in (timedelta(0), timedelta(days=-1), MAX_LIFETIME + timedelta(days=1)):
        with pytest.raises(ValueError, match="a token lives"):
            store.issue(Role.OPS_CENTER, "ops-duty", expires_in=wrong)


@pytest.mark.parametrize(
    ("text", "span"),
    [
        ("30d", timedelta(days=30)),
        ("30", timedelta(days=30)),
        ("12h", timedelta(hours=12)),
        ("15m", timedelta(minutes=15)),
        ("never", None),
        (" 7D ", timedelta(days=7)),
    ],
)
def test_spans_as_the_cli_takes_them(text: str, span: timedelta | None) -> None:
    assert parse_span(text) == span


@pytest.mark.parametrize("text", ["", "soon", "30 days", "-1d", "1.5d", "30w", "9" * 30])
def test_spans_the_cli_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="days"):
        parse_span(text)


def test_the_cli_issues_with_an_expiry_and_lists_it(admin: CliRunner) -> None:
    month = admin.invoke(cli, ["tokens", "issue", "--role", "open311", "--subject", "fixmystreet", "--expires", "30d"])
    assert month.exit_code == 0, month.output
    assert "expires " in month.output
    default = admin.invoke(cli, ["tokens", "issue", "--role", "ops_center", "--subject", "ops-duty", "-q"])
    assert default.exit_code == 0 and default.output.startswith("glt_")
    forever = admin.invoke(
        cli, ["tokens", "issue", "--role", "sensor", "--subject", "sensor-001", "--expires", "never"]
    )
    assert forever.exit_code == 0, forever.output
    refused = admin.invoke(cli, ["tokens", "issue", "--role", "ops_center", "--subject", "desk", "--expires", "never"])
    assert refused.exit_code != 0 and "only a sensor's token may never expire" in refused.output
    listed = admin.invoke(cli, ["tokens", "list"]).output.splitlines()
    assert len(listed) == 3
    today = datetime.now(UTC)
    (app,) = (line for line in listed if "fixmystreet" in line)
    (desk,) = (line for line in listed if "ops-duty" in line)
    (sensor,) = (line for line in listed if "sensor-001" in line)
    assert f"expires {today + timedelta(days=30):%Y-%m-%d}" in app
    assert f"expires {today + timedelta(days=90):%Y-%m-%d}" in desk
    assert "never expires" in sensor


def test_an_expired_token_is_listed_as_expired(admin: CliRunner, auth_url: str) -> None:
    engine = make_engine(auth_url)
    store = TokenStore(engine, clock=FakeClock(datetime.now(UTC) - timedelta(days=40)))
    store.issue(Role.OPS_CENTER, "ops-duty", expires_in=timedelta(days=30))
    engine.dispose()
    (line,) = admin.invoke(cli, ["tokens", "list"]).output.splitlines()
    assert "expired " in line


# -- rotation ------------------------------------------------------------------------------------------------------


def test_rotating_issues_a_new_secret_with_the_same_binding_and_revokes_the_old(
    timed: tuple[TokenStore, FakeClock],
) -> None:
    store, clock = timed
    old, row = store.issue(
        Role.DEPARTMENT, "zhang@city_ops", department="city_ops", name="desk 1", expires_in=timedelta(days=30)
    )
    assert store.check(old) is not None
    clock.advance(days=20)
    new, fresh = store.rotate(row.token_id)
    assert new != old and fresh.token_id != row.token_id
    who = store.authenticate(new)
    assert (who.role, who.subject, who.department, fresh.name) == (
        Role.DEPARTMENT,
        "zhang@city_ops",
        "city_ops",
        "desk 1",
    )
    assert fresh.expires_at == clock.now + timedelta(days=30)  # as long as the old one was given
    with pytest.raises(Unauthenticated, match="unknown or revoked"):
        store.authenticate(old)
    with pytest.raises(ValueError, match="no active token"):
        store.rotate(row.token_id)
    with pytest.raises(ValueError, match="no active token"):
        store.rotate("nosuchtoken")


def test_rotating_with_a_grace_keeps_the_old_secret_a_while(timed: tuple[TokenStore, FakeClock]) -> None:
    store, clock = timed
    old, row = store.issue(Role.GRID_WORKER, "w-gh01-1")
    new, fresh = store.rotate(row.token_id, grace=timedelta(hours=1))
    assert store.authenticate(old).grids == store.authenticate(new).grids == ("gh01",)
    clock.advance(hours=1)
    with pytest.raises(Unauthenticated, match="token expired"):
        store.authenticate(old)
    assert store.check(new) is not None
    assert fresh.expires_at == T0 + timedelta(days=90)


def test_rotating_a_sensor_that_never_expires_keeps_it_so_and_a_new_lifetime_may_be_given(
    timed: tuple[TokenStore, FakeClock],
) -> None:
    store, _ = timed
    _, sensor = store.issue(Role.SENSOR, "sensor-001", expires_in=None)
    _, rotated = store.rotate(sensor.token_id)
    assert rotated.expires_at is None
    _, shorter = store.rotate(rotated.token_id, expires_in=timedelta(days=7))
    assert shorter.expires_at == T0 + timedelta(days=7)


def test_the_cli_rotates(admin: CliRunner, auth_url: str) -> None:
    issued = admin.invoke(cli, ["tokens", "issue", "--role", "ops_center", "--subject", "ops-duty"])
    token_id = issued.output.split()[2]
    old = issued.output.splitlines()[-1]
    rotated = admin.invoke(cli, ["tokens", "rotate", token_id, "--grace", "10m"])
    assert rotated.exit_code == 0, rotated.output
    new = rotated.output.splitlines()[-1]
    assert new.startswith("glt_") and new != old and f"replaces {token_id}" in rotated.output
    engine = make_engine(auth_url)
    store = TokenStore(engine)
    assert store.check(old) is not None and store.check(new) is not None  # the old one for ten more minutes
    engine.dispose()
    again = admin.invoke(cli, ["tokens", "rotate", "nosuchtoken"])
    assert again.exit_code != 0 and "no active token nosuchtoken" in again.output


# -- a token store made by an earlier version ----------------------------------------------------------------------


def test_a_token_table_without_expiry_gets_the_column_and_its_tokens_keep_working(auth_url: str) -> None:
    engine = make_engine(auth_url)
    with engine.begin() as conn:  # auth_token as deployed before tokens expired
        conn.execute(
            sa.text(
                "CREATE TABLE auth_token (token_id VARCHAR(24) PRIMARY KEY, token_hash VARCHAR(64) UNIQUE NOT NULL, "
                "role VARCHAR(20) NOT NULL, subject VARCHAR(64) NOT NULL, department VARCHAR(40), "
                "grids VARCHAR NOT NULL, name VARCHAR(100) NOT NULL, created_at DATETIME NOT NULL, "
                "revoked_at DATETIME)"
            )
        )
        conn.execute(
            sa.text(
                "INSERT INTO auth_token VALUES ('abc123', :hash, 'ops_center', 'ops-duty', NULL, '', 'old', "
                "'2025-01-01 00:00:00', NULL)"
            ),
            {"hash": hash_token("glt_issued-long-ago")},
        )
    store = TokenStore(engine)
    assert "expires_at" in {c["name"] for c in sa.inspect(engine).get_columns("auth_token")}
    assert store.authenticate("glt_issued-long-ago").subject == "ops-duty"  # issued without an expiry: none
    (old,) = store.list()
    assert old.expires_at is None
    secret, row = store.issue(Role.OPS_CENTER, "ops-duty")
    assert row.expires_at is not None and store.check(secret) is not None
    _, renewed = store.rotate("abc123")  # its replacement expires as any new token does
    assert renewed.expires_at is not None
    TokenStore(engine)  # and the next start finds the column there
    engine.dispose()


# -- where a service takes a token from ------------------------------------------------------------------------------


async def test_a_token_is_taken_from_the_authorization_header_only(store: TokenStore) -> None:
    api = create_api("authtest", title="t")

    @api.get("/mine")
    async def mine(who: Principal = Depends(require(store, Role.OPS_CENTER))) -> dict[str, str]:
        return {"subject": who.subject}

    secret, _ = store.issue(Role.OPS_CENTER, "ops-duty")
    expired, _ = store.issue(Role.OPS_CENTER, "ops-night", expires_in=timedelta(minutes=1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as client:
        r = await client.get("/mine", headers={"Authorization": f"Bearer {secret}"})
        assert r.json() == {"subject": "ops-duty"}
        in_url = "a token goes in the Authorization header (Authorization: Bearer <token>), never in the URL"
        for query in ({"api_key": secret}, {"api_key": "glt_forged"}, {"api_key": ""}):
            r = await client.get("/mine", params=query)
            assert (r.status_code, r.headers["www-authenticate"]) == (401, "Bearer")
            assert r.json()["error"].startswith(in_url)
        r = await client.get("/mine", params={"api_key": secret}, headers={"Authorization": f"Bearer {secret}"})
        assert r.status_code == 401 and r.json()["error"].startswith(in_url)
        store.clock = lambda: datetime.now(UTC) + timedelta(minutes=2)
        r = await client.get("/mine", headers={"Authorization": f"Bearer {expired}"})
        assert r.status_code == 401 and r.json()["error"].startswith("token expired")
