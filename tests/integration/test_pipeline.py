"""End to end: intake over HTTP and Dramatiq, delivery through the sandbox, callbacks, fallback."""

from __future__ import annotations

import uuid

from tests.support.system import System, magic_phone, unique_phone


def test_http_send_is_delivered_on_the_first_channel(system: System) -> None:
    # Given a phone number kod.mobi delivers to
    to = unique_phone()
    # When a producer posts it
    response = system.api.post("/v1/messages", json={"to": to, "channels": ["telegram", "sms"]})
    # Then it is accepted at once, and delivered over telegram
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and body["channels"] == ["telegram", "sms"]
    final = system.wait_final(body["id"])
    assert final["status"] == "delivered"
    assert [(a["channel"], a["status"]) for a in final["attempts"]] == [("telegram", "delivered")]
    assert final["attempts"][0]["kodmobi_message_id"] is not None
    sends = system.sandbox_sends(to)
    assert len(sends) == 1 and sends[0]["channel"] == "telegram"


def test_raw_dramatiq_message_is_delivered_and_found_by_its_message_id(system: System) -> None:
    to = unique_phone()
    key = system.send_raw(to=to, channels=["whatsapp"], code="4321")
    final = system.wait_key_final(key)
    assert final["status"] == "delivered"
    assert system.sandbox_sends(to)[0]["code"] == "4321"


def test_refused_channel_falls_back_to_the_next_with_the_same_code(system: System) -> None:
    # Given telegram refuses the recipient (ERROR_USER_NOT_AUTHORIZE_ON_CHANNEL)
    to = magic_phone(telegram=10, whatsapp=0)
    response = system.api.post(
        "/v1/messages",
        json={"to": to, "channels": ["telegram", "whatsapp"]},
        headers={"Idempotency-Key": uuid.uuid4().hex},
    )
    final = system.wait_final(response.json()["id"])
    assert final["status"] == "delivered"
    first, second = final["attempts"]
    assert (first["channel"], first["status"], first["error_code"]) == (
        "telegram",
        "error",
        "ERROR_USER_NOT_AUTHORIZE_ON_CHANNEL",
    )
    assert "refused" in first["reason"]
    assert (second["channel"], second["status"]) == ("whatsapp", "delivered")


def test_failure_callback_falls_back(system: System) -> None:
    to = magic_phone(telegram=1, whatsapp=0)
    key = system.send_raw(to=to, channels=["telegram", "whatsapp"])
    final = system.wait_key_final(key)
    assert final["status"] == "delivered"
    assert [a["status"] for a in final["attempts"]] == ["failed", "delivered"]
    sends = system.sandbox_sends(to)
    assert [s["channel"] for s in sends] == ["telegram", "whatsapp"]
    assert sends[0]["code"] == sends[1]["code"]


def test_silence_past_the_deadline_falls_back(system: System) -> None:
    to = magic_phone(telegram=2, whatsapp=0)
    response = system.api.post(
        "/v1/messages", json={"to": to, "channels": ["telegram", "whatsapp"]}
    )
    final = system.wait_final(response.json()["id"], timeout_s=20)
    assert final["status"] == "delivered"
    assert [a["status"] for a in final["attempts"]] == ["timed_out", "delivered"]
    assert "no final callback" in final["attempts"][0]["reason"]


def test_chain_that_runs_out_fails_the_message(system: System) -> None:
    to = magic_phone(telegram=1, whatsapp=13, sms=1)
    response = system.api.post("/v1/messages", json={"to": to})
    final = system.wait_final(response.json()["id"])
    assert final["status"] == "failed"
    assert [a["channel"] for a in final["attempts"]] == ["telegram", "whatsapp", "sms"]
    assert final["failure_reason"].startswith("all channels failed")


def test_blocked_recipient_fails_without_trying_other_channels(system: System) -> None:
    to = magic_phone(telegram=14)
    response = system.api.post("/v1/messages", json={"to": to})
    final = system.wait_final(response.json()["id"])
    assert final["status"] == "failed"
    assert len(final["attempts"]) == 1
    assert "ERROR_PHONE_BLOCKED" in final["failure_reason"]


def test_check_code(system: System) -> None:
    to = unique_phone()
    created = system.api.post("/v1/messages", json={"to": to, "channels": ["sms"]}).json()
    system.wait_final(created["id"])
    sent_code = system.sandbox_sends(to)[0]["code"]
    wrong = "000000" if sent_code != "000000" else "111111"
    assert system.api.post(f"/v1/messages/{created['id']}/check", json={"code": wrong}).json() == {
        "valid": False,
        "reason": "mismatch",
    }
    assert system.api.post(
        f"/v1/messages/{created['id']}/check", json={"code": sent_code}
    ).json() == {"valid": True, "reason": None}
