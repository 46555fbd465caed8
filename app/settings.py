"""One settings class shared by the API, the worker and the CLI (prefix ``CORELOOP_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Every knob of a deployment; the embedded default needs none of them set.

    Paths default to locations under ``data_dir``: the SQLite database, stored files
    (images, masks, checkpoints) and the embedded broker's own SQLite file.
    """

    model_config = SettingsConfigDict(env_prefix="CORELOOP_", env_file=".env", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    data_dir: Path = Path("./data")
    database_url: str | None = None
    broker_url: str | None = None
    storage_dir: Path | None = None

    max_upload_bytes: int = 20 * 1024 * 1024
    # The largest request body of any kind (a multi-file upload is one request); larger ones
    # get 413 before they are read. At least max_upload_bytes.
    max_request_bytes: int = 256 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    queue_max_limit: int = 100

    # Worker / rounds.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    round_max_attempts: int = 3
    heartbeat_seconds: float = 10.0
    heartbeat_timeout_seconds: float = 120.0
    embedded_worker: bool = True

    sqlite_busy_timeout_ms: int = Field(default=30_000, ge=0)
    # SQLite's PRAGMA synchronous in WAL mode. "normal": a commit writes the WAL without
    # waiting for the disk, so an answered label survives a crash of the server's processes
    # but a power loss or an OS crash may take back the commits since the WAL was last synced.
    # "full": every commit waits for the disk (what PostgreSQL does by default).
    sqlite_synchronous: Literal["normal", "full"] = "normal"
    # After start-up, hide the objects alive then (modules, the schema, the routes) from the
    # garbage collector (gc.freeze): a full collection then scans only what requests made
    # (under load: 3.4 ms, against 76-96 ms without; every request waits for it).
    gc_freeze: bool = True

    # Outgoing webhooks may reach loopback, private and link-local addresses (a trusted
    # network only); by default they reach public addresses only (app.netpolicy).
    webhook_allow_private: bool = False

    @model_validator(mode="after")
    def _fill_paths(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().resolve()
        if self.storage_dir is None:
            self.storage_dir = self.data_dir / "files"
        if self.database_url is None:
            self.database_url = f"sqlite:///{self.data_dir / 'coreloop.sqlite'}"
        if self.broker_url is None:
            self.broker_url = f"sqla+sqlite:///{self.data_dir / 'broker.sqlite'}"
        if self.max_request_bytes < self.max_upload_bytes:
            raise ValueError(
                f"max_request_bytes ({self.max_request_bytes}) is below max_upload_bytes "
                f"({self.max_upload_bytes}): no upload of the allowed size could be sent"
            )
        return self

    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @property
    def files_dir(self) -> Path:
        assert self.storage_dir is not None
        return self.storage_dir

    @property
    def is_sqlite(self) -> bool:
        return self.db_url.startswith("sqlite")


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (tests build their own ``Settings`` and pass them explicitly)."""
    return Settings()
