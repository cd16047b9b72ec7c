#!/usr/bin/env bash
# Deploys one stack from infra/ (run by the pipeline's deploy jobs, or by hand with the same env):
#   STACK=staging IMAGE_TAG=<git sha> bash ../ci/github/deploy.sh   (from infra/)
# 1. creates the ECR repositories a new region lacks (a targeted `up`: the repository, its KMS key and the
#    components above both, from txroute_infra/bootstrap.py);
# 2. builds the image once, for the tasks' CPU architecture, and pushes it to every region's repository
#    that does not hold this tag yet (tags are immutable: a re-run job must not push them again);
# 3. sets txroute:imageTag and runs `pulumi up` with the policy pack, with each region's migrate task run
#    before it (when the stack has one) and after it (ci/github/migrate.sh).
set -euo pipefail
: "${STACK:?STACK is required}" "${IMAGE_TAG:?IMAGE_TAG is required}"
export PATH="$PWD/../.venv/bin:$PATH"
# The task definitions run on ARM64 (Graviton; components/compute.py): build for that platform (buildx, with
# QEMU on x86 runners). tests/infra/test_pipeline.py keeps the two in step.
PLATFORM=linux/arm64
REPOSITORY="txroute-${STACK}"

# The bootstrap `up` below is targeted: engines before 3.256.0 resolve the outputs of the resources it skips
# as empty values, and the program's first apply on one crashes (pulumi/pulumi#24108).
PULUMI_VERSION_MIN=3.256.0
pulumi_version=$(pulumi version | sed 's/^v//')
if [ "$(printf '%s\n%s\n' "$PULUMI_VERSION_MIN" "$pulumi_version" | sort -V | head -n1)" != "$PULUMI_VERSION_MIN" ]; then
  echo "pulumi ${pulumi_version} is older than ${PULUMI_VERSION_MIN}: install a newer CLI" >&2
  exit 1
fi

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
  mapfile -t urns < <(python -m txroute_infra.bootstrap "$STACK")
  targets=()
  for urn in "${urns[@]}"; do targets+=(--target "$urn"); done
  pulumi up --yes --skip-preview --policy-pack policy "${targets[@]}"
fi

# 0: the tag is in the region's repository; 1: it is not; any other failure stops the deploy.
image_present() {
  local err
  if err=$(aws ecr describe-images --region "$1" --repository-name "$REPOSITORY" \
             --image-ids "imageTag=${IMAGE_TAG}" 2>&1 >/dev/null); then
    return 0
  fi
  if grep -q ImageNotFoundException <<<"$err"; then
    return 1
  fi
  echo "$err" >&2
  exit 1
}

missing=()
for region in $regions; do
  if image_present "$region"; then
    echo "${region}: ${REPOSITORY}:${IMAGE_TAG} is already there (immutable tag): not pushed again"
  else
    missing+=("$region")
  fi
done
if [ "${#missing[@]}" -gt 0 ]; then
  account=$(aws sts get-caller-identity --query Account --output text)
  docker buildx build --platform "$PLATFORM" --load -f ../ci/Dockerfile -t "txroute:${IMAGE_TAG}" ..
  for region in "${missing[@]}"; do
    registry="${account}.dkr.ecr.${region}.amazonaws.com"
    aws ecr get-login-password --region "$region" | docker login --username AWS --password-stdin "$registry"
    docker tag "txroute:${IMAGE_TAG}" "${registry}/${REPOSITORY}:${IMAGE_TAG}"
    docker push "${registry}/${REPOSITORY}:${IMAGE_TAG}"
  done
fi

pulumi config set txroute:imageTag "$IMAGE_TAG"
# Migrations run as the database owner in each region's migrate task (components/migrate.py, ci/github/
# migrate.sh), before the services roll onto code that needs them: a targeted `up` first gives the migrate
# task definitions the new image. A first deploy has no migrate task yet; there, and after every `up`, they
# run once more after it (idempotent: nothing to do the second time). Services never migrate themselves.
mapfile -t migrate_urns < <(pulumi stack export 2>/dev/null | python -c '
import json, sys
state = json.load(sys.stdin)
for r in state.get("deployment", {}).get("resources") or []:
    if r.get("type") == "aws:ecs/taskDefinition:TaskDefinition" and r["urn"].endswith("-migrate"):
        print(r["urn"])
' || true)
if [ "${#migrate_urns[@]}" -gt 0 ]; then
  targets=()
  for urn in "${migrate_urns[@]}"; do targets+=(--target "$urn"); done
  pulumi up --yes --skip-preview --policy-pack policy "${targets[@]}"
  for region in $regions; do bash ../ci/github/migrate.sh "$region"; done
fi
pulumi up --yes --policy-pack policy
for region in $regions; do bash ../ci/github/migrate.sh "$region"; done
