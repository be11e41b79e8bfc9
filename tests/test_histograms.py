"""tensor_histograms against numpy.histogram in fp64, and exact on sharded DTensors (gloo, 2 ranks)."""

from __future__ import annotations

import numpy as np
import pytest
import tiny
import torch
import torch.distributed as dist

from tick_lightning.histograms import COLUMNS, HIGH_EXP, LOW_EXP, bin_edges, columns, tensor_histograms


def reference(x: torch.Tensor, lo: int = LOW_EXP, hi: int = HIGH_EXP) -> np.ndarray:
    """The documented binning with numpy in fp64: numpy.histogram over the edges 2^lo .. 2^hi."""
    v = x.detach().double().numpy().ravel()
    finite = np.isfinite(v)
    a = np.abs(v[finite])
    nonzero = a[a > 0]
    edges = np.asarray(bin_edges(lo, hi))
    counts, _ = np.histogram(nonzero, bins=edges)
    at_top = np.sum(nonzero == edges[-1])  # numpy's last bin is closed; the documented one is half-open
    counts[-1] -= at_top
    return np.concatenate([[np.sum(a == 0), np.sum(v[finite] < 0), np.sum(~finite), np.sum(nonzero < edges[0])],
                           counts, [np.sum(nonzero >= edges[-1]) + 0 * at_top]]).astype(np.float64)


def cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(3000, generator=g, dtype=torch.float64).sign() * 2.0 ** (
        torch.rand(3000, generator=g, dtype=torch.float64) * 60 - 40)  # magnitudes 2^-40 .. 2^20
    wide[:10] = 0.0
    wide[10:14] = torch.tensor([float("nan"), float("inf"), -float("inf"), 2.0**HIGH_EXP], dtype=torch.float64)
    edges = torch.tensor([2.0**e for e in range(LOW_EXP - 2, HIGH_EXP + 2)] + [-(2.0**-3), 2.0**-3 * (1 - 2**-20)],
                         dtype=torch.float64)  # exactly on the edges, and just below one
    return [wide, wide.float(), wide.clamp(-6e4, 6e4).half(), wide.bfloat16(), edges, torch.randn(7, 5, generator=g),
            torch.zeros(0)]


def test_matches_numpy_histogram_in_fp64():
    tensors = cases()
    got = tensor_histograms(tensors)
    assert got.dtype == torch.float64 and got.shape == (len(tensors), len(COLUMNS))
    for i, t in enumerate(tensors):
        want = reference(t)
        np.testing.assert_array_equal(got[i].numpy(), want, err_msg=f"tensor {i} ({t.dtype})")
        magnitude = got[i].sum() - got[i, COLUMNS.index("negative")]
        assert magnitude == t.numel()  # zero, non-finite, under, bins, over partition the tensor


def test_custom_range_and_columns():
    x = torch.tensor([0.3, 0.6, 1.0, 3.9, 4.0, 1e-3])
    h = tensor_histograms([x], lo=-2, hi=2)
    assert columns(-2, 2) == ("zero", "negative", "nonfinite", "under", "2^-2", "2^-1", "2^0", "2^1", "over")
    assert h[0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    np.testing.assert_array_equal(h[0].numpy(), reference(x, -2, 2))


def test_no_host_sync_in_the_computation():
    """No aten op that reads a device value on the host (``_local_scalar_dense``, ``item``) runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    tensors = cases()[:2]
    with Spy():
        tensor_histograms(tensors)
    assert seen and not [f for f in seen if "_local_scalar_dense" in f or "bincount" in f or "nonzero" in f]


@pytest.mark.parametrize("kwargs, match", [({"lo": 3, "hi": 3}, "lo must be below hi"), ({"lo": 1.5}, "lo=1.5")])
def test_bad_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tensor_histograms([torch.ones(2)], **kwargs)


def _worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(6, 5, generator=g) * 1e3, torch.randn(7, generator=g), torch.randn(4, 9, generator=g) * 1e-6]
    full[2][1, 3] = float("inf")  # one shard only
    full[1][2] = 0.0
    placements = [[Shard(0)], [Shard(0)], [Shard(1)], [Replicate()]]
    full.append(torch.randn(3, 3, generator=g))
    dts = [distribute_tensor(t, mesh, p) for t, p in zip(full, placements)]
    calls = []
    original = dist.all_gather
    dist.all_gather = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
    try:
        got = tensor_histograms(dts)
    finally:
        dist.all_gather = original
    if rank == 0:
        torch.save({"got": got, "full": full, "collectives": len(calls)}, out)


def test_sharded_dtensors_exact(tmp_path):
    out = str(tmp_path / "h.pt")
    tiny.gloo_spawn(_worker, tmp_path, out)
    res = torch.load(out)
    for i, t in enumerate(res["full"]):
        np.testing.assert_array_equal(res["got"][i].numpy(), reference(t), err_msg=f"tensor {i}")
    assert res["collectives"] == 1  # the sharded rows gather together (dist.Gather); the replicated one is not summed


def test_tick_states_weight_hist_and_grad_hist_in_a_trainer(tmp_path):
    """``states=["weight_hist", "grad_hist"]`` for a selection: each tick's rows equal the numpy binning of
    the weights before the update and of the gradients, recorded independently; off by default."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    import tiny
    from lightning.pytorch.callbacks import Callback

    from tick_lightning import TickCallback, load_ticks
    from tick_lightning.histograms import COLUMNS

    class Seen(Callback):
        def __init__(self):
            self.w, self.g = {}, {}

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            s = trainer.global_step
            named = dict(pl_module.named_parameters())
            self.w[s] = {n: p.detach().clone() for n, p in named.items() if n.startswith("model.classifier")}
            self.g[s] = {n: p.grad.detach().clone() for n, p in named.items() if n.startswith("model.classifier")}

    seen = Seen()
    cb = TickCallback(ticks="0,2", states=["loss", "weight_hist", "grad_hist"], select="model.classifier.*",
                      dirpath=tmp_path / "ticks", log_to_loggers=False, dense=False)
    tiny.trainer(tmp_path, callbacks=[seen, cb], max_steps=3).fit(tiny.HFClassifier(tiny.tiny_bert()),
                                                                  tiny.loader(tiny.token_dataset(24)))
    df = load_ticks(tmp_path / "ticks")
    for state, ref in (("weight_hist", seen.w), ("grad_hist", seen.g)):
        rows = df[df.state == state]
        assert sorted(rows.step.unique()) == [0, 2]
        for (step, name), group in rows.groupby(["step", "name"]):
            got = group.set_index("stat").value.reindex(list(COLUMNS)).to_numpy()
            np.testing.assert_array_equal(got, reference(ref[step][name]), err_msg=f"{state} {name} {step}")
        assert rows.name.nunique() == 2
    assert "weight_hist" not in TickCallback().states and "grad_hist" not in TickCallback().states
