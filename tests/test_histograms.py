"""tensor_histograms against numpy.histogram in fp64, and exact on sharded DTensors (gloo, 2 ranks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        full = [torch.randn(6, 5, generator=g) * 1e3, torch.randn(7, generator=g), torch.randn(4, 9, generator=g) * 1e-6]
        full[2][1, 3] = float("inf")  # one shard only
        full[1][2] = 0.0
        placements = [[Shard(0)], [Shard(0)], [Shard(1)], [Replicate()]]
        full.append(torch.randn(3, 3, generator=g))
        dts = [distribute_tensor(t, mesh, p) for t, p in zip(full, placements)]
        calls = []
        original = dist.all_reduce
        dist.all_reduce = lambda *a, **k: (calls.append(1), original(*a, **k))[1]
        try:
            got = tensor_histograms(dts)
        finally:
            dist.all_reduce = original
        if rank == 0:
            torch.save({"got": got, "full": full, "all_reduces": len(calls)}, out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_dtensors_exact(tmp_path):
    out = str(tmp_path / "h.pt")
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, start_method="spawn")
    res = torch.load(out)
    for i, t in enumerate(res["full"]):
        np.testing.assert_array_equal(res["got"][i].numpy(), reference(t), err_msg=f"tensor {i}")
    assert res["all_reduces"] == 1  # the sharded rows reduce together; the replicated one is not summed
