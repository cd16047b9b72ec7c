"""The compiled load generator: Debian's `wrk` with `wrk_load.lua`, so an HTTP benchmark charges its client
about what pgbench's C client charges (the Python generator took about a fifth of the machine's CPU).

`available()` finds wrk, or installs it (`apt-get install -y wrk`) when allowed and running as root; where it
cannot, the benchmarks fall back to the Python generator (benchmarks/common.py) and say so. `run()` sends one
workload for a duration and returns its figures with every latency (wrk's histogram, exact to the
microsecond), the same `Figures` the Python generator returns.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from app import limits
from app.security.scopes import PUBLIC_SCOPES
from benchmarks.client import Auth, Direct, Routed

SCRIPT = Path(__file__).with_name("wrk_load.lua")
INSTALL_TIMEOUT_S = 300.0
THREADS_MAX = 2  # this machine's cores; more threads than cores only add switching
PAIRS_PERIOD = 10_000  # the pair table's length: a multiple of every account count the benchmarks use
SUMMARY_PREFIX = "txroute-wrk "


def available(*, install: bool) -> str | None:
    """The path of wrk, installing it first when `install` and this process may (root, apt-get present)."""
    found = shutil.which("wrk")
    if found or not install or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    print("wrk not found: apt-get install -y wrk ...", flush=True)
    try:
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True, capture_output=True,
                       timeout=INSTALL_TIMEOUT_S, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"could not install wrk ({type(exc).__name__}; without a network, or after `apt-get update`?)")
        return None
    return shutil.which("wrk")


def version(wrk: str) -> str:
    out = subprocess.run([wrk, "-v"], capture_output=True, text=True, timeout=10, check=False)
    return (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0] if (out.stdout or out.stderr) else wrk


def auth_settings(auth: Auth) -> dict[str, object]:
    """What the Lua script needs to authenticate as `auth` does."""
    if isinstance(auth, Routed):
        return {"auth": "client", "client_authorization": auth.headers("GET", "/", b"", None)["authorization"]}
    assert isinstance(auth, Direct), auth
    raw = auth.hop_key().private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                       serialization.NoEncryption())
    return {
        "auth": "hop",
        "client": auth.client_id,
        "client_authorization": auth.client_header,
        "hop_key_hex": raw.hex(),
        "scope": " ".join(sorted(PUBLIC_SCOPES)),
        "hop_lifetime_s": limits.HOP_TOKEN_LIFETIME_S,
    }


def run(
    wrk: str,
    url: str,
    auth: Auth,
    *,
    clients: int,
    seconds: float,
    pick: Callable[[int], tuple[str, str]] | None = None,
    reads: Sequence[str] = (),
    timeout_s: float,
) -> tuple[int, int, float, list[float]]:
    """(requests answered 2xx/3xx, other answers and socket errors, seconds, latencies in ms) of `clients`
    connections, each one request at a time: transfers of pairs `pick(i)`, or reads of the accounts `reads`."""
    assert (pick is None) != (not reads), "transfers or reads"
    threads = min(THREADS_MAX, clients)
    with tempfile.TemporaryDirectory(prefix="txroute-wrk-") as folder:
        histogram = Path(folder) / "latency.txt"
        settings: dict[str, object] = {
            "mode": "read" if reads else "transfer",
            "path": "/v1/transfers",
            "currency": "EUR",
            "threads": threads,
            "key_prefix": "wrk-" + uuid.uuid4().hex,
            "histogram": str(histogram),
            "accounts": list(reads),
            "pairs": [list(pick(i)) for i in range(PAIRS_PERIOD)] if pick else [],
            **auth_settings(auth),
        }
        settings_file = Path(folder) / "settings.lua"
        settings_file.write_text("return " + _lua(settings) + "\n")
        settings_file.chmod(0o600)  # it holds the benchmark's own hop key
        out = subprocess.run(
            [wrk, "-t", str(threads), "-c", str(clients), "-d", f"{max(1, round(seconds))}s",
             "--timeout", f"{int(timeout_s)}s", "-s", str(SCRIPT), url],
            env={**os.environ, "TXROUTE_WRK_SETTINGS": str(settings_file)},
            capture_output=True, text=True, timeout=seconds + timeout_s + 30, check=False,
        )
        summary = _summary(out.stdout)
        if out.returncode != 0 or summary is None:
            raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
        latencies = measured_latencies(histogram.read_text(), requests=int(summary["requests"]),
                                       duration_us=int(summary["duration_us"]), connections=clients)
    errors = sum(int(summary[k]) for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    refused = int(summary["status_errors"])
    return int(summary["requests"]) - refused, refused + errors, int(summary["duration_us"]) / 1e6, latencies


def _summary(stdout: str) -> Mapping[str, float] | None:
    for line in stdout.splitlines():
        if line.startswith(SUMMARY_PREFIX):
            parsed: Mapping[str, float] = json.loads(line[len(SUMMARY_PREFIX):])
            return parsed
    return None


def measured_latencies(histogram: str, *, requests: int, duration_us: int, connections: int) -> list[float]:
    """The latencies (ms) wrk measured, from its histogram ("<us> <count>" lines) with its coordinated-omission
    correction reverted. wrk (stats_correct) takes the expected interval e = duration / (requests //
    connections) and, for every recorded latency n > 2e, adds a synthetic sample at n - e, n - 2e, ... while
    above e. So a corrected count C[m] is the measured D[m] plus C[m + e] for m > e: D[m] = C[m] - C[m + e].
    Our clients are closed loops, like the Python generator's and pgbench's, whose latencies are measured
    only; the sum of the result is checked against wrk's request count."""
    corrected: dict[int, int] = {}
    for line in histogram.splitlines():
        value_text, count_text = line.split()
        corrected[int(value_text)] = int(count_text)
    interval_us = duration_us // (requests // connections) if requests // connections else 0
    latencies: list[float] = []
    for value_us, count in corrected.items():
        measured = count - corrected.get(value_us + interval_us, 0) if interval_us and value_us > interval_us else count
        assert measured >= 0, f"wrk's histogram is not its correction of a measured one (at {value_us} us)"
        latencies.extend([value_us / 1000] * measured)
    if len(latencies) != requests:
        raise RuntimeError(f"wrk's histogram holds {len(latencies)} measured latencies for {requests} requests")
    return latencies


def _lua(value: object) -> str:
    """A Lua literal of a JSON-like value (ASCII strings, ints, lists, dicts with identifier keys)."""
    if isinstance(value, bool) or value is None:
        raise TypeError(f"no Lua literal for {value!r} here")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        assert value.isascii(), value
        return json.dumps(value)  # an ASCII JSON string is a valid Lua string literal
    if isinstance(value, list | tuple):
        return "{" + ",".join(_lua(v) for v in value) + "}"
    if isinstance(value, dict):
        assert all(isinstance(k, str) and k.isidentifier() for k in value), value
        return "{" + ",".join(f"{k}={_lua(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua literal for {type(value).__name__}")
