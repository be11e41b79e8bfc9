"""Re-normalization across processes on CPU (gloo): DDP ranks stay identical with no extra communication,
and DTensor-sharded rows give the same result as the unsharded fp64 reference."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tick_lightning.renorm import STATS, Renorm, renorm_

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

DDP_SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, sys.argv[2])
    import torch, tiny
    from tick_lightning import Renorm, RenormCallback

    calls, inside = [], []
    original_reduce = torch.distributed.all_reduce
    torch.distributed.all_reduce = lambda *a, **k: (calls.extend(inside), original_reduce(*a, **k))[1]
    out = sys.argv[1]
    cb = RenormCallback([Renorm("*.attention.self.*.weight", method="unit", at="step"),
                         Renorm("*.intermediate.dense.weight", method="layernorm", at="every:2")],
                        ticks="every:2", dirpath=os.path.join(out, "ticks"))
    original_apply = cb.engine.apply
    def counted_apply(*a, **k):  # count collectives issued while re-normalizing, not Lightning's own
        inside.append(1)
        try:
            return original_apply(*a, **k)
        finally:
            inside.clear()
    cb.engine.apply = counted_apply
    model = tiny.HFClassifier(tiny.tiny_bert())
    trainer = tiny.trainer(out, strategy="ddp", devices=2, callbacks=[cb], max_steps=4)
    trainer.fit(model, tiny.loader(tiny.token_dataset(32), batch_size=4))
    torch.save({n: p.detach() for n, p in model.named_parameters()},
               os.path.join(out, f"params{trainer.global_rank}.pt"))
    json.dump({"renorm_all_reduce_calls": len(calls), "applications": cb.engine.applications},
              open(os.path.join(out, f"info{trainer.global_rank}.json"), "w"))
''')


def test_ddp_two_cpu_processes_identical(tmp_path):
    script = tmp_path / "ddp_renorm.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("LOCAL_RANK", None)
    run = subprocess.run([sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)], env=env,
                         capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    p0, p1 = torch.load(tmp_path / "params0.pt"), torch.load(tmp_path / "params1.pt")
    assert all(torch.equal(p0[n], p1[n]) for n in p0)  # bit-identical on both ranks
    for n, w in p0.items():
        if ".attention.self." in n and n.endswith(".weight"):
            torch.testing.assert_close(w.norm(dim=-1), torch.ones(w.shape[0]))
    for rank in (0, 1):
        info = json.loads((tmp_path / f"info{rank}.json").read_text())
        assert info == {"renorm_all_reduce_calls": 0, "applications": [4, 2]}
    assert sorted(p.name for p in (tmp_path / "ticks").glob("attempts/*/rank*")) == ["rank0"]  # rank 0 writes


# ---------------------------------------------------------------------------------------------- DTensor
def _dtensor_worker(rank: int, world: int, init_file: str) -> None:
    from test_renorm_ops import reference
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from tick_lightning.dist import is_sharded
    from tick_lightning.renorm import RenormEngine

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)  # same full tensors on every rank
        fulls = [torch.randn(5, 6, generator=g) * 2 + 1, torch.randn(5, 6, generator=g),
                 torch.randn(7, 3, generator=g), torch.randn(4, 3, 5, generator=g)]
        cases = [(m, k) for m in ("layernorm", "unit", "center") for k in (False, True) if not (m == "unit" and k)]
        # rows split across ranks (Shard(d) with d the row dim) need reductions: every method there;
        # rows kept whole: one method is enough to show no reduction is needed
        # batch=True: same-shape tensors stacked (the accelerator path); batch=False: per tensor (the CPU default)
        combos = [(Shard(1), -1, cases, True), (Shard(1), -1, cases, False), (Shard(0), 0, cases, True),
                  (Shard(0), -1, cases[:1], True), (Shard(1), 0, cases[1:2], True), (Replicate(), -1, cases[:1], True)]
        for placement, dim, some, batch in combos:
            for method, keep_norm in some:
                ws = [distribute_tensor(f.clone(), mesh, [placement]) for f in fulls]
                stats = renorm_(ws, method, dim=dim, keep_norm=keep_norm, stats=True, batch=batch)
                for w, f, row in zip(ws, fulls, stats.double()):
                    e = reference(f, method, dim, keep_norm, 1e-5)
                    torch.testing.assert_close(w.full_tensor().double(), e, rtol=1e-5, atol=1e-5,
                                               msg=f"{placement} dim={dim} {method} keep_norm={keep_norm}")
                    want = torch.stack([f.double().norm(), e.norm(), f.double().mean(), e.mean(),
                                        f.double().std(correction=0), e.std(correction=0)])
                    torch.testing.assert_close(row, want, rtol=1e-5, atol=1e-5)
        # through the engine: sharded parameters of a model, names in the records
        torch.manual_seed(1)  # distribute_tensor expects the same full tensor on every rank
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 4))
        full = [model[0].weight.detach().clone(), model[1].weight.detach().clone()]
        for i, p in enumerate(full):
            model[i].weight = torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(1)]))
        engine = RenormEngine([Renorm("*.weight", method="layernorm", at="step")])
        engine.resolve(model)
        [skip] = engine.apply(0, True, torch.tensor(1.0), record=True)  # a skipped step: nothing moves
        assert all(torch.equal(model[i].weight.full_tensor(), full[i]) for i in range(2))
        [block] = engine.apply(1, True, torch.tensor(0.0), record=True)
        assert block.names == ("0.weight", "1.weight") == skip.names and block.stats == STATS
        assert not any(is_sharded(t) for t in (block.values, skip.values))  # plain rows, ready for to_host
        for i in range(2):
            torch.testing.assert_close(model[i].weight.full_tensor().double(), reference(full[i], "layernorm", -1, False, 1e-5))
        dist.barrier()  # neither rank tears gloo down while the other may still be talking to it
    finally:
        dist.destroy_process_group()


def test_dtensor_sharded_rows_match_unsharded(tmp_path):
    mp.spawn(_dtensor_worker, args=(2, str(tmp_path / "init")), nprocs=2, join=True)
