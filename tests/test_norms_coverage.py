"""Architecture coverage: tiny random models (built from configs) of 32 transformers architectures.

For each architecture, built once: every normalization layer is found and patched (checked against an
independent count by class name and type), logits match the unpatched model, and 10 SGD steps give
matching losses, in fp32 and under bf16 autocast.

Stated tolerances (relative to the loss / logit scale):
- logits, fp32: rtol 1e-5, atol 1e-5 (fused fp32 kernels round differently from eager Python);
- 10 training steps, fp32: every loss within 1e-5 relative;
- 10 training steps, bf16 autocast: every loss within 1e-2 relative (bf16 has ~3 significant digits and
  a 1-ulp difference in one norm output is amplified by the following layers and steps).
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from tick_lightning.norms import iter_patched_norms, patch_norms

V, H, L, HEADS, FF, POS = 64, 32, 2, 2, 64, 64
G = torch.Generator().manual_seed(0)
IDS = torch.randint(3, V, (2, 10), generator=G)
PIXELS = torch.randn(2, 3, 16, 16, generator=G)
LABELS = torch.tensor([0, 1])

DEC = {"vocab_size": V, "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": L, "num_attention_heads": HEADS,
           "num_key_value_heads": 1, "max_position_embeddings": POS, "head_dim": H // HEADS}
ENC = {"vocab_size": V, "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": L, "num_attention_heads": HEADS,
           "max_position_embeddings": POS, "num_labels": 2}
IMG = {"image_size": 16, "patch_size": 4, "num_channels": 3, "hidden_size": H, "num_hidden_layers": L,
           "num_attention_heads": HEADS, "intermediate_size": FF, "num_labels": 2}

# name -> (config class, model head, config kwargs, input kind)
ARCHS = {
    # encoders
    "bert": ("BertConfig", "seqcls", ENC, "text"),
    "roberta": ("RobertaConfig", "seqcls", ENC, "text"),
    "deberta-v2": ("DebertaV2Config", "seqcls", ENC, "text"),
    "albert": ("AlbertConfig", "seqcls", dict(ENC, embedding_size=16), "text"),
    "electra": ("ElectraConfig", "seqcls", dict(ENC, embedding_size=16), "text"),
    "distilbert": ("DistilBertConfig", "seqcls", {"vocab_size": V, "dim": H, "n_layers": L, "n_heads": HEADS, "hidden_dim": FF,
                                                      "max_position_embeddings": POS, "num_labels": 2}, "text"),
    "modernbert": ("ModernBertConfig", "seqcls", dict(ENC, global_attn_every_n_layers=1, pad_token_id=0,
                                                     bos_token_id=1, eos_token_id=2, cls_token_id=1,
                                                     sep_token_id=2), "text"),
    # decoders
    "gpt2": ("GPT2Config", "causal", {"vocab_size": V, "n_embd": H, "n_layer": L, "n_head": HEADS, "n_positions": POS}, "text"),
    "gpt-neox": ("GPTNeoXConfig", "causal", dict(DEC, num_key_value_heads=HEADS), "text"),
    "opt": ("OPTConfig", "causal", {"vocab_size": V, "hidden_size": H, "ffn_dim": FF, "num_hidden_layers": L,
                                        "num_attention_heads": HEADS, "max_position_embeddings": POS,
                                        "word_embed_proj_dim": H}, "text"),
    "llama": ("LlamaConfig", "causal", DEC, "text"),
    "mistral": ("MistralConfig", "causal", DEC, "text"),
    "qwen2": ("Qwen2Config", "causal", DEC, "text"),
    "qwen3": ("Qwen3Config", "causal", DEC, "text"),
    "gemma": ("GemmaConfig", "causal", DEC, "text"),
    "gemma2": ("Gemma2Config", "causal", DEC, "text"),
    "phi3": ("Phi3Config", "causal", dict(DEC, pad_token_id=0), "text"),
    "falcon": ("FalconConfig", "causal", {"vocab_size": V, "hidden_size": H, "num_hidden_layers": L,
                                              "num_attention_heads": HEADS}, "text"),
    "bloom": ("BloomConfig", "causal", {"vocab_size": V, "hidden_size": H, "n_layer": L, "n_head": HEADS}, "text"),
    "olmo": ("OlmoConfig", "causal", DEC, "text"),  # parameter-free OlmoLayerNorm, eps hard-coded in forward
    "olmo2": ("Olmo2Config", "causal", DEC, "text"),
    "cohere": ("CohereConfig", "causal", DEC, "text"),
    "nemotron": ("NemotronConfig", "causal", DEC, "text"),  # NemotronLayerNorm1P: the fp32-safe "1P" rule
    "stablelm": ("StableLmConfig", "causal", DEC, "text"),
    # encoder-decoders
    "t5": ("T5Config", "seq2seq", {"vocab_size": V, "d_model": H, "d_ff": FF, "d_kv": H // HEADS, "num_layers": L,
                                       "num_heads": HEADS, "decoder_start_token_id": 0}, "text"),
    "bart": ("BartConfig", "seq2seq", {"vocab_size": V, "d_model": H, "encoder_layers": L, "decoder_layers": L,
                                           "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS,
                                           "encoder_ffn_dim": FF, "decoder_ffn_dim": FF, "max_position_embeddings": POS},
             "text"),
    # vision
    "vit": ("ViTConfig", "imgcls", IMG, "image"),
    "deit": ("DeiTConfig", "DeiTForImageClassification", IMG, "image"),
    "beit": ("BeitConfig", "imgcls", dict(IMG, use_mean_pooling=True), "image"),
    "swin": ("SwinConfig", "imgcls", {"image_size": 16, "patch_size": 2, "embed_dim": 16, "depths": [1, 1],
                                          "num_heads": [2, 2], "window_size": 2, "num_labels": 2}, "image"),
    "convnext": ("ConvNextConfig", "imgcls", {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2, "num_labels": 2}, "image"),
    "dinov2": ("Dinov2Config", "imgcls", dict(IMG, image_size=16), "image"),
}

HEADS_ = {"seqcls": "AutoModelForSequenceClassification", "causal": "AutoModelForCausalLM",
          "seq2seq": "AutoModelForSeq2SeqLM", "imgcls": "AutoModelForImageClassification"}

# Independent of detect.py: what a reader would call a LayerNorm/RMSNorm by its class name or type.
NORM_NAME = re.compile(r"(LayerNorm|RMSNorm|LayerNorm2d)$")


pytestmark = pytest.mark.usefixtures("one_thread")


def _build(name: str) -> nn.Module:
    import transformers

    config_cls, head, kwargs, _ = ARCHS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    for attr in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                 "resid_pdrop", "embd_pdrop", "attn_pdrop", "hidden_dropout", "dropout_rate", "drop_path_rate"):
        if hasattr(config, attr):
            setattr(config, attr, 0.0)
    torch.manual_seed(0)
    if head in HEADS_:
        model = getattr(transformers, HEADS_[head]).from_config(config, attn_implementation="eager")
    else:
        model = getattr(transformers, head)._from_config(config, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking norm weights, not the 1/0 init
        for m in model.modules():
            if NORM_NAME.search(type(m).__name__) and isinstance(getattr(m, "weight", None), torch.Tensor):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 0.5 + 0.75)
    return model


def _loss_and_logits(model, name):
    _, head, _, kind = ARCHS[name]
    if kind == "image":
        out = model(pixel_values=PIXELS, labels=LABELS)
    elif head == "seqcls" or head.endswith("ForImageClassification"):
        out = model(input_ids=IDS, labels=LABELS)
    else:
        out = model(input_ids=IDS, labels=IDS)
    return out.loss, out.logits


def _train(model, name, autocast):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.01 if ARCHS[name][3] == "image" else 0.05, momentum=0.9)
    losses = []
    for _ in range(10):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss, _ = _loss_and_logits(model, name)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture(name):
    base = _build(name)
    expected = {n for n, m in base.named_modules()
                if NORM_NAME.search(type(m).__name__) or isinstance(m, (nn.LayerNorm, nn.RMSNorm))}
    assert expected, f"{name}: the independent count found no norm layer"
    patched = copy.deepcopy(base)
    report = patch_norms(patched)
    assert {n for n, _ in iter_patched_norms(patched)} == expected, str(report)
    assert not report.skipped, str(report)

    base.eval(), patched.eval()
    with torch.no_grad():
        _, ref = _loss_and_logits(base, name)
        _, out = _loss_and_logits(patched, name)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    base.train(), patched.train()

    for autocast, rtol in ((False, 1e-5), (True, 1e-2)):
        a = _train(copy.deepcopy(base), name, autocast)
        b = _train(copy.deepcopy(patched), name, autocast)
        assert torch.isfinite(a).all() and a[-1] < a[0], f"{name}: the reference run does not train: {a}"
        torch.testing.assert_close(b, a, rtol=rtol, atol=0, msg=lambda m, ac=autocast: f"{name} autocast={ac}: {m}")


def test_parameter_free_olmo_norm_found_with_its_eps():
    from transformers.models.olmo.modeling_olmo import OlmoLayerNorm

    layer = OlmoLayerNorm(32)
    assert not list(layer.parameters()) and not hasattr(layer, "eps")
    report = patch_norms(nn.Sequential(layer))
    (info,) = report.layers
    assert info.patched and info.eps == 1e-5 and "inferred" in info.reason
    x = torch.randn(4, 32, dtype=torch.float64).float() * 3 + 1
    ref = nn.functional.layer_norm(x.double(), (32,), eps=1e-5)  # fp64 reference
    torch.testing.assert_close(layer(x).double(), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("how", ["set_default_dtype", "hf_dtype"])
@pytest.mark.parametrize("name", ["llama", "bert", "olmo", "gemma"])
def test_models_built_in_half_default_dtype(name, how, monkeypatch):
    import transformers

    config_cls, head, kwargs, _ = ARCHS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    auto = getattr(transformers, HEADS_[head])
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    try:
        if how == "set_default_dtype":
            torch.set_default_dtype(torch.bfloat16)
            model = auto.from_config(config, attn_implementation="eager")
            report = patch_norms(copy.deepcopy(model))  # probed while the default dtype is still bf16
        else:
            model = auto.from_config(config, attn_implementation="eager", dtype=torch.bfloat16)
            report = patch_norms(copy.deepcopy(model))
    finally:
        torch.set_default_dtype(previous)
    expected = {n for n, m in model.named_modules() if NORM_NAME.search(type(m).__name__)}
    assert expected and {e.name for e in report.patched} == expected, str(report)
    patched = copy.deepcopy(model)
    patch_norms(patched)
    model.eval(), patched.eval()
    with torch.no_grad():
        _, ref = _loss_and_logits(model, name)
        _, out = _loss_and_logits(patched, name)
    assert out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)  # bf16 model: a few ulps


def test_autocast_branching_nemotron_is_patched_fp32_safe():
    """NemotronLayerNorm1P casts to the autocast dtype when ``torch.is_autocast_enabled()`` (CUDA autocast):
    no variant reproduces that, so the "1P" rule patches it as its fp32-safe variant (fp32 math, input dtype
    out), with the reason; the original does return bf16 there (the rule's premise, checked)."""
    import transformers

    from tick_lightning.norms.detect import FP32_SAFE_REASON, _autocast

    config = transformers.NemotronConfig(**dict(DEC, num_key_value_heads=1))
    model = transformers.AutoModelForCausalLM.from_config(config)
    names = {n for n, m in model.named_modules() if type(m).__name__ == "NemotronLayerNorm1P"}
    layer = copy.deepcopy(next(m for n, m in model.named_modules() if n in names))
    report = patch_norms(model)
    assert names and {e.name for e in report.patched} == names and not report.skipped
    assert all(e.variant == "layer*(1+w)+b/after" and FP32_SAFE_REASON in e.reason for e in report.patched)
    with torch.no_grad(), _autocast("cpu"):
        assert layer(torch.randn(2, H)).dtype == torch.bfloat16  # the original, under autocast
        assert model.get_submodule(sorted(names)[0])(torch.randn(2, H)).dtype == torch.float32  # patched
    assert not torch.is_autocast_enabled()  # the emulated CUDA flag is restored
