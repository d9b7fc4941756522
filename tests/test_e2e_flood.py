"""A real job under flood must complete every round on time (issue 7, acceptance 2).

While a 5-round job runs (nats-server, coordinator and four workers through the CLI),
separate processes publish:
- 100k junk messages on heartbeat subjects and 100k on update subjects from a client
  with no key (random bytes, garbage headers, truncated frames, unlisted signers,
  forged claims of listed workers), as fast as they can;
- a validly signed heartbeat storm from w05, a listed worker whose worker process is
  not running (it enters every cohort while it storms, so those rounds close at their
  deadline with the four real updates);
- the same from a second process, signed with w01's key, while w01's real worker
  process keeps working.

The coordinator's cost per 100k junk messages is printed and written to
<tmp>/flood-result.json: peak RSS increase, audit records, bytes of its log. Budgets:
at most 1,000 audit records and 1 MB of log per 100k junk, and < 300 MB more memory.
"""

from __future__ import annotations

import pytest

from tests.flood_support import FloodPlan, format_result, run_flooded_job

pytestmark = pytest.mark.e2e

AUDIT_RECORDS_PER_100K = 1_000
LOG_BYTES_PER_100K = 1_000_000
RSS_INCREASE_MB = 300


def test_job_completes_every_round_under_junk_and_heartbeat_storms(nats_server, tmp_path):
    plan = FloodPlan()
    out = run_flooded_job(tmp_path, nats_server.url, plan)
    report = format_result(out)
    print(report)
    print(f"(details: {tmp_path / 'flood-result.json'})")

    # The harness really flooded: every publisher ran to its count.
    assert out["junk_sent"] >= 200_000, out["publishers"]
    for name, pub in out["publishers"].items():
        assert pub.get("sent", 0) > 0, (name, pub)

    assert out["job_ok"], report
    # Not a vacuous pass: the flood ran while rounds were open (round 1 waits for the
    # storming w05, and rounds with w05 in the cohort last until their deadline).
    assert out["seconds"].get("flood_while_rounds_ran", 0) > 0, report
    per = out["per_100k_junk"]
    assert per["audit_records"] <= AUDIT_RECORDS_PER_100K, report
    assert per["coordinator_log_bytes"] <= LOG_BYTES_PER_100K, report
    assert out["coordinator_rss_increase_mb"] < RSS_INCREASE_MB, report
