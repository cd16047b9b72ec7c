"""`txroute ops rotate-keys`: new hop key (router -> region), new saga key (region -> region) and new dev
client-issuer key, with no window in which a token is refused.

Local stack, in order (each public-key file may hold several PEMs, all accepted):
    1. public files := new + old; restart the regions, then the router: everyone accepts both keys
    2. private files := new; restart the regions, then the router: everyone signs with the new key
    3. later, `--finish` (once client tokens minted with the old key have expired or been replaced):
       public files := new only; restart the regions, then the router
A restart of the local stack's single process per region answers 503 + Retry-After for a second or two;
a deployed stack rolls its tasks instead. For a deployed stack this prints the Secrets Manager steps.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519

from app import limits
from app.local import stack as local_stack
from app.ops.target import OpsError, Target, confirm
from app.security.keys import DevKeys, private_pem, public_pem

_PEM_MARK = "-----BEGIN "


def _first_pem(path: Path) -> str:
    text = path.read_text()
    return _PEM_MARK + text.split(_PEM_MARK)[1]


def _write_private(path: Path, pem: str) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pem)
    tmp.replace(path)


def _write_public(path: Path, pems: list[str]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(p if p.endswith("\n") else p + "\n" for p in pems))
    tmp.replace(path)


def _restart_in_order(stack: local_stack.Stack) -> None:
    regions = [s.name for s in stack.services if s.name != local_stack.ROUTER_NAME]
    local_stack.restart_services(stack, regions)
    local_stack.restart_services(stack, [local_stack.ROUTER_NAME])


def rotate(target: Target, *, finish: bool, yes: bool) -> bool:
    if target.stack is None:
        _print_deployed(finish)
        return True
    stack = target.stack
    keys = DevKeys(stack.keys.folder)
    pairs = keys.pairs()
    if not all(private.exists() and public.exists() for private, public, _ in pairs):
        raise OpsError(f"no dev keys in {keys.folder}: run `txroute up` first")
    if finish:
        plan = [f"{what} key: accept only the current key ({public.name} keeps its first PEM)"
                for _, public, what in pairs]
        plan += ["restart the regions, then the router",
                 "client tokens signed by the old dev client key are refused from then on"]
        if not confirm(plan, yes):
            return True
        for _, public, _ in pairs:
            _write_public(public, [_first_pem(public)])
        _restart_in_order(stack)
        print("rotation finished: only the new keys are accepted")
        return True
    if any(public.read_text().count(_PEM_MARK) > 1 for _, public, _ in pairs):
        raise OpsError("a rotation is already open (a public key file holds two keys): run "
                       "`txroute ops rotate-keys --finish --yes` first")
    names = ", ".join(what for _, _, what in pairs)
    plan = [
        f"generate new Ed25519 key pairs: {names}",
        f"step 1: accept old and new ({', '.join(public.name for _, public, _ in pairs)} hold both); "
        "restart the regions, then the router",
        f"step 2: sign with the new keys ({', '.join(private.name for private, _, _ in pairs)}); restart the "
        "regions, then the router (a restart answers 503 + Retry-After for a moment; no token is refused)",
        "tokens minted by `txroute token` use the new key; ones minted before stay accepted until "
        "`txroute ops rotate-keys --finish --yes`",
    ]
    if not confirm(plan, yes):
        return True
    new = {what: ed25519.Ed25519PrivateKey.generate() for _, _, what in pairs}
    for _, public, what in pairs:
        _write_public(public, [public_pem(new[what].public_key()), _first_pem(public)])
    _restart_in_order(stack)
    print("step 1 done: every service accepts the old and the new keys")
    for private, _, what in pairs:
        _write_private(private, private_pem(new[what]))
    _restart_in_order(stack)
    print("step 2 done: every service signs with the new keys")
    print(f"hop and saga tokens live {limits.HOP_TOKEN_LIFETIME_S}s; finish with "
          "`txroute ops rotate-keys --finish --yes` once old client tokens are retired")
    return True


def _print_deployed(finish: bool) -> None:
    """The same three steps against AWS Secrets Manager (secret names from infra/ compute.py: JSON secrets
    `txroute/<env>/region-service` {hop_public_key, saga_public_key, saga_private_key} and `txroute/<env>/router`
    {hop_private_key, client_issuers}); ECS injects them at task start, so a forced deployment is the restart.
    The saga key lives in the region secret only: routers never receive it."""
    region_secret = "txroute/<env>/region-service"  # noqa: S105 - a secret name
    router_secret = "txroute/<env>/router"  # noqa: S105 - a secret name
    roll_regions = ("aws ecs update-service --region <region> --cluster txroute-<env> --service region-service "
                    "--force-new-deployment && aws ecs wait services-stable --region <region> "
                    "--cluster txroute-<env> --services region-service   # every region")
    roll_routers = roll_regions.replace("region-service", "router")
    put = "(get-secret-value, edit the JSON, put-secret-value --secret-string file://<file>.json), every region"
    print("a deployed stack keeps its keys in AWS Secrets Manager; the steps (printed, nothing changed):")
    if finish:
        steps = [
            f"put only the new PEM in {region_secret} .hop_public_key and .saga_public_key {put}; then:",
            roll_regions,
        ]
    else:
        steps = [
            "for each of hop and saga: openssl genpkey -algorithm ed25519 -out <k>.private.pem && "
            "openssl pkey -in <k>.private.pem -pubout -out <k>.public.pem",
            f"1. {region_secret} .hop_public_key := new hop PEM + old; .saga_public_key := new saga PEM + old "
            f"{put}; then:",
            roll_regions,
            f"2. {region_secret} .saga_private_key := new saga private PEM {put}; then:",
            roll_regions,
            f"3. {router_secret} .hop_private_key := new hop private PEM {put}; then:",
            roll_routers,
            "4. later: txroute ops rotate-keys --finish --endpoint ... (prints the last step)",
            "never put a saga key in the router secret: a router must not be able to sign saga calls",
            "a client issuer key is the client's own: add its new PEM under a new kid of that issuer in "
            f"{router_secret} .client_issuers, roll the routers, remove the old kid once its tokens expire",
        ]
    for step in steps:
        print(f"  {step}")
