"""`txroute bench batch` (benchmarks/batch.py) runs for real at a tiny size: its own durable cluster, regional
service and router. Its `--json` line carries the figures issue 12 asks for: batches against pgbench, and a hold
and a capture against a plain transfer, measured in the same run. No figure is held to a time: this proves the
benchmark measures what it says (every request answered as expected), not how fast this machine is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKLOADS = ("transfer", "hold", "capture")
FIELDS = ("ratio", "per_second", "batch_p50_ms", "batch_p99_ms", "non_atomic_per_second", "pgbench_tps", "errors",
          "generator", *(f"{w}_{f}" for w in WORKLOADS for f in ("per_second", "p50_ms", "p99_ms", "errors")))
BENCH_TIMEOUT_S = 300


@pytest.mark.timeout(BENCH_TIMEOUT_S + 60)
def test_bench_batch_at_a_tiny_size_reports_batches_holds_and_captures_beside_plain_transfers(work_dir: Path) -> None:
    env = {**os.environ, "TXROUTE_STATE_DIR": str(work_dir / "bench-batch")}
    env.pop("TXROUTE_PG_DIR", None)
    out = subprocess.run(
        [sys.executable, "-m", "app.cli.main", "bench", "batch", "--clients", "2", "--accounts", "8", "--seconds",
         "1", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=BENCH_TIMEOUT_S, check=False,
    )
    lines = out.stdout.strip().splitlines()
    assert lines, f"expected output from the benchmark; stderr: {out.stderr[-2000:]}"
    figures = json.loads(lines[-1])
    missing = [name for name in FIELDS if name not in figures]
    assert not missing, f"expected every figure in the --json line, missing {missing}: {lines[-1]}"
    for workload in WORKLOADS:
        assert figures[f"{workload}_per_second"] > 0, f"expected {workload}s to be measured: {out.stdout[-3000:]}"
        assert figures[f"{workload}_errors"] == 0, f"expected every {workload} answered 201: {out.stdout[-3000:]}"
    assert figures["hold_p50_ms"] > 0 and figures["capture_p50_ms"] > 0 and figures["transfer_p50_ms"] > 0
    assert figures["per_second"] > 0 and figures["pgbench_tps"] > 0
    assert out.returncode == (0 if figures["errors"] == 0 else 1), out.stderr[-2000:]
