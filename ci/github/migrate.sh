#!/usr/bin/env bash
# Runs a region's migrate task (infra/txroute_infra/components/migrate.py) and waits for it to finish:
#   STACK=staging bash ci/github/migrate.sh eu-west-1
# The task provisions the region's shard databases as their owner (`python -m app.store.provision`): it
# creates what is missing, applies new migrations, fills the service role's secret on the first run and
# grants the service role. Every step is idempotent, so running it twice is harmless. It uses the regional
# service's subnets and security group (the ones the database admits). Exits non-zero if the task fails.
set -euo pipefail
region="${1:?usage: migrate.sh REGION}"
: "${STACK:?STACK is required}"
cluster="txroute-${STACK}"
network=$(aws ecs describe-services --region "$region" --cluster "$cluster" --services region-service \
            --query 'services[0].networkConfiguration' --output json)
task=$(aws ecs run-task --region "$region" --cluster "$cluster" --task-definition "txroute-${STACK}-migrate" \
         --launch-type FARGATE --network-configuration "$network" --query 'tasks[0].taskArn' --output text)
# Bounded: the waiter polls every 6 s, at most 100 times.
aws ecs wait tasks-stopped --region "$region" --cluster "$cluster" --tasks "$task"
code=$(aws ecs describe-tasks --region "$region" --cluster "$cluster" --tasks "$task" \
         --query 'tasks[0].containers[0].exitCode' --output text)
if [ "$code" != "0" ]; then
  echo "${region}: the migrate task failed (exit ${code}); its log: stream prefix 'migrate' in the region-service log group" >&2
  exit 1
fi
echo "${region}: databases provisioned"
