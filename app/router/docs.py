"""The interactive API reference at `/docs` on the global endpoint: Swagger UI over the router's own OpenAPI
document (the regions' public routes plus the router's health; `/openapi.json`).

Swagger UI's files come from the `swagger-ui-py` wheel (Swagger UI 5, which reads OpenAPI 3.1) and the
router serves them itself under `/docs/assets/`: the page loads nothing from a CDN, so it works on a machine
without internet access. Only the three files the page needs are served.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response, get
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.response import File

from app.errors import Problem

DOCS_PATH = "/docs"
ASSETS_PATH = DOCS_PATH + "/assets"
# name -> media type: everything the page loads (its favicon is inline).
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "swagger-ui.css": "text/css",
}
_PLUGIN = SwaggerRenderPlugin(
    js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
    css_url=f"{ASSETS_PATH}/swagger-ui.css",
    standalone_preset_js_url=f"{ASSETS_PATH}/swagger-ui-standalone-preset.js",
    path=DOCS_PATH,
    favicon="<link rel='icon' href='data:,'>",
)


def assets_folder() -> Path:
    """Where the installed swagger-ui-py keeps Swagger UI's files (found without importing the package)."""
    spec = importlib.util.find_spec("swagger_ui")
    assert spec is not None and spec.submodule_search_locations, "swagger-ui-py is a dependency of txroute"
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@get(DOCS_PATH, include_in_schema=False, sync_to_thread=False)
def docs_page(request: Request[Any, Any, Any]) -> Response[bytes]:
    page = request.app.state.get("docs_page")
    if page is None:
        document = msgspec.json.decode(request.app.state.openapi_document)
        page = request.app.state.docs_page = _PLUGIN.render(request, document)
    return Response(page, media_type="text/html; charset=utf-8")


@get(ASSETS_PATH + "/{name:str}", include_in_schema=False, sync_to_thread=False)
def docs_asset(name: str) -> File:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise Problem("not_found", f"no such file under {ASSETS_PATH}")
    return File(assets_folder() / name, media_type=media_type, content_disposition_type="inline",
                headers={"cache-control": "public, max-age=86400"})
