"""Patching mechanics: in place, reversible, idempotent, deepcopy/pickle, observer contract, fallback,
argument validation, torch.compile, PEFT (LoRA, LN tuning)."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

from tick_lightning.norms import (
    NormPatchReport,
    find_norms,
    iter_patched_norms,
    patch_norms,
    patched_norms,
    unpatch_norms,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64))


def _randomize_norms(model):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for e in find_norms(model):
            layer = model.get_submodule(e.name)
            layer.weight.copy_(torch.rand(layer.weight.shape, generator=g) + 0.5)


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))


def _sd_bytes(model) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def test_patch_in_place_keeps_objects_and_unpatch_restores_exactly():
    model = tiny_llama()
    _randomize_norms(model)
    params_before = {n: p for n, p in model.named_parameters()}
    classes_before = {n: type(m) for n, m in model.named_modules()}
    sd_before = _sd_bytes(model)
    ref = model(IDS).logits

    report = patch_norms(model)
    assert isinstance(report, NormPatchReport) and len(report.patched) == 5 and not report.skipped
    assert all(dict(model.named_parameters())[n] is p for n, p in params_before.items())  # same Parameter objects
    assert [n for n, _ in iter_patched_norms(model)] == [e.name for e in report.layers]
    assert all(isinstance(m, classes_before[n]) for n, m in model.named_modules())
    assert _sd_bytes(model) == sd_before
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)

    assert unpatch_norms(model) == [e.name for e in report.layers]
    assert {n: type(m) for n, m in model.named_modules()} == classes_before
    assert not any("tick_observer" in vars(m) or "_tick_norm" in vars(m) for m in model.modules())
    assert _sd_bytes(model) == sd_before
    assert torch.equal(model(IDS).logits, ref)
    assert unpatch_norms(model) == []


def test_idempotent_and_context_manager():
    model = tiny_llama()
    first = patch_norms(model)
    layer = model.model.norm
    layer.tick_observer = print  # an observer set by the callback survives a re-patch
    second = patch_norms(model)
    assert [(e.name, e.variant, e.patched) for e in first.layers] == [(e.name, e.variant, e.patched) for e in second.layers]
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from tick_lightning.norms.modules import PatchedNorm

    assert type(layer).__bases__ == (PatchedNorm, LlamaRMSNorm)  # patched once, not wrapped twice
    assert layer.tick_observer is print
    unpatch_norms(model)
    assert type(layer).__module__.startswith("transformers.")

    with patched_norms(model, select="model.layers.0.*") as report:
        assert [e.name for e in report.layers] == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm"]
        assert len(list(iter_patched_norms(model))) == 2
    assert list(iter_patched_norms(model)) == []

    patch_norms(model, select="model.norm")  # patched before entering: stays patched after the block
    with patched_norms(model):
        assert len(list(iter_patched_norms(model))) == 5
    assert [n for n, _ in iter_patched_norms(model)] == ["model.norm"]


def test_deepcopy_and_pickle_keep_the_patch():
    model = tiny_llama()
    _randomize_norms(model)
    patch_norms(model)
    ref = model(IDS).logits
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert [n for n, _ in iter_patched_norms(clone)] == [n for n, _ in iter_patched_norms(model)]
        assert clone.model.norm.weight is not model.model.norm.weight
        assert torch.equal(clone(IDS).logits, ref)
        assert unpatch_norms(clone) and type(clone.model.norm).__name__ == "LlamaRMSNorm"
        assert torch.equal(clone(IDS).logits, ref)


def test_pickle_loads_in_a_fresh_process():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    patch_norms(model)
    blob = pickle.dumps(model)
    code = ("import pickle, sys, torch; m = pickle.loads(sys.stdin.buffer.read()); "
            "from tick_lightning.norms import iter_patched_norms; print([n for n, _ in iter_patched_norms(m)])")
    out = subprocess.run([sys.executable, "-c", code], input=blob, capture_output=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "['1']"


def test_observer_contract_and_stats_off():
    model = tiny_llama()
    report = patch_norms(model)
    seen = []
    layer = model.model.layers[0].input_layernorm
    assert all(m.tick_observer is None for _, m in iter_patched_norms(model))
    layer.tick_observer = seen.append
    captured = {}
    handle = layer.register_forward_pre_hook(lambda mod, args: captured.setdefault("x", args[0]))
    model(IDS)
    handle.remove()
    assert len(seen) == 1 and seen[0] is captured["x"]  # the exact input tensor, once per call
    layer.tick_observer = None
    model(IDS)
    assert len(seen) == 1

    patch_norms(model, stats=False)
    assert not any("tick_observer" in vars(m) for _, m in iter_patched_norms(model))
    layer.__dict__["tick_observer"] = seen.append  # even when present, stats=False never looks
    model(IDS)
    assert len(seen) == 1 and len(report.layers) == 5


def test_fallback_for_inputs_it_does_not_handle():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = nn.Sequential(LlamaRMSNorm(8))
    report = patch_norms(model)
    spec = model[0]._tick_norm
    wrong = torch.randn(3, 5)  # hidden 5 != 8: the original forward decides (and raises, as it would)
    with pytest.raises(RuntimeError):
        model(wrong)
    assert spec.fallbacks == 1
    x = torch.randn(2, 8)
    model(x)
    assert spec.fallbacks == 1 and report.layers[0].fallbacks == 1
    assert str(report).splitlines()[1].split()[6] == "1"  # the report says so


def test_detection_variants_and_report_table():
    from transformers.models.convnext.modeling_convnext import ConvNextLayerNorm
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    class FakeNorm(nn.Module):  # looks like a norm by name and structure, but is not one
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(8))
            self.eps = 1e-6

        def forward(self, x):
            return x * self.weight

    class GatedRMSNorm(LlamaRMSNorm):  # needs a second input: the probe cannot call it, so it is left alone
        def forward(self, x, gate):
            return super().forward(x) * gate

    model = nn.ModuleDict({
        "ln": nn.LayerNorm(8), "ln_noaffine": nn.LayerNorm(8, elementwise_affine=False), "ln_nobias": nn.LayerNorm(8, bias=False),
        "rms": nn.RMSNorm(8), "llama": LlamaRMSNorm(8), "gemma": GemmaRMSNorm(8), "t5": T5LayerNorm(8), "olmo2": Olmo2RMSNorm(8),
        "convnext_cf": ConvNextLayerNorm(8, data_format="channels_first"), "group": nn.GroupNorm(2, 8), "fake": FakeNorm(),
        "gated": GatedRMSNorm(8), "linear": nn.Linear(8, 8)})
    found = {e.name: e for e in find_norms(model)}
    assert not list(iter_patched_norms(model))  # find_norms does not patch
    assert {n: e.variant for n, e in found.items()} == {
        "ln": "layer*w+b/native", "ln_noaffine": "layer/native", "ln_nobias": "layer*w/native",
        "rms": "rms*w/native", "llama": "rms*w/llama", "gemma": "rms*(1+w)/after", "t5": "rms*w/t5",
        "olmo2": "rms*w/after", "convnext_cf": "layer*w+b/native/channels_first",
        "group": None, "fake": None, "gated": None}
    assert found["llama"].eps == 1e-6 and found["llama"].hidden_size == 8 and found["ln"].eps == 1e-5
    report = patch_norms(model)
    assert {e.name for e in report.skipped} == {"group", "fake", "gated"}
    assert "probe matched no reference formula" in found["fake"].reason
    table = str(report).splitlines()
    assert table[0].split() == ["name", "class", "variant", "eps", "hidden", "patched", "fallbacks", "reason"]
    assert len(table) == 13 and any(line.startswith("gemma ") and "GemmaRMSNorm" in line and " yes " in line
                                    for line in table)


def test_bad_arguments_fail_before_patching():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"Unknown kernel 'cuda'.*valid choices: auto, torch"):
        patch_norms(model, kernel="cuda")
    with pytest.raises(ValueError, match="triton"):
        patch_norms(model, kernel="triton")
    with pytest.raises(TypeError, match="stats must be True or False"):
        patch_norms(model, stats="yes")
    from tick_lightning.select import SelectionError

    with pytest.raises(SelectionError, match="model.norm"):
        patch_norms(model, select="model.nrom")
    assert list(iter_patched_norms(model)) == []


def test_low_precision_output_option():
    model = tiny_llama()
    layer = model.model.norm
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    ref = layer(x)
    assert ref.dtype == torch.float32  # Llama: fp32 weight * bf16 -> fp32
    patch_norms(model)
    assert torch.equal(layer(x), ref)
    patch_norms(model, low_precision_output=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref.to(torch.bfloat16))


def test_torch_compile_no_new_graph_breaks_and_same_output():
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), LlamaRMSNorm(16), nn.Linear(16, 16), GemmaRMSNorm(16), nn.LayerNorm(16))
    x = torch.randn(4, 16)
    eager_ref = model(x)
    torch._dynamo.reset()
    before = torch._dynamo.explain(model)(x)
    patch_norms(model)
    torch._dynamo.reset()
    after = torch._dynamo.explain(model)(x)
    assert after.graph_break_count == before.graph_break_count == 0
    assert after.graph_count == before.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager_bf16 = model(x)
        compiled_bf16 = compiled(x)
    torch.testing.assert_close(compiled(x), eager_ref, rtol=1e-5, atol=1e-5)
    assert compiled_bf16.dtype == eager_bf16.dtype
    torch.testing.assert_close(compiled_bf16, eager_bf16, rtol=0, atol=0)
    # the observer path compiles too (it is only set on tick steps)
    seen = []
    model[1].tick_observer = lambda t: seen.append(t.shape)
    compiled(x)
    assert seen == [torch.Size([4, 16])]


def _train(model, steps: int = 5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("tuner", ["lora", "ln_tuning"])
@pytest.mark.parametrize("order", ["patch_after_peft", "patch_before_peft"])
def test_peft_trains_and_saves_like_unpatched(tuner, order, tmp_path):
    from peft import LNTuningConfig, LoraConfig, get_peft_model

    def config():
        if tuner == "lora":
            return LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["model.norm"],
                              task_type="CAUSAL_LM")
        return LNTuningConfig(target_modules=["input_layernorm", "norm"], task_type="CAUSAL_LM")

    def build(patch: bool):
        base = tiny_llama()
        _randomize_norms(base)
        if patch and order == "patch_before_peft":
            patch_norms(base)
        torch.manual_seed(0)
        model = get_peft_model(base, config())
        if patch and order == "patch_after_peft":
            report = patch_norms(model)
            assert not report.skipped
        return model

    twin = build(patch=False)  # the same construction without patch_norms
    model = build(patch=True)
    names = [n for n, _ in iter_patched_norms(model)]
    copies = [n for n in names if ("ln_tuning_layers" in n if tuner == "ln_tuning" else "modules_to_save" in n)]
    assert len(copies) == (3 if tuner == "ln_tuning" else 1), names  # PEFT's trainable copies are patched too
    torch.testing.assert_close(_train(model), _train(twin), rtol=1e-5, atol=1e-6)
    model.save_pretrained(tmp_path / "patched")
    twin.save_pretrained(tmp_path / "twin")
    from safetensors.torch import load_file

    a = load_file(tmp_path / "patched" / "adapter_model.safetensors")
    b = load_file(tmp_path / "twin" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
def test_cuda_autocast_output_dtypes_match_original(autocast):
    """Under CUDA autocast nn.LayerNorm returns fp32 while eager RMSNorms keep their own cast order."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    torch.manual_seed(0)
    layers = [nn.LayerNorm(256), nn.RMSNorm(256, eps=1e-6), LlamaRMSNorm(256), GemmaRMSNorm(256), T5LayerNorm(256)]
    model = nn.ModuleList(layers).cuda()
    twin = copy.deepcopy(model)
    patch_norms(twin)
    x = torch.randn(8, 256, device="cuda")
    for x_in in (x, x.to(autocast)):
        with torch.autocast("cuda", dtype=autocast):
            for a, b in zip(model, twin):
                ya, yb = a(x_in), b(x_in)
                assert ya.dtype == yb.dtype, type(a).__name__
                torch.testing.assert_close(yb.float(), ya.float(), rtol=2e-2, atol=2e-2)


def test_probe_does_not_copy_the_observer_and_repatch_keeps_it():
    class Heavy:
        copies = 0

        def __deepcopy__(self, memo):
            Heavy.copies += 1
            return Heavy()

        def __call__(self, x):
            pass

    model = nn.Sequential(nn.LayerNorm(8))
    patch_norms(model)
    observer = Heavy()
    model[0].tick_observer = observer
    patch_norms(model)
    assert Heavy.copies == 0 and model[0].tick_observer is observer
