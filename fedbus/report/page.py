"""render_report: RunData -> one self-contained HTML page.

plotly.js is inlined once (plotly's own bundle, from the installed package), so the page
opens offline and fetches nothing. Every text from the run directory goes through
html.escape, and the figures' JSON through plotly's encoder (which escapes ``<``, ``>``
and ``/``), so a worker id or a span name cannot end a script element.

A small script at the top records script errors (window errors, unhandled rejections,
console.error) into the ``#report-errors`` element: a reader sees that a chart failed,
and benchmarks/report_render.py reads the count from the DOM headless Chromium dumps.
"""

from __future__ import annotations

import html
import json
import time

import plotly.io as pio
import yaml
from plotly.offline import get_plotlyjs

from fedbus.report.figures import Chart, all_charts
from fedbus.report.rundata import RunData, finite

MAX_CONTRIBUTOR_ROWS = 500  # the full list stays in the manifest's JSON below the table

ERROR_RECORDER = """
(function () {
  var errors = [];
  function show() {
    var el = document.getElementById("report-errors");
    if (!el) { return; }
    el.setAttribute("data-count", String(errors.length));
    if (errors.length) {
      el.hidden = false;
      el.textContent = "Errors while drawing this page:\\n" + errors.join("\\n");
    }
  }
  function note(text) { errors.push(String(text).slice(0, 500)); show(); }
  window.addEventListener("error", function (e) { note("error: " + (e.message || e)); });
  window.addEventListener("unhandledrejection", function (e) {
    note("unhandled rejection: " + ((e.reason && e.reason.message) || e.reason));
  });
  var consoleError = console.error;
  console.error = function () {
    note("console.error: " + Array.prototype.join.call(arguments, " "));
    return consoleError.apply(console, arguments);
  };
  document.addEventListener("DOMContentLoaded", show);
})();
"""

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 20px 40px; color: #212121; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
nav a { margin-right: 12px; }
table { border-collapse: collapse; margin: 8px 0; }
td, th { border: 1px solid #ddd; padding: 3px 8px; text-align: left; font-size: 14px; vertical-align: top; }
th { background: #f5f5f5; }
pre { background: #f7f7f7; padding: 10px; overflow-x: auto; font-size: 13px; }
.note { color: #555; font-style: italic; }
#report-errors { background: #ffebee; color: #b71c1c; padding: 8px; white-space: pre-wrap; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    number = finite(value)
    if number is None:
        return "–" if value is None else _e(value)
    return f"{number:.4f}" if isinstance(value, float) else str(int(number))


def _table(rows: list[tuple[str, object]]) -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _chart(chart: Chart) -> str:
    head = f'<section class="chart" id="{_e(chart.id)}-section"><h3>{_e(chart.title)}</h3>'
    note = f'<p class="note">{_e(chart.note)}</p>' if chart.note else ""
    if chart.figure is None:
        return head + note + "</section>"
    div = pio.to_html(chart.figure, include_plotlyjs=False, full_html=False, validate=False, div_id=chart.id,
                      default_width="100%", default_height=f"{chart.figure['layout'].get('height', 380)}px",
                      config={"displaylogo": False, "responsive": True})
    return head + div + note + "</section>"


def _overview(data: RunData) -> str:
    s = data.summary
    unit = "versions" if data.mode == "async" else "rounds"
    rejected = s.get("updates_rejected") if isinstance(s.get("updates_rejected"), dict) else {}
    rows = [("job", _e(s.get("job", "?"))), ("run", _e(s.get("run", ""))), ("task", _e(s.get("task", ""))),
            ("mode", _e(data.mode)), ("finished", _e(s.get("reason", "?"))),
            (f"{unit} completed", f"{_fmt(s.get('rounds_completed'))} of {_fmt(s.get('rounds_planned'))}"),
            ("final model version", _fmt(s.get("model_version"))),
            ("final test accuracy", _fmt(s.get("final_accuracy"))), ("final test loss", _fmt(s.get("final_loss"))),
            ("wall time (s)", _fmt(s.get("wall_seconds"))),
            (f"median {unit[:-1]} (s)", _fmt(s.get("median_round_seconds"))),
            ("updates accepted", _fmt(s.get("updates_accepted"))),
            ("messages rejected", _fmt(sum(v for v in rejected.values() if isinstance(v, int)))),
            ("coordinator incarnations", _fmt(s.get("incarnations")))]
    if s.get("resumed_from_round") is not None:
        rows.append(("resumed from round", _fmt(s.get("resumed_from_round"))))
    if isinstance(s.get("privacy"), dict) and s["privacy"]:
        rows.append(("privacy", f"<code>{_e(json.dumps(s['privacy'], sort_keys=True)[:2000])}</code>"))
    if s.get("error"):
        rows.append(("error", f"<code>{_e(s['error'])}</code>"))
    return _table(rows)


def _rejection_table(data: RunData) -> str:
    rejected = data.summary.get("updates_rejected")
    if not isinstance(rejected, dict) or not rejected:
        return ""
    return _table([(k, _fmt(v)) for k, v in sorted(rejected.items(), key=lambda kv: (-(finite(kv[1]) or 0), kv[0]))])


def _manifest(data: RunData) -> str:
    m = data.manifest
    if m is None:
        return '<p class="note">The final model\'s manifest is not in the run directory.</p>'
    obj = m.get("model_object") if isinstance(m.get("model_object"), dict) else {}
    strategy = m.get("strategy") if isinstance(m.get("strategy"), dict) else {}
    rows = [("version", _fmt(m.get("version"))), ("parent version", _fmt(m.get("parent_version"))),
            ("kind", _e(m.get("kind", ""))), ("round", _fmt(m.get("round"))),
            ("created", _e(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m["created_ms"] / 1000)))
             if isinstance(m.get("created_ms"), int) else "–"),
            ("model digest", f"<code>{_e(m.get('model_digest', ''))}</code>"),
            ("model object", f"<code>{_e(obj.get('bucket', ''))}/{_e(obj.get('name', ''))}</code> "
                             f"({_fmt(obj.get('size'))} bytes)"),
            ("strategy", f"<code>{_e(json.dumps(strategy, sort_keys=True)[:2000])}</code>"),
            ("DP ε", _fmt(m.get("dp_epsilon"))), ("signed by", _e(m.get("coordinator", "")))]
    metrics = m.get("metrics") if isinstance(m.get("metrics"), dict) else {}
    rows += [(f"metric {k}", _fmt(v)) for k, v in sorted(metrics.items())]
    contributors = m.get("contributors") if isinstance(m.get("contributors"), list) else []
    shown = [c for c in contributors[:MAX_CONTRIBUTOR_ROWS] if isinstance(c, dict)]
    table = "".join(f"<tr><td>{_e(c.get('participant', ''))}</td><td>{_fmt(c.get('round'))}</td>"
                    f"<td><code>{_e(c.get('update_digest', ''))}</code></td></tr>" for c in shown)
    more = f'<p class="note">{len(contributors) - len(shown)} more in the JSON below.</p>' \
        if len(contributors) > len(shown) else ""
    return (_table(rows) + f"<h3>Contributors ({len(contributors)})</h3>"
            f"<table><tr><th>participant</th><th>round</th><th>update digest (SHA-256)</th></tr>{table}</table>{more}"
            f"<details><summary>manifest JSON</summary><pre id=\"manifest-json\">"
            f"{_e(json.dumps(m, indent=2, sort_keys=True))}</pre></details>")


def _job_spec(data: RunData) -> str:
    if data.job is None:
        return '<p class="note">The job spec is not in the run directory.</p>'
    text = yaml.safe_dump(data.job, sort_keys=False, allow_unicode=True)
    return f'<pre id="job-spec">{_e(text)}</pre>'


def render_report(data: RunData) -> str:
    """The whole page for ``data``: pure (no I/O beyond reading plotly's bundled plotly.js)."""
    charts = {c.id: c for c in all_charts(data)}
    unit = "version" if data.mode == "async" else "round"
    title = f"fedbus run report: {data.summary.get('job', '?')}"
    notes = "".join(f"<li>{_e(n)}</li>" for n in data.notes)
    sections = [
        ("overview", "Overview", _overview(data) + (f'<ul class="note">{notes}</ul>' if notes else "")),
        ("progress", "Accuracy and loss", _chart(charts["fig-accuracy"]) + _chart(charts["fig-accuracy-time"])),
        ("durations", f"{unit.capitalize()} durations", _chart(charts["fig-durations"])),
        ("workers", "Workers", _chart(charts["fig-participation"]) + _chart(charts["fig-staleness"])
         + _chart(charts["fig-training"])),
        ("rejections", "Rejections", _chart(charts["fig-rejections"]) + _rejection_table(data)),
        ("trace", f"Trace of one {unit}", _chart(charts["fig-waterfall"])),
        ("job", "Job spec", _job_spec(data)),
        ("manifest", "Final model manifest", _manifest(data)),
    ]
    nav = "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name, _ in sections)
    body = "".join(f'<h2 id="{sid}">{_e(name)}</h2>{content}' for sid, name, content in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style>"
            f"<script>{ERROR_RECORDER}</script>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
            f'<body><h1>{_e(title)}</h1><p class="note">run directory {_e(data.run_dir)}</p>'
            f'<pre id="report-errors" data-count="0" hidden></pre><nav>{nav}</nav>{body}</body></html>\n')
