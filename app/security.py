"""API tokens: random, shown once, stored as sha256 hashes."""

from __future__ import annotations

import hashlib
import secrets


def new_token() -> str:
    return "cl_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
