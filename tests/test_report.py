"""report.html: built from a run directory into one self-contained page (structure checked here;
benchmarks/report_render.py opens a real demo's report in headless Chromium)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import structlog

from fedbus.cli import main
from fedbus.coordinator.service import CoordinatorService
from fedbus.jobspec import JobSpec
from fedbus.registry.manifest import Contributor, ModelManifest, ObjectRef
from fedbus.report import load_run, render_report, write_report
from fedbus.report.rundata import JOB_SPEC_NAME, MANIFEST_NAME

RUN = "r1-test"
HOSTILE = "</script><script>window.pwned=1</script>"


def _row(n: int, acc: float | None, loss, seconds: float, workers: list[str], staleness: list[int],
         version: int | None = None, **extra) -> dict:
    return {"round": n, "model_version": n if version is None else version, "status": "aggregated",
            "seconds": seconds, "accepted": len(workers),
            "accepted_workers": workers, "late_workers": [], "folded": len(workers), "staleness": staleness,
            "rejected": {}, "test_accuracy": acc, "test_loss": loss, "elapsed_s": 1.0 + n, **extra}


def _summary() -> dict:
    rows = [_row(1, 0.61, 1.2, 0.30, ["w01", "w02"], [0, 0]),
            _row(2, 0.82, None, 0.25, ["w01", "w03"], [0, 2]),  # a diverged loss is written as null
            {"round": 3, "model_version": 2, "status": "failed", "seconds": 30.0, "accepted": 0,
             "accepted_workers": [], "late_workers": [], "folded": 0, "staleness": [], "rejected": {}},
            _row(4, 0.93, 0.4, 0.20, ["w02", HOSTILE], [1, 0], version=3)]
    return {"job": "report-job", "run": RUN, "task": "fedbus.tasks.digits:task", "reason": "completed",
            "rounds_planned": 4, "rounds_completed": 3, "model_version": 3, "final_accuracy": 0.93,
            "final_loss": 0.4, "wall_seconds": 7.5, "median_round_seconds": 0.25, "updates_accepted": 6,
            "updates_rejected": {"bad_signature": 5, "replayed_nonce": 2}, "incarnations": 1, "rounds": rows}


def _manifest(run: str = RUN) -> dict:
    return ModelManifest(
        job="report-job", run=run, version=3, parent_version=2, kind="aggregated", round=4,
        created_ms=1_700_000_000_000, metrics={"test_accuracy": 0.93},
        contributors=[Contributor(participant="w02", round=4, update_digest="ab" * 32)],
        strategy={"name": "fedavg"}, model_digest="sha256:" + "cd" * 32,
        model_object=ObjectRef(bucket="fedbus-models", name="report-job.v3", size=1234, digest="SHA-256=x"),
        coordinator="coordinator").model_dump(mode="json")


def _span(trace: str, span_id: str, parent: str | None, name: str, service: str, instance: str, start_ms: float,
          end_ms: float, round_: int) -> dict:
    base = 1_700_000_000_000_000_000
    return {"trace_id": trace, "span_id": span_id, "parent_span_id": parent, "name": name, "kind": "INTERNAL",
            "service": service, "instance": instance, "start_ns": base + int(start_ms * 1e6),
            "end_ns": base + int(end_ms * 1e6), "duration_ms": end_ms - start_ms,
            "attributes": {"fedbus.round": round_}, "status": "UNSET", "status_message": None, "events": []}


def _spans() -> list[dict]:
    # Round 1: coordinator, an aggregator and two workers. Round 2: only the coordinator and
    # one worker (less complete, so round 1 is the one drawn although round 2 is later).
    r1 = [_span("t1", "root1", None, "round", "fedbus-coordinator", "coordinator", 0, 100, 1),
          _span("t1", "a1", "root1", "aggregator.publish", "fedbus-aggregator", "agg-r0", 70, 80, 1),
          _span("t1", "f1", "root1", "worker.fetch", "fedbus-worker", "w01", 2, 5, 1),
          _span("t1", "tr1", "root1", "worker.train", "fedbus-worker", "w01", 5, 45, 1),
          _span("t1", "tr2", "root1", "worker.train", "fedbus-worker", "w02", 6, 66, 1),
          _span("t1", "u1", "root1", "worker.upload", "fedbus-worker", HOSTILE, 66, 69, 1)]
    r2 = [_span("t2", "root2", None, "round", "fedbus-coordinator", "coordinator", 200, 300, 2),
          _span("t2", "tr3", "root2", "worker.train", "fedbus-worker", "w01", 205, 235, 2)]
    return r1 + r2


def _run_dir(tmp_path: Path, *, spans: bool = True, manifest: dict | None = None) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps(_summary()))
    job = JobSpec.model_validate({"job": "report-job", "task": "fedbus.tasks.digits:task", "rounds": 4})
    (run_dir / JOB_SPEC_NAME).write_text(json.dumps(job.model_dump(mode="json", by_alias=True)))
    (run_dir / MANIFEST_NAME).write_text(json.dumps(manifest or _manifest()))
    if spans:
        lines = [json.dumps(s) for s in _spans()]
        # A torn last line (a process killed mid-write) and junk are skipped, not fatal.
        (run_dir / "spans.jsonl").write_text("\n".join(lines) + "\nnot json\n" + '{"trace_id": "t9", "span')
    return run_dir


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _figure(page: str, fig_id: str) -> tuple[list, dict]:
    """The data and layout passed to Plotly.newPlot for ``fig_id``."""
    m = re.search(r'Plotly\.newPlot\(\s*"' + re.escape(fig_id) + r'",\s*', page)
    assert m, f"no figure {fig_id}"
    decoder = json.JSONDecoder()
    data, end = decoder.raw_decode(page, m.end())
    layout, _ = decoder.raw_decode(page, page.index("{", end))
    return data, layout


def test_the_page_is_self_contained_and_carries_every_section(tmp_path):
    page = render_report(load_run(_run_dir(tmp_path)))
    parser = _Tags()
    parser.feed(page)
    scripts = [a for t, a in parser.tags if t == "script"]
    assert scripts and all("src" not in a for a in scripts)  # plotly.js and the figures are inline
    assert not [a for t, a in parser.tags if t == "link"]
    fetched = [(t, a) for t, a in parser.tags for k, v in a.items() if k in ("src", "href") and v
               and not v.startswith("#")]
    assert fetched == []  # nothing is fetched: the only links are the page's own anchors
    assert len(page) > 1_000_000 and "Plotly.newPlot" in page  # plotly.js itself is in the page
    ids = {a.get("id") for _, a in parser.tags}
    for fig in ("fig-accuracy", "fig-accuracy-time", "fig-durations", "fig-participation", "fig-staleness",
                "fig-training", "fig-rejections", "fig-waterfall"):
        assert fig in ids, fig
    assert {"job-spec", "manifest-json", "report-errors"} <= ids
    # The job spec and the manifest are in the page.
    spec = page[page.index('<pre id="job-spec">'):]
    assert "job: report-job" in spec and "rounds: 4" in spec
    assert "sha256:" + "cd" * 32 in page and "ab" * 32 in page and "report-job.v3" in page


def test_figures_carry_the_runs_numbers(tmp_path):
    page = render_report(load_run(_run_dir(tmp_path)))
    data, _ = _figure(page, "fig-accuracy")
    acc = next(t for t in data if t["name"].startswith("test accuracy"))
    assert acc["x"] == [1, 2, 3] and acc["y"] == [0.61, 0.82, 0.93]  # the failed round 3 is not a point
    loss = next(t for t in data if t["name"].startswith("test loss"))
    assert loss["y"] == [1.2, None, 0.4] and loss["yaxis"] == "y2"
    data, _ = _figure(page, "fig-accuracy-time")
    assert data[0]["x"] == [2.0, 3.0, 5.0]  # elapsed_s
    data, _ = _figure(page, "fig-durations")
    by_status = {t["name"]: t for t in data}
    assert by_status["aggregated"]["y"] == [300.0, 250.0, 200.0] and by_status["failed"]["x"] == [3]
    data, _ = _figure(page, "fig-participation")
    folded = data[0]
    assert dict(zip(folded["x"], folded["y"])) == {"w01": 2, "w02": 2, "w03": 1, HOSTILE: 1}
    trained = next(t for t in data if "worker.train" in t["name"])
    assert dict(zip(trained["x"], trained["y"])) == {"w01": 2, "w02": 1, "w03": 0, HOSTILE: 0}
    data, _ = _figure(page, "fig-staleness")
    assert {t["name"]: t["y"] for t in data} == {"w01": [0, 0], "w02": [0, 1], "w03": [2], HOSTILE: [0]}
    data, _ = _figure(page, "fig-training")
    assert {t["name"]: t["y"] for t in data} == {"w01": [40.0, 30.0], "w02": [60.0]}
    data, _ = _figure(page, "fig-rejections")
    assert dict(zip(data[0]["y"], data[0]["x"])) == {"bad_signature": 5, "replayed_nonce": 2}


def test_the_waterfall_draws_the_most_complete_round_trace(tmp_path):
    page = render_report(load_run(_run_dir(tmp_path)))
    data, layout = _figure(page, "fig-waterfall")
    by_role = {t["name"]: t for t in data}
    assert set(by_role) == {"coordinator", "aggregator", "worker"}
    assert by_role["coordinator"]["base"] == [0.0] and by_role["coordinator"]["x"] == [100.0]
    assert by_role["aggregator"]["base"] == [70.0] and by_role["aggregator"]["x"] == [10.0]
    workers = by_role["worker"]
    assert workers["base"] == [2.0, 5.0, 6.0, 66.0] and workers["x"] == [3.0, 40.0, 60.0, 3.0]
    assert layout["yaxis"]["categoryarray"][0] == "coordinator · round"
    assert "round 1: 6 spans (1 aggregator, 1 coordinator, 4 worker)" in page


def test_hostile_names_never_leave_their_string(tmp_path):
    page = render_report(load_run(_run_dir(tmp_path)))
    assert HOSTILE not in page  # neither in the figures' JSON nor in the tables
    assert "window.pwned" in page  # (escaped, it is still shown)


def test_without_a_span_file_the_report_says_so(tmp_path):
    page = render_report(load_run(_run_dir(tmp_path, spans=False)))
    assert "no span file" in page and 'id="fig-waterfall"' not in page and 'id="fig-training"' not in page
    assert 'id="fig-accuracy"' in page  # the rest is drawn


def test_a_manifest_of_another_run_is_not_shown(tmp_path):
    data = load_run(_run_dir(tmp_path, manifest=_manifest(run="r0-earlier")))
    assert data.manifest is None and any("r0-earlier" in n for n in data.notes)
    assert "sha256:" + "cd" * 32 not in render_report(data)


def test_fedbus_report_rebuilds_the_page_and_refuses_a_directory_without_summary(tmp_path, capsys):
    run_dir = _run_dir(tmp_path)
    assert main(["report", str(run_dir)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run_dir / 'report.html'}"
    assert 'id="fig-waterfall"' in (run_dir / "report.html").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["report", str(empty)]) == 2
    assert "summary.json" in capsys.readouterr().err and not (empty / "report.html").exists()


def test_write_report_stores_the_job_spec_and_manifest_it_is_given(tmp_path):
    run_dir = _run_dir(tmp_path)
    (run_dir / JOB_SPEC_NAME).unlink()
    (run_dir / MANIFEST_NAME).unlink()
    path = write_report(run_dir, job={"job": "report-job", "rounds": 4}, manifest=_manifest())
    assert json.loads((run_dir / MANIFEST_NAME).read_text())["version"] == 3
    page = path.read_text()
    assert "sha256:" + "cd" * 32 in page and "job: report-job" in page


def test_a_report_that_cannot_be_written_is_logged_not_raised(tmp_path):
    # The coordinator's end-of-job step, on a run directory that is a file: report.failed, no exception.
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    job = JobSpec.model_validate({"job": "j", "task": "fedbus.tasks.digits:task", "rounds": 1})
    service = SimpleNamespace(run_dir=not_a_dir, span_file=None, job=job, _final_manifest=None, registrar=None)
    with structlog.testing.capture_logs() as logs:
        CoordinatorService._write_report(service)
    assert [e["event"] for e in logs] == ["report.failed"]
