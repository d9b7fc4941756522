"""The report's charts as plotly figures (plain dicts: plotly.js draws them in the page).

Each builder takes a RunData and returns a Chart: its element id (the page and
benchmarks/report_render.py find figures by it), a title, and either a figure or a note
saying why there is nothing to draw (no rounds closed, no span file, no rejections).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

from fedbus.demo import row_elapsed
from fedbus.report.rundata import RunData, Span, finite

# Metric columns of a round row, drawn when present: (key, label).
ACCURACIES = (("test_accuracy", "test accuracy (coordinator)"), ("federated_accuracy", "federated accuracy (workers)"),
              ("train_accuracy", "train accuracy (workers)"))
LOSSES = (("test_loss", "test loss (coordinator)"), ("federated_loss", "federated loss (workers)"),
          ("train_loss", "train loss (workers)"))
STATUS_COLORS = {"aggregated": "#2e7d32", "failed": "#c62828", "rolled_back": "#ef6c00"}
SERVICE_COLORS = {"coordinator": "#1565c0", "aggregator": "#6a1b9a", "worker": "#2e7d32"}
MAX_WATERFALL_SPANS = 400  # beyond this a bar chart stops being readable: the rest are counted, not drawn
HEIGHT = 380


@dataclass(frozen=True)
class Chart:
    id: str
    title: str
    figure: dict | None = None
    note: str = ""


def _layout(**extra) -> dict:
    base = {"height": HEIGHT, "margin": {"l": 60, "r": 30, "t": 30, "b": 50},
            "plot_bgcolor": "white", "paper_bgcolor": "white",
            "legend": {"orientation": "h", "y": -0.2}, "hovermode": "x unified"}
    return {**base, **extra}


def _integer_ticks(xs: list) -> dict:
    """Ticks on whole rounds (plotly would put them at 0.5 steps for a few rounds), about a dozen."""
    top = max((x for x in xs if isinstance(x, int)), default=1)
    return {"tick0": 0, "dtick": max(1, math.ceil(top / 12)), "tickformat": "d"}


def _unit(data: RunData) -> str:
    return "version" if data.mode == "async" else "round"


def _metric_traces(rows: list[dict], xs: list, columns, yaxis: str, dash: str) -> list[dict]:
    traces = []
    for key, label in columns:
        ys = [finite(r.get(key)) for r in rows]
        if any(y is not None for y in ys):
            traces.append({"type": "scatter", "mode": "lines+markers", "name": label, "x": xs, "y": ys,
                           "yaxis": yaxis, "line": {"dash": dash}, "connectgaps": False})
    return traces


def _progress(data: RunData, xs, x_title: str, chart_id: str, title: str, integer_x: bool = False) -> Chart:
    rows = [r for r in data.rows if r.get("status", "aggregated") == "aggregated"]
    if not rows:
        return Chart(chart_id, title, note=f"no {_unit(data)} was aggregated: nothing to plot")
    traces = _metric_traces(rows, xs(rows), ACCURACIES, "y", "solid") + \
        _metric_traces(rows, xs(rows), LOSSES, "y2", "dot")
    if not traces:
        return Chart(chart_id, title, note="the rounds carry no accuracy or loss (no evaluation in this job)")
    layout = _layout(xaxis={"title": {"text": x_title}, **(_integer_ticks(xs(rows)) if integer_x else {})},
                     yaxis={"title": {"text": "accuracy"}, "rangemode": "tozero"},
                     yaxis2={"title": {"text": "loss"}, "overlaying": "y", "side": "right", "rangemode": "tozero",
                             "showgrid": False})
    return Chart(chart_id, title, {"data": traces, "layout": layout})


def accuracy_by_round(data: RunData) -> Chart:
    unit = _unit(data)
    return _progress(data, lambda rows: [r.get("model_version", r.get("round")) for r in rows],
                     f"model version ({unit})", "fig-accuracy", f"Accuracy and loss by {unit}", integer_x=True)


def accuracy_by_time(data: RunData) -> Chart:
    # elapsed_s: seconds since the job started when the row was written (a sum of round
    # durations for rows from before it existed: see fedbus.demo.row_elapsed).
    def seconds(rows: list[dict]) -> list[float]:
        return [round(t, 3) for t in row_elapsed(rows)]
    return _progress(data, seconds, "wall time since the job started (s)", "fig-accuracy-time",
                     "Accuracy and loss over wall time")


def round_durations(data: RunData) -> Chart:
    unit = _unit(data)
    title = f"{unit.capitalize()} durations"
    if not data.rows:
        return Chart("fig-durations", title, note=f"no {unit} closed")
    traces = []
    for status in sorted({str(r.get("status", "aggregated")) for r in data.rows}):
        rows = [r for r in data.rows if str(r.get("status", "aggregated")) == status]
        traces.append({"type": "bar", "name": status, "x": [r.get("round") for r in rows],
                       "y": [None if (s := finite(r.get("seconds"))) is None else round(s * 1000, 3) for r in rows],
                       "marker": {"color": STATUS_COLORS.get(status, "#757575")}})
    layout = _layout(xaxis={"title": {"text": unit}, **_integer_ticks([r.get("round") for r in data.rows])},
                     yaxis={"title": {"text": "duration (ms)"}},
                     barmode="overlay")
    return Chart("fig-durations", title, {"data": traces, "layout": layout})


def _worker_stats(data: RunData) -> tuple[Counter, Counter, dict[str, list[int]]]:
    on_time: Counter = Counter()
    late: Counter = Counter()
    staleness: dict[str, list[int]] = {}
    for r in data.rows:
        if r.get("status", "aggregated") != "aggregated":
            continue
        accepted = [str(w) for w in r.get("accepted_workers") or []]
        late_workers = [str(w) for w in r.get("late_workers") or []]
        on_time.update(accepted)
        late.update(late_workers)
        # close_row lists staleness for the accepted updates first, then the late ones.
        for worker, tau in zip(accepted + late_workers, r.get("staleness") or []):
            if isinstance(tau, int) and not isinstance(tau, bool):
                staleness.setdefault(worker, []).append(tau)
    return on_time, late, staleness


def participation(data: RunData) -> Chart:
    on_time, late, _ = _worker_stats(data)
    trained = {w: len(v) for w, v in (data.traces.train_ms if data.traces else {}).items()}
    workers = sorted(set(on_time) | set(late) | set(trained))
    title = "Per-worker participation"
    if not workers:
        return Chart("fig-participation", title, note="no update was folded into a model")
    traces = [{"type": "bar", "name": "updates folded" + (" (on time)" if late else ""), "x": workers,
               "y": [on_time.get(w, 0) for w in workers]}]
    if late:
        traces.append({"type": "bar", "name": "late updates folded into the next round", "x": workers,
                       "y": [late.get(w, 0) for w in workers]})
    if trained:
        traces.append({"type": "bar", "name": "local trainings (worker.train spans)", "x": workers,
                       "y": [trained.get(w, 0) for w in workers]})
    layout = _layout(xaxis={"title": {"text": "worker"}, "type": "category"}, yaxis={"title": {"text": "count"}},
                     barmode="group")
    return Chart("fig-participation", title, {"data": traces, "layout": layout})


def staleness(data: RunData) -> Chart:
    _, _, taus = _worker_stats(data)
    title = "Per-worker staleness of folded updates"
    if not taus:
        return Chart("fig-staleness", title, note="no folded update carries a staleness")
    workers = sorted(taus)
    traces = [{"type": "box", "name": w, "y": taus[w], "boxpoints": "outliers", "showlegend": False}
              for w in workers]
    layout = _layout(xaxis={"title": {"text": "worker"}, "type": "category"},
                     yaxis={"title": {"text": "staleness (model versions behind)"}, "rangemode": "tozero"},
                     hovermode="closest")
    stale = sum(1 for v in taus.values() for t in v if t > 0)
    note = f"{stale} of {sum(map(len, taus.values()))} folded updates were stale" if stale else \
        "every folded update was trained on the current model (staleness 0)"
    return Chart("fig-staleness", title, {"data": traces, "layout": layout}, note)


def training_time(data: RunData) -> Chart:
    title = "Per-worker training time"
    if data.traces is None:
        return Chart("fig-training", title, note="no span file: training times are recorded as worker.train spans")
    if not data.traces.train_ms:
        return Chart("fig-training", title, note="the span file holds no worker.train span")
    workers = sorted(data.traces.train_ms)
    traces = [{"type": "box", "name": w, "y": [round(ms, 3) for ms in data.traces.train_ms[w]],
               "boxpoints": "outliers", "showlegend": False} for w in workers]
    layout = _layout(xaxis={"title": {"text": "worker"}, "type": "category"},
                     yaxis={"title": {"text": "local training (ms, worker.train span)"}, "rangemode": "tozero"},
                     hovermode="closest")
    return Chart("fig-training", title, {"data": traces, "layout": layout})


def rejections(data: RunData) -> Chart:
    title = "Rejections by reason"
    totals = data.summary.get("updates_rejected")
    totals = {str(k): int(v) for k, v in totals.items() if isinstance(v, int) and v > 0} \
        if isinstance(totals, dict) else {}
    if not totals:
        return Chart("fig-rejections", title, note="no message was rejected in this run")
    reasons = sorted(totals, key=lambda k: (-totals[k], k))
    layout = _layout(xaxis={"title": {"text": "messages rejected"}},
                     yaxis={"type": "category", "autorange": "reversed"},
                     hovermode="closest", height=max(200, 60 + 28 * len(reasons)))
    return Chart("fig-rejections", title, {"data": [
        {"type": "bar", "orientation": "h", "name": "rejected", "y": reasons, "x": [totals[k] for k in reasons],
         "marker": {"color": "#c62828"}}], "layout": layout})


def _role(span: Span) -> str:
    for role in SERVICE_COLORS:
        if role in span.service:
            return role
    return span.service


def waterfall(data: RunData) -> Chart:
    title = "Trace of one round"
    if data.traces is None:
        return Chart("fig-waterfall", title, note="no span file was available for this run: no trace to show")
    spans = data.traces.trace
    if not spans:
        return Chart("fig-waterfall", title,
                     note=f"the span file ({data.traces.spans_read} spans) holds no round trace")
    root = next((s for s in spans if s.parent is None), spans[0])
    t0 = min(s.start_ns for s in spans)
    shown = spans[:MAX_WATERFALL_SPANS]
    labels, seen = [], Counter()
    for s in shown:
        label = f"{s.instance} · {s.name}"
        seen[label] += 1
        labels.append(label if seen[label] == 1 else f"{label} #{seen[label]}")
    traces = []
    for role in sorted({_role(s) for s in shown}):
        idx = [i for i, s in enumerate(shown) if _role(s) == role]
        traces.append({
            "type": "bar", "orientation": "h", "name": role, "y": [labels[i] for i in idx],
            "base": [round((shown[i].start_ns - t0) / 1e6, 3) for i in idx],
            "x": [max(round(shown[i].ms, 3), 0.001) for i in idx],
            "customdata": [round(shown[i].ms, 3) for i in idx],
            "hovertemplate": "%{y}<br>starts at %{base:.1f} ms, lasts %{customdata:.2f} ms<extra></extra>",
            "marker": {"color": SERVICE_COLORS.get(role, "#757575")}})
    layout = _layout(xaxis={"title": {"text": "ms since the round opened"}},
                     yaxis={"type": "category", "categoryorder": "array", "categoryarray": labels,
                            "autorange": "reversed", "automargin": True},
                     barmode="overlay", hovermode="closest", height=max(260, 80 + 18 * len(shown)),
                     margin={"l": 200, "r": 30, "t": 30, "b": 50})
    unit = "version" if root.name == "version" else "round"
    which = f"{unit} {root.round}" if root.round is not None else f"the {unit} trace {root.trace_id[:12]}"
    roles = Counter(_role(s) for s in spans)
    note = (f"{which}: {len(spans)} spans ({', '.join(f'{n} {r}' for r, n in sorted(roles.items()))}), "
            f"{root.ms:.1f} ms from open to close; the most complete of {data.traces.round_traces} round traces")
    if len(spans) > len(shown):
        note += f"; the first {len(shown)} spans are drawn"
    return Chart("fig-waterfall", title, {"data": traces, "layout": layout}, note)


def all_charts(data: RunData) -> list[Chart]:
    return [accuracy_by_round(data), accuracy_by_time(data), round_durations(data), participation(data),
            staleness(data), training_time(data), rejections(data), waterfall(data)]

