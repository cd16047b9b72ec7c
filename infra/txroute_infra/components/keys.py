"""The region's own KMS key: database storage, its master secret, Performance Insights, the service
secrets, ECR images, logs and the alarm topic in this region are all encrypted with it, so a key (and the
data it protects) never leaves its region."""

from __future__ import annotations

import json

import pulumi
import pulumi_aws.kms as kms
from pulumi_aws import get_caller_identity_output

from txroute_infra.components.base import RegionalComponent, tags

# Days a scheduled key deletion waits (the maximum), so a mistaken `pulumi destroy` can be cancelled.
KEY_DELETION_WINDOW_DAYS = 30
KEY_ROTATION_PERIOD_DAYS = 365


class RegionKey(RegionalComponent):
    def __init__(self, region: str, *, environment: str, provider: pulumi.ProviderResource,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:cell:RegionKey", region, provider, opts)
        account_id = get_caller_identity_output(opts=self.invoke_opts()).account_id
        self.key = kms.Key(
            self.name("key"),
            description=f"txroute {environment} {region}: data, secrets, images, logs, alarms",
            enable_key_rotation=True,
            rotation_period_in_days=KEY_ROTATION_PERIOD_DAYS,
            deletion_window_in_days=KEY_DELETION_WINDOW_DAYS,
            multi_region=False,
            policy=account_id.apply(lambda account: _key_policy(account, region)),
            tags=tags(environment, region),
            opts=self.child(),
        )
        kms.Alias(self.name("key-alias"), name=f"alias/txroute-{environment}", target_key_id=self.key.key_id,
                  opts=self.child())
        self.arn = self.key.arn
        self.register_outputs({"arn": self.arn})


def _key_policy(account_id: str, region: str) -> str:
    root = f"arn:aws:iam::{account_id}:root"
    return json.dumps({
        "Version": "2012-10-17",
        "Statement": [
            # IAM policies in the account decide who uses the key (task roles, RDS through its grants).
            {"Sid": "AccountAdmin", "Effect": "Allow", "Principal": {"AWS": root}, "Action": "kms:*",
             "Resource": "*"},
            # CloudWatch Logs encrypts this region's log groups of this account only.
            {"Sid": "CloudWatchLogs", "Effect": "Allow",
             "Principal": {"Service": f"logs.{region}.amazonaws.com"},
             "Action": ["kms:Encrypt*", "kms:Decrypt*", "kms:ReEncrypt*", "kms:GenerateDataKey*",
                        "kms:Describe*"],
             "Resource": "*",
             "Condition": {"ArnLike": {
                 "kms:EncryptionContext:aws:logs:arn": f"arn:aws:logs:{region}:{account_id}:log-group:*"}}},
            # CloudWatch alarms publish to the encrypted SNS topic.
            {"Sid": "CloudWatchAlarms", "Effect": "Allow", "Principal": {"Service": "cloudwatch.amazonaws.com"},
             "Action": ["kms:Decrypt", "kms:GenerateDataKey*"], "Resource": "*",
             "Condition": {"StringEquals": {"aws:SourceAccount": account_id}}},
        ],
    })
