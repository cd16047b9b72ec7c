"""The pipeline's benchmark step: short runs of the ledger, router and move benchmarks, written as figures for
`ci/bench_compare.py` to hold against `ci/bench_baseline.json`.

    python benchmarks/run.py --json bench-results.json [--seconds 5] [--generator auto|wrk|python]

Only ratios go into "figures", each against a reference measured in the same run on the same machine:
`ledger_ratio` (txroute transfers/s over pgbench tpcb-like TPS on the same cluster), `router_ratio`
(transfers/s through the router over straight to the region) and `move_unaffected_ratio` (transfers/s of the
slots a move leaves alone while it moves MOVE_ACCOUNTS accounts, over their rate before it). The absolute
figures behind them go into "details", for a reader: they depend on the runner and are never compared.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ledger, move, router  # after the path set-up above
from benchmarks.common import GENERATORS, use_generator

CLIENTS = 8
ACCOUNTS = 100
MOVE_ACCOUNTS = 2_000  # the moved range's accounts, with ten entries each: a move of about a minute here


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--generator", choices=GENERATORS, default="auto",
                        help="the load generator (default: wrk, installed when absent and allowed)")
    args = parser.parse_args()
    generator = use_generator(args.generator)
    same_shard, pgbench, _ = ledger.measure(clients=CLIENTS, seconds=args.seconds, accounts=ACCOUNTS,
                                            with_pgbench=True)
    assert pgbench is not None
    direct, routed = router.measure(clients=CLIENTS, seconds=args.seconds, accounts=ACCOUNTS)
    moved = move.measure(accounts=MOVE_ACCOUNTS, entries=10 * MOVE_ACCOUNTS, clients=CLIENTS, seconds=args.seconds,
                         across_regions=False)
    figures = {
        "ledger_ratio": round(same_shard.per_second / pgbench.per_second, 3),
        "router_ratio": round(routed.per_second / direct.per_second, 3),
        "move_unaffected_ratio": moved["unaffected_ratio"],
    }
    details = {
        "generator": generator,
        "clients": CLIENTS,
        "transfer_same_shard_per_s": round(same_shard.per_second, 1),
        "pgbench_tps": round(pgbench.per_second, 1),
        "router_direct_per_s": round(direct.per_second, 1),
        "router_forward_per_s": round(routed.per_second, 1),
        "router_p50_added_ms": round(routed.percentile(0.50) - direct.percentile(0.50), 2),
        "move_freeze_ms": moved["freeze_ms"],
        "move_p99_moving_ms": moved["p99_moving_ms"],
        "move_copy_rows_per_s": moved["copy_rows_per_s"],
        "move_errors": moved["errors_by_code"],
    }
    args.json.write_text(json.dumps({"figures": figures, "details": details}, indent=2) + "\n")
    print(json.dumps({"figures": figures, "details": details}, indent=2))
    moved_clean = moved["phase"] == "done" and moved["audit_clean"] and moved["money_conserved"]
    return 0 if same_shard.errors == 0 and direct.errors == 0 and routed.errors == 0 and moved_clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
