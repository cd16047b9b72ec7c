"""The test session's internal TLS: a CA and server certificate made once per process (app/local/tls.py, the
same code as the local stack's `.state/tls/`). Every region process of the tests serves HTTPS with them, and
every client of a region verifies it with the CA, as routers and regions do (app/security/tls.py)."""

from __future__ import annotations

import atexit
import functools
import shutil
import ssl
import tempfile
from pathlib import Path

from app.local.tls import LocalTls, ensure_local_tls
from app.security.tls import client_context


@functools.cache
def session_tls() -> LocalTls:
    folder = Path(tempfile.mkdtemp(prefix="txroute-tls-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return ensure_local_tls(folder)


def verify() -> ssl.SSLContext:
    """httpx's `verify` (or aiohttp's `ssl`) for a test client of region processes: the session CA only."""
    return client_context(session_tls().ca_file)
