"""A real Prometheus scrapes the Procfile's processes of a short run (issue 11 item 1):
web at GET /metrics, the worker's two processes summed on its METRICS_PORT (multiprocess
mode, Dramatiq's own series beside ours), the clock on its METRICS_PORT."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.system import fresh_database, magic_phone, unique_phone
from tests.support.tools import require
from worker.dev import DevOptions, DevSystem
from worker.embedded import free_port
from worker.processes import ManagedProcess

pytestmark = [pytest.mark.prometheus, pytest.mark.slow]


@pytest.fixture(scope="module")
def dev(
    pg_server_url: str, redis_url: str, template_db: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DevSystem]:
    require("prometheus", "prometheus")
    root = tmp_path_factory.mktemp("dev")
    with pytest.MonkeyPatch.context() as mp, fresh_database(pg_server_url, template_db) as db:
        mp.setenv("DATABASE_URL", db)
        mp.setenv("REDIS_URL", redis_url)
        mp.delenv("KODMOBI_BASE_URL", raising=False)
        options = DevOptions(
            root=root / ".kodmobi",
            web_port=free_port(),
            worker_processes=2,
            worker_threads=4,
            log_dir=root / "logs",
            sandbox_args=["--callback-delay-ms", "50"],
            extra_env={
                "BROKER_NAMESPACE": f"kodmobi-test-{uuid.uuid4().hex[:8]}",
                "RECIPIENT_LIMIT": "0",
                "CHANNEL_COOLDOWN_S": "0",
                "DELIVERY_TIMEOUT_S": "3",
            },
        )
        with DevSystem(options) as system:
            yield system


@pytest.fixture(scope="module")
def prometheus(dev: DevSystem, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require("prometheus", "prometheus")
    home = tmp_path_factory.mktemp("prometheus")
    web = dev.options.web_port
    targets = {
        "web": f"127.0.0.1:{web}",
        "worker": f"127.0.0.1:{dev.metrics_ports['worker']}",
        "clock": f"127.0.0.1:{dev.metrics_ports['clock']}",
    }
    config = "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n"
    for job, target in targets.items():
        config += f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']\n"
    (home / "prometheus.yml").write_text(config)
    port = free_port()
    process = ManagedProcess(
        "prometheus",
        [
            binary,
            f"--config.file={home / 'prometheus.yml'}",
            f"--storage.tsdb.path={home / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        {},
        log_path=home / "prometheus.log",
    ).start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/-/ready", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.exited() is None, (home / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "prometheus not ready"
            time.sleep(0.2)
        yield url
    finally:
        process.stop()


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5, trust_env=False
    )
    response.raise_for_status()
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def value(prometheus: str, expr: str) -> float | None:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else None


def eventually(prometheus: str, expectations: dict[str, float], timeout_s: float = 40) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        seen = {expr: value(prometheus, expr) for expr in expectations}
        if seen == expectations:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {expectations}, Prometheus has {seen}")
        time.sleep(1)


def test_prometheus_scrapes_every_series_of_a_short_run(dev: DevSystem, prometheus: str) -> None:
    # Given a short run: two codes delivered at once, one after telegram's failure callback
    api = httpx.Client(
        base_url=dev.api_url, headers={"Authorization": f"Bearer {dev.api_token}"},
        timeout=10, trust_env=False,
    )
    recipients = [unique_phone(), unique_phone(), magic_phone(1)]
    ids = []
    for to in recipients:
        response = api.post("/v1/messages", json={"to": to, "channels": ["telegram", "whatsapp"]})
        assert response.status_code == 202, response.text
        ids.append(response.json()["id"])
    deadline = time.monotonic() + 30
    while any(api.get(f"/v1/messages/{i}").json()["status"] != "delivered" for i in ids):
        assert time.monotonic() < deadline, "messages not delivered"
        time.sleep(0.2)

    # When Prometheus has scraped web, worker and clock
    # Then every process is up, and the counters add up across processes and jobs
    eventually(
        prometheus,
        {
            'up{job="web"}': 1,
            'up{job="worker"}': 1,
            'up{job="clock"}': 1,
            'sum(kodmobi_messages_total{source="http", status="delivered"})': 3,
            'sum(kodmobi_attempts_total{channel="telegram", outcome="delivered"})': 2,
            'sum(kodmobi_attempts_total{channel="telegram", outcome="failed"})': 1,
            'sum(kodmobi_attempts_total{channel="whatsapp", outcome="delivered"})': 1,
            'sum(kodmobi_fallbacks_total{from_channel="telegram", to_channel="whatsapp",'
            ' reason="failure_callback"})': 1,
            # Sent by the worker's two processes, summed by its one exposition.
            'sum(kodmobi_api_requests_total{job="worker", endpoint="/manual/send",'
            ' status="200"})': 4,
            'sum(kodmobi_api_request_seconds_count{endpoint="/manual/send"})': 4,
            'sum(kodmobi_time_to_delivered_seconds_count)': 3,
            'sum(kodmobi_callbacks_total{outcome="applied"}) >= bool 4': 1,
            'max(kodmobi_queue_depth)': 0,
            'count(kodmobi_oldest_queued_seconds)': 1,
            'sum(kodmobi_open_attempts)': 0,
            'sum(dramatiq_messages_total{job="worker"}) >= bool 3': 1,
            'count(dramatiq_message_duration_milliseconds_count{job="worker"}) > bool 0': 1,
        },
    )
    api.close()


def test_every_contract_series_is_known_to_prometheus(dev: DevSystem, prometheus: str) -> None:
    names = set(
        httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=5, trust_env=False)
        .json()["data"]
    )
    contract = {
        "kodmobi_messages_total", "kodmobi_attempts_total", "kodmobi_fallbacks_total",
        "kodmobi_api_requests_total", "kodmobi_api_request_seconds_bucket",
        "kodmobi_callbacks_total", "kodmobi_time_to_delivered_seconds_bucket",
        "kodmobi_queue_depth", "kodmobi_oldest_queued_seconds", "kodmobi_open_attempts",
        "dramatiq_messages_total", "dramatiq_messages_inprogress",
    }
    assert contract <= names, sorted(contract - names)


def test_logs_hold_no_scrape_errors(dev: DevSystem) -> None:
    logs = Path(dev.options.log_dir or ".")
    for name in ("web", "worker", "clock"):
        text = (logs / f"{name}.log").read_text()
        assert "Traceback" not in text, f"{name}.log:\n{text[-3000:]}"


