"""The Python producer API used from another service: it sends, and leaves the host's
logging configuration and its global Dramatiq broker as they were."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.support.system import System, unique_phone

HOST_SERVICE = textwrap.dedent(
    """
    import json, logging, sys

    import dramatiq
    import structlog
    from dramatiq.brokers.stub import StubBroker

    # A host service with logging and a Dramatiq broker of its own
    handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)
    host_broker = StubBroker()
    dramatiq.set_broker(host_broker)

    import worker
    from worker import check_code, send_code

    accepted = send_code(sys.argv[1], channels=["sms"], code="4321")
    check = check_code(accepted.id, "1111")
    print(json.dumps({
        "id": accepted.id,
        "check": check.reason,
        "root_handlers_unchanged": logging.getLogger().handlers == [handler],
        "root_level": logging.getLogger().level,
        "broker_unchanged": dramatiq.get_broker() is host_broker,
        "structlog_configured": structlog.is_configured(),
        "actors_imported": "worker.actors" in sys.modules,
    }))
    """
)


def test_send_code_from_another_service_leaves_its_logging_and_broker_alone(
    system: System,
) -> None:
    # Given a host service with its own logging and global broker, and our settings
    to = unique_phone()
    env = {**os.environ, **system.env}
    # When it imports worker and sends a code, then checks a wrong one
    done = subprocess.run(
        [sys.executable, "-c", HOST_SERVICE, to],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    # Then its logging and broker are as it set them, and our actors were never imported
    assert seen["root_handlers_unchanged"] is True
    assert seen["root_level"] == 30
    assert seen["broker_unchanged"] is True
    assert seen["structlog_configured"] is False
    assert seen["actors_imported"] is False
    assert seen["check"] == "mismatch"
    # And the code is delivered by the system's worker, enqueued by actor name
    final = system.wait_final(seen["id"])
    assert final["status"] == "delivered"
    assert [s["code"] for s in system.sandbox_sends(to)] == ["4321"]
