// llmproxy status page: follows /status/events and redraws the panels.
(function () {
  "use strict";
  var W = 300, KINDS = ["input", "cached_input", "output", "reasoning"];
  var CHARTS = [["rps", [1]], ["err", [2]], ["lat", [3, 4]], ["ttfb", [5, 6]]];
  var first = JSON.parse(document.getElementById("snapshot").textContent);
  var history = first.history || [];
  var $ = function (id) { return document.getElementById(id); };
  function e(v) {
    return String(v).replace(/[&<>"']/g, function (c) { return "&#" + c.charCodeAt(0) + ";"; });
  }
  function ms(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return (s * 1000).toFixed(s >= 0.01 ? 0 : 1) + " ms";
    return s.toFixed(2) + " s";
  }
  function ago(s) {
    if (s === null || s === undefined) return "–";
    if (s < 120) return s.toFixed(0) + "s";
    if (s < 7200) return (s / 60).toFixed(0) + "m";
    return (s / 3600).toFixed(1) + "h";
  }
  function usd(x) { return x ? "$" + x.toFixed(6).replace(/\.?0+$/, "") : "$0"; }
  function pct(r) { return r === null || r === undefined ? "–" : (r * 100).toFixed(1) + "%"; }
  function size(n) {
    if (n === null || n === undefined) return "–";
    var u = ["B", "KiB", "MiB", "GiB"], i = 0;
    while (n >= 1024 && i < 3) { n /= 1024; i++; }
    return i ? n.toFixed(1) + " " + u[i] : n + " B";
  }
  function facts(pairs) {
    return "<dl>" + pairs.map(function (p) { return "<dt>" + e(p[0]) + "</dt><dd>" + p[1] + "</dd>"; }).join("") + "</dl>";
  }
  function table(head, rows, empty) {
    if (!rows.length) rows = ['<tr><td colspan="' + head.length + '" class="none">' + empty + "</td></tr>"];
    return "<table><thead><tr>" + head.map(function (h) { return "<th>" + h + "</th>"; }).join("") +
      "</tr></thead><tbody>" + rows.join("") + "</tbody></table>";
  }
  function targets(rows) {
    return table(["Model", "Upstream/model", "State", "In flight", "TTFB (EWMA)", "Fails", "Last error"],
      rows.map(function (r) {
        var where = e(r.upstream) + "/" + e(r.upstream_model);
        var state = r.state === "cooling" ? "cooling " + r.cooling_left.toFixed(0) + "s" : r.state;
        var err = r.last_error ? e(r.last_error) + " <small>" + ago(r.last_error_ago) + " ago</small>" : "–";
        return '<tr class="' + e(r.state) + '" data-target="' + where + '"><td>' + e(r.model) + "</td><td>" + where +
          '</td><td class="state">' + e(state) + "</td><td>" + r.inflight + "</td><td>" + ms(r.ttfb_ewma) +
          "</td><td>" + r.failures + "</td><td>" + err + "</td></tr>";
      }), "no targets");
  }
  function cache(c) {
    var skipped = Object.keys(c.skipped).sort().map(function (k) { return e(k) + ": " + c.skipped[k]; }).join(", ");
    return facts([["Hit ratio", pct(c.hit_ratio)], ["Hits / misses", c.hits + " / " + c.misses],
      ["Entries", c.entries === null ? "–" : c.entries], ["Bytes", size(c.bytes)], ["Stores", c.stores],
      ["Coalesced", c.coalesced], ["Skipped", skipped || "none"]]);
  }
  function keys(rows) {
    return table(["Key", "Requests", "Input", "Cached", "Output", "Reasoning", "Cost", "Budget", "Headroom"],
      rows.map(function (r) {
        var b = r.budget ? usd(r.budget.spent_usd) + " / " + usd(r.budget.usd) : "–";
        var h = ["requests", "tokens"].filter(function (u) { return r.headroom[u]; }).map(function (u) {
          return u[0] + "pm " + r.headroom[u][0] + "/" + r.headroom[u][1];
        }).join(" · ") || "–";
        return '<tr data-key="' + e(r.name) + '"><td>' + e(r.name || "(none)") + '</td><td class="requests">' +
          r.requests + "</td>" + KINDS.map(function (k) { return '<td class="' + k + '">' + r.tokens[k] + "</td>"; }).join("") +
          '<td class="cost">' + usd(r.cost_usd) + "</td><td>" + b + "</td><td>" + h + "</td></tr>";
      }), "no keys");
  }
  function proc(p) {
    return facts([["Version", e(p.version)], ["Config", e(p.config)], ["Loaded", ago(p.loaded_ago) + " ago"],
      ["Uptime", ago(p.uptime)], ["Worker", p.worker + " (pid " + p.pid + ")"], ["Workers", e(p.workers.join(", "))],
      ["In flight", p.inflight], ["Redis", e(p.redis)]]);
  }
  function series(col, last) {
    var by = {}, out = [];
    history.forEach(function (r) { by[r[0]] = r; });
    for (var t = last - W + 1; t <= last; t++) {
      var r = by[t];
      out.push(!r ? 0 : col === 2 ? (r[1] ? r[2] / r[1] : 0) : (r[col] || 0));
    }
    return out;
  }
  function charts(last) {
    CHARTS.forEach(function (c) {
      var fig = $("c-" + c[0]), lines = fig.querySelectorAll("polyline");
      var all = c[1].map(function (col) { return series(col, last); });
      var top = Math.max.apply(null, [0].concat.apply([], all));
      all.forEach(function (s, i) {
        lines[i].setAttribute("points", s.map(function (v, x) {
          return x + "," + (top ? 58 - v / top * 56 : 58).toFixed(1);
        }).join(" "));
      });
      fig.querySelector(".max").textContent = "max " + (c[0] === "err" ? pct(top) : c[0] === "rps" ? top : ms(top));
    });
  }
  function traffic(t) {
    var last = t.last;
    if (last[1] && (!history.length || history[history.length - 1][0] < last[0])) history.push(last);
    while (history.length && history[0][0] <= last[0] - W) history.shift();
    $("traffic").querySelector("dl").outerHTML = facts([["Requests (5 min)", t.requests], ["Requests/s", t.rps.toFixed(2)],
      ["Error rate (5xx)", pct(t.error_rate)], ["Latency p50 / p95", ms(t.p50) + " / " + ms(t.p95)],
      ["TTFB p50 / p95", ms(t.ttfb_p50) + " / " + ms(t.ttfb_p95)]]);
    charts(last[0]);
  }
  function show(s) {
    if (s.history) history = s.history;
    traffic(s.traffic);
    $("targets").querySelector(".body").innerHTML = targets(s.targets);
    $("cache").querySelector(".body").innerHTML = cache(s.cache);
    $("keys").querySelector(".body").innerHTML = keys(s.keys);
    $("process").querySelector(".body").innerHTML = proc(s.process);
    $("from").textContent = "worker " + s.worker.index + " · pid " + s.worker.pid;
    $("live").textContent = "live · " + new Date(s.now * 1000).toLocaleTimeString();
  }
  function down() { $("banner").hidden = false; $("live").textContent = "disconnected"; }
  function connect() {
    var source = new EventSource(location.pathname.replace(/\/?$/, "/events"));
    source.onopen = function () { $("banner").hidden = true; };
    source.onmessage = function (m) { $("banner").hidden = true; show(JSON.parse(m.data)); };
    source.addEventListener("bye", down);
    source.onerror = function () {
      down();
      if (source.readyState === EventSource.CLOSED) setTimeout(connect, 2000);  // e.g. nginx's 502
    };
  }
  show(first);
  connect();
})();
