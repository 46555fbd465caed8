"""Users: who am I, and (admins) create users with a token shown once, revoke or rotate it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request, status

from app.db import call_after_commit
from app.deps import AdminUser, CurrentUser, SessionDep, auth_cache
from app.users import service
from app.users.schemas import TokenRotate, UserCreate, UserCreated, UserOut

router = APIRouter(prefix="/users", tags=["users"])


@router.get("/me", response_model=UserOut)
def read_me(user: CurrentUser) -> UserOut:
    return UserOut.model_validate(user)


@router.get("", response_model=list[UserOut])
def list_users(session: SessionDep, _: AdminUser) -> list[UserOut]:
    return [UserOut.model_validate(u) for u in service.list_users(session)]


@router.post("", response_model=UserCreated, status_code=status.HTTP_201_CREATED)
def create_user(body: UserCreate, session: SessionDep, _: AdminUser) -> UserCreated:
    user, token = service.create_user(session, body.name, body.role, body.expires_in_days)
    return UserCreated(**UserOut.model_validate(user).model_dump(), token=token)


@router.post("/{user_id}/revoke", response_model=UserOut)
def revoke_token(user_id: int, request: Request, session: SessionDep, _: AdminUser) -> UserOut:
    """The user's token stops working at once in this process (and within 5 s in other API
    processes, whose token caches expire); no new token exists until a rotation."""
    user = service.revoke_token(session, user_id)
    call_after_commit(session, auth_cache(request).clear)
    return UserOut.model_validate(user)


@router.post("/{user_id}/rotate", response_model=UserCreated)
def rotate_token(
    user_id: int,
    request: Request,
    session: SessionDep,
    _: AdminUser,
    body: Annotated[TokenRotate | None, Body()] = None,
) -> UserCreated:
    """A new token for the user, shown only in this response; the old one stops working (as
    for a revocation). ``expires_in_days`` bounds the new token's life."""
    user, token = service.rotate_token(session, user_id, body.expires_in_days if body else None)
    call_after_commit(session, auth_cache(request).clear)
    return UserCreated(**UserOut.model_validate(user).model_dump(), token=token)
