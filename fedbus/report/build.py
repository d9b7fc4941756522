"""Writing report.html into a run directory (the coordinator at job end, and ``fedbus report``)."""

from __future__ import annotations

from pathlib import Path

from fedbus.atomicfile import atomic_write_json, atomic_write_text
from fedbus.report.page import render_report
from fedbus.report.rundata import JOB_SPEC_NAME, MANIFEST_NAME, load_run

REPORT_NAME = "report.html"


def write_report(run_dir: str | Path, *, span_file: str | Path | None = None, job: dict | None = None,
                 manifest: dict | None = None) -> Path:
    """(Re)build ``run_dir``/report.html from what the run directory holds. ``job`` and
    ``manifest`` (the coordinator's, at job end) are written into the run directory first,
    so a later ``fedbus report`` rebuilds the same page. Atomic: a failed write leaves the
    previous report (or none)."""
    run_dir = Path(run_dir)
    if job is not None:
        atomic_write_json(run_dir / JOB_SPEC_NAME, job)
    if manifest is not None:
        atomic_write_json(run_dir / MANIFEST_NAME, manifest)
    path = run_dir / REPORT_NAME
    atomic_write_text(path, render_report(load_run(run_dir, span_file=span_file)))
    return path
