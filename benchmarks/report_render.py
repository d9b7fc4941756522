"""report.html in a real browser: a demo run's report opened in headless Chromium.

Runs a small `fedbus demo` (real nats-server, coordinator and worker processes) unless
--run-dir names an existing coordinator run directory, then opens its report.html in
headless Chromium (Debian's package: apt-get install -y chromium) with every host name
mapped to "not found", so a page that tried to fetch anything would log an error:

1. --dump-dom: the DOM after plotly.js has drawn. Checked: the page's own error recorder
   (#report-errors data-count, fed by window errors, unhandled rejections and
   console.error) is 0; Chromium logged no console message (--enable-logging=stderr); the
   accuracy figure has an SVG (.main-svg) with one drawn line (path.js-line) per curve of
   its data; the round waterfall has an SVG with one drawn bar per span of the round's
   trace (fedbus.report.load_run says which spans those are).
2. A negative control: the same page with a console.error and a call of an undefined
   function appended must show 2 errors to the page's recorder and in Chromium's log.
3. --screenshot: a PNG of the page (default runs/report-screenshot.png; its size is printed).

Exit 0 only when every check holds; 1 otherwise, or when Chromium is missing.

    python benchmarks/report_render.py [--run-dir DIR] [--workers 4] [--rounds 6] [--screenshot PNG]

Chromium refuses its sandbox as root: --no-sandbox is passed when running as root.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from html.parser import HTMLParser
from pathlib import Path

from fedbus.report import load_run
from fedbus.report.figures import MAX_WATERFALL_SPANS

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
FIGURES = ("fig-accuracy", "fig-waterfall")
# Chromium's log line for a page console message, e.g. [...:INFO:CONSOLE:1] "text", source: ...
CONSOLE = re.compile(r":(INFO|WARNING|ERROR|VERBOSE\d*):CONSOLE[^\]]*\]\s*(.*)")


class DomCensus(HTMLParser):
    """Per figure id: its .main-svg elements, drawn lines (path.js-line with a path) and bar
    points (g.point > path with a path); and the error recorder's count."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        # (tag, enclosing figure id, classes, inside a plot's traces: not the legend's samples)
        self.stack: list[tuple[str, str | None, set[str], bool]] = []
        self.found = {f: {"main_svg": 0, "lines": 0, "bars": 0} for f in FIGURES}
        self.errors_count: str | None = None
        self.errors_text = ""
        self._in_errors = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        fig = a.get("id") if a.get("id") in self.found else (self.stack[-1][1] if self.stack else None)
        if a.get("id") == "report-errors":
            self.errors_count = a.get("data-count")
            self._in_errors = True
        in_plot = "overplot" in classes or bool(self.stack and self.stack[-1][3])
        if fig is not None:
            f = self.found[fig]
            f["main_svg"] += "main-svg" in classes
            drawn = tag == "path" and len(a.get("d") or "") > 2 and in_plot
            f["lines"] += drawn and "js-line" in classes
            f["bars"] += drawn and bool(self.stack) and "point" in self.stack[-1][2]
        if tag not in VOID:
            self.stack.append((tag, fig, classes, in_plot))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.stack.pop()

    def handle_endtag(self, tag):
        if tag == "pre":
            self._in_errors = False
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                return

    def handle_data(self, data):
        if self._in_errors:
            self.errors_text += data


def chromium_binary(name: str | None) -> str:
    for candidate in ([name] if name else ["chromium", "chromium-browser", "google-chrome"]):
        path = shutil.which(candidate)
        if path:
            return path
    raise SystemExit("chromium not found: apt-get install -y chromium (Debian's package), or pass --chromium")


def chromium(binary: str, profile: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    base = [binary, "--headless", "--disable-gpu", "--no-first-run", "--disable-extensions", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND", "--virtual-time-budget=20000"]
    if os.geteuid() == 0:
        base.append("--no-sandbox")
    return subprocess.run(base + list(args), capture_output=True, text=True, timeout=timeout)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    if head[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def demo_run(tmp: Path, workers: int, rounds: int) -> Path:
    run_dir = tmp / "demo"
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "fedbus.cli", "demo", "--workers", str(workers), "--rounds",
                          str(rounds), "--run-dir", str(run_dir), "--timeout", "300"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"demo failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    printed = re.search(r"^report: (.+)$", out.stdout, re.M)
    if printed is None or Path(printed.group(1)) != run_dir / "report.html":
        raise SystemExit(f"the demo did not print its report's path:\n{out.stdout[-2000:]}")
    print(f"demo: {workers} workers, {rounds} rounds in {time.perf_counter() - started:.1f} s; "
          f"report {printed.group(1)}")
    return run_dir


def expected_curves(report: str) -> int:
    """Curves (scatter traces) in the accuracy figure's data, from the page itself."""
    m = re.search(r'Plotly\.newPlot\(\s*"fig-accuracy",\s*', report)
    if m is None:
        return 0
    data, _ = json.JSONDecoder().raw_decode(report, m.end())
    return sum(1 for t in data if t.get("type") == "scatter")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="an existing coordinator run directory (default: run a small demo)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--screenshot", default="runs/report-screenshot.png")
    p.add_argument("--window-size", default="1280,5200")
    p.add_argument("--chromium", help="browser binary (default: chromium on PATH)")
    args = p.parse_args()
    binary = chromium_binary(args.chromium)
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        run_dir = Path(args.run_dir) if args.run_dir else demo_run(tmp, args.workers, args.rounds)
        page = run_dir / "report.html"
        if not page.exists():
            raise SystemExit(f"{page} does not exist")
        html_text = page.read_text(encoding="utf-8")
        page_mib = page.stat().st_size / 2**20
        data = load_run(run_dir)
        spans = min(len(data.traces.trace), MAX_WATERFALL_SPANS) if data.traces else 0
        curves = expected_curves(html_text)

        started = time.perf_counter()
        dumped = chromium(binary, tmp / "profile-dom", "--enable-logging=stderr", "--v=0", "--dump-dom",
                          page.resolve().as_uri())
        dom_s = time.perf_counter() - started
        census = DomCensus()
        census.feed(dumped.stdout)
        console = [m.groups() for m in map(CONSOLE.search, dumped.stderr.splitlines()) if m]
        # Chromium logs every console message at INFO, errors included: the page writes none
        # of its own, so any message at all is a finding.
        console_errors = [text for _, text in console]

        # Negative control: the same page with a broken script and a console.error must be
        # seen as failing by both detectors, or their zeros above mean nothing.
        broken = tmp / "broken.html"
        control_script = '<script>console.error("control");no_such_fn();</script>'
        broken.write_text(html_text.replace("</body>", control_script + "</body>"), encoding="utf-8")
        control = chromium(binary, tmp / "profile-control", "--enable-logging=stderr", "--v=0", "--dump-dom",
                           broken.as_uri())
        control_census = DomCensus()
        control_census.feed(control.stdout)
        control_console = [m.groups() for m in map(CONSOLE.search, control.stderr.splitlines()) if m]

        shot = Path(args.screenshot).resolve()
        shot.unlink(missing_ok=True)
        shot.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        chromium(binary, tmp / "profile-shot", f"--window-size={args.window_size}", f"--screenshot={shot}",
                 page.resolve().as_uri())
        shot_s = time.perf_counter() - started

    acc, fall = census.found["fig-accuracy"], census.found["fig-waterfall"]
    checks = {
        "chromium exited 0": dumped.returncode == 0,
        "page error recorder found, 0 errors": census.errors_count == "0",
        "no console message in Chromium's log": not console_errors,
        "accuracy figure drawn (.main-svg)": acc["main_svg"] > 0,
        f"accuracy figure: {curves} curves in its data, each drawn": curves > 0 and acc["lines"] == curves,
        "waterfall drawn (.main-svg)": fall["main_svg"] > 0,
        f"waterfall: one bar per span of the round's trace ({spans})": spans > 0 and fall["bars"] == spans,
        "screenshot written": shot.exists() and shot.stat().st_size > 0,
        "control page with 2 script errors: the page recorder counts 2": control_census.errors_count == "2",
        "control page: Chromium's log shows console errors": len(control_console) >= 2,
    }
    print(f"{version}; report {page} ({page_mib:.1f} MiB{', removed with the demo run' if not args.run_dir else ''})")
    print(f"dump-dom {dom_s:.1f} s: DOM {len(dumped.stdout) / 2**20:.1f} MiB; page errors {census.errors_count!r}"
          f"{' ' + census.errors_text.strip()[:500] if census.errors_text.strip() else ''}; console lines "
          f"{len(console)}, errors {len(console_errors)}{' ' + repr(console_errors[:3]) if console_errors else ''}")
    print(f"accuracy figure: main-svg {acc['main_svg']}, lines drawn {acc['lines']} of {curves}; waterfall: "
          f"main-svg {fall['main_svg']}, bars drawn {fall['bars']} of {spans} spans")
    print(f"control (broken) page: page errors {control_census.errors_count!r}, console lines "
          f"{[text[:60] for _, text in control_console[:2]]}")
    if shot.exists():
        width, height = png_size(shot)
        print(f"screenshot {shot} ({width}x{height}, {shot.stat().st_size / 1024:.0f} KiB) in {shot_s:.1f} s")
    for name, ok in checks.items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
