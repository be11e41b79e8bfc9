"""Optimizer parameter groups of the recipes: weight-decay split and layer-wise lr decay (LLRD)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_bert, tiny_gpt2, tiny_vit

from recipes import text_classification as tc
from recipes._shared.errors import RecipeError
from recipes._shared.optim import optimizer_param_groups


def lr_and_decay_by_name(module, groups):
    by_id = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    return {n: by_id.get(id(p)) for n, p in module.named_parameters()}


def test_llrd_follows_the_depth_of_each_bert_parameter():
    m, lr, d, L = tiny_bert(num_hidden_layers=3), 2.0, 0.5, 3
    got = lr_and_decay_by_name(m, optimizer_param_groups(m, lr, 0.1, layer_lr_decay=d))
    for name, p in m.named_parameters():
        # the reference, from BERT's own module layout
        if name.startswith("bert.embeddings."):
            depth = 0
        elif name.startswith("bert.encoder.layer."):
            depth = int(name.split(".")[3]) + 1
        else:
            assert name.startswith(("bert.pooler.", "classifier.")), name
            depth = L + 1
        plain = p.ndim == 1  # biases and LayerNorm weights: no weight decay
        assert got[name] == (pytest.approx(lr * d ** (L + 1 - depth)), 0.0 if plain else 0.1), name


def test_llrd_puts_gpt2_token_and_position_tables_at_the_bottom():
    m = tiny_gpt2()
    got = lr_and_decay_by_name(m, optimizer_param_groups(m, 1.0, 0.0, layer_lr_decay=0.5))
    assert got["transformer.wte.weight"][0] == pytest.approx(0.125)
    assert got["transformer.wpe.weight"][0] == pytest.approx(0.125)
    assert got["transformer.h.0.attn.c_attn.weight"][0] == pytest.approx(0.25)
    assert got["transformer.h.1.mlp.c_fc.weight"][0] == pytest.approx(0.5)
    assert got["transformer.ln_f.weight"][0] == pytest.approx(1.0)


def test_no_llrd_is_the_plain_two_group_split_without_frozen_parameters():
    m = tiny_bert()
    m.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    groups = optimizer_param_groups(m, 1e-3, 0.01)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.01), (1e-3, 0.0)]
    trainable = [p for p in m.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable}
    assert all(p.ndim >= 2 for p in groups[0]["params"]) and all(p.ndim == 1 for p in groups[1]["params"])


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_layer_lr_decay_out_of_range_is_refused_before_training(bad):
    with pytest.raises(RecipeError, match=r"layer_lr_decay=.*must be in \(0, 1\]"):
        tc.TextClassifier(layer_lr_decay=bad)


def test_layer_lr_decay_without_numbered_blocks_says_so():
    with pytest.raises(RecipeError, match="numbered transformer blocks"):
        optimizer_param_groups(torch.nn.Sequential(torch.nn.Linear(2, 2)), 1.0, 0.0, layer_lr_decay=0.9)


def test_recipe_trains_with_llrd_from_the_command_line(tmp_path):
    from test_recipes_text import run

    cli, run_dir = run(tmp_path, "--trainer.max_steps=3", "--model.layer_lr_decay=0.5", "--model.lr=1e-3",
                       "--model.warmup_ratio=0.0", "--tick.ticks=every:1")
    groups = cli.trainer.optimizers[0].param_groups
    # 2 blocks: the embeddings train at 1e-3 * 0.5**3, the blocks at 0.5**2 and 0.5, the head at 1e-3
    assert sorted({g["initial_lr"] for g in groups}) == pytest.approx([1.25e-4, 2.5e-4, 5e-4, 1e-3])
    # the tick records carry one learning rate per group; the schedule scales them all, keeping the decay
    from tick_lightning.store import load_ticks

    df = load_ticks(run_dir / "ticks")
    lr = df[(df.state == "lr") & (df.stat == "lr")]
    assert set(lr.name) == {f"group{i}" for i in range(len(groups))}
    first = lr[lr.step == lr.step.min()].set_index("name").value
    top = max(range(len(groups)), key=lambda i: groups[i]["initial_lr"])
    for i, g in enumerate(groups):
        ratio = first[f"group{i}"] / first[f"group{top}"]
        assert ratio == pytest.approx(g["initial_lr"] / groups[top]["initial_lr"], rel=1e-6)


def test_llrd_on_vit_keeps_the_final_norm_and_head_at_the_top():
    m = tiny_vit()
    got = lr_and_decay_by_name(m, optimizer_param_groups(m, 1.0, 0.05, layer_lr_decay=0.5))
    assert got["vit.embeddings.cls_token"] == (pytest.approx(0.125), 0.05)  # 3-d: decayed, as HF Trainer does
    assert got["vit.embeddings.patch_embeddings.projection.weight"] == (pytest.approx(0.125), 0.05)
    assert got["vit.layers.1.attention.q_proj.weight"] == (pytest.approx(0.5), 0.05)
    assert got["vit.layernorm.weight"] == (1.0, 0.0)
    assert got["classifier.weight"] == (1.0, 0.05)


def test_ema_weight_averaging_from_the_command_line_is_what_the_run_saves(tmp_path):
    """Lightning's EMAWeightAveraging: the saved model and the checkpoint hold the averaged weights."""
    from safetensors.torch import load_file
    from test_recipes_text import run

    common = ["--trainer.max_steps=4", "--tick.ticks=every:2", "--seed_everything=3"]
    _, plain_dir = run(tmp_path, *common, name="plain")
    _, ema_dir = run(tmp_path, *common, "--trainer.callbacks+=lightning.pytorch.callbacks.EMAWeightAveraging",
                     "--trainer.callbacks.decay=0.5", name="ema")
    plain = load_file(plain_dir / "model" / "model.safetensors")
    ema = load_file(ema_dir / "model" / "model.safetensors")
    ckpt = torch.load(ema_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(ema[name], plain[name])  # same seed and data: only the averaging differs
    for key, value in ema.items():
        torch.testing.assert_close(ckpt[f"model.{key}"], value, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ automatic precision
def fake_cuda(monkeypatch, *, initialized: bool, capability=None, bf16=None):
    """A machine with a CUDA GPU, as far as auto_precision can see; calls that would initialize CUDA fail."""
    import recipes._shared.precision as precision

    calls = {}

    def is_bf16_supported(including_emulation=True):
        if not initialized:
            raise AssertionError("is_bf16_supported initializes CUDA")
        calls["including_emulation"] = including_emulation
        return bf16

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(precision, "nvml_compute_capability", lambda device=0: capability)
    return calls


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), "16-mixed"), ((7, 5), "16-mixed"),
                                                      ((8, 0), "bf16-mixed"), ((9, 0), "bf16-mixed"),
                                                      (None, "16-mixed")])
def test_auto_precision_reads_the_capability_without_initializing_cuda(monkeypatch, capability, expected):
    from recipes._shared.precision import auto_precision

    fake_cuda(monkeypatch, initialized=False, capability=capability)
    assert auto_precision() == expected  # V100 (7.0) / T4 (7.5) only emulate bf16


@pytest.mark.parametrize("bf16", [True, False])
def test_auto_precision_once_cuda_is_initialized_asks_torch_without_emulation(monkeypatch, bf16):
    from recipes._shared.precision import auto_precision

    calls = fake_cuda(monkeypatch, initialized=True, capability=(9, 0), bf16=bf16)
    assert auto_precision() == ("bf16-mixed" if bf16 else "16-mixed")
    assert calls == {"including_emulation": False}


def test_nvml_compute_capability_without_a_driver_is_none_and_cuda_stays_uninitialized():
    from recipes._shared.precision import nvml_compute_capability

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: the GPU check covers it")
    assert nvml_compute_capability() is None
    assert not torch.cuda.is_initialized()
