"""How benchmarks authenticate to a regional service (the same way the tests do)."""

from __future__ import annotations

from app.region.identity import CLIENT_HEADER


def auth_headers(client_id: str) -> dict[str, str]:
    return {CLIENT_HEADER: client_id}
