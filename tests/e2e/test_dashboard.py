"""The 城运中心 dashboard as a person sees it: a real headless Chromium renders http://…:28104/ against the running
services, and what the page shows must be what the API says. The page is also shown an API that fails, to prove the
figure checks can fail: then the page must show its error banner and "—" instead of figures.

The screenshot of the live dashboard is kept as artifacts/dashboard.png.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.edge import SECURITY_HEADERS
from tests.e2e.conftest import Town
from tests.kafka_support import PORT_OFFSET

ROOT = Path(__file__).resolve().parents[2]
STATIC = ROOT / "services" / "opscenter" / "static"
ARTIFACTS = ROOT / "artifacts"
OPSCENTER = f"http://127.0.0.1:{28104 + PORT_OFFSET}"  # the e2e town's opscenter (base port 28100 + 4)
DASH = "—"
OVERDUE_PAGE = 50
"""The dashboard's page of the overdue list."""
TILES = (
    "reported",
    "filed",
    "closed",
    "closure_rate",
    "on_time_rate",
    "rework_rate",
    "accurate_dispatch_rate",
    "overdue_open",
)
RATES = {"closure_rate", "on_time_rate", "rework_rate", "accurate_dispatch_rate"}


# -- headless Chromium --------------------------------------------------------------------------------------------


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "Debian's chromium is needed to render the dashboard: apt-get install -y chromium"
        if os.environ.get("CI"):
            pytest.fail(f"{msg} (CI must run this test, not skip it)", pytrace=False)
        pytest.skip(msg)
    return exe


def run_chromium(url: str, *, dump_dom: bool = False, screenshot: Path | None = None, budget_ms: int = 4000) -> str:
    """Load ``url`` once, let ``budget_ms`` of virtual time pass (network waits do not count), and return the DOM
    (``dump_dom``) or write a 1400×1000 screenshot. Whatever the page did that its Content Security Policy blocked
    (the browser says so on its console) fails the test."""
    with tempfile.TemporaryDirectory(prefix="gridloop-chromium-") as profile:
        args = [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            "--window-size=1400,1000",
            "--enable-logging=stderr",  # the page's console, CSP violations included
            "--v=0",
        ]
        args += ["--dump-dom"] if dump_dom else [f"--screenshot={screenshot}"]
        proc = subprocess.Popen(
            [*args, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"chromium did not finish loading {url} within 120 s") from None
    noise = ("dbus", "unexpected operator")
    log = "\n".join(line for line in err.splitlines() if not any(n in line for n in noise))
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}:\n{log[-3000:]}"
    if dump_dom:
        assert "<body" in out, f"chromium dumped no DOM for {url}:\n{log[-3000:]}"
    blocked = [line for line in log.splitlines() if "Content Security Policy" in line]
    assert not blocked, f"{url} did what its Content Security Policy forbids:\n" + "\n".join(blocked[:10])
    return out


# -- the dumped DOM, as a tree -------------------------------------------------------------------------------------

_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        parts: list[str] = []

        def walk(n: Node) -> None:
            for c in n.children:
                if isinstance(c, str):
                    parts.append(c)
                else:
                    walk(c)

        walk(self)
        return " ".join("".join(parts).split())

    def iter(self) -> Iterator[Node]:
        yield self
        for c in self.children:
            if isinstance(c, Node):
                yield from c.iter()

    def all(self, pred: Callable[[Node], bool]) -> list[Node]:
        return [n for n in self.iter() if pred(n)]

    def by_id(self, id_: str) -> Node:
        found = self.all(lambda n: n.attrs.get("id") == id_)
        assert len(found) == 1, f"{len(found)} elements with id {id_!r}"
        return found[0]

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())


class _Builder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in _VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, 0, -1):
            if self.stack[i].tag == tag:
                del self.stack[i:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse(html: str) -> Node:
    b = _Builder()
    b.feed(html)
    b.close()
    return b.root


# -- what the page shows -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figure:
    text: str
    value: float


def figures(dom: Node, attr: str = "data-kpi") -> dict[str, Figure]:
    """The KPI figures the page shows, by name (``attr`` data-kpi: this period, data-kpi-prev: the previous one).
    An element still showing "—" shows no figure, so a page whose data never loaded reports none."""
    out: dict[str, Figure] = {}
    for n in dom.all(lambda n: attr in n.attrs):
        text = n.text()
        if text and text != DASH:
            out[n.attrs[attr]] = Figure(text, float(n.attrs["data-value"]))
    return out


def figure_slots(dom: Node, attr: str = "data-kpi") -> dict[str, str]:
    """Every element meant to hold a KPI figure, with whatever it shows (a figure or "—")."""
    return {n.attrs[attr]: n.text() for n in dom.all(lambda n: attr in n.attrs)}


def expected_figures(kpi: dict[str, Any]) -> dict[str, float]:
    return {k: float(kpi[k]) for k in TILES if kpi[k] is not None}


def assert_figures_match(shown: dict[str, Figure], kpi: dict[str, Any], label: str) -> None:
    want = expected_figures(kpi)
    assert {k: f.value for k, f in shown.items()} == want, f"{label}: page {shown} vs API {want}"
    for k, f in shown.items():
        if k in RATES:
            assert f.text.endswith("%") and abs(float(f.text[:-1]) - 100 * kpi[k]) < 0.051, (label, k, f.text)
        else:
            assert f.text == f"{kpi[k]:,}", (label, k, f.text)


def markers(dom: Node) -> list[Node]:
    return dom.all(lambda n: n.tag == "path" and "incident-marker" in n.classes())


def body(dom: Node) -> Node:
    [b] = dom.all(lambda n: n.tag == "body")
    return b


def banner_shown(dom: Node) -> bool:
    return "hidden" not in dom.by_id("error-banner").attrs


# -- the API, for comparison ---------------------------------------------------------------------------------------


def snapshot(client: httpx.Client) -> dict[str, Any]:
    """What the dashboard shows, straight from the API (without what moves by itself, such as overdue seconds)."""

    def get(path: str) -> Any:
        r = client.get(path)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text[:300]}"
        return r.json()

    overdue = client.get("/api/overdue", params={"limit": OVERDUE_PAGE})  # the dashboard's first page
    assert overdue.status_code == 200, overdue.text[:300]

    kpis = get("/api/kpis?period=day&by=department")
    total = kpis["total"]
    return {
        "day": kpis["start"][:10],
        "current": {k: total["current"][k] for k in TILES},
        "previous": {k: total["previous"][k] for k in TILES},
        "backlog": {b["department_code"]: (b["open"], b["overdue"]) for b in get("/api/backlog")},
        "overdue": sorted(o["work_order_id"] for o in overdue.json()),
        "overdue_total": int(overdue.headers["X-Total-Count"]),
        "overdue_next": overdue.headers.get("X-Next-Cursor"),
        "incidents": sorted(f["properties"]["incident_id"] for f in get("/api/map/incidents")["features"]),
        "grids": {f["properties"]["grid_id"]: f["properties"]["open"] for f in get("/api/map/grids")["features"]},
        "trend": [(p["reported"], p["closed"]) for p in get("/api/trend?days=14")],
    }


def render_stable(url: str, read: Callable[[], Any]) -> tuple[Node, Any]:
    """The page's DOM and what the API said, read before and after the page loaded and the same both times: the
    town keeps moving (deadlines pass), so only an API that stood still while the page loaded can be compared."""
    for _attempt in range(5):
        before = read()
        dom = parse(run_chromium(url, dump_dom=True))
        if read() == before:
            return dom, before
    pytest.fail(f"the API kept changing while {url} loaded; nothing stable to compare")


def wait_until(what: str, check: Callable[[], Any], timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


# -- the live dashboard over the running town ----------------------------------------------------------------------


@pytest.mark.kafka
def test_dashboard_shows_what_the_api_says(town: Town) -> None:
    chromium()
    # three incidents in the far north-east cell (芦九沟, gh12), where no other test reports
    closed = town.report("garbage_sorting", 31.3150, 121.6200)
    [order] = town.work_orders(closed)
    town.accept_and_handle(order)
    town.verify(closed, passed=True)
    town.wait_for(closed, status="closed")
    late = town.report("flooding", 31.3180, 121.6230)  # due in 4 s at the e2e time scale: overdue, then escalated
    late_orders = {o["work_order_id"] for o in town.work_orders(late, min_count=2)}
    town.wait_for(late, event="IncidentEscalated", timeout=60)
    fresh = town.report("illegal_signage", 31.3210, 121.6260)  # 120 h → due in 120 s: open, not yet overdue
    town.wait_for(fresh, status="dispatched")

    ops = town.opscenter  # carries the operations center's token
    fragment = f"#token={town.tokens.ops_center}"

    def caught_up() -> dict[str, Any] | None:
        s = snapshot(ops)
        seen = (
            {late, fresh} <= set(s["incidents"])
            and closed not in s["incidents"]
            and late_orders <= set(s["overdue"])
            and s["current"]["reported"] >= 3
            and s["current"]["closed"] >= 1
            and any(
                f["properties"]["incident_id"] == late and f["properties"]["escalated"]
                for f in ops.get("/api/map/incidents").json()["features"]
            )
        )
        return s if seen else None

    wait_until("opscenter to show the reported incidents", caught_up)

    dom, api = render_stable(f"{OPSCENTER}/{fragment}", lambda: snapshot(ops))
    for path in ("/", "/static/dashboard.js", "/static/vendor/leaflet.css", "/api/kpis"):  # as run_chromium saw them
        headers = ops.get(path).headers
        assert [(n, headers.get(n.decode(), "").encode()) for n, _ in SECURITY_HEADERS] == list(SECURITY_HEADERS), path

    assert body(dom).attrs.get("data-state") == "live", body(dom).attrs
    assert not banner_shown(dom), dom.by_id("error-banner").text()

    # KPI tiles: this period and the previous one (环比)
    assert set(figure_slots(dom)) == set(TILES)
    shown = figures(dom)
    assert shown["reported"].text == str(api["current"]["reported"])
    assert_figures_match(shown, api["current"], "this period")
    assert_figures_match(figures(dom, "data-kpi-prev"), api["previous"], "previous period")
    assert dom.by_id("period-range").text() == api["day"]

    # map: the grid cells, one marker per open incident
    cells = dom.all(lambda n: n.tag == "path" and "grid-cell" in n.classes())
    assert sorted(n.attrs.get("data-grid", "") for n in cells) == sorted(api["grids"]) and len(cells) == 12
    labels = {n.attrs["data-grid-open"]: n.text() for n in dom.all(lambda n: "data-grid-open" in n.attrs)}
    assert labels == {g: f"在办 {n}" for g, n in api["grids"].items()}
    marks = markers(dom)
    assert sorted(n.attrs["data-incident"] for n in marks) == api["incidents"]
    assert dom.by_id("map-count").text() == str(len(api["incidents"]))
    assert dom.by_id("map").attrs.get("data-map-mode") == "points"  # a few incidents: each one drawn
    by_id = {n.attrs["data-incident"]: n for n in marks}
    assert "escalated" in by_id[late].classes() and "big" in by_id[late].classes()
    assert "normal" in by_id[fresh].classes()

    # overdue work orders
    rows = dom.by_id("overdue-table").all(lambda n: n.tag == "tr" and "data-work-order" in n.attrs)
    assert sorted(r.attrs["data-work-order"] for r in rows) == api["overdue"]
    assert late_orders <= {r.attrs["data-work-order"] for r in rows}
    assert dom.by_id("overdue-count").text() == f"{api['overdue_total']:,}"
    assert dom.by_id("overdue-next").attrs.get("data-cursor") == api["overdue_next"]
    assert "disabled" in dom.by_id("overdue-first").attrs  # the first page

    # backlog per department
    table = dom.by_id("backlog-table")
    shown_backlog = {}
    for tr in table.all(lambda n: n.tag == "tr" and "data-department" in n.attrs):
        cells_ = {td.attrs["data-field"]: td.text() for td in tr.all(lambda n: "data-field" in n.attrs)}
        shown_backlog[tr.attrs["data-department"]] = (int(cells_["open"]), int(cells_["overdue"]))
    assert shown_backlog == api["backlog"]
    assert dom.by_id("backlog-open-total").text() == str(sum(o for o, _ in api["backlog"].values()))

    # trend
    assert dom.by_id("trend-reported-total").text() == f"{sum(r for r, _ in api['trend']):,}"
    assert dom.by_id("trend-closed-total").text() == f"{sum(c for _, c in api['trend']):,}"
    assert dom.by_id("trend-chart").all(lambda n: n.tag == "canvas"), "the trend chart was not drawn"

    # another period, chosen in the address (as the period buttons leave it)
    def month() -> dict[str, Any]:
        r = ops.get("/api/kpis", params={"period": "month", "by": "department"})
        assert r.status_code == 200, r.text
        return dict(r.json())

    dom, report = render_stable(f"{OPSCENTER}/?period=month{fragment}", month)
    [pressed] = dom.by_id("period-selector").all(lambda n: "active" in n.classes())
    assert pressed.attrs["data-period"] == "month"
    assert "period=month" in dom.by_id("csv-link").attrs["href"]
    assert_figures_match(figures(dom), report["total"]["current"], "this month")
    assert_figures_match(figures(dom, "data-kpi-prev"), report["total"]["previous"], "last month")
    assert dom.by_id("period-range").text() == report["start"][:7]
    csv = ops.get(dom.by_id("csv-link").attrs["href"])
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv"), csv.text[:200]

    # the screenshot, kept as the test's artifact
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    run_chromium(f"{OPSCENTER}/{fragment}", screenshot=shot)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


# -- the same page over an API that fails --------------------------------------------------------------------------


Api = Callable[[str, int, str | None], tuple[int, Any] | tuple[int, Any, dict[str, str]]]
"""(path, how many /api/ requests so far, Authorization header) -> (status, JSON body[, headers])"""


class _Page(BaseHTTPRequestHandler):
    """Serves the dashboard's static files like opscenter, with its security headers; /api/* is answered by the
    server's ``api``."""

    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in SECURITY_HEADERS:  # as the services send them
            self.send_header(name.decode(), value.decode())
        for header, text in (headers or {}).items():
            self.send_header(header, text)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/api/"):
            self.server.hits.append(path)
            self.server.asked.append(self.path)
            status, payload, *headers = self.server.api(path, len(self.server.hits), self.headers.get("Authorization"))
            body = json.dumps(payload, ensure_ascii=False).encode()
            self._send(status, body, "application/json", headers[0] if headers else {})
            return
        rel = "index.html" if path == "/" else path.removeprefix("/static/") if path.startswith("/static/") else ""
        file = (STATIC / rel).resolve()
        if not rel or not file.is_file() or STATIC.resolve() not in file.parents:
            self._send(404, b'{"detail":"Not Found"}', "application/json")
            return
        types = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css"}
        self._send(200, file.read_bytes(), types.get(file.suffix, "application/octet-stream"))


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, api: Api) -> None:
        super().__init__(("127.0.0.1", 0), _Page)
        self.api = api
        self.hits: list[str] = []
        self.asked: list[str] = []
        """Every /api/ request's path with its query."""


@contextmanager
def page_server(api: Api) -> Iterator[_Server]:
    server = _Server(api)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _fails(path: str, n: int, authorization: str | None) -> tuple[int, Any]:
    return 500, {"detail": "Internal Server Error"}


def test_failing_api_shows_the_banner_and_no_figures() -> None:
    chromium()
    with page_server(_fails) as server:
        dom = parse(run_chromium(f"http://127.0.0.1:{server.server_port}/", dump_dom=True))
    assert "/api/kpis" in server.hits, f"the page never asked the API: {server.hits}"
    assert body(dom).attrs.get("data-state") == "error"
    assert banner_shown(dom)
    assert "HTTP 500" in dom.by_id("error-banner").text()
    # the figure checks of the live test see nothing here
    assert figures(dom) == {} and figures(dom, "data-kpi-prev") == {}
    assert set(figure_slots(dom).values()) == {DASH} and set(figure_slots(dom)) == set(TILES)
    assert markers(dom) == []
    assert dom.by_id("overdue-table").all(lambda n: "data-work-order" in n.attrs) == []
    assert dom.by_id("backlog-table").all(lambda n: "data-department" in n.attrs) == []
    for id_ in ("map-count", "overdue-count", "trend-reported-total", "period-range", "updated-at"):
        assert dom.by_id(id_).text() == DASH, id_


def _fake_api() -> dict[str, Any]:
    """One answer of every endpoint, shaped by opscenter's own models."""
    from services.opscenter.kpis import Dimension, Kpi, KpiReport, KpiRow, Period
    from services.opscenter.views import Backlog, OverdueOrder, TrendPoint

    start = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    cur = Kpi(
        reported=7,
        filed=6,
        closed=4,
        due=5,
        overdue_open=1,
        closure_rate=0.8,
        on_time_rate=0.6,
        rework_rate=0.25,
        accurate_dispatch_rate=0.8333,
        dispatched=6,
        returned=1,
        handled=4,
        reworks=1,
    )
    prev = Kpi(reported=5, filed=5, closed=3, due=4, closure_rate=0.75, on_time_rate=0.75)
    total = KpiRow(key="all", name_zh="全镇", name_en="Whole town", current=cur, previous=prev)
    report = KpiReport(
        period=Period.DAY,
        by=Dimension.DEPARTMENT,
        start=start,
        end=start + timedelta(days=1),
        previous_start=start - timedelta(days=1),
        previous_end=start,
        total=total,
        rows=[total.model_copy(update={"key": "city_ops", "name_zh": "城运办"})],
    )
    order = OverdueOrder(
        work_order_id="GL20240101-ABCDEF12-1",
        incident_id="GL20240101-ABCDEF12",
        department_code="city_ops",
        department_zh="城运办",
        category_code="flooding",
        category_zh="积水",
        grid_id="gh01",
        deadline=start,
        overdue_s=3600.0,
        reminded=True,
        escalated=False,
        lat=31.28,
        lon=121.57,
    )
    cell = [[121.56, 31.27], [121.5775, 31.27], [121.5775, 31.29], [121.56, 31.29], [121.56, 31.27]]
    return {
        "/api/kpis": report.model_dump(mode="json"),
        "/api/backlog": [
            Backlog(
                department_code="city_ops", name_zh="城运办", name_en="City Operations Office", open=1, overdue=1
            ).model_dump(mode="json")
        ],
        "/api/overdue": [order.model_dump(mode="json")],
        "/api/trend": [TrendPoint(date=start.date().isoformat(), reported=7, closed=4).model_dump()],
        "/api/map/grids": {
            "type": "FeatureCollection",
            "features": [
                {
                    "type": "Feature",
                    "geometry": {"type": "Polygon", "coordinates": [cell]},
                    "properties": {
                        "grid_id": "gh01",
                        "name_zh": "华高网格",
                        "name_en": "Huagao grid",
                        "workers": [],
                        "open": 1,
                    },
                }
            ],
        },
        "/api/map/incidents": {
            "type": "FeatureCollection",
            "features": [
                {
                    "type": "Feature",
                    "geometry": {"type": "Point", "coordinates": [121.57, 31.28]},
                    "properties": {
                        "incident_id": "GL20240101-ABCDEF12",
                        "category_code": "flooding",
                        "category_zh": "积水",
                        "family": "safety",
                        "status": "dispatched",
                        "overdue": True,
                        "escalated": False,
                        "big": True,
                        "grid_id": "gh01",
                        "reported_at": start.isoformat(),
                    },
                }
            ],
        },
    }


def test_api_failing_after_a_good_refresh_keeps_the_last_figures() -> None:
    chromium()
    answers = _fake_api()
    first_round = len(answers)

    def flaky(path: str, n: int, authorization: str | None) -> tuple[int, Any]:
        return (200, answers[path]) if n <= first_round else (503, {"detail": "Service Unavailable"})

    with page_server(flaky) as server:
        # long enough for the first refresh and the one 5 s later
        dom = parse(run_chromium(f"http://127.0.0.1:{server.server_port}/", dump_dom=True, budget_ms=8000))
    assert len(server.hits) > first_round, f"no second refresh: {server.hits}"
    assert body(dom).attrs.get("data-state") == "error"
    assert banner_shown(dom) and "HTTP 503" in dom.by_id("error-banner").text()
    assert_figures_match(figures(dom), answers["/api/kpis"]["total"]["current"], "kept figures")
    assert [m.attrs["data-incident"] for m in markers(dom)] == ["GL20240101-ABCDEF12"]
    assert dom.by_id("updated-at").text() != DASH


def test_the_dashboard_runs_under_the_services_content_security_policy() -> None:
    """No inline script or style in the page, nothing its script does that a strict policy blocks (run_chromium
    fails on any violation the browser reports), and the policy is strict: no 'unsafe-inline', no other origin."""
    chromium()
    csp = dict(SECURITY_HEADERS)[b"content-security-policy"].decode()
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["script-src"] == directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == directives["object-src"] == directives["base-uri"] == "'none'"
    page = parse((STATIC / "index.html").read_text(encoding="utf-8"))
    inline = [
        f"<{n.tag} {' '.join(sorted(n.attrs))}>"
        for n in page.iter()
        if (n.tag == "script" and ("src" not in n.attrs or n.text().strip()))
        or n.tag == "style"
        or "style" in n.attrs
        or any(a.startswith("on") for a in n.attrs)
        or any(v.strip().lower().startswith("javascript:") for v in n.attrs.values())
    ]
    assert not inline, f"index.html holds what the policy blocks: {inline}"
    answers = _fake_api()
    with page_server(lambda path, n, authorization: (200, answers[path])) as server:
        dom = parse(run_chromium(f"http://127.0.0.1:{server.server_port}/#token=glt_test-token", dump_dom=True))
    assert body(dom).attrs.get("data-state") == "live"
    bars = dom.by_id("backlog-table").all(lambda n: n.tag == "i" and "open" in n.classes())
    assert bars and all(n.attrs.get("style", "").startswith("width: ") for n in bars)


def test_token_from_the_address_is_sent_as_bearer() -> None:
    chromium()
    answers = _fake_api()
    seen: list[str | None] = []

    def guarded(path: str, n: int, authorization: str | None) -> tuple[int, Any]:
        seen.append(authorization)
        if authorization != "Bearer glt_test-token":
            return 401, {"detail": "a token is required: Authorization: Bearer <token>"}
        return 200, answers[path]

    with page_server(guarded) as server:
        base = f"http://127.0.0.1:{server.server_port}/"
        refused = parse(run_chromium(base, dump_dom=True))
        admitted = parse(run_chromium(base + "#token=glt_test-token", dump_dom=True))
    assert banner_shown(refused) and "token" in refused.by_id("error-banner").text()
    assert figures(refused) == {}
    assert body(admitted).attrs.get("data-state") == "live" and not banner_shown(admitted)
    assert_figures_match(figures(admitted), answers["/api/kpis"]["total"]["current"], "with a token")
    assert "Bearer glt_test-token" in seen and None in seen


def _clusters() -> dict[str, Any]:
    """A map answered as clusters, as opscenter answers a view of many open incidents."""

    def cluster(lon: float, lat: float, count: int, overdue: int, escalated: int) -> dict[str, Any]:
        return {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [lon, lat]},
            "properties": {
                "cluster": True,
                "count": count,
                "overdue": overdue,
                "escalated": escalated,
                "big": 0,
                "bbox": [lon - 0.005, lat - 0.005, lon + 0.005, lat + 0.005],
            },
        }

    features = [cluster(121.565, 31.275, 1204, 310, 12), cluster(121.60, 31.31, 7, 0, 0)]
    return {"type": "FeatureCollection", "mode": "clusters", "zoom": 13, "total": 1211, "features": features}


def test_the_map_draws_clusters_and_the_overdue_list_pages() -> None:
    """Clusters are drawn with their counts, the map asks for its own view once it has one, and the overdue list
    shows its total and its next page; opened on that page (the address keeps it), it asks for it by cursor."""
    chromium()
    answers = _fake_api()
    first = answers["/api/overdue"][0]
    second = {**first, "work_order_id": "GL20240101-0000000000FF-1", "incident_id": "GL20240101-0000000000FF"}

    def first_page(path: str, n: int, authorization: str | None) -> tuple[int, Any, dict[str, str]]:
        if path == "/api/map/incidents":
            return 200, _clusters(), {}
        if path == "/api/overdue":
            return 200, [first], {"X-Total-Count": "1234", "X-Next-Cursor": "cursor-2"}
        return 200, answers[path], {}

    with page_server(first_page) as server:
        dom = parse(run_chromium(f"http://127.0.0.1:{server.server_port}/", dump_dom=True))
    assert body(dom).attrs.get("data-state") == "live", dom.by_id("error-banner").text()
    drawn = dom.all(lambda n: "incident-cluster" in n.classes())
    assert sorted(int(n.attrs["data-cluster-count"]) for n in drawn) == [7, 1204]
    worst = next(n for n in drawn if n.attrs["data-cluster-count"] == "1204")
    assert "escalated" in worst.classes() and worst.text() == "1,204"
    assert (worst.attrs["data-cluster-overdue"], worst.attrs["data-cluster-escalated"]) == ("310", "12")
    assert markers(dom) == [] and dom.by_id("map").attrs.get("data-map-mode") == "clusters"
    assert dom.by_id("map-count").text() == "1,211"
    views = [q for q in server.asked if q.startswith("/api/map/incidents?")]
    assert views and all("zoom=" in q and "bbox=" in q for q in views), server.asked  # its own view, once fitted
    assert f"/api/overdue?limit={OVERDUE_PAGE}" in server.asked
    assert dom.by_id("overdue-count").text() == "1,234"
    assert dom.by_id("overdue-next").attrs.get("data-cursor") == "cursor-2"
    assert "disabled" not in dom.by_id("overdue-next").attrs and "disabled" in dom.by_id("overdue-first").attrs

    def second_page(path: str, n: int, authorization: str | None) -> tuple[int, Any, dict[str, str]]:
        if path == "/api/overdue":
            return 200, [second], {"X-Total-Count": "1234"}
        return 200, answers[path], {}

    with page_server(second_page) as server:
        dom = parse(run_chromium(f"http://127.0.0.1:{server.server_port}/?overdue=cursor-2", dump_dom=True))
    assert f"/api/overdue?limit={OVERDUE_PAGE}&cursor=cursor-2" in server.asked, server.asked
    rows = dom.by_id("overdue-table").all(lambda n: n.tag == "tr" and "data-work-order" in n.attrs)
    assert [r.attrs["data-work-order"] for r in rows] == [second["work_order_id"]]
    assert "disabled" in dom.by_id("overdue-next").attrs and "data-cursor" not in dom.by_id("overdue-next").attrs
    assert "disabled" not in dom.by_id("overdue-first").attrs  # back to the first page from here
    assert dom.by_id("map").attrs.get("data-map-mode") == "points" and len(markers(dom)) == 1
