"""The API reference: Swagger UI at `/docs` on the global endpoint, served without a CDN, and `/healthz` and
`/readyz` answering what the OpenAPI document (router and regions) says they answer."""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema

from app.local.processes import ServiceProcess
from tests.e2e.conftest import ROUTER_REGION


async def test_the_router_serves_an_interactive_api_reference_at_docs_from_its_own_files(
    router: ServiceProcess, http: httpx.AsyncClient
) -> None:
    page = await http.get(router.url + "/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html"), page.text[:200]
    assert "SwaggerUIBundle" in page.text and '"/v1/transfers"' in page.text, "expected Swagger UI over our document"
    loaded = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert loaded, "expected the page to load Swagger UI's script and style"
    for url in loaded:
        if url.startswith("data:"):
            continue
        assert url.startswith("/docs/assets/"), f"expected every file served by the router itself, not {url}"
        asset = await http.get(router.url + url)
        assert asset.status_code == 200 and len(asset.content) > 1_000, f"expected {url} served: {asset.status_code}"
    missing = await http.get(router.url + "/docs/assets/index.html")
    assert missing.status_code == 404 and missing.json()["code"] == "not_found", missing.text


def _response_schema(document: dict[str, Any], path: str, status: str) -> dict[str, Any]:
    schema: dict[str, Any] = document["paths"][path]["get"]["responses"][status]["content"]["application/json"][
        "schema"
    ]
    return schema


def _resolved(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    if "$ref" not in schema:
        return schema
    found: dict[str, Any] = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return found


async def test_health_and_readiness_answers_match_their_openapi_schemas(
    router: ServiceProcess, region_services: dict[str, ServiceProcess], http: httpx.AsyncClient
) -> None:
    for service in (router, region_services[ROUTER_REGION]):
        document = (await http.get(service.url + "/openapi.json")).json()
        for path in ("/healthz", "/readyz"):
            schema = _response_schema(document, path, "200")
            assert _resolved(document, schema).get("type") == "object", (
                f"expected {service.name} {path} documented as an object, got {schema}"
            )
            answer = await http.get(service.url + path)
            assert answer.status_code == 200, answer.text
            # Validated against the document itself, so references resolve where the document puts them.
            jsonschema.validate(answer.json(), {**schema, "components": document["components"]})
        not_ready = _resolved(document, _response_schema(document, "/readyz", "503"))
        assert not_ready.get("type") == "object" and "status" in not_ready.get("required", []), not_ready
