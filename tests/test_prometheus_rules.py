"""deploy/prometheus: the alert rules pass `promtool check rules`, their unit tests
(alerts_test.yml) pass `promtool test rules` — among them "no round committed" firing on
a synthetic series — and the rules and the dashboard use only series fedbus exports.

promtool comes from Debian's `prometheus` package; .ci/run puts it in .venv/bin. Without
it these tests fail rather than skip: set FEDBUS_SKIP_PROMTOOL=1 to opt out explicitly
on a machine that cannot have it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "prometheus"


def promtool() -> str:
    found = shutil.which("promtool") or shutil.which("promtool", path=str(Path(sys.prefix) / "bin"))
    if found:
        return found
    if os.environ.get("FEDBUS_SKIP_PROMTOOL") == "1":
        pytest.skip("FEDBUS_SKIP_PROMTOOL=1: promtool checks opted out")
    pytest.fail("promtool not found (apt-get install prometheus, or run .ci/run); "
                "FEDBUS_SKIP_PROMTOOL=1 opts out explicitly")


def run(*args: str, cwd: Path = DEPLOY) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_alert_rules_pass_promtool_check():
    result = run("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_scrape_config_passes_promtool_check():
    result = run("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_unit_tests_pass_and_no_round_committed_fires():
    result = run("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FedbusNoRoundCommitted" in (DEPLOY / "alerts_test.yml").read_text()


def test_a_rule_that_never_fires_fails_its_unit_test(tmp_path):
    """The unit tests can fail: with 100 deadlines instead of 3, the stalled job of
    alerts_test.yml no longer fires FedbusNoRoundCommitted, and promtool says so."""
    rules = (DEPLOY / "alerts.yml").read_text()
    assert "> 3 * fedbus_round_deadline_seconds" in rules
    (tmp_path / "alerts.yml").write_text(rules.replace("> 3 * fedbus_round_deadline_seconds",
                                                       "> 100 * fedbus_round_deadline_seconds"))
    shutil.copy(DEPLOY / "alerts_test.yml", tmp_path / "alerts_test.yml")
    result = run("test", "rules", "alerts_test.yml", cwd=tmp_path)
    assert result.returncode != 0
    assert "FedbusNoRoundCommitted" in result.stdout + result.stderr


def exported_series() -> set[str]:
    """What the Prometheus exporter makes of fedbus/telemetry/metrics.py's instruments."""
    source = (ROOT / "fedbus" / "telemetry" / "metrics.py").read_text()
    names = set(re.findall(r'create_counter\(\s*"(fedbus_[a-z_]+)"', source))
    series = {f"{n}_total" for n in names}
    for n in re.findall(r'create_histogram\(\s*"(fedbus_[a-z_]+)"', source):
        series |= {f"{n}_bucket", f"{n}_sum", f"{n}_count"}
    series |= set(re.findall(r'create_gauge\(\s*"(fedbus_[a-z_]+)"', source))
    series |= {f"fedbus_worker_{split}_{m}" for split in ("train", "eval") for m in ("loss", "accuracy")}
    return series


@pytest.mark.parametrize("name", ["alerts.yml", "grafana-dashboard.json"])
def test_rules_and_dashboard_use_only_exported_series(name):
    used = set(re.findall(r"\b(fedbus_[a-z_]+)\b", (DEPLOY / name).read_text())) - {"fedbus_job"}
    assert used, name
    unknown = sorted(used - exported_series())
    assert not unknown, unknown
