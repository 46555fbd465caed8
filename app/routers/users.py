"""Users: who am I, and (admins) create users with a token shown once."""

from __future__ import annotations

from fastapi import APIRouter, status

from app.deps import AdminUser, CurrentUser, SessionDep
from app.schemas.users import UserCreate, UserCreated, UserOut
from app.services import users as service

router = APIRouter(prefix="/users", tags=["users"])


@router.get("/me", response_model=UserOut)
def read_me(user: CurrentUser) -> UserOut:
    return UserOut.model_validate(user)


@router.get("", response_model=list[UserOut])
def list_users(session: SessionDep, _: AdminUser) -> list[UserOut]:
    return [UserOut.model_validate(u) for u in service.list_users(session)]


@router.post("", response_model=UserCreated, status_code=status.HTTP_201_CREATED)
def create_user(body: UserCreate, session: SessionDep, _: AdminUser) -> UserCreated:
    user, token = service.create_user(session, body.name, body.role)
    return UserCreated(**UserOut.model_validate(user).model_dump(), token=token)
