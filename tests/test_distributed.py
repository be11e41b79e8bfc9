"""DDP on 2 CPU processes (gloo) and exact sharded statistics with DTensor."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch

from tick_lightning import load_flight, load_ticks
from tick_lightning.stats import global_norm, tensor_stats

HERE = Path(__file__).parent


def test_ddp_two_cpu_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HERE / "ddp_script.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=240)  # a hang fails here instead of blocking CI
    assert proc.returncode == 0, proc.stderr[-3000:]

    df = load_ticks(tmp_path / "all")
    assert sorted(df["rank"].unique()) == [0, 1]
    steps = {r: sorted(df[df["rank"] == r].step.unique()) for r in (0, 1)}
    assert steps[0] == steps[1] == [0, 2, 3, 6]  # identical decisions on every rank

    name = "model.classifier.weight"
    for rank in (0, 1):
        expect = {row["step"]: row for row in json.loads((tmp_path / f"expect-rank{rank}.json").read_text())}
        mine = df[(df["rank"] == rank) & (df.name == name)]
        for step in steps[rank]:
            row = mine[(mine.step == step) & (mine.state == "weight") & (mine.stat == "norm")]
            assert float(row.value.iloc[0]) == pytest.approx(expect[step]["wnorm"], rel=1e-5)
            grad = mine[(mine.step == step) & (mine.state == "grad") & (mine.stat == "norm")]
            assert float(grad.value.iloc[0]) == pytest.approx(expect[step]["gnorm"], rel=1e-4)
            loss = df[(df["rank"] == rank) & (df.step == step) & (df.state == "loss") & (df.stat == "value")]
            assert float(loss.value.iloc[0]) == pytest.approx(expect[step]["loss"], rel=1e-5)

    pivot = df[(df.state.isin(["weight", "grad"])) & (df.stat == "norm")].pivot_table(
        index=["step", "state", "name"], columns="rank", values="value")
    # DDP: replicated weights and all-reduced gradients are identical on both ranks ...
    assert (pivot[0] - pivot[1]).abs().max() < 1e-6
    losses = df[(df.state == "loss") & (df.stat == "value")].pivot_table(index="step", columns="rank", values="value")
    assert (losses[0] != losses[1]).all()  # ... while each rank's loss is its own batch's

    zero = load_ticks(tmp_path / "zero")
    assert zero["rank"].unique().tolist() == [0] and sorted(zero.step.unique()) == [0, 2, 4, 6]
    assert not list((tmp_path / "zero").glob("attempts/*/rank1"))
    assert len(list((tmp_path / "zero").glob("attempts/*/rank0"))) == 1


def _dtensor_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(6, 5, generator=g) + 3.0, torch.randn(7, generator=g), torch.randn(4, 9, generator=g)]
    full[2][1, 3] = float("inf")  # a non-finite value on one shard only
    placements = [[Shard(0)], [Shard(0)], [Shard(1)]]
    dts = [distribute_tensor(t, mesh, p) for t, p in zip(full, placements)]
    dts.append(distribute_tensor(torch.randn(3, 3, generator=g), mesh, [Replicate()]))
    full.append(dts[-1].full_tensor())
    got = tensor_stats(dts)
    ref = tensor_stats([t.double() for t in full])
    gnorm = global_norm(dts[:2])
    ref_gnorm = torch.linalg.vector_norm(torch.cat([full[0].flatten(), full[1].flatten()]).double())
    if rank == 0:
        torch.save({"got": got, "ref": ref, "gnorm": gnorm, "ref_gnorm": ref_gnorm}, out)


def test_sharded_statistics_are_exact_global_values(tmp_path):
    out = str(tmp_path / "stats.pt")
    tiny.gloo_spawn(_dtensor_worker, tmp_path, out)
    res = torch.load(out)
    got, ref = res["got"].double(), res["ref"].double()
    finite = [0, 1, 3]  # the tensor with an inf has inf norm/std/mean; its count is what matters
    torch.testing.assert_close(got[finite], ref[finite], rtol=1e-5, atol=1e-6)
    assert got[2, 4] == 1 and torch.isinf(got[2, 3])
    torch.testing.assert_close(res["gnorm"].double(), res["ref_gnorm"], rtol=1e-6, atol=1e-6)


def _flag_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from tick_lightning.collect import NonfiniteWatch

    mesh = init_device_mesh("cpu", (world,))
    grad = distribute_tensor(torch.ones(4, 3), mesh, [Shard(0)])
    watch = NonfiniteWatch()
    watch.observe_loss(torch.tensor(float("nan") if rank == 1 else 0.5))  # only rank 1 sees a NaN loss
    sharded = watch.check(None, [grad], sharded=True)
    watch.observe_loss(torch.tensor(float("nan") if rank == 1 else 0.5))
    local = watch.check(None, [grad], sharded=False)
    torch.save({"sharded": sharded, "local": local}, f"{out}.{rank}")


def test_nonfinite_decision_is_identical_on_every_rank_when_sharded(tmp_path):
    # a rank-local decision before the tick's collectives would leave rank 0 outside them: an NCCL hang
    out = str(tmp_path / "flag")
    tiny.gloo_spawn(_flag_worker, tmp_path, out)
    results = [torch.load(f"{out}.{rank}") for rank in (0, 1)]
    assert [r["sharded"] for r in results] == [True, True]
    assert [r["local"] for r in results] == [False, True]  # what the flag would be without the all-reduce


def test_the_layer_watch_under_fsdp2_finds_the_same_jump_on_every_rank(tmp_path):
    """Two gloo processes, FSDP2: the planted parameter is sharded, its norm is the reduced one on both ranks, so
    both find the one layer event at the fault, dump the same steps once each, and agree on every value. A norm
    input jumping on rank 1 only is rank 1's event; the agreement makes both ranks dump alike (no hang)."""
    from flight_fsdp2_script import FAULT_STEP, INPUT_STEP, NORM, QUIET

    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, str(HERE / "flight_fsdp2_script.py"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load_ticks(tmp_path / "ticks", flight=True)
    events = df[df.state == "flight_event"]
    # records name the column (<trigger>@<column>): the planted parameter is the watch's column 2 (after wte, wpe);
    # the norm layer's column is its place among the recorded norm inputs
    assert {r: sorted(zip(g.step, g.name)) for r, g in events.groupby("rank")} == {
        0: [(FAULT_STEP, "layer@2")], 1: [(INPUT_STEP, "input@3"), (FAULT_STEP, "layer@2")]}, events
    named = load_flight(tmp_path / "ticks", "events", rank=1)
    assert sorted(zip(named.step, named.trigger, named.layer)) == [(INPUT_STEP, "input", NORM),
                                                                  (FAULT_STEP, "layer", QUIET)]
    inputs = {r: load_flight(tmp_path / "ticks", "input_absmax", rank=r) for r in (0, 1)}
    assert inputs[1].loc[INPUT_STEP, NORM] / inputs[1].loc[INPUT_STEP - 1, NORM] > 1e3
    assert inputs[0].loc[INPUT_STEP, NORM] / inputs[0].loc[INPUT_STEP - 1, NORM] < 10  # each rank's own
    # rank 0 dumped at rank 1's event (its flush at step 12): steps 1-6 left the 12-step ring before the fault's
    # dump (its flush at step 18)
    assert set(range(1, 7)) <= set(load_flight(tmp_path / "ticks", rank=0).index)
    from tick_lightning.reporting import load_run

    merged = load_run(tmp_path / "ticks").flight["input_absmax"]  # the ranks' max: rank 1's jump stays whole
    assert merged.loc[INPUT_STEP, NORM] == inputs[1].loc[INPUT_STEP, NORM]
    grad = df[(df.state == "flight") & (df.stat == "grad_norm")]
    assert not grad.duplicated(["step", "name", "rank"]).any()
    wide = {r: g.pivot(index="step", columns="name", values="value") for r, g in grad.groupby("rank")}
    assert wide[0].index.equals(wide[1].index) and FAULT_STEP in wide[0].index
    assert (wide[0] - wide[1]).abs().max().max() == 0.0  # the reduced norms: the same on both ranks
    jump = wide[0].loc[FAULT_STEP] / wide[0].loc[FAULT_STEP - 1]
    assert jump.idxmax() == QUIET and jump[QUIET] > 30
    assert load_flight(tmp_path / "ticks", "events").trigger.tolist() == ["layer"]  # rank 0's own
    # the opt-in series under sharding: update norms reduced (equal on both ranks), attention logits each rank's own
    for stat, same in (("update_norm", True), ("attn_logit", False)):
        rows = df[(df.state == "flight") & (df.stat == stat)]
        assert not rows.duplicated(["step", "name", "rank"]).any()
        by_rank = {r: g.pivot(index="step", columns="name", values="value") for r, g in rows.groupby("rank")}
        assert by_rank[0].shape == by_rank[1].shape and len(by_rank[0]) > 20, stat
        assert ((by_rank[0] - by_rank[1]).abs().max().max() == 0.0) == same, stat
