"""The FastAPI application factory. Never imports torch (``tests/test_architecture.py``)."""

from __future__ import annotations

import gc
import importlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from sqlalchemy import Engine

from app.db import make_async_engine, make_async_sessionmaker, make_engine, make_sessionmaker
from app.errors import install_error_handlers
from app.gate import RequestGate
from app.labels.masks import sweep_orphan_files
from app.middleware import ResponseBasics
from app.migrate import upgrade
from app.openapi import install_openapi
from app.settings import Settings, get_settings
from app.storage import Storage

log = logging.getLogger(__name__)

# Router modules, each exposing ``router``; listed here so the surface is visible in one place.
# A request is matched against the routers in this order, each router's routes in turn (about
# 8% of the API's CPU under load, FastAPI 0.163): the annotators' hot paths come first (load
# benchmark, 1 process, 32 annotators, 3 interleaved pairs: 440-462 against 427-431 cycles/s).
# No path of theirs overlaps another router's, so the order changes no route's meaning.
ROUTERS = (
    "app.queue.endpoints",
    "app.labels.endpoints",
    "app.health.endpoints",
    "app.users.endpoints",
    "app.projects.endpoints",
    "app.members.endpoints",
    "app.agreement.endpoints",
    "app.review.endpoints",
    "app.images.endpoints",
    "app.rounds.endpoints",
    "app.warm_start.endpoints",
    "app.model_versions.endpoints",
    "app.ui.endpoints",
    "app.exports.endpoints",
    "app.webhooks.endpoints",
    "app.queue.activelearning",
    "app.integrations.labelstudio.endpoints",
)


def _sweep_storage(app: FastAPI) -> None:
    """Delete the orphan files a killed process left (never stops the start-up)."""
    try:
        sweep_orphan_files(app.state.sessions, app.state.storage)
    except Exception:
        log.exception("the start-up sweep of orphan files failed; the files are kept")


def create_app(settings: Settings | None = None, *, migrate: bool = True) -> FastAPI:
    """Build the API for ``settings``; ``migrate`` upgrades the schema at start-up."""
    settings = settings or get_settings()
    engine = make_engine(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if migrate:
            upgrade(engine)
        await anyio.to_thread.run_sync(_sweep_storage, app)
        # PostgreSQL: the hot paths' transactions on this loop (app.deps.in_unit_of_work), on
        # the database of the sessions' engine (none when a test bound them to a connection).
        bind = app.state.sessions.kw.get("bind")
        async_engine = make_async_engine(bind) if isinstance(bind, Engine) else None
        if async_engine is not None:
            app.state.async_sessions = make_async_sessionmaker(async_engine)
        if settings.gc_freeze:
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            if async_engine is not None:
                del app.state.async_sessions
                await async_engine.dispose()
            engine.dispose()

    app = FastAPI(title="coreloop", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.engine = engine
    app.state.sessions = make_sessionmaker(engine)
    app.state.storage = Storage(settings.files_dir)
    install_error_handlers(app)
    # Authentication and the size limit before any body is read (app.gate).
    app.add_middleware(RequestGate)
    # Outermost: HEAD as GET without the body, nosniff on every response (app.middleware).
    app.add_middleware(ResponseBasics)
    for name in ROUTERS:
        app.include_router(importlib.import_module(name).router)
    install_openapi(app)  # errors as the envelope, hand-parsed bodies declared
    return app
