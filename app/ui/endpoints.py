"""The annotator page: static HTML, JS and CSS under ``/ui`` (no build step, no CDN).

The files need no auth: the page asks for an API token and sends it as
``Authorization: Bearer`` on its API calls. A strict Content-Security-Policy keeps the page
to its own origin (no inline scripts, nothing from the network).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from app.errors import NotFound

router = APIRouter(tags=["ui"], include_in_schema=False)

UI_DIR = Path(__file__).resolve().parent.parent / "static" / "ui"
_ASSETS = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
}


def _file(name: str, media_type: str) -> FileResponse:
    return FileResponse(UI_DIR / name, media_type=media_type, headers=_HEADERS)


@router.get("/ui")
@router.get("/ui/")
def ui_page() -> FileResponse:
    return _file("index.html", "text/html; charset=utf-8")


@router.get("/ui/{asset}")
def ui_asset(asset: str) -> FileResponse:
    media_type = _ASSETS.get(asset)
    if media_type is None:
        raise NotFound(f"/ui has no file {asset!r}.", code="NotFound")
    return _file(asset, media_type)
