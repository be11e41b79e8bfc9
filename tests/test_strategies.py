"""TickCallback in real Trainer fits under every strategy Lightning trains large models with, on CPU (gloo):
a matrix of strategy (single, DDP 2, FSDP2 2, FSDP2 x TP 2x2) x precision (32-true, bf16-mixed) x
accumulation (1, 2) x compile (off, and on for single), each fit against an independent fp64 reference of
the full tensors (tests/strategy_script.py); then FSDP2 on 4 processes, tensor parallel alone, and a NaN
seen by one rank only."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tick_lightning import load_flight, load_ticks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

HERE = Path(__file__).parent
TICKS = (0, 2, 3)


def run(out: Path, mode: str, devices: int, build: str, n_layer: int, configs: str) -> list[dict]:
    """Launch tests/strategy_script.py once for the fits ``configs`` (``PRECISION/ACCUMULATE[/compile],...``);
    each fit's rank-0 info, in order (fit ``i`` is in ``out / str(i)``)."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(HERE / "strategy_script.py"), str(out), mode, str(devices), build,
                           str(n_layer), configs], env=env, capture_output=True, text=True,
                          timeout=600)  # a hang in a collective fails here instead of blocking CI
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads((out / str(i) / "info-rank0.json").read_text()) for i in range(len(configs.split(",")))]


def value(df, step, state, name, stat):
    rows = df[(df.step == step) & (df.state == state) & (df.name == name) & (df.stat == stat)]
    assert len(rows) == 1, (step, state, name, stat, len(rows))
    return float(rows.value.iloc[0])


def check_against_reference(out: Path, info: dict, patched: bool, sharded: bool = True) -> None:
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
        observed = set(df[(df.step == step) & (df.state == "norm_input")].name)
        assert observed == set(r["norm_input"]) and observed, (step, observed, set(r["norm_input"]))
        for name, (total, squares, amax, count) in r["norm_input"].items():  # rank 0's own inputs
            assert value(df, step, "norm_input", name, "mean") == pytest.approx(total / count, rel=1e-3, abs=1e-6)
            assert value(df, step, "norm_input", name, "rms") == pytest.approx((squares / count) ** 0.5, rel=1e-4)
            assert value(df, step, "norm_input", name, "absmax") == pytest.approx(amax, rel=1e-5)
    # the flight recorder: every step's per-parameter gradient norm, reduced over the shards at its dump
    flight = load_flight(out / "ticks")
    assert sorted(flight.index) == sorted(ref)
    for step, r in ref.items():
        assert set(flight.columns) == set(r["grad"]), step
        for name, stats in r["grad"].items():
            assert flight.loc[step, name] == pytest.approx(stats["norm"], rel=1e-4, abs=1e-9), (step, name)
    assert (load_flight(out / "ticks", "nonfinite") == 0).all().all()
    # the update copy holds each parameter's local shard only
    for name, numel in info["update_copies"]:
        assert numel == info["local_numel"][name]
    assert any(info["local_numel"][n] < info["full_numel"][n] for n, _ in info["update_copies"]) == sharded
    if patched:
        assert info["patched"] > 0


CONFIGS = "32-true/1,32-true/2,bf16-mixed/1,bf16-mixed/2"  # precision x accumulation
CI_CONFIGS = "32-true/2,bf16-mixed/1"  # each precision and each accumulation once (the full product: make test-all)
EVENT_FLAG = 1  # the spike trigger's agreement (triggers.SpikeTrigger) at each flush of the dense rows
MATRIX = {  # strategy: devices, where the model is built, GPT-2 blocks, fits, TickCallback collectives per tick
    "single": (1, "init", 2, CONFIGS + "," + CONFIGS.replace(",", "/compile,") + "/compile", 0),
    "ddp": (2, "init", 2, CONFIGS, 0),  # replicated parameters, all-reduced gradients: nothing to gather
    # one all_gather over the data-parallel group; and a model whose output FSDP2 cannot traverse
    "fsdp2": (2, "configure", 2, CONFIGS + ",32-true/1/opaque", 1),
    # TP parameters are split over both mesh dimensions (one all_gather each), the others over data parallel
    "fsdp2_tp": (4, "configure", 0, CONFIGS, 3),
}
CI_MATRIX = {  # the CI-sized matrix: every strategy, both precisions, accumulation, and compile once: under bf16 with
    # accumulation, against the fp64 reference (fp32 compile is checked against the uncompiled fit by
    # test_callback's compile test; the full product is slow)
    "single": CI_CONFIGS + ",bf16-mixed/2/compile",
    "ddp": CI_CONFIGS, "fsdp2": CI_CONFIGS + ",32-true/1/opaque", "fsdp2_tp": CI_CONFIGS,
}


@pytest.mark.parametrize(("mode", "configs"), [
    *[pytest.param(mode, CI_MATRIX[mode], id=mode) for mode in MATRIX],
    *[pytest.param(mode, MATRIX[mode][3], id=f"{mode}-full", marks=pytest.mark.slow) for mode in MATRIX],
])
def test_strategy_precision_accumulation_compile_matrix(tmp_path, mode, configs):
    devices, build, n_layer, _, collectives = MATRIX[mode]
    infos = run(tmp_path, mode, devices, build, n_layer, configs)
    for i, (config, info) in enumerate(zip(configs.split(","), infos)):
        if config.endswith("/opaque"):  # FSDP2 never resharded: the optimizer's parameters have no gradients
            assert len(info["warnings"]) == 1 and "must return tensors FSDP2 can traverse" in info["warnings"][0]
            assert "grad" not in set(load_ticks(tmp_path / str(i) / "ticks").state)
            continue
        try:
            assert info["warnings"] == [], info["warnings"]
            check_against_reference(tmp_path / str(i), info, patched=True, sharded=mode.startswith("fsdp2"))
            assert info["compiled"] == config.endswith("/compile")
            # sharded: the statistics' all_gathers, plus the one all_reduce of "did any rank see a spike" with
            # the flush of the dense rows (the flight recorder's dump decision must be rank-identical)
            expect = collectives + EVENT_FLAG if collectives else 0
            assert info["collectives"] == ({str(s): expect for s in TICKS} if expect else {})
            if mode == "fsdp2_tp":  # 2-D: the tensor-parallel weights are split over both mesh dimensions
                assert info["mesh_dims"]["model.fc1.weight"] == 2 and info["mesh_dims"]["model.head.weight"] == 1
        except AssertionError as e:
            raise AssertionError(f"{mode} {config}: {e}") from e


@pytest.mark.slow  # four processes on a small CI machine: ~45 s
def test_fsdp2_four_processes_collectives_do_not_grow_with_parameters(tmp_path):
    info, = run(tmp_path, "fsdp2", 4, "init", n_layer=4, configs="32-true/1")  # twice the blocks of the matrix
    check_against_reference(tmp_path / "0", info, patched=True)
    assert info["collectives"] == {str(s): 1 + EVENT_FLAG for s in TICKS}


def test_tensor_parallel_two_processes(tmp_path):
    info, = run(tmp_path, "tp", 2, "init", n_layer=0, configs="32-true/1")
    assert {"model.fc1.weight", "model.fc2.weight", "model.fc2.bias"} <= set(info["sharded"])
    check_against_reference(tmp_path / "0", info, patched=False)
    assert info["collectives"] == {str(s): 1 + EVENT_FLAG for s in TICKS}  # one tensor-parallel group


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
    run(tmp_path, "nan", 2, "init", n_layer=1, configs="32-true/1")
    df = load_ticks(tmp_path / "0" / "ticks")
    assert {r: sorted(df[df["rank"] == r].step.unique()) for r in (0, 1)} == {0: [2, 3], 1: [2, 3]}  # 3: the last
    loss = df[(df.state == "loss") & (df.stat == "nonfinite") & (df.step == 2)].set_index("rank").value
    assert loss.to_dict() == {0: 0.0, 1: 1.0}
    grads = df[(df.state == "grad") & (df.name != "")].pivot_table(index="name", columns=["rank", "stat"],
                                                                  values="value")
    assert (grads[0] - grads[1]).abs().max().max() < 1e-6  # exact global statistics on both ranks
