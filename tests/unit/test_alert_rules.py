"""docs/ops/alerts.yml is valid Prometheus rules (promtool) over series we really export."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.tools import require
from worker import metrics

RULES = Path(__file__).resolve().parents[2] / "docs" / "ops" / "alerts.yml"
DASHBOARD = RULES.with_name("grafana-dashboard.json")

pytestmark = pytest.mark.prometheus

#: Series the web's scrape-time collector adds (worker.metrics.DatabaseGauges).
GAUGES = {"kodmobi_queue_depth", "kodmobi_oldest_queued_seconds", "kodmobi_open_attempts"}


def exported() -> set[str]:
    names = set(GAUGES)
    for collector in (
        metrics.MESSAGES, metrics.ATTEMPTS, metrics.FALLBACKS, metrics.API_REQUESTS,
        metrics.API_SECONDS, metrics.CALLBACKS, metrics.TIME_TO_DELIVERED,
    ):
        for family in collector.describe():
            names.add(family.name)
            names.update({f"{family.name}_total", f"{family.name}_bucket",
                          f"{family.name}_count", f"{family.name}_sum"})
    return names


def test_promtool_accepts_the_rules() -> None:
    promtool = require("promtool", "prometheus")
    # When promtool checks the rules file
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    # Then it finds them valid
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.parametrize("source", [RULES, DASHBOARD], ids=lambda p: p.name)
def test_rules_and_dashboard_name_only_series_we_export(source: Path) -> None:
    # Given the rules and the dashboard, every kodmobi_* series they query
    used = set(re.findall(r"\bkodmobi_[a-z_]+", source.read_text()))
    # Then is one the service exports
    assert used, f"{source.name} queries no kodmobi series"
    assert used <= exported(), f"unknown series: {sorted(used - exported())}"
