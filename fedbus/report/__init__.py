"""report.html: one self-contained page per coordinator run, for people who will not read JSON.

``rundata`` reads what a run directory holds (summary.json and its round rows, the job
spec, the final model's manifest, the span file) into a ``RunData``; ``figures`` turns
that into plotly figures; ``page`` renders the page (plotly.js inlined, nothing fetched);
``build`` ties them together for the coordinator (at job end) and ``fedbus report``.
"""

from fedbus.report.build import REPORT_NAME, write_report
from fedbus.report.page import render_report
from fedbus.report.rundata import RunData, load_run

__all__ = ["REPORT_NAME", "RunData", "load_run", "render_report", "write_report"]
