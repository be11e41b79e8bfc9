"""The prepared GPU check (benchmarks/gpu_check.sh) parses and, in dry-run mode, finds every command it runs."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def dry_run(python: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": python, "OMP_NUM_THREADS": "1"}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], env=env, capture_output=True, text=True, timeout=timeout)


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_dry_run_fails_when_the_python_is_missing():
    proc = dry_run("/nonexistent/python", timeout=30)
    assert proc.returncode != 0 and "missing" in proc.stdout


@pytest.mark.slow
def test_dry_run_finds_every_command_and_option():
    """Runs each benchmark's --help to check every option the check passes exists (~40 s on 2 loaded cores)."""
    proc = dry_run(sys.executable)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    import re

    steps = int(re.search(r"dry run: checking (\d+) steps", proc.stdout).group(1))
    assert steps >= 8 and proc.stdout.count("\nok    ") == steps and "every command exists" in proc.stdout
