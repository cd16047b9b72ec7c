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


def test_deploy_script_targets_urns_the_program_really_makes(program_run: Run) -> None:
    script = (REPO / "ci" / "github" / "deploy.sh").read_text()
    templates = re.findall(r'--target "\$\{base\}([^"]+)"', script)
    assert len(templates) == 3
    region = "eu-west-1"
    made = {urn.split("::", 2)[2] for urn in program_run.urns}
    for template in templates:
        urn = template.replace("${region}", region).replace("\\$", "$")
        assert urn in made, f"{urn} is not a resource the program makes"
