"""Re-normalization math against fp64 references, per method, dtype, dim and keep_norm."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from tick_lightning.renorm import METHODS, STATS, Renorm, RenormError, RenormPlan, renorm_

# output is rounded to the parameter dtype once; tolerances are a few ulps of that dtype
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
       torch.float16: dict(rtol=2e-3, atol=2e-3)}


def reference(w: torch.Tensor, method: str, dim: int, keep_norm: bool, eps: float) -> torch.Tensor:
    """Independent fp64 formulas: F.layer_norm / F.normalize on rows moved to the last dim."""
    x = w.double().movedim(dim, -1)
    if method == "layernorm":
        y = F.layer_norm(x, x.shape[-1:], eps=eps)
    elif method == "unit":
        y = F.normalize(x, dim=-1, eps=eps)
    else:
        y = x - x.mean(-1, keepdim=True)
    if keep_norm:
        y = y * x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True)
    return y.movedim(-1, dim)


CASES = [(m, k) for m in METHODS for k in (False, True) if not (m == "unit" and k)]


@pytest.mark.parametrize("batch", [True, False])  # stacked groups (accelerator default) and per tensor (CPU)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("method,keep_norm", CASES)
def test_matches_fp64_reference(method, keep_norm, dim, dtype, batch):
    g = torch.Generator().manual_seed(0)
    ws = [(torch.randn(6, 10, generator=g) * 0.3 + 0.2).to(dtype), (torch.randn(6, 10, generator=g)).to(dtype),
          torch.randn(10, 6, generator=g).to(dtype), torch.randn(3, 4, 5, generator=g).to(dtype)]
    expected = [reference(w, method, dim, keep_norm, 1e-5) for w in ws]
    storages = [w.data_ptr() for w in ws]
    renorm_(ws, method, dim=dim, keep_norm=keep_norm, batch=batch)
    for w, e, ptr in zip(ws, expected, storages):
        assert w.dtype == dtype and w.data_ptr() == ptr  # in place, same dtype
        torch.testing.assert_close(w.double(), e, **TOL[dtype])


@pytest.mark.parametrize("method,keep_norm", CASES)
def test_post_conditions(method, keep_norm):
    w = torch.randn(8, 32, dtype=torch.float64) * 3 + 5  # large mean: a one-pass variance would cancel badly
    before = w.norm(dim=-1)
    renorm_([w], method, keep_norm=keep_norm, eps=1e-12)
    if method in ("layernorm", "center"):
        torch.testing.assert_close(w.mean(-1), torch.zeros(8, dtype=torch.float64), atol=1e-5, rtol=0)
    if method == "layernorm" and not keep_norm:
        torch.testing.assert_close(w.var(-1, correction=0), torch.ones(8, dtype=torch.float64), atol=1e-5, rtol=0)
    if method == "unit":
        torch.testing.assert_close(w.norm(dim=-1), torch.ones(8, dtype=torch.float64), atol=1e-5, rtol=0)
    if keep_norm:
        torch.testing.assert_close(w.norm(dim=-1), before, atol=1e-4, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), cols=st.integers(2, 9), offset=st.floats(-100, 100), scale=st.floats(1e-2, 1e2))
def test_layernorm_any_shape_and_offset(rows, cols, offset, scale):
    g = torch.Generator().manual_seed(rows * 100 + cols)
    w = torch.randn(rows, cols, generator=g) * scale + offset
    expected = reference(w, "layernorm", -1, False, 1e-5)
    renorm_([w], "layernorm")
    # fp32 centring loses ~eps32 * |offset| / scale: the conditioning of the input, not of the method
    tol = 1e-5 + 16 * 2.0**-24 * (abs(offset) + 4 * scale) / scale
    torch.testing.assert_close(w.double(), expected, rtol=0, atol=tol)


@pytest.mark.parametrize("batch", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_skip_leaves_tensors_bit_identical(dtype, batch):
    ws = [torch.randn(5, 7).to(dtype), torch.randn(5, 7).to(dtype), torch.randn(7, 3).to(dtype)]
    copies = [w.clone() for w in ws]
    renorm_(ws, "layernorm", skip=torch.tensor(1.0) > 0, batch=batch)
    assert all(torch.equal(w, c) for w, c in zip(ws, copies))
    renorm_(ws, "layernorm", skip=torch.tensor(0.0) > 0, batch=batch)
    assert not any(torch.equal(w, c) for w, c in zip(ws, copies))


@pytest.mark.parametrize("batch", [True, False])
def test_stats_match_fp64(batch):
    ws = [torch.randn(4, 6) + 1, torch.randn(6, 4), torch.randn(4, 6)]  # two groups, reordered internally
    before = [w.double().clone() for w in ws]
    stats = renorm_(ws, "center", stats=True, batch=batch)
    assert stats.shape == (3, len(STATS)) and stats.dtype == torch.float32
    for row, b, a in zip(stats.double(), before, ws):
        a = a.double()
        expected = [b.norm(), a.norm(), b.mean(), a.mean(), b.std(correction=0), a.std(correction=0)]
        torch.testing.assert_close(row, torch.stack(expected), rtol=1e-5, atol=1e-6)


def test_plan_groups_same_shapes_and_keeps_order():
    ws = [torch.randn(4, 6), torch.randn(6, 4), torch.randn(4, 6), torch.randn(2, 3, 4)]
    plan = RenormPlan(ws, dim=-1, batch=True)
    assert len(plan.groups) == 3 and sorted(plan.order) == [0, 1, 2, 3] and plan.order[:2] == [0, 2]
    assert len(RenormPlan(ws, dim=-1).groups) == 4  # CPU default: one group per tensor


def test_bad_dim_is_named():
    with pytest.raises(ValueError, match=r"dim=2 is out of range .*\[4, 6\]"):
        RenormPlan([torch.randn(4, 6)], dim=2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="rms"), r"method 'rms' is unknown; valid methods: layernorm, unit, center"),
    (dict(at="every:x"), r"at='every:x' does not parse"),
    (dict(at="sometimes"), r"at='sometimes' does not parse.*'ticks'.*'step'"),
    (dict(at="epoch"), r"'epoch'/'nonfinite' terms"),
    (dict(at="none"), r"never applies"),
    (dict(eps=0), r"eps 0 must be a finite number > 0"),
    (dict(dim=1.0), r"dim 1.0 must be an int"),
    (dict(method="unit", keep_norm=True), r"no-op"),
    (dict(fold="*.ln_1"), r"fold='\*.ln_1' is function-preserving only .* method='unit', dim=0"),
])
def test_spec_rejects_bad_input(kwargs, match):
    with pytest.raises(RenormError, match=match):
        Renorm("linear", **kwargs)


def test_spec_rejects_bad_target():
    with pytest.raises(RenormError, match="target"):
        Renorm([])
    with pytest.raises(RenormError, match="target"):
        Renorm(["linear", 3])
    assert Renorm(["linear", "!*.bias"], at="log:5").schedule.log_counts == (5,)
