"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter

from app.db import ping
from app.deps import SessionDep

router = APIRouter(tags=["health"])


@router.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
def ready(session: SessionDep) -> dict[str, str]:
    """The database answers. Unauthenticated, so it says nothing about the deployment."""
    ping(session)
    return {"status": "ready"}
