"""Who may do what, on every route of every service, over the running town.

The routes come from each service's own OpenAPI document, so a new route is covered as soon as it exists: every
one must refuse a request without a valid token (none, forged, revoked, expired, malformed, or a valid one in the
URL) with 401, and every one must have a rule below saying who may call it — a route without one fails the matrix.
For each rule every other principal of the town (grid workers of this grid and another, every department's staff,
the operations center, an administrator, a sensor, an Open311 application) is refused and never served: with 403
where its role may not call the route, and with 404 where it may but the item is not its own (another office's
work order, another grid's task), word for word the answer to an id that names nothing, so that the refusal tells
neither that the item exists nor whose it is. The principal the route is for is served (the positive control).
Lists that several principals may read show each of them only their own department's or grid's data.

Real ids are used: the incidents, work orders, verification tasks and the extension request below are made first,
through the public APIs. Requests that change state are made by wrong principals first, the positive control last.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from schemas.reference import GAOHANG
from services.common.auth import Role, TokenStore
from tests.e2e.conftest import Town

pytestmark = pytest.mark.kafka

SERVICES = ("intake", "handling", "verification", "opscenter", "dispatch")
HTTP_METHODS = ("get", "post", "put", "patch", "delete")
NOT_API = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json", "/static")
OPEN311 = "/open311/v2/"
"""The Open311 GeoReport v2 gateway: its reads are public; posting needs an Open311 application's api_key, and
every refusal is a 403 there, as the GeoReport v2 specification says."""

CITY = "dept city_ops"
REPORTER = "worker gh01"  # w-gh01-1 reports every incident here, in grid gh01
VERIFIER = "verifier gh01"  # w-gh01-2, who verifies them
OTHER_GRID = "worker gh09"
CENTER = "ops center"
ADMIN = "admin"
SENSOR = "sensor"
APP = "open311 app"


def excluded(method: str, path: str) -> bool:
    """Not part of the matrix: health, metrics, docs, static files, the dashboard page and Open311's public reads."""
    if path == "/" or any(path == p or path.startswith(p + "/") for p in NOT_API):
        return True
    return path.startswith(OPEN311) and method == "GET"


@dataclass(frozen=True)
class Route:
    service: str
    method: str
    path: str

    def __str__(self) -> str:
        return f"{self.service} {self.method} {self.path}"


def routes(town: Town) -> list[Route]:
    found = []
    for service in SERVICES:
        spec = httpx.get(f"http://127.0.0.1:{town.port[_port_key(service)]}/openapi.json", timeout=10).json()
        for path, item in spec["paths"].items():
            for method in item:
                if method in HTTP_METHODS and not excluded(method.upper(), path):
                    found.append(Route(service, method.upper(), path))
    return found


def _port_key(service: str) -> str:
    return f"GRIDLOOP_{service.upper()}_HTTP_PORT"


# -- the town's state and people ---------------------------------------------------------------------------------


@dataclass
class World:
    """Real ids in a known state, and a token for everyone."""

    incident: str
    """Reported in grid gh01 by w-gh01-1, dispatched to city_ops; its work order ``order`` stays dispatched."""
    order: str
    to_return: str
    """A dispatched work order of city_ops."""
    to_extend: str
    """An accepted work order of city_ops."""
    to_handle: str
    """An accepted work order of city_ops."""
    to_decide: str
    """An accepted work order of city_ops with an extension request pending."""
    to_pass: str
    """A pending verification task of grid gh01."""
    to_fail: str
    """A pending verification task of grid gh01."""
    principals: dict[str, str]
    """Name → token of everyone who may knock."""
    store: Any
    revoked: dict[str, str] = field(default_factory=dict)
    expired: dict[str, str] = field(default_factory=dict)

    def revoked_like(self, name: str) -> str:
        """A token bound exactly as ``name``'s, revoked (never used before: no service has it cached)."""
        if name not in self.revoked:
            who = self.store.check(self.principals[name])
            assert who is not None, name
            secret, row = self.store.issue(
                who.role, who.subject, department=who.department, grids=who.grids, name="revoked"
            )
            assert self.store.revoke(row.token_id)
            self.revoked[name] = secret
        return self.revoked[name]

    def expired_like(self, name: str) -> str:
        """A token bound exactly as ``name``'s, past its expiry (issued a week ago for a day)."""
        if name not in self.expired:
            who = self.store.check(self.principals[name])
            assert who is not None, name
            issued = TokenStore(self.store.engine, clock=lambda: datetime.now(UTC) - timedelta(days=7))
            secret, _ = issued.issue(
                who.role, who.subject, department=who.department, grids=who.grids, expires_in=timedelta(days=1)
            )
            self.expired[name] = secret
        return self.expired[name]


def _wait(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def world(town: Town) -> World:
    # each its own spot of grid gh01, 90 m apart: never merged with each other or with other tests' reports
    ids = [town.report("street_vending", 31.2830 + i * 0.0008, 121.5700, reporter_id="w-gh01-1") for i in range(7)]
    orders = {iid: town.work_orders(iid)[0] for iid in ids}
    assert {o["department_code"] for o in orders.values()} == {"city_ops"}
    incident, to_return, to_extend, to_handle, to_pass, to_fail, to_decide = ids
    for iid in (to_extend, to_handle, to_decide):
        town.act(orders[iid], "accept")
    for iid in (to_pass, to_fail):
        town.accept_and_handle(orders[iid])
    later = (datetime.now(UTC) + timedelta(days=60)).isoformat()
    town.act(orders[to_decide], "extension", requested_deadline=later, reason="需协调城管执法")
    pending = {iid: town.verification_task(iid) for iid in (to_pass, to_fail)}
    assert {t["grid_id"] for t in pending.values()} == {"gh01"}
    assert {t["worker_id"] for t in pending.values()} == {"w-gh01-2"}
    decide = orders[to_decide]["work_order_id"]
    _wait(
        f"{decide} waits for a decision",
        lambda: decide in [o["work_order_id"] for o in town.dispatch.get("/extensions").json()],
    )

    tokens = town.tokens
    app_token, _ = tokens.store.issue(Role.OPEN311, "fixmystreet-gaohang", name="access matrix")
    principals = {
        REPORTER: tokens.workers["w-gh01-1"],
        VERIFIER: tokens.workers["w-gh01-2"],
        OTHER_GRID: tokens.workers["w-gh09-1"],
        **{f"dept {d}": tokens.departments[d] for d in GAOHANG.departments},
        CENTER: tokens.ops_center,
        ADMIN: tokens.admin,
        SENSOR: tokens.sensor,
        APP: app_token,
    }
    return World(
        incident=incident,
        order=orders[incident]["work_order_id"],
        to_return=orders[to_return]["work_order_id"],
        to_extend=orders[to_extend]["work_order_id"],
        to_handle=orders[to_handle]["work_order_id"],
        to_decide=decide,
        to_pass=pending[to_pass]["verification_id"],
        to_fail=pending[to_fail]["verification_id"],
        principals=principals,
        store=tokens.store,
    )


# -- the rules ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Who a route is for. Everyone else of the town is refused: 403, or 404 for ``hidden``."""

    right: str
    """The positive control: served (2xx)."""
    may: frozenset[str] = frozenset()
    """Also allowed: served too on a read; an action is not repeated by them (it would change the state)."""
    params: dict[str, str] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    body: Callable[[], dict[str, Any]] | None = None
    form: bool = False
    """Open311: the token goes in the form as ``api_key``; every refusal is 403."""
    hidden: frozenset[str] = frozenset()
    """Their role may call the route, but the item is not theirs to see: answered as an unknown id is."""
    served_in: str = ""
    """The test that serves the right principal, where serving takes what only that test sets up (a hold of the
    fold, a rebuilt model): here, only the refusals are checked."""


BATCH_ACTIONS = ("/work-orders/accept", "/work-orders/handle", "/verifications/pass")


def _names(*names: str) -> frozenset[str]:
    return frozenset(names)


DEPTS = frozenset(f"dept {d}" for d in GAOHANG.departments)
WORKERS = _names(REPORTER, VERIFIER, OTHER_GRID)
CENTERS = _names(CENTER, ADMIN)


def _report() -> dict[str, Any]:
    return {
        "category_code": "street_vending",
        "lat": 31.3200,
        "lon": 121.5650,
        "description": "占道经营 (access matrix)",
        "reporter_id": "w-gh01-1",
        "client_report_id": f"matrix-{secrets.token_hex(6)}",
    }


def _open311_request() -> dict[str, Any]:
    return {"service_code": "street_vending", "lat": "31.3210", "long": "121.5660", "description": "占道经营"}


def rules(w: World) -> dict[tuple[str, str, str], Rule]:
    later = (datetime.now(UTC) + timedelta(days=90)).isoformat()
    return {
        # intake: grid workers, sensors and the hotline desk report as themselves; anyone follows what they may see
        ("intake", "POST", "/reports"): Rule(REPORTER, _names(ADMIN), body=_report),
        ("intake", "GET", "/incidents/{incident_id}"): Rule(
            REPORTER,
            _names(VERIFIER, CITY, *CENTERS),
            params={"incident_id": w.incident},
            hidden=_names(OTHER_GRID, SENSOR, APP, *(DEPTS - {CITY})),
        ),
        ("intake", "GET", "/incidents"): Rule(CENTER, frozenset(w.principals)),  # scoped: see test_lists_…
        ("intake", "POST", "/open311/v2/requests.{fmt}"): Rule(
            APP, params={"fmt": "json"}, body=_open311_request, form=True
        ),
        # handling: department staff act on their own office's work orders only
        ("handling", "GET", "/work-orders"): Rule(CITY, DEPTS | CENTERS),  # scoped
        ("handling", "GET", "/work-orders/{work_order_id}"): Rule(
            CITY, CENTERS, params={"work_order_id": w.order}, hidden=DEPTS - {CITY}
        ),
        ("handling", "POST", "/work-orders/{work_order_id}/accept"): Rule(
            CITY, params={"work_order_id": w.order}, hidden=DEPTS - {CITY}
        ),
        ("handling", "POST", "/work-orders/{work_order_id}/return"): Rule(
            CITY,
            params={"work_order_id": w.to_return},
            body=lambda: {"reason": "不属本部门职责"},
            hidden=DEPTS - {CITY},
        ),
        ("handling", "POST", "/work-orders/{work_order_id}/extension"): Rule(
            CITY,
            params={"work_order_id": w.to_extend},
            body=lambda: {"requested_deadline": later, "reason": "需协调"},
            hidden=DEPTS - {CITY},
        ),
        ("handling", "POST", "/work-orders/{work_order_id}/handle"): Rule(
            CITY,
            params={"work_order_id": w.to_handle},
            body=lambda: {"result": "已清理", "evidence_urls": ["https://evidence.example/matrix.jpg"]},
            hidden=DEPTS - {CITY},
        ),
        # several at once: every department may ask, each order it does not own is refused on its own, as unknown
        ("handling", "POST", "/work-orders/accept"): Rule(CITY, DEPTS, body=lambda: {"work_order_ids": [w.order]}),
        ("handling", "POST", "/work-orders/handle"): Rule(
            CITY, DEPTS, body=lambda: {"items": [{"work_order_id": w.to_handle, "result": "已清理"}]}
        ),
        ("handling", "GET", "/webhook-deliveries"): Rule(CENTER, _names(ADMIN)),
        # verification: the grid's workers see its incidents; the worker a verification is asked of decides it (an
        # administrator names the worker it decides for)
        ("verification", "GET", "/verifications"): Rule(VERIFIER, WORKERS | CENTERS),  # scoped
        ("verification", "GET", "/verifications/{verification_id}"): Rule(
            VERIFIER, _names(REPORTER, *CENTERS), params={"verification_id": w.to_pass}, hidden=_names(OTHER_GRID)
        ),
        ("verification", "POST", "/verifications/{verification_id}/pass"): Rule(
            VERIFIER,
            _names(ADMIN),
            params={"verification_id": w.to_pass},
            body=lambda: {"note": "已核查"},
            hidden=_names(OTHER_GRID),
        ),
        ("verification", "POST", "/verifications/pass"): Rule(  # each task outside the caller's grids: 404 alone
            VERIFIER, WORKERS | _names(ADMIN), body=lambda: {"verification_ids": [w.to_pass], "note": "已核查"}
        ),
        ("verification", "POST", "/verifications/{verification_id}/fail"): Rule(
            VERIFIER,
            _names(ADMIN),
            params={"verification_id": w.to_fail},
            body=lambda: {"note": "仍有摊位"},
            hidden=_names(OTHER_GRID),
        ),
        # opscenter: the operations center's figures
        **{
            ("opscenter", "GET", path): Rule(CENTER, _names(ADMIN))
            for path in (
                "/api/kpis",
                "/api/kpis.csv",
                "/api/backlog",
                "/api/overdue",
                "/api/trend",
                "/api/map/incidents",
                "/api/map/grids",
            )
        },
        # opscenter's read model: an administrator's (a hold of the fold ends by itself after hold_s)
        ("opscenter", "GET", "/admin/read-model"): Rule(ADMIN),
        ("opscenter", "POST", "/admin/fold/pause"): Rule(ADMIN, body=lambda: {"hold_s": 1.0}),
        **{
            ("opscenter", "POST", path): Rule(
                ADMIN,
                body=lambda: {"hold_id": "matrix", "database_url": "sqlite:////nonexistent/matrix.sqlite"},
                served_in="tests/integration/test_opscenter_rebuild.py (a swap into a running service)",
            )
            for path in ("/admin/fold/resume", "/admin/read-model/swap")
        },
        # dispatch: cases for the center; only the operations center decides an extension
        ("dispatch", "GET", "/cases/{incident_id}"): Rule(CENTER, _names(ADMIN), params={"incident_id": w.incident}),
        ("dispatch", "GET", "/extensions"): Rule(CENTER, _names(ADMIN)),
        ("dispatch", "POST", "/work-orders/{work_order_id}/extension"): Rule(
            CENTER, params={"work_order_id": w.to_decide}, body=lambda: {"grant": True}
        ),
    }


# -- asking ------------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    route: Route
    who: str
    expected: str
    status: int
    ok: bool
    detail: str = ""

    def line(self) -> str:
        return f"{self.route!s:62} {self.who:26} want {self.expected:9} got {self.status}  {self.detail[:90]}"


class Matrix:
    """Sends the requests and keeps every outcome; ``failures_of`` makes the compact summary."""

    def __init__(self, town: Town) -> None:
        self.clients = {
            s: httpx.Client(base_url=f"http://127.0.0.1:{town.port[_port_key(s)]}", timeout=15) for s in SERVICES
        }
        self.outcomes: list[Outcome] = []

    def close(self) -> None:
        for c in self.clients.values():
            c.close()

    def ask(
        self,
        route: Route,
        rule: Rule | None,
        *,
        token: str | None = None,
        header: str | None = None,
        query_key: str | None = None,
        query: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> httpx.Response:
        params = dict(params if params is not None else rule.params if rule else {})
        path = route.path.format_map(_Default(params))
        body = rule.body() if rule and rule.body else None
        headers = {}
        q = dict(rule.query if rule else {}) | dict(query or {})
        if query_key is not None:
            q["api_key"] = query_key
        if rule is not None and rule.form:
            form = dict(body or {})
            if token is not None:
                form["api_key"] = token
            return self.clients[route.service].request(route.method, path, data=form, params=q)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if header is not None:
            headers["Authorization"] = header
        return self.clients[route.service].request(route.method, path, json=body, headers=headers, params=q)

    def expect(self, route: Route, who: str, expected: str, r: httpx.Response, ok: bool) -> None:
        detail = "" if ok else r.text.replace("\n", " ")
        self.outcomes.append(Outcome(route, who, expected, r.status_code, ok, detail))

    @staticmethod
    def failures_of(outcomes: list[Outcome]) -> str:
        """One line per failed check, under a count; empty when every check passed."""
        bad = [o for o in outcomes if not o.ok]
        if not bad:
            return ""
        routes_hit = len({o.route for o in outcomes})
        head = f"{len(bad)} of {len(outcomes)} checks failed over {routes_hit} routes:"
        return "\n".join([head, *(o.line() for o in bad)])


class _Default(dict[str, str]):
    """Path parameters of a route without a rule: a format Open311 knows, an id that names nothing."""

    def __missing__(self, key: str) -> str:
        return "json" if key == "fmt" else "GL00000000-NOSUCH"


@pytest.fixture(scope="module")
def matrix(town: Town) -> Iterator[Matrix]:
    m = Matrix(town)
    yield m
    m.close()


def _served(r: httpx.Response) -> bool:
    return 200 <= r.status_code < 300


def _anonymous(r: httpx.Response, params: dict[str, str]) -> str:
    """The answer with the ids it was asked about taken out."""
    text = r.text
    for name, value in params.items():
        text = text.replace(value, "{" + name + "}")
    return text


WHY = {"expired": "expired", "?api_ke": "Authorization header"}
"""What the reason says, by the start of what was tried."""


def _says_why(r: httpx.Response, rule: Rule | None, says: str | None = None) -> bool:
    """A refusal gives its reason: ``{"error": …}``, or GeoReport v2's ``[{"code", "description"}]`` on Open311;
    one that ``says`` something."""
    try:
        body = r.json()
    except ValueError:
        return False
    if rule is not None and rule.form:
        reason = str(body[0].get("description", "")) if isinstance(body, list) and body else ""
    else:
        reason = str(body.get("error") or "") if isinstance(body, dict) else ""
    return bool(reason) and (says is None or says in reason)


# -- the tests ---------------------------------------------------------------------------------------------------


def test_every_route_refuses_a_caller_without_a_valid_token(town: Town, world: World, matrix: Matrix) -> None:
    table = rules(world)
    found = routes(town)
    start = len(matrix.outcomes)
    for route in found:
        rule = table.get((route.service, route.method, route.path))
        want = 403 if rule is not None and rule.form else 401
        right = rule.right if rule is not None else CENTER
        forged = "glt_" + secrets.token_urlsafe(32)
        tries: list[tuple[str, dict[str, Any]]] = [
            ("no token", {}),
            ("forged token", {"token": forged}),
            (f"revoked token of {right}", {"token": world.revoked_like(right)}),
            (f"expired token of {right}", {"token": world.expired_like(right)}),
        ]
        if rule is None or not rule.form:
            tries += [
                ("forged ?api_key", {"query_key": forged}),
                (f"?api_key of {right}", {"query_key": world.principals[right]}),
                ("Basic credentials", {"header": "Basic YWRtaW46YWRtaW4="}),
                ("Bearer without token", {"header": "Bearer"}),
            ]
        for who, how in tries:
            r = matrix.ask(route, rule, **how)
            matrix.expect(route, who, str(want), r, r.status_code == want and _says_why(r, rule, WHY.get(who[:7])))
    summary = Matrix.failures_of(matrix.outcomes[start:])
    assert not summary, summary


def test_every_route_has_an_access_rule(town: Town, world: World) -> None:
    table = rules(world)
    found = {(r.service, r.method, r.path) for r in routes(town)}
    missing = sorted(found - set(table))
    stale = sorted(set(table) - found)
    assert not missing, "routes without an access rule in tests/e2e/test_access_matrix.py: " + ", ".join(
        " ".join(k) for k in missing
    )
    assert not stale, "rules for routes that no longer exist: " + ", ".join(" ".join(k) for k in stale)


def test_lists_show_each_principal_only_their_own_departments_or_grids_data(world: World, matrix: Matrix) -> None:
    p = world.principals
    start = len(matrix.outcomes)

    def listed(service: str, path: str, who: str, **query: Any) -> tuple[httpx.Response, list[dict[str, Any]]]:
        route = Route(service, "GET", path)
        r = matrix.ask(route, None, token=p[who], query={"limit": 500, **query})
        return r, (r.json() if _served(r) and isinstance(r.json(), list) else [])

    # intake's incidents: the reporter, the grid's workers, the department it went to and the center see it
    for who in sorted(p):
        r, items = listed("intake", "/incidents", who)
        sees = world.incident in {i["incident_id"] for i in items}
        should = who in (REPORTER, VERIFIER, CITY, CENTER, ADMIN)
        matrix.expect(
            Route("intake", "GET", "/incidents"),
            who,
            "sees" if should else "not seen",
            r,
            _served(r) and sees == should,
        )

    # handling's queue: each department only its own office's work orders, even when it asks for another's
    route = Route("handling", "GET", "/work-orders")
    for who in sorted(DEPTS):
        dept = who.removeprefix("dept ")
        r, items = listed("handling", "/work-orders", who)
        others = sorted({i["department_code"] for i in items} - {dept})
        sees = world.order in {i["work_order_id"] for i in items}
        ok = _served(r) and not others and sees == (dept == "city_ops")
        matrix.expect(route, who, "own only", r, ok)
        if dept != "city_ops":
            r, _ = listed("handling", "/work-orders", who, department="city_ops")
            matrix.expect(route, f"{who} ?department=city_ops", "403", r, r.status_code == 403)

    # verification's queue: a grid worker sees only the tasks of their own grid cells, however they filter
    route = Route("verification", "GET", "/verifications")
    for query in ({}, {"grid_id": "gh01"}, {"worker_id": "w-gh01-2"}, {"status": "pending"}):
        r, items = listed("verification", "/verifications", OTHER_GRID, **query)
        grids = sorted({i["grid_id"] for i in items} - {"gh09"})
        matrix.expect(route, f"{OTHER_GRID} {query or ''}", "gh09 only", r, _served(r) and not grids)
    for who in (VERIFIER, REPORTER, CENTER, ADMIN):
        r, items = listed("verification", "/verifications", who, status="pending")
        sees = world.to_pass in {i["verification_id"] for i in items}
        matrix.expect(route, who, "sees", r, _served(r) and sees)

    summary = Matrix.failures_of(matrix.outcomes[start:])
    assert not summary, summary


def test_wrong_principals_are_refused_and_the_right_one_is_served(town: Town, world: World, matrix: Matrix) -> None:
    table = rules(world)
    found = [r for r in routes(town) if (r.service, r.method, r.path) in table]
    start = len(matrix.outcomes)
    everyone = sorted(world.principals)
    reads = [r for r in found if r.method == "GET"]
    actions = [r for r in found if r.method != "GET"]

    def refusals(route: Route) -> None:
        rule = table[(route.service, route.method, route.path)]
        for who in everyone:
            if who == rule.right or who in rule.may:
                continue
            token = world.principals[who]
            r = matrix.ask(route, rule, token=token)
            if who in rule.hidden:
                unknown = {name: f"GL00000000-NOSUCH-{name}" for name in rule.params}
                as_unknown = matrix.ask(route, rule, token=token, params=unknown)
                alike = _anonymous(r, rule.params) == _anonymous(as_unknown, unknown)
                ok = r.status_code == as_unknown.status_code == 404 and alike and _says_why(r, rule)
                matrix.expect(route, who, "404 as unknown", r, ok)
            else:
                matrix.expect(route, who, "403", r, r.status_code == 403 and _says_why(r, rule))

    def served(route: Route, who: str) -> None:
        r = matrix.ask(route, table[(route.service, route.method, route.path)], token=world.principals[who])
        matrix.expect(route, who, "2xx", r, _served(r))

    for route in reads:
        refusals(route)
        rule = table[(route.service, route.method, route.path)]
        for who in sorted({rule.right, *rule.may}):
            served(route, who)
    for route in actions:  # every refusal first: none of them may change anything the positive controls need
        refusals(route)
    # actions on several items last: they act on the items the one-item actions' positive controls need
    for route in sorted(actions, key=lambda r: r.path in BATCH_ACTIONS):
        if not table[(route.service, route.method, route.path)].served_in:
            served(route, table[(route.service, route.method, route.path)].right)

    outcomes = matrix.outcomes[start:]
    summary = Matrix.failures_of(outcomes)
    assert not summary, summary
    print(f"access matrix: {len(outcomes)} checks over {len(found)} routes, {len(everyone)} principals")
    served_here = [r for r in found if not table[(r.service, r.method, r.path)].served_in]
    assert sum(o.ok and o.expected == "2xx" for o in outcomes) >= len(served_here)


def test_a_batch_answers_an_item_not_the_callers_as_an_unknown_one(town: Town, world: World) -> None:
    """Another office's work order and another grid's task, in a batch, are refused as an id that names nothing."""
    p = world.principals
    unknown = "GL00000000-NOSUCH-1"
    asks = [
        ("handling", "dept river_chief", "/work-orders/accept", {"work_order_ids": [world.order, unknown]}),
        (
            "handling",
            "dept river_chief",
            "/work-orders/handle",
            {"items": [{"work_order_id": i, "result": "已清理"} for i in (world.to_handle, unknown)]},
        ),
        ("verification", OTHER_GRID, "/verifications/pass", {"verification_ids": [world.to_pass, unknown]}),
    ]
    for service, who, path, body in asks:
        r = town.as_(service, p[who]).post(path, json=body)
        assert r.status_code == 202, (path, r.text)
        theirs, none = r.json()["results"]
        assert theirs["code"] == none["code"] == 404, (path, theirs)
        assert theirs["error"].replace(theirs["id"], "?") == none["error"].replace(unknown, "?"), (path, theirs)


def test_a_12345_callers_number_is_shown_to_the_operations_center_only(town: Town, world: World) -> None:
    """The hotline desk reports a call with the caller's phone number; the department and the grid's workers who
    work the case follow it without the number."""
    phone = f"139{secrets.randbelow(10**8):08d}"
    body = {
        **_report(),
        "lat": 31.2790,
        "lon": 121.5650,
        "source": "hotline_12345",
        "reporter_id": phone,
        "description": "市民来电：占道经营",
    }
    r = town.intake.post("/reports", json=body)
    assert r.status_code == 202, r.text
    incident_id = r.json()["incident_id"]
    town.wait_for(incident_id, event="WorkOrderDispatched")  # to city_ops, filed in gh01, as intake knows it
    p = world.principals
    for who in (CITY, REPORTER, VERIFIER):
        client = town.as_("intake", p[who])
        seen = client.get(f"/incidents/{incident_id}")
        assert seen.status_code == 200, (who, seen.text)
        assert seen.json()["reporter_id"] is None and phone not in seen.text, who
    for who in (CENTER, ADMIN):
        seen = town.as_("intake", p[who]).get(f"/incidents/{incident_id}")
        assert seen.json()["reporter_id"] == phone, who
