"""Users and their API tokens (stored hashed; the plain token is returned once)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict
from app.models import Role, User
from app.security import hash_token, new_token


class UserExists(Conflict):
    code = "UserExists"


def create_user(session: Session, name: str, role: Role | str) -> tuple[User, str]:
    """Create a user; returns the row and the plain token (only its hash is stored)."""
    name = name.strip()
    role = Role(role)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise UserExists(f"A user named {name!r} already exists; pick another name.")
    token = new_token()
    user = User(name=name, role=role.value, token_hash=hash_token(token))
    try:
        with session.begin_nested():  # a concurrent insert of the same name loses here
            session.add(user)
            session.flush()
    except IntegrityError as exc:
        raise UserExists(f"A user named {name!r} already exists; pick another name.") from exc
    return user, token


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.id)))
