"""A sampling profile of a service under a benchmark's load: py-spy (the `bench` extra) attached to the
service's process group for the measured stretch, then the top functions by samples, self and inclusive.

    txroute bench ledger --profile ledger.txt   # the collapsed stacks in ledger.txt (flamegraph.pl reads it)

py-spy reads the other process's memory: as root, or where ptrace is allowed. The profile costs the sampled
process little (py-spy is a separate process), but the sampler takes CPU on the same cores: figures measured
with --profile are not comparable with those without.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

SAMPLES_PER_S = 250
TOP = 15
_LINE = re.compile(r":\d+\)$")
# Where a sample's innermost frame means "not running Python": the event loop's wait, and granian's worker
# entry point, below which its Rust runtime serves HTTP and TLS.
_IDLE = ("select (selectors.py", "_run_once (asyncio/base_events.py", "run_forever (asyncio/base_events.py",
         "MPServer._spawn_asgi_lifespan_worker (granian/")


class Profiler:
    """`start(pid, seconds)` samples the process `pid` and its children for `seconds`; `report()` waits for
    py-spy and returns the top functions."""

    def __init__(self, output: Path) -> None:
        # The venv's bin first: `txroute` runs from it without it being on PATH.
        found = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                             os.environ.get("PATH", "")]))
        if found is None:
            raise SystemExit("--profile needs py-spy: pip install 'txroute[bench]' (or pip install py-spy)")
        self._py_spy = found
        self._output = output
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, pid: int, seconds: float) -> None:
        self._process = subprocess.Popen(
            [self._py_spy, "record", "--pid", str(pid), "--subprocesses", "--format", "raw", "--nonblocking",
             "--rate", str(SAMPLES_PER_S), "--duration", str(max(1, round(seconds))), "--output", str(self._output)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    def report(self, *, timeout_s: float = 60.0) -> str:
        assert self._process is not None, "start() first"
        _, stderr = self._process.communicate(timeout=timeout_s)
        if self._process.returncode != 0 or not self._output.exists():
            return f"py-spy failed ({self._process.returncode}): {stderr.decode(errors='replace').strip()[-500:]}"
        return top_functions(self._output.read_text())


def top_functions(collapsed: str, *, top: int = TOP) -> str:
    """The `top` functions by self samples, and the project's own (`app/`) functions by inclusive samples (a
    function counted once per stack), of py-spy's raw (collapsed) output, line numbers folded. Samples with
    no Python frame (granian's Rust side: HTTP, TLS, waiting) and the event loop's idle wait are counted
    apart, so the shares are of the Python work."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_LINE.sub(")", f.strip()) for f in stack.split(";") if not f.startswith("process ")]
        if not frames or frames[-1].startswith(_IDLE):
            idle += count
            continue
        own[frames[-1]] += count
        for frame in set(frames):
            if " (app/" in frame:
                inclusive[frame] += count
    busy = max(total - idle, 1)
    lines = [f"profile: {total} samples, {idle} ({idle / max(total, 1):.0%}) outside Python code or idle (granian's "
             f"Rust side, waiting); shares below are of the other {busy}", "  self (top functions):"]
    lines += [f"  {n / busy:6.1%}  {name}" for name, n in own.most_common(top)]
    lines.append("  inclusive (the project's own functions):")
    lines += [f"  {n / busy:6.1%}  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)
