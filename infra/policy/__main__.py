"""The txroute policy pack: `pulumi preview --policy-pack infra/policy` (or `up`). Every rule is mandatory.
The rules themselves live in `txroute_policies.py`, where the tests call them directly."""

from pulumi_policy import EnforcementLevel, PolicyPack, ResourceValidationPolicy, StackValidationPolicy
from txroute_policies import RESOURCE_RULES, STACK_RULES

PolicyPack(
    name="txroute-safety",
    enforcement_level=EnforcementLevel.MANDATORY,
    policies=[
        *(ResourceValidationPolicy(name=name, description=description, validate=validate)
          for name, (description, validate) in RESOURCE_RULES.items()),
        *(StackValidationPolicy(name=name, description=description, validate=validate)
          for name, (description, validate) in STACK_RULES.items()),
    ],
)
