"""The guard under DDP and FSDP2 on 2 CPU processes (gloo): one decision on every rank, from the reduced norms and
the mean loss, checked against each rank's own view and ``full_tensor()`` references (tests/guard_dist_script.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tick_lightning import load_dense, load_guard, load_ticks

HERE = Path(__file__).parent


def launch(tmp_path, kind: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(HERE / "guard_dist_script.py"), str(tmp_path), kind], env=env,
                          capture_output=True, text=True, timeout=300)  # a hang fails here instead of blocking CI
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r: {int(k): v for k, v in json.loads((tmp_path / f"rank{r}.json").read_text()).items()} for r in (0, 1)}


def test_ddp_one_rank_spikes_every_rank_skips(tmp_path):
    """Rank 1's loss x1e3 (and later NaN) before the all-reduce: both ranks skip both steps, from the loss averaged
    over the ranks (rank 0's own loss is normal), and stay exact replicas."""
    from guard_dist_script import LOSS_STEP, NAN_STEP

    seen = launch(tmp_path, "ddp")
    guard = {r: load_guard(tmp_path / "ticks", rank=r) for r in (0, 1)}
    for r in (0, 1):
        assert guard[r][["step", "action", "trigger"]].values.tolist() == [
            [LOSS_STEP, "skip", "loss"], [NAN_STEP, "skip", "nonfinite"]]
    cols = ["factor", "loss", "grad_norm", "z_loss", "z_grad_norm"]
    assert guard[0][cols].equals(guard[1][cols])  # the same numbers on both ranks, not just the same verdict
    losses = {r: load_dense(tmp_path / "ticks", rank=r).loss for r in (0, 1)}
    assert guard[0].loss[0] == pytest.approx((losses[0][LOSS_STEP] + losses[1][LOSS_STEP]) / 2, rel=1e-6)
    assert losses[1][LOSS_STEP] > 100 * losses[0][LOSS_STEP]
    assert {s: seen[0][s]["param_sum"] for s in seen[0]} == {s: seen[1][s]["param_sum"] for s in seen[1]}
    for step in (LOSS_STEP, NAN_STEP):
        assert seen[0][step]["param_sum"] == seen[0][step - 1]["param_sum"]  # skipped: nothing moved
    assert seen[0][LOSS_STEP + 1]["param_sum"] != seen[0][LOSS_STEP]["param_sum"]


@pytest.mark.parametrize("kind", ["fsdp2", "tp"])
def test_a_sharded_tensor_is_clipped_by_its_whole_norm_on_every_rank(tmp_path, kind):
    """A gradient sharded over both ranks (FSDP2, or tensor parallel) x50: both ranks clip it, by the norm of the
    whole tensor (its ``full_tensor()`` norm, not the rank's half), and write the same rows."""
    from guard_dist_script import CLIP_STEP, SHARDED, TP_SHARDED

    seen = launch(tmp_path, kind)
    planted = SHARDED if kind == "fsdp2" else TP_SHARDED
    rows = load_ticks(tmp_path / "ticks")
    rows = rows[rows.state == "guard"]
    per_rank = {r: g.drop(columns=["rank", "attempt"], errors="ignore").sort_values(["step", "name", "stat"])
                .reset_index(drop=True) for r, g in rows.groupby("rank")}
    assert sorted(per_rank) == [0, 1]
    assert per_rank[0][["step", "name", "stat", "value"]].equals(per_rank[1][["step", "name", "stat", "value"]])
    named = rows[(rows["rank"] == 0) & (rows.name != "") & (rows.stat == "grad_norm")]
    mine = named[named.name == planted]
    assert CLIP_STEP in set(mine.step)
    for step, value in zip(mine.step, mine.value):
        assert value == pytest.approx(seen[0][int(step)]["full_norm"], rel=1e-6)
        assert value == pytest.approx(seen[1][int(step)]["full_norm"], rel=1e-6)
