"""Who is calling: the one place the regional service learns the caller's client id.

Until the router's internal tokens exist the client id comes from the `X-Txroute-Client` header; swapping
this for token verification touches only this module.
"""

from __future__ import annotations

import re
from typing import Any

from litestar import Request

from app import limits
from app.errors import Problem

CLIENT_HEADER = "x-txroute-client"
_CLIENT = re.compile(rf"^[A-Za-z0-9._-]{{1,{limits.CLIENT_ID_CHARS_MAX}}}$")


def caller(request: Request[Any, Any, Any]) -> str:
    value = request.headers.get(CLIENT_HEADER)
    if value is None or not _CLIENT.match(value):
        raise Problem("unauthorized", "the caller's identity is missing or malformed")
    return value
