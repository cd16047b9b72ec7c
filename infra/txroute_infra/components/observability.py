"""A region's logs, its alarm topic and its alarms. Every alarm carries its runbook's path in its
description (`layout.alarm_description`) and notifies the topic when it fires and when it clears."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pulumi
import pulumi_aws.cloudwatch as cloudwatch
import pulumi_aws.sns as sns

from txroute_infra import layout
from txroute_infra.components.base import RegionalComponent, tags

# One-minute datapoints; an alarm fires when 3 of the last 5 breach: long enough to ride out one slow
# deploy step, short enough to page within five minutes.
PERIOD_S = 60
EVALUATION_PERIODS = 5
DATAPOINTS_TO_ALARM = 3


class Observability(RegionalComponent):
    def __init__(self, region: str, *, environment: str, kms_key_arn: pulumi.Input[str],
                 log_retention_days: int, alarm_email: str, provider: pulumi.ProviderResource,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("txroute:cell:Observability", region, provider, opts)
        self.environment = environment
        self._tags = tags(environment, region)
        self.log_groups = {
            service: cloudwatch.LogGroup(
                self.name(f"{service}-log"), name=f"/txroute/{environment}/{service}",
                retention_in_days=log_retention_days, kms_key_id=kms_key_arn, tags=self._tags,
                opts=self.child())
            for service in ("region-service", "router")
        }
        self.topic = sns.Topic(self.name("alarms"), name=f"txroute-{environment}-alarms",
                               kms_master_key_id=kms_key_arn, tags=self._tags, opts=self.child())
        if alarm_email:
            sns.TopicSubscription(self.name("alarms-email"), topic=self.topic.arn, protocol="email",
                                  endpoint=alarm_email, opts=self.child())
        self.alarms: list[cloudwatch.MetricAlarm] = []
        self.register_outputs({"topic_arn": self.topic.arn})

    def alarm(self, key: str, *, summary: str, runbook: str, comparison: str, threshold: float,
              metric: Mapping[str, Any] | None = None,
              queries: pulumi.Input[Sequence[Mapping[str, Any]]] | None = None,
              treat_missing_data: str = "missing") -> cloudwatch.MetricAlarm:
        """One alarm: either a single `metric` (namespace, metric_name, dimensions, statistic or
        extended_statistic) or metric math `queries`."""
        assert (metric is None) != (queries is None), "an alarm has a metric or metric queries, not both"
        alarm = cloudwatch.MetricAlarm(
            self.name(key),
            name=f"txroute-{self.environment}-{self.region}-{key}",
            alarm_description=layout.alarm_description(summary, runbook),
            comparison_operator=comparison,
            threshold=threshold,
            evaluation_periods=EVALUATION_PERIODS,
            datapoints_to_alarm=DATAPOINTS_TO_ALARM,
            treat_missing_data=treat_missing_data,
            alarm_actions=[self.topic.arn],
            ok_actions=[self.topic.arn],
            **({"period": PERIOD_S, **metric} if metric is not None else {"metric_queries": queries}),
            tags={**self._tags, "runbook": runbook},
            opts=self.child(),
        )
        self.alarms.append(alarm)
        return alarm
