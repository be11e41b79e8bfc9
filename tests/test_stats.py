"""tick_lightning.stats against fp64 references, on both strategies (CPU and accelerator) and edge cases."""

import math

import numpy as np
import pytest
import torch

from tick_lightning import stats
from tick_lightning.stats import TENSOR_STATS, NormInputAccumulator, global_norm, tensor_stats


def reference(t: torch.Tensor) -> list[float]:
    """fp64 statistics of ``t``: norm, mean, std (population), absmax, non-finite count."""
    x = t.detach().double().reshape(-1)
    finite = torch.isfinite(x)
    if not x.numel():
        return [math.nan] * 5
    return [float(x.norm()), float(x.mean()), float(x.std(correction=0)), float(x.abs().max()),
            float((~finite).sum())]


def cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(64, 32, generator=g) * 0.02,
        1.0 + 1e-3 * torch.randn(256, generator=g),  # LayerNorm gain: mean ~1, tiny std (cancellation trap)
        torch.randn(3, 5, 7, generator=g) - 4.0,
        torch.tensor(2.5),
        torch.randn(10, generator=g).double(),
        torch.randn(128, generator=g).bfloat16(),
        torch.randn(128, generator=g).half(),
    ]


STRATEGIES = {"cpu": stats._host_rows, "accelerator": stats._device_rows}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategies_match_fp64(strategy):
    ts = cases()
    rows = torch.stack(STRATEGIES[strategy](ts))
    assert rows.dtype == torch.float32 and rows.shape == (len(ts), len(TENSOR_STATS))
    for t, row in zip(ts, rows):
        ref = torch.tensor(reference(t), dtype=torch.float64)
        # fp32 accumulation of at most 8k elements: 1e-5 relative; the std of the gain vector is 1e-3 of its mean
        torch.testing.assert_close(row.double(), ref, rtol=2e-5, atol=1e-7, msg=f"{strategy} {t.dtype} {tuple(t.shape)}")


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_nonfinite_values(strategy):
    nan, inf = float("nan"), float("inf")
    ts = [torch.tensor([1.0, nan, 3.0]), torch.tensor([1.0, inf, -3.0]), torch.tensor([-inf, nan, 2.0, inf]),
          torch.tensor([1e30, 1e30])]  # the last: L2 norm overflows fp32, yet every element is finite
    rows = torch.stack(STRATEGIES[strategy](ts))
    assert rows[:, 4].tolist() == [1.0, 1.0, 3.0, 0.0]
    assert math.isnan(rows[0, 0]) and rows[1, 0] == inf and math.isnan(rows[2, 0])  # norm: NaN wins over inf
    assert math.isnan(rows[0, 3]) and rows[1, 3] == inf  # absmax
    assert rows[3, 3] == pytest.approx(1e30) and rows[3, 1] == pytest.approx(1e30) and rows[3, 2] == 0


def test_both_strategies_agree_on_a_model():
    model = torch.nn.Sequential(torch.nn.Embedding(500, 48), torch.nn.LayerNorm(48), torch.nn.Linear(48, 48))
    ts = [p.detach() for p in model.parameters()]
    torch.testing.assert_close(torch.stack(stats._host_rows(ts)), torch.stack(stats._device_rows(ts)),
                               rtol=1e-5, atol=1e-7)


def test_cpu_strategy_is_accurate_on_a_large_tensor():
    """8M elements: the CPU path stays within 1e-6 of fp64 (fp32 foreach / vector_norm drift to ~3e-4 here)."""
    w = torch.randn(30522, 256, generator=torch.Generator().manual_seed(0)) * 0.02 + 1e-3
    got = torch.stack(stats._host_rows([w]))[0].double()
    ref = torch.tensor(reference(w), dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_chunked_centred_pass(monkeypatch):
    """Tensors longer than one chunk give the same std as one pass (the chunking only bounds memory)."""
    t = torch.randn(1000, generator=torch.Generator().manual_seed(1)) + 3.0
    whole = tensor_stats([t])
    monkeypatch.setattr(stats, "_CHUNK", 7)
    chunked = tensor_stats([t])
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
    assert chunked[0, 2].item() == pytest.approx(float(t.double().std(correction=0)), rel=1e-5)


def test_empty_tensors_give_nan_rows():
    """An empty tensor (an FSDP rank's empty shard) is a NaN row, not an error; the others are unaffected."""
    w = torch.tensor([[3.0, -4.0]])
    out = tensor_stats([torch.zeros(0), w, torch.zeros(0, 4)])
    assert torch.isnan(out[0]).all() and torch.isnan(out[2]).all()
    assert out[1].tolist() == [5.0, -0.5, 3.5, 4.0, 0.0]
    assert tensor_stats([]).shape == (0, len(TENSOR_STATS))


def test_global_norm_is_clip_grad_norm():
    ts = cases()[:3]
    ref = torch.nn.utils.get_total_norm([t.double() for t in ts], 2.0)
    assert float(global_norm(ts)) == pytest.approx(float(ref), rel=1e-6)


def test_norm_input_accumulator_against_fp64():
    acc = NormInputAccumulator(2)
    xs = [torch.randn(4, 8) * 3 + 1, torch.randn(2, 8)]
    for x in xs:
        acc.observe(0, x)
    vals = acc.values()
    ref = torch.cat([x.reshape(-1) for x in xs]).double()
    torch.testing.assert_close(vals[0, :3].double(), torch.stack([ref.mean(), ref.square().mean().sqrt(), ref.abs().max()]),
                               rtol=1e-5, atol=1e-6)
    assert torch.isnan(vals[1]).all()  # a module that saw no input


def _kurtosis(x) -> float:
    """Pearson's kurtosis in fp64 numpy: E[(x - mean)^4] / var^2."""
    v = np.asarray(x, dtype=np.float64).ravel()
    d = v - v.mean()
    return float(np.mean(d**4) / np.mean(d**2) ** 2)


@pytest.mark.parametrize("case", ["gaussian", "outlier_feature", "shifted", "bf16"])
def test_norm_input_kurtosis_against_fp64_numpy(case):
    """One pass over several tensors (chunked: a chunk size of 7 elements here) equals numpy's two-pass
    kurtosis of everything seen: Gaussian ~3, one outlier feature channel large, a mean of 50 (cancellation)."""
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(64, 16, generator=g), torch.randn(32, 16, generator=g)]
    if case == "outlier_feature":
        xs[0][:, 5] *= 40.0
    if case == "shifted":
        xs = [x + 50.0 for x in xs]
    if case == "bf16":
        xs = [x.bfloat16() for x in xs]
    acc = NormInputAccumulator(1)
    old = stats._CHUNK
    stats._CHUNK = 7
    try:
        for x in xs:
            acc.observe(0, x)
    finally:
        stats._CHUNK = old
    want = _kurtosis(torch.cat([x.double().reshape(-1) for x in xs]).numpy())
    assert float(acc.values()[0, 3]) == pytest.approx(want, rel=1e-5)
    if case == "outlier_feature":
        assert want > 10
    if case == "gaussian":
        assert 2.5 < want < 3.5


@pytest.mark.parametrize("group_elements", [1 << 26, 5])
def test_update_norms_against_fp64(group_elements):
    """fp32 differences of bf16/fp32/fp64 weights, whole or in small groups: the same numbers as fp64 math."""
    g = torch.Generator().manual_seed(2)
    before = [torch.randn(8, 4, generator=g), torch.randn(16, generator=g).bfloat16(), torch.randn(3, generator=g).double()]
    after = [b + 1e-3 * torch.randn(b.shape, generator=g).to(b.dtype) for b in before]
    after[1] = before[1] + 1e-2  # a bf16 update that fp32 keeps (the differences are exact in fp32)
    got = stats.update_norms(after, before, group_elements=group_elements)
    for row, a, b in zip(got, after, before):
        u = (a.double() - b.double()).norm()
        torch.testing.assert_close(row.double(), torch.stack([u, u / b.double().norm()]), rtol=1e-5, atol=0)
    assert stats.update_norms([], []).shape == (0, 2)


def test_partials_of_pieces_combine_to_the_whole_tensors_statistics():
    # a LayerNorm-like gain split unevenly, with an empty piece (an FSDP rank's empty shard): Chan's formula
    g = torch.Generator().manual_seed(1)
    whole = 1.0 + 1e-3 * torch.randn(1000, generator=g)
    pieces = [whole[:10], whole[10:10], whole[10:600], whole[600:]]
    parts = torch.stack([stats.stats_partials([p]) for p in pieces])  # [ranks, 1, len(PARTIALS)]
    got = stats.combine_stats(parts)[0].double()
    torch.testing.assert_close(got, torch.tensor(reference(whole), dtype=torch.float64), rtol=2e-6, atol=1e-9)
    nothing = stats.combine_stats(torch.stack([stats.stats_partials([whole[:0]])]))
    assert torch.isnan(nothing).all()  # a tensor with no elements anywhere


def test_norm_input_accumulator_makes_no_host_copies():
    from torch.overrides import TorchFunctionMode

    class Watch(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in (torch.tensor, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu):
                self.calls.append(func)
            return func(*args, **(kwargs or {}))

    acc = NormInputAccumulator(2)
    x = torch.randn(3, 8)
    with Watch() as watch:
        acc.observe(1, x)
        acc.observe(1, 2 * x)
        values = acc.values()
    assert watch.calls == []
    both = torch.cat([x, 2 * x]).double()
    torch.testing.assert_close(values[1, :3].double(), torch.stack([both.mean(), both.square().mean().sqrt(),
                                                                both.abs().max()]), rtol=1e-6, atol=1e-7)
    assert torch.isnan(values[0]).all()
