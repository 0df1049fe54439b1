"""
The live status page: ``GET /status``, an HTML page of what the gateway is
doing (traffic, targets, cache, keys, the process), and ``GET
/status/events``, the server-sent events that keep it live: one compact JSON
snapshot a second.  Both are guarded as ``/stats`` is (a snapshot *is* a
``/stats`` document, with more), and both show names only, never a key.

The page is rendered here, whole, from the current snapshot, so it reads as a
static page with JavaScript off; ``static/status.js`` (a few KB, no framework)
then follows the event stream, redraws the tables and the inline SVG charts,
reconnects on its own and says "disconnected" while the proxy is away.

What lasts for the process (:class:`Board`, one per site): the traffic of
the last five minutes, one sample a second in a ring (fed by the site's
request observer, which it wraps), each key's last rate-limit headers, and
when the process started.  Each config applied makes a new :class:`StatusView`
over its own :class:`~llmproxy.operations.Operations`; a stream always reads
the view in force, so it follows a reload.  A stream ends when its client
goes, when the site drains (shutdown), or when a reload no longer lets its
caller in.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os
import re
import weakref
from base64 import b64encode
from collections import Counter
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from llmproxy import __version__, errors
from llmproxy.metrics import USAGE_KINDS
from llmproxy.operations import Caller, Operations
from llmproxy.redisclient import RedisUnavailable
from llmproxy.relay import SSE_HEADERS
from llmproxy.site import GatewayRequest, GatewaySite, RequestObserver, RequestSink

#: Seconds of traffic kept, one sample each.
WINDOW = 300
#: The operator's own requests (and the status page's): not traffic.
OPERATOR_ENDPOINTS = frozenset(
    {
        "health",
        "health/live",
        "health/ready",
        "stats",
        "metrics",
        "cache",
        "admin/reload",
        "status",
        "status/events",
    }
)
#: Latency buckets: each 5% wider than the one before, from 0.1 ms.
_BASE, _RATIO = 1e-4, 1.05


def _bucket(seconds: float) -> int:
    return max(0, int(math.log(max(seconds, _BASE) / _BASE, _RATIO)))


def _seconds(bucket: int) -> float:
    """A bucket's middle (geometric)."""
    return _BASE * _RATIO ** (bucket + 0.5)


def quantile(counts: Mapping[int, int], q: float) -> float | None:
    """The ``q`` quantile of bucketed durations (within 5%); None with none."""
    total = sum(counts.values())
    if not total:
        return None
    rank = q * total
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            return round(_seconds(bucket), 6)
    return round(_seconds(max(counts)), 6)  # pragma: no cover - rank <= total


class Second:
    """One second's client requests: how many, how many failed (5xx), their timings."""

    __slots__ = ("at", "requests", "errors", "latency", "ttfb")

    def __init__(self, at: int) -> None:
        self.at = at
        self.requests = 0
        self.errors = 0
        self.latency: Counter[int] = Counter()
        self.ttfb: Counter[int] = Counter()

    def row(self) -> list[Any]:
        """``[second, requests, errors, p50, p95, ttfb p50, ttfb p95]`` (the charts' unit)."""
        return [
            self.at,
            self.requests,
            self.errors,
            quantile(self.latency, 0.5),
            quantile(self.latency, 0.95),
            quantile(self.ttfb, 0.5),
            quantile(self.ttfb, 0.95),
        ]


class Traffic:
    """The last :data:`WINDOW` seconds of client requests, one :class:`Second` each, in a ring."""

    def __init__(self) -> None:
        self._ring: list[Second | None] = [None] * WINDOW

    def add(self, now: float, status: int, duration: float, ttfb: float) -> None:
        at = int(now)
        second = self._ring[at % WINDOW]
        if second is None or second.at != at:
            second = self._ring[at % WINDOW] = Second(at)
        second.requests += 1
        second.errors += status >= 500
        second.latency[_bucket(duration)] += 1
        second.ttfb[_bucket(ttfb)] += 1

    def second(self, at: int) -> Second:
        found = self._ring[at % WINDOW]
        return found if found is not None and found.at == at else Second(at)

    def history(self, now: float) -> list[list[Any]]:
        """The complete seconds of the window that had requests, oldest first."""
        last = int(now) - 1
        seconds = (self.second(at) for at in range(last - WINDOW + 1, last + 1))
        return [s.row() for s in seconds if s.requests]

    def summary(self, now: float) -> dict[str, Any]:
        """The window at a glance, and its last complete second."""
        last = int(now) - 1
        seconds = [self.second(at) for at in range(last - WINDOW + 1, last + 1)]
        latency: Counter[int] = Counter()
        ttfb: Counter[int] = Counter()
        for s in seconds:
            latency.update(s.latency)
            ttfb.update(s.ttfb)
        requests = sum(s.requests for s in seconds)
        failed = sum(s.errors for s in seconds)
        return {
            "requests": requests,
            "rps": round(requests / WINDOW, 3),
            "error_rate": round(failed / requests, 4) if requests else 0.0,
            "p50": quantile(latency, 0.5),
            "p95": quantile(latency, 0.95),
            "ttfb_p50": quantile(ttfb, 0.5),
            "ttfb_p95": quantile(ttfb, 0.95),
            "last": seconds[-1].row(),
        }


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def go_duration(text: str) -> float:
    """``1m30s`` (as ``x-ratelimit-reset-*`` say it) in seconds."""
    return sum(float(n) * _UNIT[u] for n, u in _DURATION.findall(text))


class Headroom:
    """What each rate-limited key had left at its last admission (its ``x-ratelimit-*``)."""

    def __init__(self) -> None:
        # key name -> unit -> (remaining, limit, when it is whole again)
        self._seen: dict[str, dict[str, tuple[int, int, float]]] = {}

    def saw(self, key: str, headers: Mapping[str, str], now: float) -> None:
        for unit in ("requests", "tokens"):
            limit = headers.get(f"x-ratelimit-limit-{unit}")
            remaining = headers.get(f"x-ratelimit-remaining-{unit}")
            if limit is None or remaining is None:
                continue
            reset = go_duration(headers.get(f"x-ratelimit-reset-{unit}", ""))
            try:
                self._seen.setdefault(key, {})[unit] = (int(remaining), int(limit), now + reset)
            except ValueError:
                continue

    def of(self, key: str, now: float) -> dict[str, list[int]]:
        """``{unit: [remaining, limit]}``; the whole limit once its window has emptied."""
        return {
            unit: [limit if now >= whole else remaining, limit]
            for unit, (remaining, limit, whole) in self._seen.get(key, {}).items()
        }


class Board:
    """
    What the status page keeps for the process: the traffic, the keys'
    headroom, when the process started, and the :class:`StatusView` in force.
    One per site, made by the first view (see :meth:`of`).
    """

    _boards: weakref.WeakKeyDictionary[GatewaySite, Board] = weakref.WeakKeyDictionary()

    def __init__(self, site: GatewaySite, started: float) -> None:
        self.site = site
        self.started = started
        self.traffic = Traffic()
        self.headroom = Headroom()
        self.view: StatusView | None = None
        site.observer = _Observer(site.observer, self)

    @classmethod
    def of(cls, site: GatewaySite, now: float) -> Board:
        """The site's board (made, and its observer wrapped, the first time)."""
        board = cls._boards.get(site)
        if board is None:
            board = cls._boards[site] = Board(site, now)
        return board

    def finished(self, request: GatewayRequest, lost: bool) -> None:
        """A request is over: count it, and note its key's rate-limit headers."""
        if request.endpoint in OPERATOR_ENDPOINTS:
            return
        now = request.now()
        trace = request.trace
        first = trace.first_byte if trace.first_byte is not None else now
        status = 499 if lost else request.code
        self.traffic.add(now, status, now - trace.started, first - trace.started)
        view = self.view
        if trace.key is None or view is None:
            return
        key = next((k for k in view.operations.auth.keys if k.name == trace.key), None)
        if key is not None and key.rate_limited:
            headers = {
                k.decode("latin-1").lower(): v[0].decode("latin-1")
                for k, v in request.responseHeaders.getAllRawHeaders()
                if k.lower().startswith(b"x-ratelimit-")
            }
            self.headroom.saw(trace.key, headers, now)

    def refused(self, endpoint: str, status: int) -> None:
        self.traffic.add(self.site.reactor.seconds(), status, 0.0, 0.0)


class _Observer:
    """The site's observer, and then the board."""

    def __init__(self, inner: RequestObserver, board: Board) -> None:
        self.inner = inner
        self.board = board

    def finished(self, request: GatewayRequest, lost: bool) -> None:
        try:
            self.inner.finished(request, lost)
        finally:
            self.board.finished(request, lost)

    def refused(self, endpoint: str, status: int) -> None:
        try:
            self.inner.refused(endpoint, status)
        finally:
            self.board.refused(endpoint, status)


class StatusView:
    """The status of one config in force: its snapshots, and its page."""

    log = Logger()

    def __init__(self, operations: Operations) -> None:
        self.operations = operations
        self.reactor: IReactorTime = operations.router.reactor
        now = self.reactor.seconds()
        self.loaded_at = now
        self.board = Board.of(operations.process.site, now)
        self.board.view = self

    async def snapshot(self, caller: Caller, history: bool = False) -> dict[str, Any]:
        """The /stats document's numbers, by panel (raises as /stats does for ``caller``)."""
        stats: dict[str, Any] = await self.operations.stats(caller)
        now = self.reactor.seconds()
        found: dict[str, Any] = {
            "now": now,
            "worker": stats["worker"],
            "traffic": self.board.traffic.summary(now),
            "targets": self._targets(stats, now),
            "cache": _cache(stats["cache"]),
            "keys": self._keys(stats, now),
            "process": await self._process(now, stats["inflight"]),
        }
        if history:
            found["history"] = self.board.traffic.history(now)
        return found

    def _targets(self, stats: Mapping[str, Any], now: float) -> list[dict[str, Any]]:
        """One row per model and target, in config order."""
        targets = stats["targets"]
        rows = []
        for name, model in self.operations.router.models.items():
            for target in model.targets:
                t = targets[target.id]
                state = {"healthy": "up", "cooling_down": "cooling"}.get(t["state"], "probing")
                at = t.get("last_error_at")
                rows.append(
                    {
                        "model": name,
                        "upstream": t["upstream"],
                        "upstream_model": t["model"],
                        "weight": t["weight"],
                        "state": state,
                        "cooling_left": t["cooldown_remaining"],
                        "inflight": t["inflight"],
                        "ttfb_ewma": t["ttfb_ewma"],
                        "failures": t["consecutive_failures"],
                        "last_error": t.get("last_error"),
                        "last_error_ago": None if at is None else round(now - at, 1),
                    }
                )
        return rows

    def _keys(self, stats: Mapping[str, Any], now: float) -> list[dict[str, Any]]:
        """One row per key name: the configured ones, then any other the counters know."""
        by_key: Mapping[str, Mapping[str, Mapping[str, Any]]] = stats["keys"]
        budgets: Mapping[str, Mapping[str, Any]] = stats["budgets"]
        names = [k.name for k in self.operations.auth.keys]
        names += [n for n in by_key if n not in names]
        rows = []
        for name in names:
            models = by_key.get(name, {}).values()
            tokens = {kind: sum(m["tokens"][kind] for m in models) for kind in USAGE_KINDS}
            budget = budgets.get(name)
            rows.append(
                {
                    "name": name,
                    "requests": sum(m["requests"] for m in models),
                    "tokens": tokens,
                    "cost_usd": round(sum(m["cost_usd"] for m in models), 12),
                    "budget": None
                    if budget is None
                    else {"usd": budget["usd"], "spent_usd": budget["spent_usd"]},
                    "headroom": self.board.headroom.of(name, now),
                }
            )
        return rows

    async def _process(self, now: float, inflight: int) -> dict[str, Any]:
        process = self.operations.process
        return {
            "version": __version__,
            "config": process.config_source or "(built-in default)",
            "loaded_ago": round(now - self.loaded_at, 1),
            "uptime": round(now - self.board.started, 1),
            "worker": process.worker.index,
            "pid": process.worker.pid,
            "workers": _fleet(self.operations.metrics.multiprocess_dir, process.worker.pid),
            "inflight": inflight,
            "redis": await self._redis(),
        }

    async def _redis(self) -> str:
        redis = self.operations.process.redis
        if redis is None:
            return "not configured"
        try:
            await redis.call("ping")
        except RedisUnavailable as e:
            return f"unavailable ({e})"
        return "up"


def _cache(cache: Mapping[str, Any]) -> dict[str, Any]:
    hits, misses = cache.get("hits", 0), cache.get("misses", 0)
    return {
        "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
        "hits": hits,
        "misses": misses,
        "entries": cache.get("entries"),
        "bytes": cache.get("bytes"),
        "stores": cache.get("stores", 0),
        "coalesced": cache.get("coalesced", 0),
        "skipped": dict(cache.get("skipped", {})),
    }


def _fleet(directory: str | None, pid: int) -> list[int]:
    """The pids of the live workers of ``--workers`` (their metrics files say), or ours."""
    if directory is None:
        return [pid]
    found = {pid}
    try:
        names = os.listdir(directory)
    except OSError:
        return [pid]
    for name in names:
        match = re.fullmatch(r"gauge_live\w*?_(\d+)\.db", name)
        if match is not None:
            other = int(match.group(1))
            try:
                os.kill(other, 0)
            except OSError:
                continue
            found.add(other)
    return sorted(found)


# -- the page -----------------------------------------------------------------------


def _static(name: str) -> str:
    return resources.files("llmproxy").joinpath("static", name).read_text("utf-8")


def _sha256(text: str) -> str:
    return "sha256-" + b64encode(hashlib.sha256(text.encode()).digest()).decode()


SCRIPT = _static("status.js")
STYLE = _static("status.css")
#: Nothing but our own inline style and script, and the event stream.
CSP = (
    f"default-src 'none'; style-src '{_sha256(STYLE)}'; script-src '{_sha256(SCRIPT)}'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'"
)
PAGE_HEADERS = {
    "content-type": "text/html; charset=utf-8",
    "cache-control": "no-store",
    "content-security-policy": CSP,
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
}


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def ms(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms" if seconds >= 0.01 else f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


def ago(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def usd(amount: float) -> str:
    return f"${amount:.6f}".rstrip("0").rstrip(".") if amount else "$0"


def size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n = n / 1024  # type: ignore[assignment]
    return f"{n:.1f} GiB"


def pct(ratio: float | None) -> str:
    return "–" if ratio is None else f"{ratio * 100:.1f}%"


def _table(head: Sequence[str], rows: Sequence[str], empty: str) -> str:
    if not rows:
        rows = [f'<tr><td colspan="{len(head)}" class="none">{empty}</td></tr>']
    th = "".join(f"<th>{h}</th>" for h in head)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _facts(pairs: Sequence[tuple[str, str]]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in pairs) + "</dl>"


def target_state(row: Mapping[str, Any]) -> str:
    if row["state"] == "cooling":
        return f"cooling {row['cooling_left']:.0f}s"
    return str(row["state"])


def render_targets(rows: Sequence[Mapping[str, Any]]) -> str:
    cells = []
    for r in rows:
        error = "–"
        if r["last_error"]:
            error = f"{_e(r['last_error'])} <small>{ago(r['last_error_ago'])} ago</small>"
        cells.append(
            f'<tr class="{_e(r["state"])}" data-target="{_e(r["upstream"])}/'
            f'{_e(r["upstream_model"])}"><td>{_e(r["model"])}</td>'
            f"<td>{_e(r['upstream'])}/{_e(r['upstream_model'])}</td>"
            f'<td class="state">{_e(target_state(r))}</td><td>{r["inflight"]}</td>'
            f"<td>{ms(r['ttfb_ewma'])}</td><td>{r['failures']}</td><td>{error}</td></tr>"
        )
    head = ("Model", "Upstream/model", "State", "In flight", "TTFB (EWMA)", "Fails", "Last error")
    return _table(head, cells, "no targets")


def render_cache(c: Mapping[str, Any]) -> str:
    skipped = ", ".join(f"{_e(k)}: {v}" for k, v in sorted(c["skipped"].items())) or "none"
    return _facts(
        [
            ("Hit ratio", pct(c["hit_ratio"])),
            ("Hits / misses", f"{c['hits']} / {c['misses']}"),
            ("Entries", "–" if c["entries"] is None else str(c["entries"])),
            ("Bytes", size(c["bytes"])),
            ("Stores", str(c["stores"])),
            ("Coalesced", str(c["coalesced"])),
            ("Skipped", skipped),
        ]
    )


def _headroom(h: Mapping[str, Sequence[int]]) -> str:
    parts = [f"{u[0]}pm {h[u][0]}/{h[u][1]}" for u in ("requests", "tokens") if u in h]
    return " · ".join(parts) or "–"


def render_keys(rows: Sequence[Mapping[str, Any]]) -> str:
    cells = []
    for r in rows:
        t = r["tokens"]
        b = r["budget"]
        budget = "–" if b is None else f"{usd(b['spent_usd'])} / {usd(b['usd'])}"
        cells.append(
            f'<tr data-key="{_e(r["name"])}"><td>{_e(r["name"] or "(none)")}</td>'
            f'<td class="requests">{r["requests"]}</td>'
            + "".join(f'<td class="{k}">{t[k]}</td>' for k in USAGE_KINDS)
            + f'<td class="cost">{usd(r["cost_usd"])}</td><td>{budget}</td>'
            f"<td>{_headroom(r['headroom'])}</td></tr>"
        )
    head = (
        "Key",
        "Requests",
        "Input",
        "Cached",
        "Output",
        "Reasoning",
        "Cost",
        "Budget",
        "Headroom",
    )
    return _table(head, cells, "no keys")


def render_process(p: Mapping[str, Any]) -> str:
    return _facts(
        [
            ("Version", _e(p["version"])),
            ("Config", _e(p["config"])),
            ("Loaded", f"{ago(p['loaded_ago'])} ago"),
            ("Uptime", ago(p["uptime"])),
            ("Worker", f"{p['worker']} (pid {p['pid']})"),
            ("Workers", _e(", ".join(str(w) for w in p["workers"]))),
            ("In flight", str(p["inflight"])),
            ("Redis", _e(p["redis"])),
        ]
    )


#: The charts: (id, title, the history columns drawn).
Chart = tuple[str, str, tuple[int, ...]]
CHARTS: tuple[Chart, ...] = (
    ("rps", "Requests/s", (1,)),
    ("err", "Error rate (5xx)", (2,)),
    ("lat", "Latency p50/p95", (3, 4)),
    ("ttfb", "TTFB p50/p95", (5, 6)),
)


def _series(history: Sequence[Sequence[Any]], column: int, last: int) -> list[float]:
    """One value a second of the window ending at ``last`` (0 where nothing happened)."""
    by_second = {r[0]: r for r in history}
    values = []
    for at in range(last - WINDOW + 1, last + 1):
        r = by_second.get(at)
        if r is None:
            values.append(0.0)
        elif column == 2:  # errors, as a share of the second's requests
            values.append(r[2] / r[1] if r[1] else 0.0)
        else:
            values.append(float(r[column] or 0))
    return values


def _points(values: Sequence[float], top: float) -> str:
    """An SVG polyline's points, one a second, scaled to ``top``; a flat run is its two ends."""
    ys = [58 - (v / top) * 56 if top else 58.0 for v in values]
    keep = [
        i for i in range(len(ys)) if i in (0, len(ys) - 1) or not ys[i - 1] == ys[i] == ys[i + 1]
    ]
    return " ".join(f"{i},{ys[i]:.1f}" for i in keep)


def render_chart(history: Sequence[Sequence[Any]], chart: Chart, last: int) -> str:
    name, title, columns = chart
    series = [_series(history, c, last) for c in columns]
    top = max((max(s) for s in series if s), default=0.0)
    lines = "".join(
        f'<polyline class="s{i}" points="{_points(s, top)}"/>' for i, s in enumerate(series)
    )
    return (
        f'<figure id="c-{name}"><figcaption>{title} <span class="max"></span></figcaption>'
        f'<svg viewBox="0 0 {WINDOW - 1} 60" preserveAspectRatio="none">{lines}</svg></figure>'
    )


def render_traffic(t: Mapping[str, Any], history: Sequence[Sequence[Any]]) -> str:
    """The numbers of the window, and its charts (drawn here too, for a page without JS)."""
    facts = _facts(
        [
            ("Requests (5 min)", str(t["requests"])),
            ("Requests/s", f"{t['rps']:.2f}"),
            ("Error rate (5xx)", pct(t["error_rate"])),
            ("Latency p50 / p95", f"{ms(t['p50'])} / {ms(t['p95'])}"),
            ("TTFB p50 / p95", f"{ms(t['ttfb_p50'])} / {ms(t['ttfb_p95'])}"),
        ]
    )
    charts = "".join(render_chart(history, c, t["last"][0]) for c in CHARTS)
    return f'{facts}<div class="charts">{charts}</div>'


def render_page(snap: Mapping[str, Any]) -> str:
    """The whole page of a snapshot (taken with its history): readable without JavaScript."""
    worker = snap["worker"]
    data = json.dumps(snap, separators=(",", ":")).replace("<", "\\u003c")
    panels = [
        ("traffic", "Traffic", render_traffic(snap["traffic"], snap.get("history", []))),
        ("targets", "Targets", render_targets(snap["targets"])),
        ("cache", "Cache", render_cache(snap["cache"])),
        ("keys", "Keys", render_keys(snap["keys"])),
        ("process", "Process", render_process(snap["process"])),
    ]
    body = "".join(
        f'<section id="{i}"><h2>{t}</h2><div class="body">{b}</div></section>' for i, t, b in panels
    )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>llmproxy status</title><style>{STYLE}</style></head><body>"
        f'<header><h1>llmproxy</h1><span id="from">worker {worker["index"]}'
        f" · pid {worker['pid']}</span>"
        '<span id="live">snapshot</span></header>'
        '<div id="banner" hidden>disconnected: the proxy is not answering; reconnecting…</div>'
        f'<main>{body}</main><script id="snapshot" type="application/json">{data}</script>'
        f"<script>{SCRIPT}</script></body></html>"
    )


# -- the event stream ---------------------------------------------------------------


@implementer(IPushProducer)
class EventStream:
    """
    ``/status/events``: a snapshot a second, as SSE ``data:`` events, the
    first with the traffic history.  The client's request is its producer's
    consumer: while the client does not read, no snapshot is taken (and the
    site's send timeout drops a client that stops reading for good).
    """

    log = Logger()

    def __init__(
        self, view: StatusView, caller: Caller, sink: RequestSink, interval: float = 1.0
    ) -> None:
        self.board = view.board
        self.reactor = view.reactor
        self.caller = caller
        self.sink = sink
        self.interval = interval
        self._paused = False
        self._first = True
        self._call: IDelayedCall | None = None
        self._done: Deferred[None] = Deferred()

    async def run(self) -> None:
        """Stream until the client goes, the site drains, or the caller is no longer let in."""
        self.sink.start(200, SSE_HEADERS)
        self.sink.write(b"retry: 2000\n\n")
        self.sink.register_producer(self)
        self._call = self.reactor.callLater(0, self._tick)
        try:
            await self._done
        except CancelledError:
            raise  # the client went (Klein cancels the handler)
        finally:
            self.stopProducing()
            if not self.sink.gone:
                self.sink.unregister_producer()

    def _end(self) -> None:
        if not self._done.called:
            self._done.callback(None)

    def _tick(self) -> None:
        self._call = None
        view = self.board.view
        if self.sink.gone or view is None:
            self._end()
            return
        if self.board.site.draining:
            self.sink.write(b"event: bye\ndata: {}\n\n")
            self._end()
            return
        if self._paused:
            self._call = self.reactor.callLater(self.interval, self._tick)
            return
        d = Deferred.fromCoroutine(view.snapshot(self.caller, history=self._first))
        d.addCallbacks(self._send, self._refused)

    def _send(self, snapshot: dict[str, Any]) -> None:
        if self._done.called:
            return
        self._first = False
        self.sink.write(b"data: " + json.dumps(snapshot, separators=(",", ":")).encode() + b"\n\n")
        self._call = self.reactor.callLater(self.interval, self._tick)

    def _refused(self, failure: Any) -> None:
        if not failure.check(errors.APIError):
            self.log.failure("status snapshot failed", failure)
        self._end()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False

    def stopProducing(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._end()
