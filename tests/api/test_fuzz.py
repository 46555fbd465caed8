"""A bounded Schemathesis run over every operation of the OpenAPI schema (issue #14).

The app runs in-process (ASGI) on the SQLite test database, with a few seeded rows. Every
operation gets ``MAX_EXAMPLES`` derandomized cases (valid and invalid requests: schemathesis'
positive and negative modes; in half of them the project, image and class ids are replaced
by existing ones so that the cases get past 404), with no shrinking and no example database,
sent with an admin token and then with an annotator token (``/ls/*`` also with an integration
credential). Checks: no 5xx (``not_a_server_error``) and every response matches the schema
(``response_schema_conformance``). All failures are collected and reported together.

Excluded: only revoking or rotating the fuzzing callers' own tokens (every later case would
be a 401). Rounds, warm starts and webhook deliveries are sent after the commit to the test
settings' own broker, a SQLite file under the test's data directory that no worker reads;
webhook URLs are checked without a DNS lookup."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.core.result import Err, Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.models import Project, Role, User

# Cases per operation and caller; CORELOOP_FUZZ_EXAMPLES=500 for a deeper run by hand.
MAX_EXAMPLES = int(os.environ.get("CORELOOP_FUZZ_EXAMPLES", "25"))
CHECKS = [not_a_server_error, response_schema_conformance]


@pytest.fixture
def db_kind() -> str:
    """One database is enough here: SQLite (overrides the conftest's two-kind fixture)."""
    return "sqlite"


@pytest.fixture
def seeded(
    make_project: Callable[..., Project],
    make_image: Callable[..., Any],
) -> dict[str, list[int]]:
    """Values to aim at: parameter name -> ids that exist (and valid class indexes)."""
    classification = make_project()
    segmentation = make_project(task="segmentation", classes=["lesion"])
    images = [
        make_image(project, split=split).id
        for project in (classification, segmentation)
        for split in ("pool", "pool", "test")
    ]
    return {
        "project_id": [classification.id, segmentation.id],
        "image_id": images,
        "class_index": [0, 1],
    }


@st.composite
def _steered(
    draw: st.DrawFn, cases: st.SearchStrategy[schemathesis.Case], known: dict[str, list[int]]
) -> schemathesis.Case:
    """A generated case; in half of them, ids (path, query, body) replaced by existing ones,
    so that the fuzzing reaches past 404."""
    case = draw(cases)
    if draw(st.booleans()):
        for container in (case.path_parameters, case.query, case.body):
            if not isinstance(container, dict):
                continue
            for name, ids in known.items():
                if name in container:
                    container[name] = draw(st.sampled_from(ids))
    return case


def _names_one_of(case: schemathesis.Case, user_ids: set[int]) -> bool:
    """Whether the case's ``user_id`` (valid or not, as the server may read it) is one of these."""
    value = (case.path_parameters or {}).get("user_id")
    try:
        return float(str(value).strip()) in user_ids
    except ValueError:
        return False


def _cases(
    operation: schemathesis.APIOperation, known: dict[str, list[int]], keep_users: set[int]
) -> st.SearchStrategy[schemathesis.Case]:
    """Valid and invalid requests (schemathesis' positive and negative modes), some aimed at
    existing rows; never one that revokes or rotates the token of a caller in ``keep_users``."""
    cases = st.one_of(
        [
            operation.as_strategy(generation_mode=mode)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        ]
    )
    return _steered(cases, known).filter(lambda case: not _names_one_of(case, keep_users))


def _fuzz(
    operation: schemathesis.APIOperation,
    role: Role,
    headers: dict[str, str],
    known: dict[str, list[int]],
    keep_users: set[int],
) -> list[str]:
    """Run the operation's cases; return one line per distinct failure.

    ``keep_users``: user ids never revoked or rotated (the fuzzing callers themselves)."""
    found: dict[str, str] = {}

    @given(case=_cases(operation, known, keep_users))
    @settings(
        max_examples=MAX_EXAMPLES,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        response = case.call(headers=headers)
        try:
            case.validate_response(response, checks=CHECKS, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                _record(found, f"{operation.label} as {role.value}", failure, response, case)

    run()
    return list(found.values())


def _record(
    found: dict[str, str],
    label: str,
    failure: Failure,
    response: schemathesis.Response,
    case: schemathesis.Case,
) -> None:
    key = f"{label}: {failure.title}"
    if key not in found:
        first_line = failure.message.strip().splitlines()[0] if failure.message else ""
        found[key] = (
            f"{key} ({response.status_code}: {first_line[:200]})\n"
            f"    {case.as_curl_command()}\n    -> {response.text[:300]}"
        )


@pytest.mark.slow
def test_every_operation_survives_fuzzing(
    app: Any,
    seeded: dict[str, list[int]],
    make_user: Callable[..., tuple[User, str]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    callers = {
        role: make_user(f"fuzz-{role.value}", role)
        for role in (Role.admin, Role.annotator, Role.integration)
    }
    keep_users = {user.id for user, _ in callers.values()}
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    results = list(schema.get_all_operations())
    assert not [r.err() for r in results if isinstance(r, Err)]  # the schema itself is valid
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) >= 40  # every operation of the app, not an empty schema

    failures: list[str] = []
    calls = 0
    started = time.monotonic()
    for operation in operations:
        roles = [Role.admin, Role.annotator]
        if operation.path.startswith("/ls/"):
            roles.append(Role.integration)
        for role in roles:
            headers = {"Authorization": f"Bearer {callers[role][1]}"}
            failures += _fuzz(operation, role, headers, seeded, keep_users)
            calls += 1
    elapsed = time.monotonic() - started
    with TestClient(app) as client:  # the callers were never locked out along the way
        for _, token in callers.values():
            me = client.get("/users/me", headers={"Authorization": f"Bearer {token}"})
            assert me.status_code in (200, 403), me.text  # 403: the integration credential
    with capsys.disabled():
        print(f"\nfuzzed {len(operations)} operations ({calls} runs) in {elapsed:.1f} s")
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures)
