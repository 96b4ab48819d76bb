/* 城运中心 live dashboard: reads opscenter's JSON API (same origin) every 5 s and draws it.
 *
 * Every figure has a stable hook for tests and scrapers:
 *   [data-kpi=NAME] / [data-kpi-prev=NAME]  tile values (text, raw number in data-value), "—" until loaded;
 *   #backlog-table tr[data-department=CODE] td[data-field=open|overdue|closure_rate];
 *   #overdue-table tr[data-work-order=ID];  #map path.incident-marker[data-incident=ID];
 *   #map .incident-cluster[data-cluster-count=N][data-cluster-overdue=N][data-cluster-escalated=N];
 *   #map[data-map-mode] is points | clusters (as the API answered for the map's view);
 *   #overdue-next[data-cursor] is the next page's cursor (absent on the last page), #overdue-first is enabled
 *   on a later page;
 *   #map-count, #overdue-count, #trend-reported-total, #trend-closed-total, #period-range, #updated-at;
 *   body[data-state] is loading | live | error, and #error-banner is shown while the API fails.
 * When a refresh fails, the figures of the last good one stay on screen under the error banner.
 *
 * The map asks for the open incidents of its view (zoom and box), again after each move: points where few are
 * in view, else clusters with their counts (a click zooms into one). The overdue list comes a page at a time;
 * the page shown is kept in the address (?overdue=<cursor>), as the period is (?period=).
 *
 * Where the API asks for a token, open the page as /#token=<token>: it is kept for the tab (sessionStorage),
 * taken out of the address bar, and sent as "Authorization: Bearer <token>" (never in a URL).
 *
 * The page runs under the services' Content Security Policy: scripts and styles from this origin only, nothing
 * inline. Styles that depend on the figures are set through element.style, never as a style attribute.
 */
(function () {
  "use strict";

  var REFRESH_MS = 5000;
  var FETCH_TIMEOUT_MS = 4500;
  var TREND_DAYS = 14;
  var OVERDUE_PAGE = 50;
  var MOVE_DEBOUNCE_MS = 250;
  var DASH = "\u2014";
  var PERIODS = ["day", "week", "month"];
  var TZ = "Asia/Shanghai";

  var TOKEN_KEY = "gridloop.opscenter.token";
  var token = takeToken();

  var state = {
    period: initialPeriod(),
    overdueCursor: initialCursor(),  // the overdue page shown (null: the first)
    incidentsAsked: 0,  // the map's requests of incidents, numbered: an older answer never replaces a newer one
    incidentsShown: 0,
    moveTimer: null,
    popupFor: null,     // an incident whose popup opens once its marker is drawn
    gen: 0,
    timer: null,
    last: {},          // last good answer of each endpoint
    lastOkAt: null,    // when every endpoint last answered
    map: null,
    gridLayer: null,
    markerLayer: null,
    markers: {},       // incident_id -> circle marker
    markerSig: null,
    fitted: false,
    chart: null,
  };

  // -- small helpers ------------------------------------------------------------------------------------

  function $(sel, root) { return (root || document).querySelector(sel); }
  function $all(sel, root) { return Array.prototype.slice.call((root || document).querySelectorAll(sel)); }

  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "text") el.textContent = v;
        else if (k === "className") el.className = v;
        // set through the CSSOM: a style attribute is inline style, which the page's CSP refuses
        else if (k === "style") Object.keys(v).forEach(function (p) { el.style[p] = v[p]; });
        else el.setAttribute(k, v === true ? "" : String(v));
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined) continue;
      el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return el;
  }

  function setText(sel, text) { var el = $(sel); if (el) el.textContent = text; }

  function takeToken() {
    var stored = null;
    try { stored = window.sessionStorage.getItem(TOKEN_KEY); } catch (e) { /* storage disabled */ }
    var m = /(?:^#|&)token=([^&]+)/.exec(window.location.hash);
    if (!m) return stored;
    var t = decodeURIComponent(m[1]);
    try { window.sessionStorage.setItem(TOKEN_KEY, t); } catch (e) { /* kept for this page only */ }
    window.history.replaceState(null, "", window.location.pathname + window.location.search);
    return t;
  }

  function headers(accept) {
    var hd = { Accept: accept };
    if (token) hd.Authorization = "Bearer " + token;
    return hd;
  }

  function initialCursor() {
    return new URLSearchParams(window.location.search).get("overdue") || null;
  }

  function initialPeriod() {
    var p = new URLSearchParams(window.location.search).get("period");
    return PERIODS.indexOf(p) >= 0 ? p : "day";
  }

  function fmtCount(n) { return n === null || n === undefined ? DASH : Number(n).toLocaleString("en-US"); }
  function fmtRate(r) { return r === null || r === undefined ? DASH : (r * 100).toFixed(1) + "%"; }

  var beijing = new Intl.DateTimeFormat("en-GB", {
    timeZone: TZ, year: "numeric", month: "2-digit", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false,
  });
  function beijingParts(d) {
    var o = {};
    beijing.formatToParts(d).forEach(function (p) { o[p.type] = p.value; });
    if (o.hour === "24") o.hour = "00";
    return o;
  }
  function fmtClock(d) {
    var p = beijingParts(d);
    return p.year + "-" + p.month + "-" + p.day + " " + p.hour + ":" + p.minute + ":" + p.second;
  }
  function fmtTime(d) { var p = beijingParts(d); return p.hour + ":" + p.minute + ":" + p.second; }

  function localDay(d) { var p = beijingParts(d); return p.year + "-" + p.month + "-" + p.day; }
  function fmtRange(period, start, end) {
    if (!start || !end) return DASH;
    var first = localDay(new Date(Date.parse(start))), last = localDay(new Date(Date.parse(end) - 1000));
    if (period === "day") return first;
    if (period === "month") return first.slice(0, 7);
    return first + " ~ " + last.slice(5);
  }

  function fmtDuration(s) {
    s = Math.max(0, Math.round(s));
    var d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return d + "天" + hh + "时";
    if (hh) return hh + "时" + m + "分";
    if (m) return m + "分" + (s % 60) + "秒";
    return s + "秒";
  }

  // -- fetching -----------------------------------------------------------------------------------------------

  // the JSON of path, with the answer's headers: {data, headers}
  function getJSON(path) {
    var ctl = typeof AbortController === "function" ? new AbortController() : null;
    var t = ctl ? setTimeout(function () { ctl.abort(); }, FETCH_TIMEOUT_MS) : null;
    return fetch(path, { cache: "no-store", headers: headers("application/json"), signal: ctl && ctl.signal })
      .then(function (r) {
        if (r.status === 401 || r.status === 403) {
          throw new Error(path.split("?")[0] + " \u2192 HTTP " + r.status +
            (token ? " (令牌无效或无权 token refused)" : " (需要令牌: 以 /#token=… 打开 · token needed: open as /#token=…)"));
        }
        if (!r.ok) throw new Error(path.split("?")[0] + " \u2192 HTTP " + r.status);
        return r.json().then(function (data) { return { data: data, headers: r.headers }; });
      }, function (e) {
        throw new Error(path.split("?")[0] + " \u2192 " + (e && e.name === "AbortError" ? "timeout" : "unreachable"));
      })
      .finally(function () { if (t) clearTimeout(t); });
  }

  function endpoints(period) {
    return {
      kpis: "/api/kpis?period=" + period + "&by=department",
      backlog: "/api/backlog",
      overdue: overduePath(),
      trend: "/api/trend?days=" + TREND_DAYS,
      grids: "/api/map/grids",
      incidents: "/api/map/incidents" + mapView(),
    };
  }

  function overduePath() {
    return "/api/overdue?limit=" + OVERDUE_PAGE +
      (state.overdueCursor ? "&cursor=" + encodeURIComponent(state.overdueCursor) : "");
  }

  // the map's zoom and box, once it has a view (before, the API chooses for the whole town)
  function mapView() {
    if (!state.map || !state.fitted) return "";
    var b = state.map.getBounds();
    var box = [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()].map(function (v, i) {
      return Math.max(i % 2 ? -90 : -180, Math.min(i % 2 ? 90 : 180, v)).toFixed(5);
    });
    return "?zoom=" + Math.max(0, Math.min(22, Math.round(state.map.getZoom()))) + "&bbox=" + box.join(",");
  }

  var RENDER = {
    kpis: function (d) { renderKpis(d); renderDepartments(); },
    backlog: function () { renderDepartments(); },
    overdue: function (d, hd) { renderOverdue(d, hd); },
    trend: function (d) { renderTrend(d); },
    grids: function (d) { renderGrids(d); },
    incidents: function (d, hd, asked) { renderIncidents(d, asked); },
  };

  function refresh(gen) {
    var urls = endpoints(state.period);
    var names = Object.keys(urls);
    var asked = ++state.incidentsAsked;
    return Promise.allSettled(names.map(function (n) { return getJSON(urls[n]); })).then(function (results) {
      if (gen !== state.gen) return;  // the period changed meanwhile: a newer refresh is on its way
      var failures = [];
      results.forEach(function (r, i) {
        if (r.status === "fulfilled") state.last[names[i]] = r.value.data;
        else failures.push(r.reason && r.reason.message ? r.reason.message : names[i] + " failed");
      });
      // render in a fixed order: grids before incidents, kpis after backlog
      ["grids", "incidents", "backlog", "kpis", "overdue", "trend"].forEach(function (n) {
        var i = names.indexOf(n);
        if (results[i].status !== "fulfilled") return;
        try {
          RENDER[n](results[i].value.data, results[i].value.headers, asked);
        } catch (e) {
          failures.push(n + ": " + (e && e.message ? e.message : e));
          if (window.console) console.error(e);
        }
      });
      if (failures.length) showError(failures);
      else showLive();
    });
  }

  function kick() {
    clearTimeout(state.timer);
    var gen = ++state.gen;
    refresh(gen).catch(function (e) { showError([String(e && e.message ? e.message : e)]); }).then(function () {
      if (gen === state.gen) state.timer = setTimeout(kick, REFRESH_MS);
    });
  }

  function showLive() {
    state.lastOkAt = new Date();
    document.body.setAttribute("data-state", "live");
    $("#error-banner").hidden = true;
    setText("#status-text", "实时 Live");
    setText("#updated-at", fmtTime(state.lastOkAt));
  }

  function showError(failures) {
    document.body.setAttribute("data-state", "error");
    var banner = $("#error-banner");
    banner.hidden = false;
    setText("#error-detail", summarize(failures));
    setText("#error-stale", state.lastOkAt
      ? "仍显示 " + fmtTime(state.lastOkAt) + " 的数据 · showing the figures of " + fmtTime(state.lastOkAt)
      : "暂无数据 · no figures yet");
    setText("#status-text", "中断 Offline");
  }

  // "/api/x → HTTP 500" × 6 reads better as one line
  function summarize(failures) {
    var total = Object.keys(endpoints(state.period)).length;
    var reasons = failures.map(function (f) { var i = f.indexOf(" \u2192 "); return i < 0 ? f : f.slice(i + 3); });
    var same = reasons.every(function (r) { return r === reasons[0]; });
    if (failures.length === total && same) return "全部 " + total + " 个接口 all " + total + " endpoints: " + reasons[0];
    return failures.join("; ");
  }

  // -- KPI tiles ----------------------------------------------------------------------------------------------

  function clearKpis() {
    $all("[data-kpi], [data-kpi-prev], [data-stat]").forEach(function (el) {
      el.textContent = DASH;
      el.removeAttribute("data-value");
      el.classList.remove("nonzero");
    });
    $all("[data-kpi-delta]").forEach(function (el) { el.textContent = ""; el.className = "delta"; });
    setText("#period-range", DASH);
    setText("#previous-range", DASH);
    $all("#backlog-table [data-field=closure_rate]").forEach(function (el) { el.textContent = DASH; });
  }

  function setFigure(el, value, kind) {
    el.textContent = kind === "rate" ? fmtRate(value) : fmtCount(value);
    if (value === null || value === undefined) el.removeAttribute("data-value");
    else el.setAttribute("data-value", String(value));
  }

  function renderKpis(report) {
    var cur = report.total.current, prev = report.total.previous;
    $all(".tile").forEach(function (tile) {
      var key = tile.getAttribute("data-tile"), kind = tile.getAttribute("data-kind");
      var good = tile.getAttribute("data-good");
      var v = cur[key], p = prev[key];
      var valueEl = $("[data-kpi=" + key + "]", tile);
      setFigure(valueEl, v, kind);
      setFigure($("[data-kpi-prev=" + key + "]", tile), p, kind);
      valueEl.classList.toggle("nonzero", kind === "count" && v > 0);
      var delta = $("[data-kpi-delta=" + key + "]", tile);
      delta.className = "delta";
      if (key === "overdue_open") {
        // a snapshot taken now: an earlier period has none to compare with
        delta.textContent = "实时 live";
        delta.classList.add("note");
        return;
      }
      if (v === null || v === undefined || p === null || p === undefined) { delta.textContent = ""; return; }
      var diff = v - p;
      var text;
      if (kind === "rate") text = Math.abs(diff * 100).toFixed(1) + "pt";
      else if (p > 0) text = Math.abs((diff / p) * 100).toFixed(1) + "%";
      else text = (diff >= 0 ? "+" : "\u2212") + Math.abs(diff);
      if (Math.abs(diff) < 1e-9) {
        delta.textContent = "持平";
        delta.classList.add("flat");
        return;
      }
      delta.textContent = (diff > 0 ? "\u25B2 " : "\u25BC ") + text;
      delta.classList.add(good === "neutral" ? "neutral" : (diff > 0) === (good === "up") ? "good" : "bad");
    });
    setText("#period-range", fmtRange(report.period, report.start, report.end));
    setText("#previous-range", fmtRange(report.period, report.previous_start, report.previous_end));
    $all("[data-stat]").forEach(function (el) {
      var path = el.getAttribute("data-stat").split("."), stat = cur[path[0]];
      var v = stat ? stat[path[1]] : null;
      if (v === null || v === undefined) {
        el.textContent = DASH;
        el.removeAttribute("data-value");
      } else {
        el.textContent = path[1] === "count" ? fmtCount(v) : fmtDuration(v);
        el.setAttribute("data-value", String(v));
      }
    });
  }

  // -- departments: backlog (now) with the period's closure rate ---------------------------------------------

  function renderDepartments() {
    var backlog = state.last.backlog;
    if (!backlog) return;
    var kpis = state.last.kpis && state.last.kpis.period === state.period ? state.last.kpis : null;
    var rate = {};
    if (kpis) kpis.rows.forEach(function (r) { rate[r.key] = r.current.closure_rate; });
    var rows = backlog.slice().sort(function (a, b) { return b.overdue - a.overdue || b.open - a.open; });
    var max = Math.max(1, Math.max.apply(null, rows.map(function (r) { return r.open; })));
    var tbody = $("#backlog-table tbody");
    var frag = document.createDocumentFragment();
    var openTotal = 0, overdueTotal = 0;
    rows.forEach(function (r) {
      openTotal += r.open;
      overdueTotal += r.overdue;
      var bar = h("div", { className: "bar" },
        h("i", { className: "open", style: { width: (100 * r.open / max).toFixed(1) + "%" } }),
        h("i", { className: "overdue", style: { width: (100 * r.overdue / max).toFixed(1) + "%" } }));
      var cr = kpis ? rate[r.department_code] : undefined;
      frag.appendChild(h("tr", { "data-department": r.department_code },
        h("td", null, h("div", { className: "dept-name" }, r.name_zh, h("small", { text: r.name_en })), bar),
        h("td", { className: "num" + (r.open ? "" : " zero"), "data-field": "open", "data-value": r.open }, fmtCount(r.open)),
        h("td", { className: "num" + (r.overdue ? " hot" : " zero"), "data-field": "overdue", "data-value": r.overdue },
          fmtCount(r.overdue)),
        h("td", { className: "num", "data-field": "closure_rate", "data-value": cr === undefined || cr === null ? null : cr },
          kpis ? fmtRate(cr === undefined ? null : cr) : DASH)));
    });
    tbody.replaceChildren(frag);
    setText("#backlog-open-total", fmtCount(openTotal));
    setText("#backlog-overdue-total", fmtCount(overdueTotal));
  }

  // -- overdue work orders ------------------------------------------------------------------------------------

  function gridName(id) {
    var g = state.last.grids;
    if (!id) return "\u7F51\u683C\u5916";  // outside every grid
    if (g) {
      for (var i = 0; i < g.features.length; i++) {
        if (g.features[i].properties.grid_id === id) return g.features[i].properties.name_zh;
      }
    }
    return id;
  }

  // GL20261124-8133C4B907D4-1 -> 8133C4B907D4-1: the day is on screen already
  function shortId(id) {
    var m = /^[A-Z]{1,4}\d{8}-(.+)$/.exec(id);
    return m ? m[1] : id.length > 14 ? "\u2026" + id.slice(-13) : id;
  }

  function renderOverdue(list, hd) {
    var total = hd && hd.get("X-Total-Count");
    var next = hd && hd.get("X-Next-Cursor");
    setText("#overdue-count", fmtCount(total === null || total === undefined ? list.length : Number(total)));
    var nextButton = $("#overdue-next");
    nextButton.disabled = !next;
    if (next) nextButton.setAttribute("data-cursor", next);
    else nextButton.removeAttribute("data-cursor");
    $("#overdue-first").disabled = !state.overdueCursor;
    setText("#overdue-page", (state.overdueCursor ? "续页 later page" : "首页 first page") + " \u00B7 " +
      fmtCount(list.length) + " 件");
    var tbody = $("#overdue-table tbody");
    if (!list.length) {
      tbody.replaceChildren(h("tr", { className: "empty" },
        h("td", { colspan: 5 }, state.overdueCursor ? "本页已无超期工单 · nothing overdue on this page any more"
          : "暂无超期工单 · no overdue work orders")));
      return;
    }
    var frag = document.createDocumentFragment();
    list.forEach(function (o) {
      var tr = h("tr", { "data-work-order": o.work_order_id, "data-incident": o.incident_id },
        h("td", { className: "wo", title: o.work_order_id }, shortId(o.work_order_id),
          h("small", { text: "事件 " + shortId(o.incident_id) })),
        h("td", null, o.department_zh, h("small", { text: o.category_zh })),
        h("td", null, gridName(o.grid_id), h("small", { text: o.grid_id || "" })),
        h("td", { className: "num late" + (o.overdue_s >= 86400 ? " severe" : ""), "data-field": "overdue_s",
          "data-value": o.overdue_s }, fmtDuration(o.overdue_s)),
        h("td", null,
          o.escalated ? h("span", { className: "badge escalated" }, "已升级") : null,
          o.reminded ? h("span", { className: "badge reminded" }, "已催办") : null,
          !o.escalated && !o.reminded ? h("span", { className: "badge none" }, "待催办") : null));
      tr.addEventListener("click", function () { focusIncident(o.incident_id, o.lat, o.lon); });
      frag.appendChild(tr);
    });
    tbody.replaceChildren(frag);
  }

  // -- trend chart ---------------------------------------------------------------------------------------------

  function chartSize() {
    var el = $("#trend-chart");
    return { width: Math.max(200, el.clientWidth), height: Math.max(120, el.clientHeight) };
  }

  function renderTrend(points) {
    var xs = points.map(function (p) { return Date.parse(p.date + "T00:00:00Z") / 1000; });
    var rep = points.map(function (p) { return p.reported; });
    var clo = points.map(function (p) { return p.closed; });
    var sum = function (a) { return a.reduce(function (s, v) { return s + v; }, 0); };
    setText("#trend-reported-total", fmtCount(sum(rep)));
    setText("#trend-closed-total", fmtCount(sum(clo)));
    var data = [xs, rep, clo];
    if (typeof uPlot !== "function") throw new Error("chart library not loaded");
    if (state.chart) { state.chart.setData(data); return; }
    var axis = {
      stroke: "#9fb4cc",
      font: "11px 'Noto Sans CJK SC', 'DejaVu Sans', sans-serif",
      grid: { stroke: "rgba(40, 80, 125, .45)", width: 1 },
      ticks: { stroke: "rgba(40, 80, 125, .8)", width: 1, size: 4 },
    };
    var size = chartSize();
    var opts = {
      width: size.width,
      height: size.height,
      tzDate: function (ts) { return uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"); },
      legend: { show: false },
      cursor: { drag: { x: false, y: false }, points: { size: 7 } },
      scales: { x: { time: true }, y: { range: function (u, min, max) { return [0, Math.max(4, Math.ceil(max * 1.15))]; } } },
      axes: [
        Object.assign({}, axis, {
          space: 44,
          values: function (u, vals) {
            return vals.map(function (v) { return new Date(v * 1000).toISOString().slice(5, 10); });
          },
        }),
        Object.assign({}, axis, { size: 38, incrs: [1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000] }),
      ],
      series: [
        {},
        { label: "上报 Reported", stroke: "#2fd3ff", width: 2, fill: "rgba(47, 211, 255, .10)", points: { size: 5 } },
        { label: "结案 Closed", stroke: "#34d399", width: 2, points: { size: 5 } },
      ],
    };
    state.chart = new uPlot(opts, data, $("#trend-chart"));
  }

  // -- map (风险一张图): grid polygons and open incidents, no tile server ------------------------------------------

  function ensureMap() {
    if (state.map) return state.map;
    if (typeof L !== "object") throw new Error("map library not loaded");
    var map = L.map("map", { zoomSnap: 0.25, zoomDelta: 0.5, attributionControl: true, minZoom: 11, maxZoom: 18 });
    map.attributionControl.setPrefix("Leaflet · 高行镇网格 Gaohang grid cells");
    var legend = L.control({ position: "topright" });
    legend.onAdd = function () {
      var div = L.DomUtil.create("div", "map-legend");
      div.innerHTML =
        '<div><i class="normal"></i>在办 open</div>' +
        '<div><i class="overdue"></i>超期 overdue</div>' +
        '<div><i class="escalated"></i>已升级 escalated</div>' +
        '<div><i class="big"></i>大事联动 big incident</div>' +
        '<div><i class="cluster"></i>聚合 cluster (count)</div>' +
        '<div><span class="scale"></span>网格在办量 open per grid</div>';
      return div;
    };
    legend.addTo(map);
    state.markerLayer = L.layerGroup().addTo(map);
    state.map = map;
    map.on("moveend", function () { if (state.fitted) mapMoved(); });
    return map;
  }

  function gridStyle(open, max) {
    return {
      color: "#2fd3ff", weight: 1.2, opacity: 0.75, dashArray: null,
      fillColor: "#2fd3ff", fillOpacity: 0.04 + 0.4 * (max ? open / max : 0),
    };
  }

  function gridLabel(p) {
    return escapeHtml(p.name_zh) + ' <span class="g-code">' + escapeHtml(p.grid_id) + "</span>" +
      '<span class="g-open" data-grid-open="' + escapeHtml(p.grid_id) + '">在办 ' + Number(p.open) + "</span>";
  }

  function renderGrids(fc) {
    var map = ensureMap();
    var max = Math.max.apply(null, [0].concat(fc.features.map(function (f) { return f.properties.open; })));
    if (state.gridLayer) map.removeLayer(state.gridLayer);
    state.gridLayer = L.geoJSON(fc, {
      interactive: false,
      className: "grid-cell",
      style: function (f) { return gridStyle(f.properties.open, max); },
    });
    if (!state.fitted && fc.features.length) {
      // the map draws nothing before it has a view; then the incidents are those of the view
      map.fitBounds(state.gridLayer.getBounds(), { padding: [14, 14], animate: false });
      state.fitted = true;
      mapMoved();
    }
    state.gridLayer.addTo(map);
    state.gridLayer.eachLayer(function (layer) {
      var el = layer.getElement && layer.getElement();
      if (el) el.setAttribute("data-grid", layer.feature.properties.grid_id);
    });
    state.gridLayer.bringToBack();
    // labels along the top edge of each cell, leaving its middle to the incidents
    if (state.labelLayer) map.removeLayer(state.labelLayer);
    state.labelLayer = L.layerGroup(fc.features.map(function (f) {
      var b = L.geoJSON(f).getBounds();
      return L.tooltip({ permanent: true, direction: "bottom", className: "grid-label", offset: [0, 2], interactive: false })
        .setLatLng([b.getNorth(), b.getCenter().lng])
        .setContent(gridLabel(f.properties));
    })).addTo(map);
  }

  function markerLook(p) {
    var colour = p.escalated ? "#ff3b5c" : p.overdue ? "#ffb020" : "#2fd3ff";
    return {
      radius: p.big ? 9 : 6,
      color: p.big ? "#b57bff" : colour,
      weight: p.big ? 3 : 1.5,
      fillColor: colour,
      fillOpacity: p.escalated || p.overdue ? 0.75 : 0.55,
      className: "incident-marker" + (p.escalated ? " escalated" : p.overdue ? " overdue" : " normal") +
        (p.big ? " big" : ""),
    };
  }

  function popupHtml(p) {
    var flags = [];
    if (p.big) flags.push("大事联动");
    if (p.overdue) flags.push("超期");
    if (p.escalated) flags.push("已升级");
    return "<b>" + escapeHtml(p.category_zh) + "</b> · " + escapeHtml(gridName(p.grid_id)) +
      '<br><span class="pid">' + escapeHtml(p.incident_id) + "</span>" +
      "<br>状态 " + escapeHtml(p.status) + (flags.length ? " · " + escapeHtml(flags.join(" / ")) : "") +
      "<br>上报 " + escapeHtml(fmtClock(new Date(p.reported_at))) + " 北京时间";
  }

  function renderIncidents(fc, asked) {
    ensureMap();
    if (asked < state.incidentsShown) return;  // a newer view's answer is on screen already
    state.incidentsShown = asked;
    var features = fc.features.slice();
    var clusters = fc.mode === "clusters";
    setText("#map-count", fmtCount(typeof fc.total === "number" ? fc.total : features.length));
    setText("#map-mode", clusters ? "聚合 clustered \u00B7 " : "");
    $("#map").setAttribute("data-map-mode", clusters ? "clusters" : "points");
    var sig = JSON.stringify([fc.mode].concat(features.map(function (f) {
      var p = f.properties;
      return (clusters ? [p.count, p.overdue, p.escalated, p.big] : [p.incident_id, p.status, p.overdue, p.escalated,
        p.grid_id]).concat(f.geometry.coordinates);
    })));
    if (sig === state.markerSig) return openPendingPopup();  // unchanged: keep markers (and any open popup)
    state.markerSig = sig;
    var rank = function (p) { return p.escalated ? 2 : p.overdue ? 1 : 0; };
    features.sort(function (a, b) { return rank(a.properties) - rank(b.properties); });  // worst drawn on top
    state.markerLayer.clearLayers();
    state.markers = {};
    if (!state.fitted && features.length) {
      // no grid cells yet (their request failed): frame the incidents instead, until the cells come
      state.map.fitBounds(L.geoJSON(fc).getBounds(), { padding: [24, 24], animate: false, maxZoom: 15 });
    }
    if (clusters) {
      features.sort(function (a, b) { return a.properties.count - b.properties.count; });  // big ones on top
      features.forEach(drawCluster);
      return;
    }
    features.forEach(function (f) {
      var p = f.properties, c = f.geometry.coordinates;
      var m = L.circleMarker([c[1], c[0]], markerLook(p)).bindPopup(popupHtml(p));
      state.markerLayer.addLayer(m);
      var el = m.getElement && m.getElement();
      if (el) el.setAttribute("data-incident", p.incident_id);
      state.markers[p.incident_id] = m;
    });
    openPendingPopup();
  }

  // a cluster: a circle sized by its count, coloured by its worst; a click zooms into its cell
  function drawCluster(f) {
    var p = f.properties, c = f.geometry.coordinates;
    var d = Math.round(Math.min(56, 22 + 7 * Math.log10(1 + p.count) * 2));
    var look = p.escalated ? " escalated" : p.overdue ? " overdue" : " normal";
    var icon = L.divIcon({
      className: "incident-cluster" + look,
      html: "<span>" + escapeHtml(fmtCount(p.count)) + "</span>",
      iconSize: [d, d],
    });
    var m = L.marker([c[1], c[0]], { icon: icon, keyboard: false, title: "" })
      .bindTooltip("在办 " + fmtCount(p.count) + " · 超期 " + fmtCount(p.overdue) + " · 已升级 " + fmtCount(p.escalated) +
        (p.big ? " · 大事 " + fmtCount(p.big) : ""), { direction: "top", offset: [0, -d / 2] });
    m.on("click", function () {
      var b = p.bbox;
      state.map.fitBounds([[b[1], b[0]], [b[3], b[2]]], { animate: false, maxZoom: 18 });
    });
    state.markerLayer.addLayer(m);
    var el = m.getElement && m.getElement();
    if (el) {
      el.setAttribute("data-cluster-count", p.count);
      el.setAttribute("data-cluster-overdue", p.overdue);
      el.setAttribute("data-cluster-escalated", p.escalated);
    }
  }

  // the open incidents of the map's view, asked again after it moved (the other figures wait for the refresh)
  function loadIncidents() {
    var asked = ++state.incidentsAsked;
    getJSON("/api/map/incidents" + mapView()).then(function (r) {
      state.last.incidents = r.data;
      renderIncidents(r.data, asked);
    }, function (e) { showError([String(e && e.message ? e.message : e)]); });
  }

  function mapMoved() {
    clearTimeout(state.moveTimer);
    state.moveTimer = setTimeout(loadIncidents, MOVE_DEBOUNCE_MS);
  }

  function openPendingPopup() {
    var m = state.popupFor && state.markers[state.popupFor];
    if (m) {
      m.openPopup();
      state.popupFor = null;
    }
  }

  function focusIncident(id, lat, lon) {
    if (!state.map) return;
    state.popupFor = id;  // its marker may come with the new view's answer
    state.map.setView([lat, lon], Math.max(state.map.getZoom(), 15), { animate: false });
    openPendingPopup();
  }

  function escapeHtml(s) {
    return String(s === null || s === undefined ? "" : s).replace(/[&<>"']/g, function (ch) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[ch];
    });
  }

  // -- controls ------------------------------------------------------------------------------------------------

  function applyPeriod(period, userChange) {
    state.period = period;
    $all("#period-selector button").forEach(function (b) {
      var on = b.getAttribute("data-period") === period;
      b.classList.toggle("active", on);
      b.setAttribute("aria-pressed", on ? "true" : "false");
    });
    $("#csv-link").setAttribute("href", "/api/kpis.csv?period=" + period + "&by=department");
    if (userChange) {
      var url = new URL(window.location.href);
      url.searchParams.set("period", period);
      window.history.replaceState(null, "", url.toString());
      clearKpis();
      kick();
    }
  }

  // with a token the CSV is fetched with it (a plain link cannot send the header)
  function downloadCsv(ev) {
    if (!token) return;
    ev.preventDefault();
    var href = $("#csv-link").getAttribute("href");
    fetch(href, { cache: "no-store", headers: headers("text/csv") }).then(function (r) {
      if (!r.ok) throw new Error("/api/kpis.csv \u2192 HTTP " + r.status);
      var cd = r.headers.get("Content-Disposition") || "";
      var name = (/filename="([^"]+)"/.exec(cd) || [])[1] || "gridloop-kpis.csv";
      return r.blob().then(function (blob) {
        var url = URL.createObjectURL(blob);
        var a = h("a", { href: url, download: name });
        document.body.appendChild(a);
        a.click();
        a.remove();
        setTimeout(function () { URL.revokeObjectURL(url); }, 10000);
      });
    }).catch(function (e) { showError([String(e && e.message ? e.message : e)]); });
  }

  // another page of the overdue list, kept in the address; the rest of the page waits for its refresh
  function showOverduePage(cursor) {
    state.overdueCursor = cursor;
    var url = new URL(window.location.href);
    if (cursor) url.searchParams.set("overdue", cursor);
    else url.searchParams.delete("overdue");
    window.history.replaceState(null, "", url.toString());
    getJSON(overduePath()).then(function (r) {
      if (cursor !== state.overdueCursor) return;  // another page was asked for meanwhile
      state.last.overdue = r.data;
      renderOverdue(r.data, r.headers);
      $("#overdue-table").parentNode.scrollTop = 0;
    }, function (e) { showError([String(e && e.message ? e.message : e)]); });
  }

  function tickClock() { setText("#clock", fmtClock(new Date())); }

  function start() {
    $all("#period-selector button").forEach(function (b) {
      b.addEventListener("click", function () {
        var p = b.getAttribute("data-period");
        if (p !== state.period) applyPeriod(p, true);
      });
    });
    $("#csv-link").addEventListener("click", downloadCsv);
    $("#overdue-next").addEventListener("click", function () {
      var next = $("#overdue-next").getAttribute("data-cursor");
      if (next) showOverduePage(next);
    });
    $("#overdue-first").addEventListener("click", function () { showOverduePage(null); });
    applyPeriod(state.period, false);
    tickClock();
    setInterval(tickClock, 1000);
    window.addEventListener("resize", function () {
      if (state.chart) state.chart.setSize(chartSize());
    });
    try { ensureMap(); } catch (e) { /* reported by the first refresh */ }
    kick();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
