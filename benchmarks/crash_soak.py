"""Soak test of record integrity: kill -9 at random moments, resume from the newest loadable checkpoint,
and check that the finished run has every tick exactly once.

    python benchmarks/crash_soak.py --trials 100 [--seed 0] [--kills 2] [--slow-writer 0.0] [--out DIR]

Each trial trains a tiny GPT-2 for 30 steps (ticks every 5, a checkpoint every 10, ~0.1 s per step) in
tests/crash_script.py, SIGKILLs it at a uniformly random moment of training ``--kills`` times, then lets
the last resume finish. Prints each trial that lost or duplicated a tick (target: 0 of 100), the kills that
landed, and the time checkpoints spent waiting for the tick writer (``Recorder.flush``).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "crash_script.py"
sys.path.insert(0, str(ROOT))

from tick_lightning.store import list_runs, load_ticks  # noqa: E402

EXPECTED = list(range(0, 30, 5))


def loadable(path: Path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:  # noqa: BLE001 - cut short by the kill
        return False


def trial(out: Path, rng: random.Random, kills: int, slow: float) -> tuple[list[str], int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    landed = fresh = 0
    for attempt in range(kills + 3):
        ckpts = sorted((out / "ckpt").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
        resume = next((c for c in reversed(ckpts) if loadable(c)), None)
        fresh += resume is None
        args = [sys.executable, str(SCRIPT), str(out), "--step-sleep", "0.1", "--slow-writer", str(slow)]
        proc = subprocess.Popen(args + (["--resume", str(resume)] if resume else []), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if attempt < kills:
            while proc.stdout.readline().strip() not in ("train-start", ""):
                pass
            time.sleep(rng.uniform(0.0, 3.5))
            proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=600)
        landed += proc.returncode == -signal.SIGKILL
        if proc.returncode == 0:
            break
    problems = []
    if proc.returncode != 0:
        problems.append(f"the last fit exited {proc.returncode}")
    df = load_ticks(out / "ticks")
    steps = df[(df.state == "loss") & (df.stat == "value")].step.tolist()
    if steps != EXPECTED:
        problems.append(f"tick steps {steps}, expected {EXPECTED}")
    sizes = df.groupby("step").size()
    if sizes.nunique() != 1:
        problems.append(f"rows per tick differ: {sizes.to_dict()}")
    runs = list_runs(out / "ticks").run.nunique()
    if runs != fresh:  # a kill before the first checkpoint makes the next fit a fresh run; a resume never does
        problems.append(f"{runs} runs from {fresh} fresh starts")
    return problems, landed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kills", type=int, default=2)
    ap.add_argument("--slow-writer", type=float, default=0.0, help="seconds per part write (a slow disk)")
    ap.add_argument("--out", help="keep the trial folders here (default: a temporary folder, removed)")
    args = ap.parse_args()
    base = Path(args.out or tempfile.mkdtemp(prefix="crash-soak-"))
    rng = random.Random(args.seed)
    bad, landed, waits, t0 = 0, 0, [], time.perf_counter()
    for i in range(args.trials):
        out = base / f"trial{i:03d}"
        problems, kills = trial(out, rng, args.kills, args.slow_writer)
        landed += kills
        flush = out / "flush.txt"
        waits += [float(x) for x in flush.read_text().split()] if flush.exists() else []
        if problems:
            bad += 1
            print(f"trial {i}: " + "; ".join(problems), flush=True)
        if (i + 1) % 10 == 0:
            print(f"... {i + 1} trials, {bad} bad, {landed} SIGKILLs landed, {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"{bad} of {args.trials} trials lost or duplicated a tick ({landed} SIGKILLs landed, "
          f"{time.perf_counter() - t0:.0f} s)")
    if waits:
        waits.sort()
        print(f"checkpoint waits for the tick writer: {len(waits)} checkpoints, median {1e3 * waits[len(waits) // 2]:.2f} ms, "
              f"max {1e3 * waits[-1]:.2f} ms, total {sum(waits):.2f} s")
    if not args.out:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
