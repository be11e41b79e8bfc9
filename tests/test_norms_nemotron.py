"""Nemotron's ``NemotronLayerNorm1P`` (LayerNorm with ``1 + w`` and a bias) is patched as its fp32-safe
variant ``layer*(1+w)+b/after``, on a tiny random model built from ``NemotronConfig`` (hidden 32, 2 layers).

Stated tolerances:
- fp32, no autocast: logits of the patched model within rtol 1e-5, atol 1e-5 of the unpatched model (the
  fused fp32 LayerNorm of both rounds the same up to kernel order), each layer's output within 1e-5;
- half precision, per layer, against the fp64 formula on the same (fp32) input and weights: the patched
  output's mean error is below the original's, and its max error is at most half an ulp of the output
  dtype at the output's scale plus fp32 noise (bf16 input: 2^-8 relative to the largest |value|; fp16
  input: 2^-11; fp32 input under bf16 autocast, output fp32: 1e-5); under bf16 autocast the original's
  max error is more than 100 times that (it rounds its input, ``1 + w`` and bias to bf16 first).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tick_lightning.norms import iter_patched_norms, patch_norms, unpatch_norms
from tick_lightning.norms.detect import FP32_SAFE_REASON, _autocast
from tick_lightning.norms.reference import reference_norm

pytestmark = pytest.mark.usefixtures("one_thread")

H = 32
IDS = torch.randint(3, 64, (2, 10), generator=torch.Generator().manual_seed(0))


def _model():
    import transformers

    config = transformers.NemotronConfig(vocab_size=64, hidden_size=H, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                         head_dim=H // 2)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking norm parameters (the init is w = 0, i.e. scale 1, and b = 0)
        for m in model.modules():
            if type(m).__name__ == "NemotronLayerNorm1P":
                m.weight.copy_(torch.randn(H, generator=g) * 0.3)
                m.bias.copy_(torch.randn(H, generator=g) * 0.3)
    return model.eval()


def _norm_names(model):  # independent of detect.py: by class name
    return {n for n, m in model.named_modules() if type(m).__name__ == "NemotronLayerNorm1P"}


def test_every_layer_norm_1p_is_patched_with_the_fp32_safe_variant():
    model = _model()
    report = patch_norms(model)
    names = _norm_names(model)
    assert len(names) == 5 and {e.name for e in report.patched} == names and not report.skipped, str(report)
    assert {e.variant for e in report.patched} == {"layer*(1+w)+b/after"}
    assert all(e.reason == f"patched; {FP32_SAFE_REASON}" for e in report.patched)
    assert {n for n, _ in iter_patched_norms(model)} == names


def test_fp32_forward_equals_the_unpatched_model():
    model = _model()
    patched = copy.deepcopy(model)
    patch_norms(patched)
    with torch.no_grad():
        ref, out = model(input_ids=IDS).logits, patched(input_ids=IDS).logits
        x = torch.randn(4, 7, H, generator=torch.Generator().manual_seed(2))
        for name in _norm_names(model):
            torch.testing.assert_close(patched.get_submodule(name)(x), model.get_submodule(name)(x),
                                       rtol=1e-5, atol=1e-5)
    assert out.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["bf16_autocast", "bf16_input_bf16_weight", "fp16_input"])
def test_half_precision_is_closer_to_fp64_than_the_original(case):
    model = _model()
    name = sorted(_norm_names(model))[0]
    original = model.get_submodule(name)
    if case == "bf16_input_bf16_weight":
        original.to(torch.bfloat16)
    patched = copy.deepcopy(original)
    patch_norms(patched)
    # an input with a large mean: rounding x to bf16 before subtracting the mean is what the original loses
    x32 = torch.randn(64, H, generator=torch.Generator().manual_seed(3)) * 0.5 + 4.0
    x = x32 if case == "bf16_autocast" else x32.to(torch.bfloat16 if case.startswith("bf16") else torch.float16)
    ctx = _autocast("cpu") if case == "bf16_autocast" else torch.autocast("cpu", enabled=False)
    with torch.no_grad(), ctx:
        out_orig, out_mine = original(x), patched(x)
    ref = reference_norm(x, "layer", weight=original.weight, bias=original.bias, eps=original.eps,
                         weight_mode="one_plus_w")
    out_dtype = {"bf16_autocast": torch.float32, "bf16_input_bf16_weight": torch.bfloat16,
                 "fp16_input": torch.float16}[case]
    assert out_mine.dtype == out_dtype  # "after": the input dtype
    scale = ref.abs().max().item()
    tol = {torch.float32: 1e-5, torch.bfloat16: 2.0 ** -8 * scale, torch.float16: 2.0 ** -11 * scale}[out_dtype]
    err_mine, err_orig = (out_mine.double() - ref).abs(), (out_orig.double() - ref).abs()
    assert err_mine.max().item() <= tol * 1.01 + 1e-6, (case, err_mine.max().item(), tol)
    assert err_mine.mean().item() < err_orig.mean().item(), (case, err_mine.mean().item(), err_orig.mean().item())
    if case == "bf16_autocast":  # the original rounds x, 1 + w and b to bf16 and returns bf16
        assert out_orig.dtype == torch.bfloat16 and err_orig.max().item() > 100 * tol


def test_unpatch_is_exact_and_checkpoints_are_unchanged():
    model = _model()
    types = {n: type(m) for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(input_ids=IDS).logits
    patch_norms(model)
    assert all(type(model.get_submodule(n)) is not types[n] for n in _norm_names(model))
    assert list(model.state_dict()) == list(state)  # checkpoint keys unchanged while patched
    assert sorted(unpatch_norms(model)) == sorted(_norm_names(model))
    assert {n: type(m) for n, m in model.named_modules()} == types
    after = model.state_dict()
    assert list(after) == list(state)
    for k, v in state.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    assert not any(hasattr(model.get_submodule(n), a) for n in _norm_names(model) for a in ("_tick_norm", "tick_observer"))
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, before)
