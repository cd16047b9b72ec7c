"""Game-day plumbing: the runbooks' marked blocks, run against a local stack started as a user starts it.

A block fenced ```sh gameday is run one command a line (a trailing backslash continues it), each with
`bash -c`, with `txroute` on the PATH and the stack's TXROUTE_STATE_DIR; only the documented placeholders
(runbooks/README.md) are filled in. ```sql gameday blocks are returned for the test to run in a shard.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from app.config import REPO_ROOT

RUNBOOKS = REPO_ROOT / "runbooks"
PLACEHOLDERS = ("<region>", "<transfer_id>", "<client>", "<account>", "<range>", "<shard>", "<region2>")
COMMAND_TIMEOUT_S = 120
_FENCE = re.compile(r"^```(\w+) gameday\s*$")


@dataclass
class Block:
    runbook: str
    language: str  # sh or sql
    text: str

    def commands(self, values: dict[str, str]) -> list[str]:
        assert self.language == "sh", self.language
        joined = self.text.replace("\\\n", " ")
        return [fill(line.strip(), values, self.runbook) for line in joined.splitlines() if line.strip()]

    def sql(self, values: dict[str, str]) -> str:
        assert self.language == "sql", self.language
        return fill(self.text, values, self.runbook)


def fill(text: str, values: dict[str, str], runbook: str) -> str:
    for name, value in values.items():
        assert f"<{name}>" in PLACEHOLDERS, f"<{name}> is not a documented placeholder"
        text = text.replace(f"<{name}>", value)
    left = re.findall(r"<[a-z0-9_]+>", text)
    assert not left, f"{runbook}: placeholder(s) {left} left unfilled in a game-day block"
    return text


def blocks(runbook: str) -> list[Block]:
    """The runbook's game-day blocks, in order."""
    found: list[Block] = []
    lines = (RUNBOOKS / runbook).read_text().splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        i += 1
        if m is None:
            continue
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"{runbook}: unclosed game-day block"
        found.append(Block(runbook, m.group(1), "\n".join(body) + "\n"))
    return found


@dataclass
class Result:
    command: str
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return f"$ {self.command}\n(exit {self.returncode})\n{self.stdout}{self.stderr}"


def run(command: str, state: Path) -> Result:
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "TXROUTE_STATE_DIR": str(state), "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S, cwd=REPO_ROOT)
    return Result(command, done.returncode, done.stdout, done.stderr)


def run_blocks(runbook: str, state: Path, values: dict[str, str], *, expect_ok: bool = True) -> list[Result]:
    """Every sh game-day block of the runbook, in order; with `expect_ok`, each command must exit 0."""
    results = []
    for block in blocks(runbook):
        if block.language != "sh":
            continue
        for command in block.commands(values):
            result = run(command, state)
            results.append(result)
            if expect_ok:
                assert result.returncode == 0, f"{runbook}: expected the command to succeed:\n{result}"
    return results
