"""Per-variant numerics of patched norm layers against fp64 references.

For every variant: output, input gradient, weight and bias gradients, for fp32/bf16/fp16 inputs, autocast
off/bf16/fp16, fp32 and bf16 weights, hidden sizes 123/1023/4096, with non-contiguous and 4-D inputs.
Guarantee under test: the patched layer returns the same dtypes as the original, and against the fp64
reference its maximum error is at most FACTOR x the original's plus MAX_FLOOR_ULPS ulps (of the output dtype,
times the largest reference value) and its RMS error at most FACTOR x the original's plus RMS_FLOOR_ULPS ulps
(times the reference RMS). The RMS bound is the tight one: it catches a systematic 1% error in bf16.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from tick_lightning.norms import patch_norms, reference_norm

FACTOR = 2.0
MAX_FLOOR_ULPS = 1.0
RMS_FLOOR_ULPS = 0.1


pytestmark = pytest.mark.usefixtures("one_thread")


DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AUTOCAST = (None, torch.bfloat16, torch.float16)
WEIGHTS = (torch.float32, torch.bfloat16)


def _llama(h):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    return LlamaRMSNorm(h, eps=1e-6)


def _gemma(h):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    return GemmaRMSNorm(h, eps=1e-6)


def _t5(h):
    from transformers.models.t5.modeling_t5 import T5LayerNorm
    return T5LayerNorm(h, eps=1e-6)


def _olmo2(h):
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    return Olmo2RMSNorm(h, eps=1e-6)


def _convnext_cf(h):
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
    return ConvNextLayerNorm(h, eps=1e-6, data_format="channels_first")


# name -> (constructor, reference kind, weight mode, has bias, channels_first)
VARIANTS = {
    "layernorm": (lambda h: nn.LayerNorm(h), "layer", "w", True, False),
    "layernorm_noaffine": (lambda h: nn.LayerNorm(h, elementwise_affine=False), "layer", "none", False, False),
    "torch_rmsnorm": (lambda h: nn.RMSNorm(h, eps=1e-6), "rms", "w", False, False),
    "llama": (_llama, "rms", "w", False, False),
    "gemma": (_gemma, "rms", "one_plus_w", False, False),
    "t5": (_t5, "rms", "w", False, False),
    "olmo2": (_olmo2, "rms", "w", False, False),
    "convnext_channels_first": (_convnext_cf, "layer", "w", True, True),
}


def _input(hidden: int, channels_first: bool, g: torch.Generator) -> torch.Tensor:
    """Non-contiguous 3-D input for 123, 4-D for 1023, plain 2-D for 4096 (channels-first: always 4-D)."""
    if channels_first:
        return torch.randn(2, 3, 2, hidden, generator=g).permute(0, 3, 1, 2)  # non-contiguous NCHW view
    if hidden == 123:
        return torch.randn(5, 3, hidden, generator=g).transpose(0, 1)
    if hidden == 1023:
        return torch.randn(2, 2, 3, hidden, generator=g)
    return torch.randn(4, hidden, generator=g)


def _run(model, x, g_out, autocast):
    x = x.detach().clone().requires_grad_(True)
    layer = model[0]
    for p in layer.parameters():
        p.grad = None
    ctx = torch.autocast("cpu", dtype=autocast) if autocast is not None else torch.autocast("cpu", enabled=False)
    with ctx:
        y = model(x)
    y.backward(g_out.to(y.dtype))
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def _rms(a: torch.Tensor) -> float:
    return a.double().pow(2).mean().sqrt().item()


@pytest.mark.parametrize("hidden", [123, 1023, 4096])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patched_matches_fp64_reference(variant, hidden):
    make, kind, mode, _, channels_first = VARIANTS[variant]
    g = torch.Generator().manual_seed(hidden)
    layer = make(hidden)
    with torch.no_grad():
        for name, p in layer.named_parameters():  # trained-looking, not init values
            p.copy_(torch.rand(p.shape, generator=g) + 0.5 if name == "weight" else torch.randn(p.shape, generator=g))
    model = nn.Sequential(layer)
    patched = copy.deepcopy(model)
    report = patch_norms(patched)
    assert [e.patched for e in report.layers] == [True], str(report)
    base = _input(hidden, channels_first, g) + 0.3
    # the full dtype x autocast x weight grid at 123 and 1023; at 4096 the combinations models really use
    grid = list(itertools.product(DTYPES, AUTOCAST, WEIGHTS)) if hidden < 4096 else [
        (torch.float32, None, torch.float32), (torch.bfloat16, None, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16, torch.float32),
        (torch.float16, torch.float16, torch.float32)]
    failures, checked = [], 0
    for x_dtype, autocast, w_dtype in grid:
        model.to(w_dtype)
        patched.to(w_dtype)
        x = base.to(x_dtype)
        g_out = torch.randn(x.shape, generator=g)
        try:
            y0, gx0, gp0 = _run(model, x, g_out, autocast)
        except RuntimeError:
            continue  # a dtype mix the original itself rejects (e.g. fp16 input with bf16 LayerNorm weights)
        y1, gx1, gp1 = _run(patched, x, g_out, autocast)
        # fp64 reference on the exact (rounded) inputs and weights, with the upstream gradient the layer saw
        x64 = x.double().requires_grad_(True)
        params64 = {n: p.detach().double().requires_grad_(True) for n, p in layer.named_parameters()}
        ref = reference_norm(x64, kind, weight=params64.get("weight"), bias=params64.get("bias"),
                             eps=1e-6 if kind == "rms" or variant.startswith("convnext") else 1e-5,
                             weight_mode=mode, channels_first=channels_first)
        ref.backward(g_out.to(y0.dtype).double())
        case = f"x={x_dtype} autocast={autocast} w={w_dtype}"
        if y1.dtype != y0.dtype or gx1.dtype != gx0.dtype:
            failures.append(f"{case}: dtype {y1.dtype}/{gx1.dtype} != original {y0.dtype}/{gx0.dtype}")
            continue
        pairs = [("out", y0, y1, ref.detach()), ("grad_x", gx0, gx1, x64.grad)]
        pairs += [(f"grad_{n}", gp0[n], gp1[n], params64[n].grad) for n in gp0]
        for what, orig, mine, r in pairs:
            ulp = torch.finfo(orig.dtype).eps
            limit = FACTOR * _err(orig, r) + MAX_FLOOR_ULPS * ulp * r.abs().max().item()
            if not _err(mine, r) <= limit:
                failures.append(f"{case} {what}: patched max err {_err(mine, r):.3g} > {limit:.3g} "
                                f"(original {_err(orig, r):.3g})")
            limit = FACTOR * _rms(orig - r) + RMS_FLOOR_ULPS * ulp * _rms(r)
            if not _rms(mine - r) <= limit:
                failures.append(f"{case} {what}: patched RMS err {_rms(mine - r):.3g} > {limit:.3g} "
                                f"(original {_rms(orig - r):.3g})")
        checked += 1
    assert checked >= min(12, len(grid) - 1), f"only {checked} dtype combinations ran"
    assert not failures, "\n".join(failures)
