"""The delivery pipeline as code: schema-valid, and shaped as promised (preview only on pull requests,
deploys only from main behind approval environments, the test command, the benchmark gate)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.infra.conftest import REPO, Run

WORKFLOW = REPO / "ci" / "github" / "workflows" / "pipeline.yml"
CHECK_JSONSCHEMA = Path(REPO / ".venv" / "bin" / "check-jsonschema")


@pytest.fixture(scope="module")
def workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    # YAML 1.1 reads the key `on` as True.
    data["on"] = data.pop(True, data.get("on"))
    return data


def _runs(job: dict[str, Any]) -> str:
    return "\n".join(str(step.get("run", "")) + str(step.get("with", "")) for step in job["steps"])


def test_workflow_matches_the_github_workflow_schema() -> None:
    exe = str(CHECK_JSONSCHEMA) if CHECK_JSONSCHEMA.exists() else shutil.which("check-jsonschema")
    assert exe, "check-jsonschema is a dev dependency (pyproject.toml)"
    result = subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", str(WORKFLOW)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_runs_on_pull_requests_and_pushes_to_main(workflow: dict[str, Any]) -> None:
    assert workflow["on"]["pull_request"]["branches"] == ["main"]
    assert workflow["on"]["push"]["branches"] == ["main"]
    assert workflow["permissions"] == {"contents": "read"}, "least privilege by default"


def test_lint_and_test_jobs_run_the_projects_commands(workflow: dict[str, Any]) -> None:
    jobs = workflow["jobs"]
    assert "ruff check" in _runs(jobs["lint"]) and "mypy" in _runs(jobs["lint"])
    assert "bash ci/test.sh" in _runs(jobs["test"])
    assert "postgresql" in _runs(jobs["test"]).lower()


def test_preview_runs_only_on_pull_requests_with_the_policy_pack(workflow: dict[str, Any]) -> None:
    preview = workflow["jobs"]["preview"]
    assert preview["if"] == "github.event_name == 'pull_request'"
    (step,) = [s for s in preview["steps"] if str(s.get("uses", "")).startswith("pulumi/actions@")]
    assert step["with"]["command"] == "preview" and step["with"]["policyPacks"] == "policy"
    assert step["with"]["work-dir"] == "infra"
    assert set(preview["strategy"]["matrix"]["stack"]) == {"staging", "prod"}


def test_every_job_that_deploys_runs_on_main_behind_an_approval_environment(workflow: dict[str, Any]) -> None:
    deploying = {name: job for name, job in workflow["jobs"].items()
                 if "deploy.sh" in _runs(job) or "pulumi up" in _runs(job)
                 or any(s.get("with", {}).get("command") == "up" for s in job["steps"])}
    assert set(deploying) == {"deploy-staging", "deploy-prod"}
    for name, job in deploying.items():
        assert job["if"] == "github.event_name == 'push' && github.ref == 'refs/heads/main'", name
        assert job["environment"] in ("staging", "production"), name
        assert "test" in job["needs"] or job["needs"] == "deploy-staging", name
        assert job["concurrency"]["cancel-in-progress"] is False, f"{name}: never cancel a running deploy"
    assert workflow["jobs"]["deploy-prod"]["environment"] == "production"
    assert workflow["jobs"]["deploy-prod"]["needs"] == "deploy-staging"


def test_jobs_are_bounded_and_use_oidc_not_stored_aws_keys(workflow: dict[str, Any]) -> None:
    text = WORKFLOW.read_text()
    assert "AWS_SECRET_ACCESS_KEY" not in text and "aws-secret-access-key" not in text
    for name, job in workflow["jobs"].items():
        assert 0 < job["timeout-minutes"] <= 60, name


def test_benchmark_job_compares_with_the_stored_baseline(workflow: dict[str, Any]) -> None:
    runs = _runs(workflow["jobs"]["bench"])
    assert "ci/bench_compare.py" in runs and "ci/bench_baseline.json" in runs
    assert "bench" in workflow["jobs"]["deploy-staging"]["needs"], "a regression blocks the deploy"


def test_installed_copy_matches_when_present() -> None:
    installed = REPO / ".github" / "workflows" / "pipeline.yml"
    if installed.exists():
        assert installed.read_text() == WORKFLOW.read_text(), "run bash ci/github/install.sh"


def test_bootstrap_targets_are_urns_the_program_makes_with_their_parents_and_dependencies(
        program_run: Run) -> None:
    """A targeted create fails ("untargeted create") when its parent or a dependency is neither in the state
    nor targeted: on a fresh stack every one must be in the list (providers and the root stack are implicit)."""
    from txroute_infra.bootstrap import bootstrap_targets

    regions = sorted({r.inputs["region"] for r in program_run.of_type("pulumi:providers:aws")} - {"us-west-2"})
    targets = bootstrap_targets("test", regions)
    made = set(program_run.urns)
    assert set(targets) <= made, f"not made by the program: {set(targets) - made}"
    # The root stack is targeted implicitly (under mocks its URN may come from an earlier run's settings).
    implicit = {u for u in made if "::pulumi:providers:" in u} | {""}

    def covered(urn: str) -> bool:
        return urn in set(targets) | implicit or "::pulumi:pulumi:Stack::" in urn

    for urn in targets:
        if "::pulumi:providers:" in urn:
            continue
        parent = program_run.parents[urn]
        assert covered(parent), f"{urn}: parent {parent} is not targeted"
        missing = {d for d in program_run.dependencies[urn] if not covered(d)}
        assert not missing, f"{urn}: depends on untargeted {missing}"
    for region in regions:
        repo = f"urn:pulumi:test::txroute::txroute:cell:RegionalCell$txroute:cell:Compute" \
               f"$aws:ecr/repository:Repository::{region}-ecr"
        assert repo in targets, f"{region}: its repository must be created by the bootstrap"
    assert not [u for u in targets if "ecs/service" in u or "taskDefinition" in u], "services wait for images"


def test_bootstrap_project_is_the_pulumi_project() -> None:
    from txroute_infra.bootstrap import PROJECT

    assert yaml.safe_load((REPO / "infra" / "Pulumi.yaml").read_text())["name"] == PROJECT


STUBS = {
    # Each stub appends its command line to $STUB_LOG, then answers like the real tool would.
    "pulumi": """
[ "$1" = version ] && echo "v${STUB_PULUMI_VERSION:-3.272.0}"
case "$1 $2" in
  "stack export") echo '{"deployment": {"resources": []}}' ;;
esac
""",
    "aws": """
case "$1 $2" in
  "sts get-caller-identity") echo 123456789012 ;;
  "ecr get-login-password") echo secret ;;
  "ecs describe-services") echo '{"awsvpcConfiguration": {"subnets": ["s"], "securityGroups": ["g"]}}' ;;
  "ecs run-task") echo arn:aws:ecs:task/migrate ;;
  "ecs describe-tasks") echo 0 ;;
  "ecr describe-images")
    case "$*" in
      *"--region eu-west-1 "*) echo '{"imageDetails": [{}]}' ;;
      *) echo "An error occurred (ImageNotFoundException) when calling the DescribeImages operation" >&2
         exit 254 ;;
    esac ;;
esac
""",
    "docker": """
[ "$1" = login ] && cat >/dev/null
exit 0
""",
}


def _run_deploy(tmp_path: Path, *, pulumi_version: str = "3.272.0",
                ok: bool = True) -> list[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        stub = bin_dir / name
        stub.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> "$STUB_LOG"\n{body}')
        stub.chmod(0o755)
    log = tmp_path / "calls.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "STUB_LOG": str(log), "STACK": "staging", "IMAGE_TAG": "abc123",
           "HOME": str(tmp_path), "STUB_PULUMI_VERSION": pulumi_version}
    result = subprocess.run(["bash", str(REPO / "ci" / "github" / "deploy.sh")], cwd=REPO / "infra", env=env,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode == 0) is ok, result.stdout + result.stderr
    return log.read_text().splitlines()


def test_deploy_script_bootstraps_builds_for_the_tasks_architecture_and_skips_present_tags(
        tmp_path: Path, program_run: Run) -> None:
    from txroute_infra.bootstrap import bootstrap_targets
    from txroute_infra.topology import load_topology

    calls = _run_deploy(tmp_path)
    regions = [r.name for r in load_topology().regions]
    (bootstrap,) = [c for c in calls if c.startswith("pulumi up") and "--target" in c]
    assert [t.strip() for t in bootstrap.split("--target ")[1:]] == bootstrap_targets("staging", regions), bootstrap

    (build,) = [c for c in calls if c.startswith("docker buildx build")]
    architectures = {td.inputs["runtimePlatform"]["cpuArchitecture"]
                     for td in program_run.of_type("aws:ecs/taskDefinition:TaskDefinition")}
    assert architectures == {"ARM64"}
    assert "--platform linux/arm64" in build, build

    pushed = [c for c in calls if c.startswith("docker push")]
    assert not any(".eu-west-1." in c for c in pushed), "eu-west-1 already holds the tag: pushing fails"
    assert sorted(c.split(".")[3] for c in pushed) == sorted(r for r in regions if r != "eu-west-1"), pushed
    up = calls.index("pulumi up --yes --policy-pack policy")
    assert calls.index("pulumi config set txroute:imageTag abc123") < up
    # After the full `up` (the stub stack has no migrate task yet: a first deploy), every region migrates.
    runs = [c for c in calls[up:] if c.startswith("aws ecs run-task")]
    assert sorted(c.split("--region ")[1].split()[0] for c in runs) == sorted(regions), runs
    assert all("--task-definition txroute-staging-migrate" in c for c in runs), runs


def test_deploy_jobs_can_build_arm64_images(workflow: dict[str, Any]) -> None:
    for name in ("deploy-staging", "deploy-prod"):
        uses = [str(step.get("uses", "")) for step in workflow["jobs"][name]["steps"]]
        assert any(u.startswith("docker/setup-qemu-action@") for u in uses), name
        assert any(u.startswith("docker/setup-buildx-action@") for u in uses), name


PULUMI_VERSION_MIN = (3, 256, 0)  # pulumi/pulumi#24108: skipped creates' outputs resolve as unknown


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.lstrip("v").split("."))


def test_an_engine_that_crashes_targeted_updates_is_refused_before_anything_changes(tmp_path: Path) -> None:
    calls = _run_deploy(tmp_path, pulumi_version="3.200.0", ok=False)
    assert calls == ["pulumi version"], f"expected nothing after the version check, got {calls}"


def test_the_pipeline_and_the_sdk_use_an_engine_that_resolves_skipped_creates(workflow: dict[str, Any]) -> None:
    assert _version(workflow["env"]["PULUMI_VERSION"]) >= PULUMI_VERSION_MIN
    pyproject = (REPO / "pyproject.toml").read_text()
    (floor,) = re.findall(r'"pulumi>=([0-9.]+),', pyproject)
    assert _version(floor) >= PULUMI_VERSION_MIN[:2]
    script = (REPO / "ci" / "github" / "deploy.sh").read_text()
    assert f"PULUMI_VERSION_MIN={'.'.join(map(str, PULUMI_VERSION_MIN))}" in script
