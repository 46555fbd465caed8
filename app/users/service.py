"""Users and their API tokens (stored hashed; the plain token is returned once).

A token may expire (``token_expires_at``; None: never). Revoking replaces the stored hash by
the hash of a token nobody is shown, so the old token stops working and no new one exists
until the next rotation; rotating makes a new token (shown once) and drops the old one.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.models import Role, User, utcnow
from app.security import hash_token, new_token

MAX_EXPIRY_DAYS = 3650


class UserExists(Conflict):
    code = "UserExists"


def expiry(expires_in_days: int | None) -> datetime | None:
    """When a token made now expires (None: never)."""
    return None if expires_in_days is None else utcnow() + timedelta(days=expires_in_days)


def create_user(
    session: Session, name: str, role: Role | str, expires_in_days: int | None = None
) -> tuple[User, str]:
    """Create a user; returns the row and the plain token (only its hash is stored)."""
    name = name.strip()
    role = Role(role)
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise UserExists(f"A user named {name!r} already exists; pick another name.")
    token = new_token()
    user = User(
        name=name,
        role=role.value,
        token_hash=hash_token(token),
        token_expires_at=expiry(expires_in_days),
    )
    try:
        with session.begin_nested():  # a concurrent insert of the same name loses here
            session.add(user)
            session.flush()
    except IntegrityError as exc:
        raise UserExists(f"A user named {name!r} already exists; pick another name.") from exc
    return user, token


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.id)))


def get_user(session: Session, ref: int | str) -> User:
    """A user by id (an int, or a string of digits that is no user's name) or by name."""
    user = None
    if isinstance(ref, str):
        user = session.scalar(select(User).where(User.name == ref.strip()))
        if user is None and ref.strip().isdigit():
            user = session.get(User, int(ref.strip()))
    else:
        user = session.get(User, ref)
    if user is None:
        raise NotFound(f"User {ref!r} does not exist.", code="UserNotFound")
    return user


def revoke_token(session: Session, ref: int | str) -> User:
    """Make the user's token stop working (a running API may accept it for up to the auth
    cache's TTL, 5 s, unless the revocation went through that process)."""
    user = get_user(session, ref)
    user.token_hash = hash_token(new_token())  # a token nobody is shown
    user.token_expires_at = None
    session.flush()
    return user


def rotate_token(
    session: Session, ref: int | str, expires_in_days: int | None = None
) -> tuple[User, str]:
    """A new token for the user (the old one stops working); returns it, shown once."""
    user = get_user(session, ref)
    token = new_token()
    user.token_hash = hash_token(token)
    user.token_expires_at = expiry(expires_in_days)
    session.flush()
    return user, token
