"""The pipeline's benchmark step: short runs of the ledger and router benchmarks, written as figures for
`ci/bench_compare.py` to hold against `ci/bench_baseline.json`.

    python benchmarks/run.py --json bench-results.json [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import ledger, router  # after the path set-up above

CLIENTS = 8
ACCOUNTS = 100


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", type=Path, required=True, help="where to write the figures")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    same_shard, _, _ = ledger.measure(clients=CLIENTS, seconds=args.seconds, accounts=ACCOUNTS, with_pgbench=False)
    _, routed = router.measure(clients=CLIENTS, seconds=args.seconds, accounts=ACCOUNTS)
    figures = {
        "transfer_same_shard_per_s": round(same_shard.per_second, 1),
        "transfer_same_shard_p99_ms": round(same_shard.percentile(0.99), 2),
        "router_forward_per_s": round(routed.per_second, 1),
        "router_forward_p99_ms": round(routed.percentile(0.99), 2),
    }
    args.json.write_text(json.dumps({"figures": figures}, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0 if same_shard.errors == 0 and routed.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
