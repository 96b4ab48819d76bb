"""The token store and the admin CLI's tokens commands: what a token may be issued for, how it ends, how it is
renewed, and where a service takes it from."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlmodel import Session, col
from typer.testing import CliRunner

from schemas import Actor, ActorKind
from schemas import events as ev
from services.admin.__main__ import cli
from services.common.auth import AuthToken, Role, TokenStore, Unauthenticated
from services.common.db import make_engine
from services.intake.models import ReportCreate


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
