"""The OpenAPI schema as the server really answers (``install_openapi``).

FastAPI documents a request-validation 422 as its ``HTTPValidationError``; this server answers
every error, that one included, in the envelope of :mod:`app.errors`. ``install_openapi``
rewrites the generated schema so that:

- every operation's client errors (``4XX``) are the :class:`~app.error_schemas.ErrorEnvelope`,
  and its 422 (wherever FastAPI declared one) too;
- an operation that needs a credential declares 401, and 403 where a role can be refused;
- a body a route parses by hand (``POST /labels``: JSON or multipart) is declared with
  :func:`hand_parsed_body`, whose models are added to the components here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.error_schemas import ErrorEnvelope
from app.labels.schemas import LabelCreate

REF_PREFIX = "#/components/schemas/"
_ENVELOPE_REF = {"$ref": f"{REF_PREFIX}{ErrorEnvelope.__name__}"}
_FASTAPI_422_REF = f"{REF_PREFIX}HTTPValidationError"
_FASTAPI_422_MODELS = ("HTTPValidationError", "ValidationError")
HTTP_METHODS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})

# Models that only a hand-parsed body refers to (FastAPI never sees them), added to the
# components under their class names.
EXTRA_MODELS: tuple[type[BaseModel], ...] = (ErrorEnvelope, LabelCreate)

DESCRIPTIONS = {
    "4XX": "A client error, in the error envelope.",
    "401": "Unauthorized: no token, or an unknown, revoked or expired one.",
    "403": "Forbidden: the caller's role may not do this.",
    "422": (
        "Invalid input: ValidationError (the request does not match this schema; detail lists "
        "the issues), or a domain check's code (InvalidInput, NumberOutOfRange, ...)."
    ),
}


def envelope_response(description: str) -> dict[str, Any]:
    """An OpenAPI response object: ``description``, the body the error envelope."""
    return {"description": description, "content": {"application/json": {"schema": _ENVELOPE_REF}}}


def hand_parsed_body(
    json_model: type[BaseModel],
    form_schema: dict[str, Any],
    *,
    form_encoding: dict[str, Any] | None = None,
    description: str = "",
) -> dict[str, Any]:
    """``openapi_extra`` declaring a request body that the route reads itself: JSON as
    ``json_model`` (which must be in :data:`EXTRA_MODELS`), or multipart form data as
    ``form_schema`` (with the OpenAPI ``encoding`` of its fields)."""
    if json_model not in EXTRA_MODELS:
        raise ValueError(f"Add {json_model.__name__} to app.openapi.EXTRA_MODELS.")
    form: dict[str, Any] = {"schema": form_schema}
    if form_encoding:
        form["encoding"] = form_encoding
    body: dict[str, Any] = {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": f"{REF_PREFIX}{json_model.__name__}"}},
            "multipart/form-data": form,
        },
    }
    if description:
        body["description"] = description
    return {"requestBody": body}


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    for dep in dependant.dependencies:
        if dep.call is not None:
            yield dep.call
        yield from _calls(dep)


def _auth_errors(dependant: Dependant) -> tuple[str, ...]:
    """The 401/403 a route's credential dependencies can answer."""
    from app.deps import current_user
    from app.integrations.labelstudio.endpoints import ls_caller, ls_integration

    calls = set(_calls(dependant))
    if current_user in calls:
        return ("401", "403")  # an integration credential is refused everywhere but /ls/*
    if ls_integration in calls:
        return ("401", "403")
    if ls_caller in calls:
        return ("401",)
    return ()


def _route_auth_errors(app: FastAPI) -> dict[tuple[str, str], tuple[str, ...]]:
    """(path, method) -> the auth errors of each operation in the schema."""
    found: dict[tuple[str, str], tuple[str, ...]] = {}
    for context in iter_route_contexts(app.routes):
        if not isinstance(context.original_route, APIRoute):
            continue
        route: Any = context  # an effective route: the included path, the merged dependant
        if not route.include_in_schema or route.dependant is None:
            continue
        errors = _auth_errors(route.dependant)
        for method in route.methods:
            found[(route.path_format, method.lower())] = errors
    return found


def _extra_schemas() -> dict[str, Any]:
    _, top = models_json_schema(
        [(model, "validation") for model in EXTRA_MODELS],
        ref_template=REF_PREFIX + "{model}",
    )
    schemas: dict[str, Any] = top.get("$defs", {})
    return schemas


def describe_errors(schema: dict[str, Any], auth: dict[tuple[str, str], tuple[str, ...]]) -> None:
    """Rewrite ``schema`` (FastAPI's) in place as the module's docstring says; idempotent."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for name, definition in _extra_schemas().items():
        components.setdefault(name, definition)
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            for code, response in list(responses.items()):
                content = response.get("content", {}).get("application/json", {})
                if content.get("schema", {}).get("$ref") == _FASTAPI_422_REF:
                    responses[code] = envelope_response(DESCRIPTIONS["422"])
                elif code.startswith("4") and "content" not in response:
                    responses[code] = envelope_response(response.get("description", ""))
            for code in auth.get((path, method), ()):
                responses.setdefault(code, envelope_response(DESCRIPTIONS[code]))
            responses.setdefault("4XX", envelope_response(DESCRIPTIONS["4XX"]))
    for name in _FASTAPI_422_MODELS:  # FastAPI's, unless something else still refers to them
        if f'"{REF_PREFIX}{name}"' not in json.dumps(schema["paths"]):
            components.pop(name, None)


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` (and ``/openapi.json``) return the rewritten schema."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # FastAPI's, cached until the routes change
        describe_errors(schema, _route_auth_errors(app))
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
