"""The selection options of a project (issue 12): cold start, groups; defaults, PATCH, errors."""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient


def _create(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    payload = {"name": "derm", "task": "classification", "classes": ["nv", "mel"], **body}
    return client.post("/projects", json=payload, headers=headers)


def test_defaults_keep_todays_behaviour(client: TestClient, admin_headers: dict[str, str]) -> None:
    body = _create(client, admin_headers).json()
    assert (body["cold_start"], body["group_key"], body["exclude_labeled_groups"]) == (
        "random",
        None,
        False,
    )


def test_set_patch_and_reset(client: TestClient, admin_headers: dict[str, str]) -> None:
    created = _create(client, admin_headers, cold_start="typiclust", group_key=" lesion_id ").json()
    assert (created["cold_start"], created["group_key"]) == ("typiclust", "lesion_id")
    url = f"/projects/{created['id']}"
    changed = client.patch(
        url, json={"cold_start": "probcover", "exclude_labeled_groups": True}, headers=admin_headers
    ).json()
    assert changed["cold_start"] == "probcover" and changed["exclude_labeled_groups"] is True
    assert changed["group_key"] == "lesion_id"
    reset = client.patch(url, json={"group_key": None}, headers=admin_headers).json()
    assert reset["group_key"] is None and reset["cold_start"] == "probcover"


def test_bad_values_are_refused(client: TestClient, admin_headers: dict[str, str]) -> None:
    for body in ({"cold_start": "kmeans"}, {"group_key": ""}, {"exclude_labeled_groups": "x"}):
        response = _create(client, admin_headers, **body)
        assert response.status_code == 422, body
        assert response.json()["error"] == "ValidationError"
    created = _create(client, admin_headers).json()
    response = client.patch(
        f"/projects/{created['id']}", json={"cold_start": None}, headers=admin_headers
    )
    assert response.status_code == 422 and response.json()["error"] == "InvalidProjectConfig"
