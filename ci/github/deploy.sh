#!/usr/bin/env bash
# Deploys one stack from infra/ (run by the pipeline's deploy jobs, or by hand with the same env):
#   STACK=staging IMAGE_TAG=<git sha> bash ../ci/github/deploy.sh   (from infra/)
# 1. creates or updates only the ECR repositories (a new region's repository must exist before its image);
# 2. builds the image once and pushes it to every region's repository (regions come from regions/);
# 3. sets txroute:imageTag and runs `pulumi up` with the policy pack.
set -euo pipefail
: "${STACK:?STACK is required}" "${IMAGE_TAG:?IMAGE_TAG is required}"
export PATH="$PWD/../.venv/bin:$PATH"

pulumi stack select "$STACK"
mapfile -t repos < <(pulumi stack export 2>/dev/null | python -c '
import json, sys
state = json.load(sys.stdin)
for r in state.get("deployment", {}).get("resources") or []:
    if r.get("type") == "aws:ecr/repository:Repository":
        print(r["urn"])
' || true)
regions=$(python -c 'import sys; sys.path.insert(0, ".."); from app.topology.loader import load_topology; print(" ".join(r.name for r in load_topology().regions))')
# Regions whose repository is not yet in the state get it first (their services need the image).
if [ "${#repos[@]}" -lt "$(wc -w <<<"$regions")" ]; then
  targets=()
  base="urn:pulumi:${STACK}::txroute::"
  for region in $regions; do
    # The repository and what it needs: the region's provider and KMS key (URNs follow the components'
    # names and types in txroute_infra; tests/infra/test_pipeline.py keeps these in step).
    targets+=(--target "${base}pulumi:providers:aws::${region}-aws"
              --target "${base}txroute:cell:RegionalCell\$txroute:cell:RegionKey\$aws:kms/key:Key::${region}-key"
              --target "${base}txroute:cell:RegionalCell\$txroute:cell:Compute\$aws:ecr/repository:Repository::${region}-ecr")
  done
  pulumi up --yes --skip-preview --policy-pack policy "${targets[@]}"
fi

account=$(aws sts get-caller-identity --query Account --output text)
docker build -f ../ci/Dockerfile -t "txroute:${IMAGE_TAG}" ..
for region in $regions; do
  registry="${account}.dkr.ecr.${region}.amazonaws.com"
  aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "$registry"
  docker tag "txroute:${IMAGE_TAG}" "${registry}/txroute-${STACK}:${IMAGE_TAG}"
  docker push "${registry}/txroute-${STACK}:${IMAGE_TAG}"
done

pulumi config set txroute:imageTag "$IMAGE_TAG"
pulumi up --yes --policy-pack policy
