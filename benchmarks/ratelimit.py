"""`txroute bench ratelimit` (or `python -m benchmarks.ratelimit`): what the router's per-client rate limit
(app/router/ratelimit.py) costs per request, measured on the check itself, in this process (no I/O: the check
never awaits). Three paths:

    known client     a tracked client with tokens left: the path of nearly every request
    refused          a client over its rate: the 429 `Problem` is built and raised (what the router catches)
    new client       the table is full and every call is a client not seen before: insert plus eviction of
                     the least recently used (the worst case, e.g. a flood of freshly minted client ids)

Each figure is the median of several rounds of many calls, in nanoseconds of this process's CPU time per
call (CPU time, not wall time: on a shared machine the time spent waiting for a core is not the check's),
printed beside two
baselines measured the same way in the same run (the machine's speed and load change the nanoseconds, not
the ratios): a call of an empty method, and decoding a transfer's JSON body, which the router does for every
write anyway. For scale, `txroute bench router` measures the whole router at milliseconds of added p50.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import msgspec

from app import limits
from app.api.schemas import TransferRequest
from app.errors import Problem
from app.router.ratelimit import ClientRateLimiter

ROUNDS = 7


def _ns_per_call(calls: int, body: Callable[[int], None]) -> float:
    rounds = []
    for _ in range(ROUNDS):
        started = time.process_time_ns()
        body(calls)
        rounds.append((time.process_time_ns() - started) / calls)
    return statistics.median(rounds)


class _Empty:
    def check(self, client: str) -> None:
        return None


def empty_call_ns(calls: int) -> float:
    empty = _Empty()

    def body(n: int) -> None:
        check = empty.check
        for _ in range(n):
            check("client")

    return _ns_per_call(calls, body)


_TRANSFER_BODY = msgspec.json.encode({
    "debit_account": "acc_0a3" + "0" * 26, "credit_account": "acc_0a4" + "1" * 26, "amount": 12_345,
    "currency": "EUR", "reference": "order 2026-11-28/0001",
})


def decode_body_ns(calls: int) -> float:
    decode = msgspec.json.Decoder(TransferRequest).decode

    def body(n: int) -> None:
        for _ in range(n):
            decode(_TRANSFER_BODY)

    return _ns_per_call(calls, body)


def known_client_ns(calls: int, clients: int) -> float:
    limiter = ClientRateLimiter(rate_per_s=1e9, burst=limits.CLIENT_BURST_MAX)  # never refuses
    ids = [f"client-{i}" for i in range(clients)]
    for client in ids:
        limiter.check(client)

    def body(n: int) -> None:
        check, k = limiter.check, len(ids)
        for i in range(n):
            check(ids[i % k])

    return _ns_per_call(calls, body)


def refused_ns(calls: int) -> float:
    limiter = ClientRateLimiter(rate_per_s=1e-6, burst=1)
    limiter.check("noisy")

    def body(n: int) -> None:
        check = limiter.check
        for _ in range(n):
            try:
                check("noisy")
            except Problem:
                pass

    return _ns_per_call(calls, body)


def new_client_ns(calls: int, clients_max: int) -> float:
    limiter = ClientRateLimiter(rate_per_s=1.0, burst=10, clients_max=clients_max)
    ids = [f"client-{i}" for i in range(calls * (ROUNDS + 1))]  # every call a client never seen
    for client in ids[:clients_max]:
        limiter.check(client)
    offset = [clients_max]

    def body(n: int) -> None:
        check, start = limiter.check, offset[0]
        for i in range(start, start + n):
            check(ids[i])
        offset[0] = start + n

    return _ns_per_call(calls, body)


def run(*, calls: int = 200_000, clients: int = 10_000) -> int:
    print(f"txroute bench ratelimit: median of {ROUNDS} rounds of {calls:,} checks, CPU time, one process, no I/O")
    empty, decode = empty_call_ns(calls), decode_body_ns(calls)
    full = limits.RATE_LIMIT_CLIENTS_MAX
    figures = [
        ("baseline: an empty method call", empty),
        ("baseline: decoding a transfer body", decode),
        (f"known client ({clients:,} tracked)", known_client_ns(calls, clients)),
        ("refused (429 Problem raised)", refused_ns(calls)),
        (f"new client, table full ({full:,}), evicts", new_client_ns(calls, full)),
    ]
    for name, ns in figures:
        print(f"  {name:<44} {ns:8.0f} ns/request  {ns / decode:5.2f}x a body decode")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ratelimit", description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--clients", type=int, default=10_000)
    args = parser.parse_args()
    return run(calls=args.calls, clients=args.clients)


if __name__ == "__main__":
    raise SystemExit(main())
