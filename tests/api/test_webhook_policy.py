"""Webhooks reach public addresses only, by default (issue 14, M4): the subscription-time
check, and credentials in URLs redacted in listings."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from app.models import Project
from app.netpolicy import check_webhook_url, redact_url

Headers = dict[str, str]

INTERNAL = [
    "http://127.0.0.1:8000/hook",
    "http://localhost/hook",
    "http://api.localhost/hook",
    "http://169.254.169.254/latest/meta-data/",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata.google.internal./computeMetadata/v1/",
    "http://10.0.0.5/hook",
    "http://172.16.3.4/hook",
    "http://192.168.1.10/hook",
    "http://100.64.0.1/hook",
    "http://0.0.0.0/hook",
    "http://2130706433/hook",  # 127.0.0.1 as one decimal number
    "http://0x7f.1/hook",
    "http://017700000001/hook",
    "http://127.1/hook",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://[fe80::1]/hook",
    "http://[fd00::1]/hook",
]


@pytest.mark.parametrize("url", INTERNAL)
def test_internal_addresses_are_refused(
    client: TestClient, make_project: Callable[..., Project], admin_headers: Headers, url: str
) -> None:
    project = make_project()
    body = {"url": url, "events": ["label.created"]}
    response = client.post(f"/projects/{project.id}/webhooks", json=body, headers=admin_headers)
    assert (response.status_code, response.json()["error"]) == (422, "WebhookAddressRefused")
    assert "CORELOOP_WEBHOOK_ALLOW_PRIVATE" in response.json()["detail"]
    listed = client.get(f"/projects/{project.id}/webhooks", headers=admin_headers).json()
    assert listed == []


@pytest.mark.parametrize("url", ["https://hooks.example.org/x", "http://93.184.216.34:8080/h"])
def test_public_addresses_are_accepted(url: str) -> None:
    check_webhook_url(url, allow_private=False)


def test_the_setting_allows_private_addresses() -> None:
    for url in INTERNAL:
        check_webhook_url(url, allow_private=True)


def test_credentials_in_urls_are_redacted_in_listings(
    client: TestClient, make_project: Callable[..., Project], admin_headers: Headers
) -> None:
    project = make_project()
    body = {"url": "https://bot:s3cret-pass@hooks.example.org/in?x=1", "events": ["round.done"]}
    created = client.post(f"/projects/{project.id}/webhooks", json=body, headers=admin_headers)
    assert created.status_code == 201, created.text
    listed = client.get(f"/projects/{project.id}/webhooks", headers=admin_headers)
    for shown in (created.json()["url"], listed.json()[0]["url"]):
        assert shown == "https://bot:***@hooks.example.org/in?x=1"
    assert "s3cret" not in listed.text and "s3cret" not in created.text


def test_redact_url() -> None:
    assert redact_url("https://hooks.example.org/a") == "https://hooks.example.org/a"
    assert redact_url("https://token@hooks.example.org/a") == "https://***@hooks.example.org/a"
    assert redact_url("http://u:p@h:81/a?b=c#d") == "http://u:***@h:81/a?b=c#d"
