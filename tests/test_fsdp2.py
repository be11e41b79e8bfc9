"""TickCallback under FSDP2 (``fully_shard``, 2 and 4 processes) and 2-way tensor parallel on CPU (gloo),
in a real Trainer, against an independent fp64 reference of the full tensors (tests/fsdp2_script.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tick_lightning import load_ticks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

HERE = Path(__file__).parent
TICKS = (0, 2, 3)


def run(out: Path, mode: str, devices: int, build: str, n_layer: int, accumulate: int,
        precision: str = "32-true") -> dict:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(HERE / "fsdp2_script.py"), str(out), mode, str(devices), build,
                           str(n_layer), str(accumulate), precision], env=env, capture_output=True, text=True,
                          timeout=300)  # a hang in a collective fails here instead of blocking CI
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "info-rank0.json").read_text())


def value(df, step, state, name, stat):
    rows = df[(df.step == step) & (df.state == state) & (df.name == name) & (df.stat == stat)]
    assert len(rows) == 1, (step, state, name, stat, len(rows))
    return float(rows.value.iloc[0])


def check_against_reference(out: Path, info: dict, patched: bool) -> None:
    df = load_ticks(out / "ticks")
    assert sorted(df.step.unique()) == list(TICKS)
    assert df["rank"].unique().tolist() == [0]  # ranks="zero": every rank computes, rank 0 writes
    ref = {int(k): v for k, v in json.loads((out / "reference-rank0.json").read_text()).items()}
    for step in TICKS:
        r = ref[step]
        for state in ("weight", "grad"):
            assert set(df[(df.step == step) & (df.state == state) & (df.name != "")].name) == set(r[state])
            for name, stats in r[state].items():
                scale = stats["norm"] / max(1, info["full_numel"][name]) ** 0.5  # the elements' rms
                for stat, expect in stats.items():
                    got = value(df, step, state, name, stat)
                    assert got == pytest.approx(expect, rel=1e-4, abs=1e-5 * scale), (step, state, name, stat)
        for name, stats in r["update"].items():
            for stat, expect in stats.items():
                assert value(df, step, "update", name, stat) == pytest.approx(expect, rel=1e-4, abs=1e-9)
        # the global norm over every trainable parameter, as clip_grad_norm_ computes it on the full tensors
        assert value(df, step, "grad", "", "norm") == pytest.approx(r["gnorm_fp64"], rel=1e-5)
        if "clip_grad_norm" in r:
            assert value(df, step, "grad", "", "norm") == pytest.approx(r["clip_grad_norm"], rel=1e-5)
        assert value(df, step, "loss", "", "value") == pytest.approx(r["loss"], rel=1e-5)  # rank 0's batches
        for name, (total, squares, amax, count) in r["norm_input"].items():  # rank 0's own inputs
            assert value(df, step, "norm_input", name, "mean") == pytest.approx(total / count, rel=1e-3, abs=1e-6)
            assert value(df, step, "norm_input", name, "rms") == pytest.approx((squares / count) ** 0.5, rel=1e-4)
            assert value(df, step, "norm_input", name, "absmax") == pytest.approx(amax, rel=1e-5)
    # the update copy holds each parameter's local shard only
    for name, numel in info["update_copies"]:
        assert numel == info["local_numel"][name]
    assert any(info["local_numel"][n] < info["full_numel"][n] for n, _ in info["update_copies"])
    if patched:
        assert info["patched"] > 0


def test_fsdp2_two_processes_model_built_in_configure_model(tmp_path):
    info = run(tmp_path, "fsdp2", 2, "configure", n_layer=2, accumulate=2)
    assert info["sharded"]  # the parameters really are DTensors
    check_against_reference(tmp_path, info, patched=True)
    # one all_gather per tick (one data-parallel group), inside TickCallback's hooks
    assert info["collectives"] == {str(s): 1 for s in TICKS}


@pytest.mark.slow  # four processes on a small CI machine: ~60 s
def test_fsdp2_four_processes_collectives_do_not_grow_with_parameters(tmp_path):
    info = run(tmp_path, "fsdp2", 4, "init", n_layer=4, accumulate=1)  # twice the blocks of the test above
    check_against_reference(tmp_path, info, patched=True)
    assert info["collectives"] == {str(s): 1 for s in TICKS}


def test_tensor_parallel_two_processes(tmp_path):
    info = run(tmp_path, "tp", 2, "init", n_layer=0, accumulate=1)
    assert {"model.fc1.weight", "model.fc2.weight", "model.fc2.bias"} <= set(info["sharded"])
    check_against_reference(tmp_path, info, patched=False)
    assert info["collectives"] == {str(s): 1 for s in TICKS}  # one tensor-parallel group


def test_fsdp2_bf16_mixed_two_processes(tmp_path):
    info = run(tmp_path, "fsdp2", 2, "init", n_layer=1, accumulate=1, precision="bf16-mixed")
    assert info["sharded"]
    check_against_reference(tmp_path, info, patched=True)


def test_strided_shards_count_as_split(tmp_path):
    """FSDP2 over a tensor-parallel dimension shards with ``_StridedShard``, which is not a ``Shard``
    subclass: its mesh dimension must be among the groups the statistics are gathered over."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    from tick_lightning.dist import shard_groups

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("dp", "tp"))
        t = DTensor.from_local(torch.ones(4, 2), mesh, [_StridedShard(0, split_factor=1), Shard(0)])
        assert len(shard_groups(t)) == 2
    finally:
        dist.destroy_process_group()


def test_nan_loss_on_one_rank_only_is_recorded_on_every_rank(tmp_path):
    # rank 1 alone sees a NaN loss (its gradients stay finite): a rank-local decision would send rank 1
    # into the tick's all_gather alone and hang; the all-reduced flag makes both ranks record step 2
    run(tmp_path, "nan", 2, "init", n_layer=1, accumulate=1)
    df = load_ticks(tmp_path / "ticks")
    assert {r: sorted(df[df["rank"] == r].step.unique()) for r in (0, 1)} == {0: [2], 1: [2]}
    loss = df[(df.state == "loss") & (df.stat == "nonfinite")].set_index("rank").value
    assert loss.to_dict() == {0: 0.0, 1: 1.0}
    grads = df[(df.state == "grad") & (df.name != "")].pivot_table(index="name", columns=["rank", "stat"],
                                                                  values="value")
    assert (grads[0] - grads[1]).abs().max().max() < 1e-6  # exact global statistics on both ranks
