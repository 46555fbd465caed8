"""The OpenAPI schema says what the server answers (issue 14, L3).

- Every error is documented as the envelope (``ErrorEnvelope``), FastAPI's own request
  validation 422 included (the app renders it in the envelope): never ``HTTPValidationError``.
- ``/ls/projects/{project_id}/health`` declares its path parameter.
- ``POST /labels`` (a body the route parses by hand) declares its JSON and multipart bodies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.error_schemas import ErrorEnvelope
from app.labels.schemas import LabelCreate
from app.main import create_app
from app.models import Image, Project
from app.settings import Settings
from tests.conftest import png_bytes

ENVELOPE = {"$ref": "#/components/schemas/ErrorEnvelope"}
OPEN = {("get", "/health"), ("get", "/ready"), ("get", "/ls/health")}
OPEN_PREFIX = "/ls/projects/{project_id}/health"
METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    where: Path = tmp_path_factory.mktemp("openapi")
    return create_app(Settings(environment="test", data_dir=where), migrate=False).openapi()


@pytest.fixture
def db_kind() -> str:
    """The schema is the same on both databases: SQLite only (overrides the conftest's)."""
    return "sqlite"


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if method in METHODS
    ]


def _schema_of(response: dict[str, Any]) -> Any:
    return response.get("content", {}).get("application/json", {}).get("schema")


def test_no_operation_declares_fastapis_validation_error(schema: dict[str, Any]) -> None:
    text = json.dumps(schema)
    assert "HTTPValidationError" not in text
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    assert "ErrorEnvelope" in schema["components"]["schemas"]


def test_every_client_error_is_the_envelope(schema: dict[str, Any]) -> None:
    operations = _operations(schema)
    assert len(operations) >= 40
    for method, path, operation in operations:
        responses = operation["responses"]
        assert "4XX" in responses, (method, path)
        errors = {code: r for code, r in responses.items() if code.startswith("4")}
        for code, response in errors.items():
            assert _schema_of(response) == ENVELOPE, (method, path, code)


def test_operations_with_input_declare_the_envelope_422(schema: dict[str, Any]) -> None:
    for method, path, operation in _operations(schema):
        if operation.get("parameters") or operation.get("requestBody"):
            assert _schema_of(operation["responses"]["422"]) == ENVELOPE, (method, path)


def test_operations_with_a_credential_declare_401(schema: dict[str, Any]) -> None:
    for method, path, operation in _operations(schema):
        responses = operation["responses"]
        if (method, path) in OPEN or path == OPEN_PREFIX:
            assert "401" not in responses, (method, path)
        else:
            assert _schema_of(responses["401"]) == ENVELOPE, (method, path)
    admin_only = schema["paths"]["/users"]["post"]["responses"]
    assert _schema_of(admin_only["403"]) == ENVELOPE


def test_the_rewrite_is_stable(tmp_path: Path) -> None:
    """/openapi.json may be asked for many times: the rewrite of the cached schema is
    idempotent."""
    app = create_app(Settings(environment="test", data_dir=tmp_path), migrate=False)
    first = json.dumps(app.openapi(), sort_keys=True)
    assert json.dumps(app.openapi(), sort_keys=True) == first
    with TestClient(app) as client:
        served = client.get("/openapi.json")
    assert json.dumps(served.json(), sort_keys=True) == first


def test_the_envelope_schema_takes_both_kinds_of_detail(schema: dict[str, Any]) -> None:
    envelope = schema["components"]["schemas"]["ErrorEnvelope"]
    assert set(envelope["required"]) == {"error", "detail"}
    kinds = envelope["properties"]["detail"]["anyOf"]
    assert {"type": "string"} in kinds
    assert {"type": "array", "items": {"$ref": "#/components/schemas/ValidationIssue"}} in kinds


def test_real_422s_match_the_declared_envelope(
    client: TestClient,
    make_project: Callable[..., Project],
    annotator_headers: dict[str, str],
    admin_headers: dict[str, str],
) -> None:
    """A request-validation 422, a hand-parsed body's 422, a domain 422, a 401 and a 404:
    each is an ErrorEnvelope, as the schema declares."""
    project = make_project()
    answers = {
        "ValidationError": client.get("/queue?project_id=x", headers=annotator_headers),
        "labels ValidationError": client.post("/labels", json={}, headers=annotator_headers),
        "NumberOutOfRange": client.get(f"/projects/{2**64}", headers=annotator_headers),
        "domain": client.post(
            "/projects",
            json={"name": "one class", "task": "classification", "classes": ["a"]},
            headers=admin_headers,
        ),
        "Unauthorized": client.get(f"/projects/{project.id}"),
        "NotFound": client.get("/projects/987654321", headers=annotator_headers),
    }
    for what, response in answers.items():
        assert 400 <= response.status_code < 500, (what, response.status_code)
        envelope = ErrorEnvelope.model_validate(response.json())
        if what.endswith("ValidationError"):
            assert envelope.error == "ValidationError"
            assert isinstance(envelope.detail, list), what
        else:
            assert isinstance(envelope.detail, str), what
    assert answers["domain"].status_code == 422


def test_ls_project_health_declares_its_path_parameter(schema: dict[str, Any]) -> None:
    operation = schema["paths"]["/ls/projects/{project_id}/health"]["get"]
    [parameter] = operation["parameters"]
    assert parameter["name"] == "project_id"
    assert parameter["in"] == "path"
    assert parameter["required"] is True
    assert parameter["schema"]["type"] == "integer"


def test_ls_project_health_still_answers(client: TestClient) -> None:
    response = client.get("/ls/projects/7/health")
    assert response.status_code == 200
    assert response.json()["status"] == "UP"


def test_post_labels_declares_json_and_multipart_bodies(schema: dict[str, Any]) -> None:
    body = schema["paths"]["/labels"]["post"]["requestBody"]
    assert body["required"] is True
    content = body["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/LabelCreate"}
    components = schema["components"]["schemas"]
    assert components["LabelCreate"]["required"] == ["image_id", "idempotency_key"]
    assert "RleMask" in components  # what LabelCreate.mask_rle refers to

    form = content["multipart/form-data"]["schema"]
    fields = set(LabelCreate.model_fields)
    assert set(form["properties"]) == fields | {"mask"}  # the model's fields, and the PNG
    assert set(form["required"]) == {"image_id", "idempotency_key"}
    assert form["properties"]["mask"]["format"] == "binary"
    assert content["multipart/form-data"]["encoding"]["mask"]["contentType"] == "image/png"
    for code in ("413", "415", "422"):
        assert _schema_of(schema["paths"]["/labels"]["post"]["responses"][code]) == ENVELOPE


def test_post_labels_takes_what_the_schema_declares(
    client: TestClient,
    make_project: Callable[..., Project],
    make_image: Callable[..., Image],
    annotator_headers: dict[str, str],
) -> None:
    """Both declared bodies work as before: a JSON class label, a multipart PNG mask."""
    project = make_project()
    image = make_image(project)
    as_json = client.post(
        "/labels",
        json={"image_id": image.id, "idempotency_key": "openapi-json", "class_index": 1},
        headers=annotator_headers,
    )
    assert as_json.status_code == 201, as_json.text

    segmentation = make_project(task="segmentation", classes=["lesion"])
    seg_image = make_image(segmentation, width=32, height=24)
    as_form = client.post(
        "/labels",
        data={"image_id": str(seg_image.id), "idempotency_key": "openapi-form"},
        files={"mask": ("mask.png", png_bytes(32, 24, (255, 0, 0), mode="L"), "image/png")},
        headers=annotator_headers,
    )
    assert as_form.status_code == 201, as_form.text
    assert as_form.json()["mask_url"]
