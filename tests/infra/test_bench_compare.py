"""ci/bench_compare.py: only ratios are compared, and a ratio that fell beyond the tolerance fails."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.infra.conftest import REPO

SCRIPT = REPO / "ci" / "bench_compare.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_compare", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = module
    spec.loader.exec_module(module)
    return module


def _write(path: Path, figures: dict[str, float], tolerance: float | None = None) -> Path:
    path.write_text(json.dumps({"figures": figures, **({"tolerance": tolerance} if tolerance else {})}))
    return path


@pytest.mark.parametrize(("current", "regressed"), [
    ({"ledger_ratio": 0.70, "router_ratio": 0.90}, False),
    ({"ledger_ratio": 0.95, "router_ratio": 0.99}, False),   # better
    ({"ledger_ratio": 0.596, "router_ratio": 0.766}, False),  # within 15 %
    ({"ledger_ratio": 0.59, "router_ratio": 0.90}, True),    # the ledger's ratio fell more than 15 %
    ({"ledger_ratio": 0.70, "router_ratio": 0.76}, True),    # the router's ratio fell more than 15 %
])
def test_compare_flags_only_a_ratio_that_fell_beyond_the_tolerance(
        bench: ModuleType, current: dict[str, float], regressed: bool) -> None:
    results = bench.compare({"ledger_ratio": 0.70, "router_ratio": 0.90}, current, 0.15)
    assert any(r.regressed for r in results) is regressed, [r.line() for r in results]


def test_missing_figures_absolute_figures_and_non_numbers_are_input_errors(bench: ModuleType) -> None:
    with pytest.raises(bench.BenchInputError, match="missing"):
        bench.compare({"x_ratio": 1}, {}, 0.15)
    for absolute in ("router_forward_per_s", "transfer_p99_ms", "x"):
        with pytest.raises(bench.BenchInputError, match="only ratios"):
            bench.compare({absolute: 1}, {absolute: 1}, 0.15)
        with pytest.raises(bench.BenchInputError, match="only ratios"):
            bench.compare({"x_ratio": 1}, {"x_ratio": 1, absolute: 1}, 0.15)
    with pytest.raises(bench.BenchInputError, match="not a number"):
        bench.compare({"x_ratio": 1}, {"x_ratio": float("nan")}, 0.15)
    with pytest.raises(bench.BenchInputError, match="positive"):
        bench.compare({"x_ratio": 0}, {"x_ratio": 1}, 0.15)


def test_cli_exit_codes(tmp_path: Path) -> None:
    baseline = _write(tmp_path / "base.json", {"x_ratio": 0.8}, tolerance=0.15)

    def run(figures: dict[str, float] | None, *extra: str) -> subprocess.CompletedProcess[str]:
        results = tmp_path / "results.json"
        if figures is None:
            results.write_text("not json")
        else:
            _write(results, figures)
        return subprocess.run([sys.executable, str(SCRIPT), str(results), "--baseline", str(baseline), *extra],
                              capture_output=True, text=True, timeout=30)

    assert run({"x_ratio": 0.7}).returncode == 0  # -12.5 %
    failed = run({"x_ratio": 0.6})  # -25 %
    assert failed.returncode == 1 and "REGRESSION" in failed.stdout
    assert run({"x_ratio": 0.6}, "--tolerance", "0.3").returncode == 0
    assert run(None).returncode == 2
    absolute = run({"x_ratio": 0.8, "x_per_s": 1000})
    assert absolute.returncode == 2 and "only ratios" in absolute.stderr


def test_what_benchmarks_run_writes_is_what_the_comparison_reads(bench: ModuleType, tmp_path: Path) -> None:
    """benchmarks/run.py's output shape (ratios in figures, absolute figures in details) loads and compares
    against the stored baseline; the stored baseline holds ratios only."""
    results = tmp_path / "results.json"
    baseline, _ = bench.load_figures(REPO / "ci" / "bench_baseline.json")
    results.write_text(json.dumps({"figures": dict(baseline), "details": {"router_forward_per_s": 900.0}}))
    figures, _ = bench.load_figures(results)
    assert not any(r.regressed for r in bench.compare(baseline, figures, 0.15))
    source = (REPO / "benchmarks" / "run.py").read_text()
    assert all(f'"{name}"' in source for name in baseline), f"benchmarks/run.py must write {sorted(baseline)}"


def test_the_stored_baseline_is_valid(bench: ModuleType) -> None:
    figures, tolerance = bench.load_figures(REPO / "ci" / "bench_baseline.json")
    assert figures and tolerance is not None and 0 < tolerance < 1
    assert bench.compare(figures, figures, tolerance) and not any(
        r.regressed for r in bench.compare(figures, figures, tolerance))
