"""The FastAPI application factory. Never imports torch (``tests/test_architecture.py``)."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app.db import make_engine, make_sessionmaker
from app.errors import install_error_handlers
from app.migrate import upgrade
from app.settings import Settings, get_settings
from app.storage import Storage

# Router modules, each exposing ``router``; listed here so the surface is visible in one place.
ROUTERS = (
    "app.routers.health",
    "app.routers.users",
    "app.routers.projects",
    "app.routers.images",
    "app.routers.queue",
    "app.routers.labels",
    "app.routers.rounds",
    "app.routers.models",
    "app.routers.ui",
    "app.routers.export",
    "app.routers.webhooks",
    "app.routers.activelearning",
    "app.routers.labelstudio",
)


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    """Build the API for ``settings``; ``migrate`` upgrades the schema at start-up."""
    settings = settings or get_settings()
    engine = make_engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            upgrade(engine)
        yield
        engine.dispose()

    app = FastAPI(title="coreloop", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.storage = Storage(settings.files_dir)
    install_error_handlers(app)
    for name in ROUTERS:
        app.include_router(importlib.import_module(name).router)
    return app
