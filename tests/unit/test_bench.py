"""The benchmark's arithmetic: percentiles, the verdict on a step, the ramp, hop counting, the summary line."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from schemas.topics import CATALOG, LIFECYCLE, topics_for
from services.bench import stats
from services.bench.driver import Driver, Tokens, Tracked
from services.bench.raw import sample_events
from services.bench.stats import Criteria, StepOutcome, evaluate_step

# -- percentiles -------------------------------------------------------------------------------------------


def test_percentile_interpolates_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert stats.percentile(values, 50) == pytest.approx(50.5)
    assert stats.percentile(values, 99) == pytest.approx(99.01)
    assert stats.percentile(values, 0) == 1.0
    assert stats.percentile(values, 100) == 100.0


def test_percentile_of_nothing_and_of_one() -> None:
    assert stats.percentile([], 99) is None
    assert stats.percentile([7.0], 1) == 7.0
    assert stats.percentile([3.0, 1.0, 2.0], 50) == 2.0  # order of the input does not matter


def test_percentile_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_summarize() -> None:
    s = stats.summarize([10.0, 20.0, 30.0, 40.0])
    assert s["n"] == 4 and s["p50"] == 25.0 and s["max"] == 40.0
    assert stats.summarize([]) == {"n": 0, "p50": None, "p95": None, "p99": None, "max": None}


def test_the_timed_events_are_the_lifecycle_points_the_stages_are_measured_between() -> None:
    points = {
        "IncidentReported",
        "WorkOrderDispatched",
        "WorkOrderAccepted",
        "WorkOrderHandled",
        "VerificationRequested",
        "VerificationPassed",
        "IncidentClosed",
    }
    assert points == stats.TIMED_EVENTS


def test_stage_latencies_use_only_known_points() -> None:
    times = {"sent": 100.0, "IncidentReported": 100.01, "WorkOrderDispatched": 100.05, "IncidentClosed": 101.0}
    lat = stats.stage_latencies_ms(times)
    assert lat["intake_http"] == pytest.approx(10)
    assert lat["report_to_dispatched"] == pytest.approx(50)
    assert lat["end_to_end"] == pytest.approx(1000)
    assert "dispatched_to_accepted" not in lat


# -- a step's verdict ----------------------------------------------------------------------------------------


def _step(rate: float, closed_rate: float, growth_per_s: float = 0.0, sent_share: float = 1.0) -> StepOutcome:
    window = 50.0
    samples = [(10.0 + t / 2, int(5 + growth_per_s * t / 2)) for t in range(101)]
    return StepOutcome(
        offered_rate=rate,
        duration_s=60.0,
        sent=round(rate * 60 * sent_share),
        window_s=window,
        closed_in_window=round(closed_rate * window),
        open_samples=samples,
        requests=1000,
        errors=0,
    )


def test_a_step_that_keeps_up_is_sustained() -> None:
    ok, reason = evaluate_step(_step(40, 39.8))
    assert ok, reason


def test_a_step_that_closes_too_little_is_not_sustained() -> None:
    ok, reason = evaluate_step(_step(40, 30))
    assert not ok and "closed 30.0/s" in reason


def test_a_short_slow_step_may_close_one_incident_fewer_than_its_window_holds() -> None:
    # the soak's quick ramp: 1/s for 10 s, a 7.5-s window; 7 closed in it is 0.93/s, one incident short of 7.5
    step = StepOutcome(1.0, 10.0, 10, 7.5, 7, [(2.5 + t / 2, 1) for t in range(16)], 40, 0)
    ok, reason = evaluate_step(step)
    assert ok, reason
    step.closed_in_window = 6  # two short: not the window's edge any more
    ok, reason = evaluate_step(step)
    assert not ok and "closed 0.8/s" in reason


def test_a_growing_backlog_is_not_sustained_even_if_closures_look_fine() -> None:
    ok, reason = evaluate_step(_step(40, 39.5, growth_per_s=5))
    assert not ok and "backlog grew" in reason


def test_a_small_backlog_wobble_is_tolerated() -> None:
    ok, _ = evaluate_step(_step(5, 5, growth_per_s=0.1))  # +5 over the window: under the floor of 10
    assert ok


def test_a_driver_that_could_not_offer_the_rate_fails_the_step() -> None:
    ok, reason = evaluate_step(_step(80, 80, sent_share=0.5))
    assert not ok and "reported" in reason


def test_errors_fail_a_step() -> None:
    step = _step(10, 10)
    step.errors = 50
    ok, reason = evaluate_step(step, Criteria(max_error_share=0.01))
    assert not ok and "HTTP errors" in reason


def test_backlog_growth_is_the_fitted_slope_over_the_window() -> None:
    step = _step(10, 10, growth_per_s=2)
    assert stats.backlog_growth(step) == pytest.approx(100, rel=0.02)
    assert stats.slope([(1.0, 5.0)]) == 0.0
    assert stats.slope([(1.0, 5.0), (1.0, 9.0)]) == 0.0


def test_highest_sustained_takes_the_highest_passing_rate() -> None:
    a, b, c = _step(10, 10), _step(20, 20), _step(40, 20)
    assert stats.highest_sustained([(a, True), (b, True), (c, False)]) is b
    assert stats.highest_sustained([(a, False)]) is None


# -- the ramp -------------------------------------------------------------------------------------------------


def test_ramp_climbs_then_bisects_once() -> None:
    ladder = (5.0, 10.0, 20.0, 40.0)
    tried: dict[float, bool] = {}
    assert stats.next_rate(tried, ladder, refine=1) == 5.0
    tried.update({5.0: True, 10.0: True})
    assert stats.next_rate(tried, ladder, refine=1) == 20.0
    tried[20.0] = False
    assert stats.next_rate(tried, ladder, refine=1) == 15.0
    tried[15.0] = True
    assert stats.next_rate(tried, ladder, refine=1) is None


def test_ramp_stops_at_the_top_of_the_ladder_and_without_refinement() -> None:
    assert stats.next_rate({5.0: True, 10.0: True}, (5.0, 10.0), refine=2) is None
    assert stats.next_rate({5.0: True, 10.0: False}, (5.0, 10.0), refine=0) is None
    assert stats.next_rate({5.0: False}, (5.0, 10.0), refine=3) is None  # nothing passed: nothing to bisect


def test_ramp_bisects_repeatedly() -> None:
    ladder = (10.0, 20.0)
    tried = {10.0: True, 20.0: False}
    assert stats.next_rate(tried, ladder, refine=2) == 15.0
    tried[15.0] = False
    assert stats.next_rate(tried, ladder, refine=2) == 12.0  # round(12.5) — banker's rounding to even
    tried[12.0] = True
    assert stats.next_rate(tried, ladder, refine=2) is None


def test_the_default_search_finds_the_rate_within_an_eighth_of_the_failed_step() -> None:
    from services.bench.harness import Options

    o = Options()
    tried = {r: True for r in o.rates if r <= 128}
    tried[256.0] = False
    walk = []
    while (rate := stats.next_rate(tried, o.rates, o.refine)) is not None:
        walk.append(rate)
        tried[rate] = rate < 180  # a loop that sustains 176/s and not 192/s
    assert walk == [192.0, 160.0, 176.0]  # two bisections would have stopped at 160


# -- hops -----------------------------------------------------------------------------------------------------


def test_one_pass_of_the_loop_is_sixteen_records() -> None:
    assert stats.expected_hops() == 16  # 8 events, each on its own topic and on the lifecycle log
    assert all(topics_for(t)[1] is LIFECYCLE for t in stats.LOOP_EVENTS)


def test_measured_hops_from_end_offsets() -> None:
    before = {"ns.a": 10, "ns.b": 0, "ns.c": 3}
    after = {"ns.a": 30, "ns.b": 20, "ns.c": 3}
    hops, per_topic = stats.measured_hops(before, after, incidents=5)
    assert hops == 8.0
    assert per_topic == {"ns.a": 20, "ns.b": 20}
    assert stats.measured_hops(before, after, 0)[0] is None


def test_every_loop_event_has_a_topic_of_the_catalog() -> None:
    names = {t.name for t in CATALOG}
    for kind in stats.LOOP_EVENTS:
        assert {t.name for t in topics_for(kind)} <= names


# -- the summary line -----------------------------------------------------------------------------------------


def test_summary_line_shape_and_ratio() -> None:
    data = stats.summary(
        incidents_per_s=50.0,
        raw_hops_per_s=20000.0,
        hops_per_incident=16.0,
        p99_report_to_dispatch_ms=42.123,
        p99_end_to_end_ms=812.0,
        peak_rss_mb={"intake": 120.04, "dispatch": 110.0},
        duration_s=123.456,
    )
    line = stats.json_line(data)
    assert "\n" not in line and " " not in line
    parsed = json.loads(line)
    assert list(parsed) == list(stats.SUMMARY_KEYS)
    assert parsed["ratio_to_limit"] == pytest.approx(50 * 16 / 20000)
    assert parsed["peak_rss_mb"] == {"dispatch": 110.0, "intake": 120.0}
    assert parsed["p99_report_to_dispatch_ms"] == 42.1


def test_summary_without_a_raw_limit_has_no_ratio() -> None:
    data = stats.summary(
        incidents_per_s=0.0,
        raw_hops_per_s=0.0,
        hops_per_incident=None,
        p99_report_to_dispatch_ms=None,
        p99_end_to_end_ms=None,
        peak_rss_mb={},
        duration_s=1.0,
    )
    assert data["ratio_to_limit"] is None and data["hops_per_incident"] is None
    assert json.loads(stats.json_line(data))["p99_end_to_end_ms"] is None


# -- soak -----------------------------------------------------------------------------------------------------


def test_rss_growth_first_and_last_five_minutes() -> None:
    samples = [(float(t), 100.0 + t / 60) for t in range(0, 1801, 30)]  # +1 MB a minute for 30 minutes
    g = stats.rss_growth(samples)
    assert g["first_mb"] == pytest.approx(102.5, abs=0.1)
    assert g["last_mb"] == pytest.approx(127.5, abs=0.1)
    assert g["growth_mb"] == pytest.approx(25, abs=0.2)


def test_rss_growth_of_a_short_run_uses_thirds() -> None:
    g = stats.rss_growth([(0.0, 100.0), (30.0, 100.0), (60.0, 130.0), (90.0, 130.0)])
    assert g["first_mb"] == 100.0 and g["last_mb"] == 130.0
    assert stats.rss_growth([])["growth_mb"] is None


# -- resources ------------------------------------------------------------------------------------------------


def test_cpu_shows_what_the_host_stole_apart_from_other_work() -> None:
    from services.bench.monitor import MACHINE, Monitor, Sample
    from services.bench.report import with_others

    m = Monitor({})
    m.samples = {
        MACHINE: [Sample(t, 180.0, 0.0) for t in (1, 2, 3)],
        "dispatch": [Sample(t, 40.0, 0.0) for t in (1, 2, 3)],
    }
    m.steal = [(1, 10.0), (2, 30.0), (3, 50.0), (9, 99.0)]  # the last one is outside the window
    cpu = m.cpu_avg(1, 3)
    assert cpu == {MACHINE: 180.0, "dispatch": 40.0, "steal": 30.0}
    assert with_others(cpu) == {"dispatch": 40.0, "steal": 30.0, "others": 110.0}
    assert "steal" not in m.peak_rss()


def test_the_monitor_samples_the_hosts_steal_with_the_machine() -> None:
    from services.bench.monitor import MACHINE, Monitor

    m = Monitor({}, interval_s=0.05).start()
    try:
        import time

        time.sleep(0.3)
    finally:
        m.stop()
    assert len(m.steal) >= 2 and len(m.steal) == len(m.samples[MACHINE])
    assert all(0.0 <= v <= 100.0 * 64 for _, v in m.steal)


def test_the_monitor_probes_the_host_every_few_seconds_and_gives_the_median_of_a_window() -> None:
    from services.bench.monitor import Monitor

    m = Monitor({}, interval_s=0.02, probe_every_s=0.05).start()
    try:
        import time

        time.sleep(0.4)
    finally:
        m.stop()
    assert len(m.probes) >= 2 and all(ms > 0 for _, ms in m.probes)

    m.probes = [(10.0, 4.0), (15.0, 9.0), (20.0, 3.0), (25.0, 5.0), (30.0, 100.0)]
    assert m.probe_median(10.0, 25.0) == 4.5  # 3, 4, 5, 9: between the middle two
    assert m.probe_median(12.0, 26.0) == 5.0  # 3, 5, 9: the middle one
    assert m.probe_median(40.0, 50.0) is None


def test_a_steps_record_and_table_carry_its_host_probe() -> None:
    from rich.console import Console

    from services.bench.harness import StepRecord
    from services.bench.report import steps_table

    cpu = {"intake": 40.0, "dispatch": 30.0}
    probed = StepRecord("ramp", _step(64, 64), True, "ok", 0.0, 60.0, {}, cpu, 0, 4.567)
    unprobed = StepRecord("ramp", _step(128, 128), True, "ok", 60.0, 120.0, {}, cpu)
    assert probed.as_dict()["host_probe_ms"] == 4.57
    assert unprobed.as_dict()["host_probe_ms"] is None

    console = Console(width=400, record=True)
    console.print(steps_table([probed, unprobed]))
    text = console.export_text()
    assert "host probe ms" in text
    rows = [line for line in text.splitlines() if "ramp" in line]
    assert "4.6" in rows[0].split("│")[11] and rows[1].split("│")[11].strip() == "-"


# -- the driver's bookkeeping (no network) ------------------------------------------------------------------


def _driver() -> Driver:
    return Driver({}, Tokens({}, {}, {}), "127.0.0.1:1", "ns.incidents.lifecycle")


def _record(kind: str, incident: str, at: str) -> bytes:
    return orjson.dumps({"type": kind, "incident_id": incident, "occurred_at": at})


def test_lifecycle_times_an_incident_and_closes_it() -> None:
    d = _driver()
    d.incidents["GL1"] = Tracked(step=0, sent=1_780_300_800.0)  # 2026-06-01T08:00:00Z
    d._fold(_record("IncidentReported", "GL1", "2026-06-01T08:00:00.010000Z"))
    d._fold(_record("IncidentFiled", "GL1", "2026-06-01T08:00:00.030000Z"))
    d._fold(_record("WorkOrderDispatched", "GL1", "2026-06-01T08:00:00.030000+00:00"))
    assert d.open_count == 1
    d._fold(_record("IncidentClosed", "GL1", "2026-06-01T08:00:01.500000Z"))
    assert d.open_count == 0
    lat = d.latencies[0]
    assert lat["report_to_dispatched"] == [pytest.approx(30, abs=0.01)]
    assert lat["end_to_end"] == [pytest.approx(1500, abs=0.01)]
    assert len(d.closed_at) == 1


def test_lifecycle_before_the_reports_answer_is_kept_for_later() -> None:
    d = _driver()
    d._fold(_record("IncidentReported", "GL2", "2026-06-01T08:00:00Z"))
    assert "GL2" in d.early and d.open_count == 0
    d._fold(b"not json")  # ignored, not fatal
    d._fold(_record("OverdueReminded", "GL2", "2026-06-01T08:00:00Z"))  # untimed events are ignored
    assert list(d.early["GL2"]) == ["IncidentReported"]


def test_a_merged_incident_is_terminal_but_not_closed() -> None:
    d = _driver()
    d.incidents["GL3"] = Tracked(step=0, sent=0.0)
    d._fold(_record("IncidentMerged", "GL3", "2026-06-01T08:00:00Z"))
    assert d.open_count == 0 and d.terminal_other == 1 and not d.closed_at


def test_raw_messages_are_the_pipelines_events() -> None:
    reported, dispatched = sample_events()
    assert orjson.loads(reported)["type"] == "IncidentReported"
    assert orjson.loads(dispatched)["type"] == "WorkOrderDispatched"
    assert 400 < len(reported) < 2000 and 400 < len(dispatched) < 2000


def test_a_desk_accepts_what_it_found_in_one_request_then_handles_all_it_took() -> None:
    """批量签收 then 批量处置: an order refused 409 (taken by an earlier try) is handled too, one of another
    office (404, as an unknown one) is not, and counts as an error."""
    import asyncio

    from services.bench.driver import Reply

    d = _driver()
    calls: list[tuple[str, Any]] = []

    async def call(service: str, method: str, path: str, token: str, ok: Any, **kw: Any) -> Reply:
        calls.append((path, kw["json"]))
        results = (
            [{"id": "a", "code": None}, {"id": "b", "code": 409}, {"id": "c", "code": 404, "error": "no work order c"}]
            if path.endswith("accept")
            else [{"id": i["work_order_id"], "code": None} for i in kw["json"]["items"]]
        )
        return Reply(202, orjson.dumps({"results": results}))

    d._call = call  # type: ignore[method-assign]
    asyncio.run(d._work_many(["a", "b", "c"], "token"))
    assert [path for path, _ in calls] == ["/work-orders/accept", "/work-orders/handle"]
    assert calls[0][1] == {"work_order_ids": ["a", "b", "c"]}
    assert [i["work_order_id"] for i in calls[1][1]["items"]] == ["a", "b"]
    assert (d.counters.conflicts, d.counters.errors) == (1, 1)


@pytest.mark.parametrize("batch", [True, False])
def test_a_queue_is_served_once_per_item_in_one_request_or_one_at_a_time(batch: bool) -> None:
    """A desk acts on each work order it finds once, however often a poll lists it; with batch actions all of one
    answer go in one request."""
    import asyncio

    from services.bench.driver import Reply

    d = Driver({}, Tokens({}, {"g1": "v-token"}, {"d1": "d-token"}), "127.0.0.1:1", "t", batch_actions=batch)
    d.poll_s = d.idle_poll_s = 0.0
    answers = [["a", "b"], ["a", "b", "c"]]
    polls: list[tuple[str, str, str, dict[str, Any]]] = []
    acted: list[Any] = []

    async def call(service: str, method: str, path: str, token: str, ok: Any, **kw: Any) -> Reply:
        polls.append((service, path, token, dict(kw["params"])))
        if len(polls) == len(answers):
            d._running = False
        return Reply(200, orjson.dumps([{"work_order_id": i} for i in answers[len(polls) - 1]]))

    async def one(work_order_id: str, token: str) -> None:
        acted.append((work_order_id, token))

    async def many(work_order_ids: list[str], token: str) -> None:
        acted.append((work_order_ids, token))

    async def serve() -> None:
        d._running = True
        d._call = call  # type: ignore[method-assign]
        d._work, d._work_many = one, many  # type: ignore[method-assign]
        await d._department("d1")
        await asyncio.sleep(0)  # the spawned actions run

    asyncio.run(serve())
    params = {"department": "d1", "status": "dispatched", "limit": 50, "wait": d.long_poll_s}
    assert polls == [("handling", "/work-orders", "d-token", params)] * 2
    if batch:
        assert acted == [(["a", "b"], "d-token"), (["c"], "d-token")]
    else:
        assert acted == [("a", "d-token"), ("b", "d-token"), ("c", "d-token")]


def test_the_driver_reports_in_the_town_it_is_given_small_incidents_only() -> None:
    from schemas import GAOHANG, Town

    grid = next(iter(GAOHANG.grids.values()))
    big = next(c for c in GAOHANG.categories.values() if c.big)
    small = next(c for c in GAOHANG.categories.values() if not c.big)
    categories = {big.code: big, small.code: small}
    town = Town("t", "测试镇", "Test", GAOHANG.departments, categories, {grid.code: grid})
    d = Driver({}, Tokens({grid.code: ("w", "token")}, {}, {}), "127.0.0.1:1", "t", town=town)
    for _ in range(20):
        grid_code, body = d._report_body()
        assert (grid_code, body["category_code"], body["reporter_id"]) == (grid.code, small.code, "w")
        assert grid.contains(body["lat"], body["lon"])


def test_desks_long_poll_again_at_once_after_an_empty_answer_and_pause_after_work_in_hand() -> None:
    d = Driver({}, Tokens({}, {}, {}), "127.0.0.1:1", "t", poll_s=0.2, idle_poll_s=1.0, long_poll_s=10)
    assert d._next_wait(0.2, found=0, listed=0, failed=False) == 0.0  # the wait ran out: ask again
    assert d._next_wait(0.2, found=3, listed=3, failed=False) == 0.2  # new work taken in hand
    assert d._next_wait(0.2, found=0, listed=2, failed=False) == 0.2  # still listed: its acceptance on its way
    assert d._next_wait(0.2, found=0, listed=0, failed=True) == 0.2  # the call failed: no busy loop
    polling = Driver({}, Tokens({}, {}, {}), "127.0.0.1:1", "t", poll_s=0.2, idle_poll_s=1.0, long_poll_s=0)
    assert polling._next_wait(0.2, found=1, listed=1, failed=False) == 0.2
    assert polling._next_wait(0.2, found=0, listed=0, failed=False) == pytest.approx(0.3)  # backs off
    assert polling._next_wait(0.9, found=0, listed=0, failed=False) == 1.0  # up to idle_poll_s


class _Admin:
    """describe_topics answers from a script: first a topic the broker does not list yet, then leaderless
    partitions, then every partition led."""

    def __init__(self, answers: list[list[dict[str, object]]]) -> None:
        self.answers = answers
        self.calls = 0

    def describe_topics(self, names: list[str]) -> list[dict[str, object]]:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        return answer


def _topic(leaders: list[int], error: int = 0) -> list[dict[str, object]]:
    parts = [{"partition_index": i, "leader_id": leader} for i, leader in enumerate(leaders)]
    return [{"name": "t", "error_code": error, "partitions": parts}]


def test_the_raw_cost_per_hop_is_client_and_broker_cpu_per_record_consumed() -> None:
    from services.bench.raw import RawResult

    base = dict(
        hops_per_s=4000.0,
        produced=8000,
        consumed=8000,
        seconds=2.0,
        message_bytes=629.0,
        produce_per_s=4000.0,
        p50_ms=1.0,
        p99_ms=9.0,
        partitions=6,
    )
    r = RawResult(**base, client_cpu_s=1.5, broker_cpu_s=0.5)  # type: ignore[arg-type]
    assert r.cpu_ms_per_hop == pytest.approx(0.25)
    assert r.as_dict()["cpu_ms_per_hop"] == 0.25
    unknown_broker = RawResult(**base, client_cpu_s=1.5)  # type: ignore[arg-type]
    assert unknown_broker.cpu_ms_per_hop is None  # half the cost is not the cost
    assert unknown_broker.as_dict()["cpu_ms_per_hop"] is None


def test_the_raw_measurement_waits_until_every_partition_has_a_leader() -> None:
    from services.bench.raw import _wait_for_leaders

    n = 3
    admin = _Admin([_topic([], error=3), _topic([-1] * n), _topic([1] * (n - 1)), _topic([1] * n)])
    _wait_for_leaders(admin, "t", n, timeout_s=10)
    assert admin.calls == 4


def test_the_raw_measurement_gives_up_on_a_topic_that_never_gets_leaders() -> None:
    from services.bench.raw import _wait_for_leaders

    admin = _Admin([_topic([-1] * 2)])
    with pytest.raises(RuntimeError, match="without a leader"):
        _wait_for_leaders(admin, "t", 2, timeout_s=0.3)


# -- clean-up ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep", [False, True])
def test_a_run_deletes_its_topics_once_unless_asked_to_keep_them(
    keep: bool, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services.bench import harness
    from services.common import admin

    dropped: list[str] = []

    def drop(bootstrap: str, ns: str) -> list[str]:
        dropped.append(ns)
        return [f"{ns}.x"]

    monkeypatch.setattr(admin, "drop_namespace", drop)
    bench = harness.Bench(harness.Options(out_root=tmp_path, keep_topics=keep))
    bench.clean_up()
    bench.drop_topics()  # what run() does in its finally, after clean_up() kept the topics
    assert dropped == ([] if keep else [bench.ns])


def test_a_failed_run_deletes_its_topics_too(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.bench import harness
    from services.common import admin

    dropped: list[str] = []

    def drop(bootstrap: str, ns: str) -> list[str]:
        dropped.append(ns)
        return []

    monkeypatch.setattr(admin, "drop_namespace", drop)
    bench = harness.Bench(harness.Options(out_root=tmp_path))

    def fail() -> None:
        raise RuntimeError("the broker went away")

    monkeypatch.setattr(bench, "_run", fail)
    with pytest.raises(RuntimeError):
        bench.run()
    assert dropped == [bench.ns]


# -- stopping a run ------------------------------------------------------------------------------------------

_SIGTERM_DURING_A_RUN = """
import asyncio, os, signal, sys
import uvloop
from services.bench.__main__ import stop_on_sigterm

stop_on_sigterm()

async def main() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    await asyncio.sleep(60)

try:
    uvloop.run(main())
finally:
    print("services stopped", flush=True)
"""


def test_sigterm_stops_a_run_through_its_clean_up() -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _SIGTERM_DURING_A_RUN], capture_output=True, text=True, timeout=30, check=False
    )
    assert "services stopped" in proc.stdout, proc.stderr
    assert "KeyboardInterrupt" in proc.stderr


# -- the command line ----------------------------------------------------------------------------------------


class _Started(Exception):
    """Raised by a stand-in run: the options it was given are what the test looks at."""


@pytest.mark.parametrize("command", ["run", "soak"])
def test_the_command_line_hands_its_options_to_the_run(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from services.bench import __main__ as cli
    from services.bench.harness import Options

    given: list[Options] = []

    class Started:
        def __init__(self, options: Options, *rest: Any) -> None:
            given.append(options)

        def run(self) -> None:
            raise _Started

        run_soak = run

    monkeypatch.setattr(cli, "Bench", Started)
    monkeypatch.setattr(cli, "Soak", Started)
    monkeypatch.delenv("GRIDLOOP_KAFKA_BOOTSTRAP", raising=False)  # the option's default, not the test broker
    runner = CliRunner()
    assert isinstance(runner.invoke(cli.app, [command]).exception, _Started)
    shared = ["--poll-s", "0.5", "--idle-poll-s", "2", "--long-poll-s", "0", "--no-batch-actions", "--base-port"]
    shared += ["9100", "--bootstrap", "b:1", "--profile", "intake", "--profile", "dispatch", "--keep-db"]
    shared += ["--keep-topics"]
    own = ["--rates", "4,2", "--no-half"] if command == "run" else ["--minutes", "2"]
    assert isinstance(runner.invoke(cli.app, [command, *own, *shared]).exception, _Started)
    default, chosen = given
    loop = [
        "poll_s",
        "idle_poll_s",
        "long_poll_s",
        "batch_actions",
        "base_port",
        "bootstrap",
        "profile",
        "keep_db",
        "keep_topics",
    ]
    assert [getattr(default, name) for name in loop] == [getattr(Options(), name) for name in loop]
    expected = (0.5, 2.0, 0.0, False, 9100, "b:1", ("intake", "dispatch"), True, True)
    assert tuple(getattr(chosen, name) for name in loop) == expected
    if command == "run":
        assert (default.rates, default.half_step, chosen.rates, chosen.half_step) == (
            Options().rates,
            True,
            (2, 4),
            False,
        )
    else:
        assert (chosen.raw_s, chosen.refine) == (0.0, 1)


def test_the_driver_verifies_as_the_worker_dispatch_asks() -> None:
    """Under the ``assigned`` policy only the worker a task is asked of decides it: the driver's verifier of each
    grid is the one dispatch's rule picks for an incident the driver's reporter filed."""
    from datetime import UTC, datetime

    from schemas import GAOHANG
    from services.bench.driver import reporter_and_verifier
    from services.dispatch.domain import Case, verifier

    for code, grid in GAOHANG.grids.items():
        reporter, chosen = reporter_and_verifier(grid)
        case = Case("i", "c", "dispatched", "exposed_garbage", code, 0.0, 0.0, reporter, datetime.now(UTC))
        assert chosen == verifier(case, [], GAOHANG) != reporter
