"""ci/bench_compare.py: regressions beyond the tolerance fail, in the direction each unit implies."""

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
    ({"x_per_s": 1000, "y_ms": 10}, False),
    ({"x_per_s": 1200, "y_ms": 8}, False),     # better both ways
    ({"x_per_s": 901, "y_ms": 10.9}, False),   # within 10 %
    ({"x_per_s": 850, "y_ms": 10}, True),      # throughput fell 15 %
    ({"x_per_s": 1000, "y_ms": 11.5}, True),   # latency rose 15 %
])
def test_compare_flags_only_changes_beyond_tolerance_in_the_bad_direction(
        bench: ModuleType, current: dict[str, float], regressed: bool) -> None:
    results = bench.compare({"x_per_s": 1000, "y_ms": 10}, current, 0.10)
    assert any(r.regressed for r in results) is regressed, [r.line() for r in results]


def test_missing_figures_and_unitless_names_are_input_errors(bench: ModuleType) -> None:
    with pytest.raises(bench.BenchInputError, match="missing"):
        bench.compare({"x_per_s": 1}, {}, 0.1)
    with pytest.raises(bench.BenchInputError, match="must end in"):
        bench.compare({"x": 1}, {"x": 1}, 0.1)


def test_cli_exit_codes(tmp_path: Path) -> None:
    baseline = _write(tmp_path / "base.json", {"x_per_s": 1000}, tolerance=0.1)

    def run(figures: dict[str, float] | None, *extra: str) -> subprocess.CompletedProcess[str]:
        results = tmp_path / "results.json"
        if figures is None:
            results.write_text("not json")
        else:
            _write(results, figures)
        return subprocess.run([sys.executable, str(SCRIPT), str(results), "--baseline", str(baseline), *extra],
                              capture_output=True, text=True, timeout=30)

    assert run({"x_per_s": 950}).returncode == 0
    failed = run({"x_per_s": 800})
    assert failed.returncode == 1 and "REGRESSION" in failed.stdout
    assert run({"x_per_s": 800}, "--tolerance", "0.25").returncode == 0
    assert run(None).returncode == 2


def test_the_stored_baseline_is_valid(bench: ModuleType) -> None:
    figures, tolerance = bench.load_figures(REPO / "ci" / "bench_baseline.json")
    assert figures and tolerance is not None and 0 < tolerance < 1
    assert bench.compare(figures, figures, tolerance) and not any(
        r.regressed for r in bench.compare(figures, figures, tolerance))
