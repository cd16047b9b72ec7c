"""Compares benchmark figures to the stored baseline and fails on a regression beyond the tolerance.

    python ci/bench_compare.py results.json [--baseline ci/bench_baseline.json] [--tolerance 0.15]

Both files are JSON objects: {"figures": {name: number}, "tolerance": 0.15 (optional)}; the results file may
carry more keys (`benchmarks/run.py` adds the absolute figures under "details", for a reader). Only ratios
are compared, each measured against a reference in the same run on the same machine (`ledger_ratio`:
transfers/s over pgbench's TPS; `router_ratio`: throughput through the router over straight to the region;
`move_unaffected_ratio`: the throughput of slots a move leaves alone during the move over before it).
Absolute times and rates depend on the runner and on whatever else it runs, so a figure whose name does not
end in `_ratio` is refused. A ratio must not fall more than the tolerance below the baseline (higher is
better). Exit 0: no regression; 1: a regression (each listed); 2: unusable input (a missing figure, a figure
that is not a ratio, a bad file).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASELINE = Path(__file__).resolve().parent / "bench_baseline.json"
DEFAULT_TOLERANCE = 0.15
RATIO_SUFFIX = "_ratio"


class BenchInputError(ValueError):
    """A figures file is missing, malformed, or lacks a figure the baseline has."""


@dataclass(frozen=True)
class Comparison:
    name: str
    baseline: float
    current: float
    change: float  # relative: +0.05 is 5 % higher than the baseline
    regressed: bool

    def line(self) -> str:
        verdict = "REGRESSION" if self.regressed else "ok"
        return f"{verdict:10} {self.name}: {self.current:g} vs baseline {self.baseline:g} ({self.change:+.1%})"


def check_ratio(name: str) -> None:
    if not name.endswith(RATIO_SUFFIX):
        raise BenchInputError(f"{name}: only ratios are compared (a name ending in {RATIO_SUFFIX!r}); absolute "
                              "times and rates depend on the machine")


def compare(baseline: dict[str, float], current: dict[str, float], tolerance: float) -> list[Comparison]:
    assert 0 <= tolerance < 1, tolerance
    for name in [*baseline, *current]:
        check_ratio(name)
    missing = sorted(set(baseline) - set(current))
    if missing:
        raise BenchInputError(f"figures missing from the results: {missing}")
    out = []
    for name in sorted(baseline):
        base, now = float(baseline[name]), float(current[name])
        if not base > 0 or not math.isfinite(base):
            raise BenchInputError(f"{name}: baseline must be a positive number, got {base}")
        if not math.isfinite(now):
            raise BenchInputError(f"{name}: the result is not a number ({now})")
        change = (now - base) / base
        out.append(Comparison(name, base, now, change, regressed=change < -tolerance))
    return out


def load_figures(path: Path) -> tuple[dict[str, float], float | None]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchInputError(f"{path}: {exc}") from None
    figures = data.get("figures") if isinstance(data, dict) else None
    if not isinstance(figures, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in figures.values()):
        raise BenchInputError(f"{path}: must hold {{\"figures\": {{name: number}}}}")
    tolerance = data.get("tolerance")
    return figures, float(tolerance) if tolerance is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--baseline", type=Path, default=DEFAULT_BASELINE)
    parser.add_argument("--tolerance", type=float, default=None,
                        help=f"relative, e.g. 0.15 (default: the baseline's, else {DEFAULT_TOLERANCE})")
    args = parser.parse_args(argv)
    try:
        baseline, baseline_tolerance = load_figures(args.baseline)
        current, _ = load_figures(args.results)
        tolerance = args.tolerance if args.tolerance is not None else (baseline_tolerance or DEFAULT_TOLERANCE)
        if not 0 <= tolerance < 1:
            raise BenchInputError(f"tolerance must be in [0, 1), got {tolerance}")
        results = compare(baseline, current, tolerance)
    except BenchInputError as exc:
        print(f"bench_compare: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(r.line())
    regressions = [r for r in results if r.regressed]
    print(f"{len(regressions)} regression(s) beyond {tolerance:.0%} against {args.baseline}")
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())
