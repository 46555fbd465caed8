"""Label Studio's ML backend protocol: ``/ls/health``, ``/ls/setup``, ``/ls/predict``,
``/ls/webhook`` (and the same under ``/ls/projects/{project_id}``, which names the project).

Connect it in Label Studio as an ML backend with the URL ``<coreloop>/ls`` (or
``<coreloop>/ls/projects/<id>``); Label Studio then registers ``<url>/webhook`` for its events.

**Auth.** Label Studio sends no bearer token to an ML backend; it can send HTTP basic auth
(the backend's "Basic Auth" user and password). So ``/ls/setup``, ``/ls/predict`` and
``/ls/webhook`` take ``Authorization: Basic`` with the user ``coreloop`` and a coreloop API
token as the password, or ``Authorization: Bearer <token>``. ``/ls/setup`` and
``/ls/predict`` take any user's token; ``/ls/webhook`` stores labels in the name of Label
Studio's users, so it takes only an integration credential (``coreloop users create --role
integration``), a token that works nowhere else. Label Studio's auto-created webhook carries
no auth: give it the same ``Authorization`` header (Label Studio's webhook ``headers``), or
create the webhook with it before connecting the backend. With ``CORELOOP_LS_OPEN=1`` in the
environment, ``/ls/*`` needs no auth (a closed network). ``/ls/health`` is always open: it
reads nothing and must answer within 1 s.

**Who labels.** An annotation is stored as the coreloop member that stands for its Label
Studio user (``completed_by``): the member named after that user's e-mail (or
``ls:<e-mail>``), else the member named ``ls:<Label Studio user id>``. An annotation of a user
with no such member is refused (422 ``UnknownLabelStudioUser``); no user is ever created.

**Webhook.** Label Studio waits 1 s and never retries. A class label is one insert, so it is
stored in the request (committed before the answer). A brush annotation (mask decoding and a
PNG write) is acknowledged at once and stored by a background task after the answer; a crash
in between loses it, and a later update of the annotation in Label Studio re-sends it.
Redeliveries store nothing twice (the idempotency key is the annotation id + updated_at).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from typing import Annotated, Any

from fastapi import APIRouter, BackgroundTasks, Body, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from app.db import unit_of_work
from app.deps import SessionDep, SettingsDep, StorageDep, user_for_token
from app.errors import CoreloopError, Forbidden, Unauthorized
from app.integrations.labelstudio import service
from app.integrations.labelstudio.schemas import (
    LsAnnotationEvent,
    LsPredictRequest,
    LsPredictResponse,
    LsSetupRequest,
    LsSetupResponse,
    LsWebhookAck,
)
from app.models import Role, User
from app.settings import Settings
from app.storage import Storage

log = logging.getLogger(__name__)

router = APIRouter(prefix="/ls", tags=["label-studio"])

OPEN_ENV = "CORELOOP_LS_OPEN"
BASIC_USER = "coreloop"
ANNOTATION_ACTIONS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED"})


def ls_open() -> bool:
    return os.environ.get(OPEN_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def ls_token(header: str) -> str | None:
    """The coreloop token in ``Basic base64(coreloop:<token>)`` or ``Bearer <token>``."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() == "bearer":
        return value.strip() or None
    if scheme.lower() != "basic":
        return None
    try:
        user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    return password if user == BASIC_USER and password else None


async def ls_caller(request: Request) -> User | None:
    """The coreloop user whose token Label Studio sends; None when ``/ls`` is open."""
    if ls_open():
        return None
    token = ls_token(request.headers.get("authorization", ""))
    if token is None:
        raise Unauthorized(
            f"Set the ML backend's Basic Auth to user {BASIC_USER!r} and a coreloop API token "
            f"as the password (or send 'Authorization: Bearer <token>'); or set {OPEN_ENV}=1."
        )
    return await user_for_token(request, token)


LsCaller = Annotated[User | None, Depends(ls_caller)]


async def ls_integration(caller: LsCaller) -> User | None:
    """The caller of ``/ls/webhook``: only an integration credential speaks for Label Studio's
    users (None when ``/ls`` is open)."""
    if caller is not None and caller.role != Role.integration:
        raise Forbidden(
            f"/ls/webhook records labels in the name of Label Studio's users: it takes an "
            f"integration credential (`coreloop users create --role integration`), not the "
            f"token of {caller.role} {caller.name!r}.",
            code="IntegrationRequired",
        )
    return caller


LsIntegration = Annotated[User | None, Depends(ls_integration)]


def health() -> dict[str, str]:
    """Always up, from no data: Label Studio calls it before every batch, with a 1 s limit."""
    return {"status": "UP", "model_class": "coreloop"}


def project_health(project_id: int) -> dict[str, str]:
    """As ``/ls/health`` (the project is not read)."""
    return health()


def setup(
    body: LsSetupRequest, session: SessionDep, caller: LsCaller, project_id: int | None = None
) -> LsSetupResponse:
    """The project's newest model version (and a check of the labeling config)."""
    return service.setup(session, project_id, body, caller)


def predict(
    body: LsPredictRequest,
    session: SessionDep,
    storage: StorageDep,
    caller: LsCaller,
    project_id: int | None = None,
) -> LsPredictResponse:
    """Stored predictions of the newest model version, one per task, in order."""
    return service.predict(session, storage, project_id, body, caller)


def _record_later(
    sessions: sessionmaker[Session],
    settings: Settings,
    storage: Storage,
    event: LsAnnotationEvent,
    project_id: int | None,
) -> None:
    """The background half of the webhook: its own unit of work, after the answer."""
    try:
        with unit_of_work(sessions) as session:
            ack = service.record_annotation(session, settings, storage, event, project_id)
    except CoreloopError as exc:
        log.warning("Label Studio annotation %s refused: %s", event.annotation.id, exc.detail)
        return
    log.info("Label Studio annotation %s: %s", event.annotation.id, ack.status)


def webhook(
    request: Request,
    body: Annotated[dict[str, Any], Body()],
    background: BackgroundTasks,
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    _: LsIntegration,
    project_id: int | None = None,
) -> LsWebhookAck:
    """Label Studio's events: annotations become coreloop labels; the rest is ignored."""
    action = str(body.get("action", ""))
    if action not in ANNOTATION_ACTIONS:
        return LsWebhookAck(action=action, status="ignored", detail="not an annotation event")
    try:
        event = LsAnnotationEvent.model_validate(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False, include_context=False)) from exc
    if event.annotation.has_brush():
        if not event.annotation.was_cancelled:  # an unknown user is refused in the answer
            service.ls_member(session, event.annotation)
        sessions = request.app.state.sessions
        background.add_task(_record_later, sessions, settings, storage, event, project_id)
        return LsWebhookAck(action=action, status="queued")
    return service.record_annotation(session, settings, storage, event, project_id)


for _prefix, _health in (("", health), ("/projects/{project_id}", project_health)):
    router.add_api_route(f"{_prefix}/health", _health, methods=["GET"])
    router.add_api_route(f"{_prefix}/setup", setup, methods=["POST"])
    router.add_api_route(f"{_prefix}/predict", predict, methods=["POST"])
    router.add_api_route(f"{_prefix}/webhook", webhook, methods=["POST"])
