"""Sharded fine-tuning: ``--trainer.strategy=fsdp2`` (Lightning's ModelParallelStrategy, FSDP2 ``fully_shard`` per
transformer block) on 2 CPU processes (gloo); the exported model is the gathered full state dict.

Ticks are on (every step, norms patched, the recipes' defaults): under FSDP2 their per-parameter statistics are
those of the full tensors, so the same run under DDP (same seed, same data split) records the same values.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.strategy=fsdp2",
          "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.max_steps=3", "--tick.ticks=every:1",
          "--checkpoint.every_n_train_steps=2"]
TEXT = ["--data.demo_train_size=128", "--data.demo_val_size=64", "--data.batch_size=16", "--data.eval_batch_size=32",
        "--model.model_config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
        "intermediate_size: 64, max_position_embeddings: 64}"]
CAUSAL = ["--data.demo_train_size=200", "--data.demo_val_size=60", "--data.block_size=16", "--data.batch_size=8",
          "--data.max_eval_blocks=8", "--model.model_config={model_type: llama, hidden_size: 32, num_hidden_layers: 2, "
          "num_attention_heads: 2, num_key_value_heads: 2, intermediate_size: 64, max_position_embeddings: 64, "
          "tie_word_embeddings: true}"]


def launch(cwd: Path, recipe: str, *args: str, strategy: str = "fsdp2") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LOCAL_RANK", None)
    env.pop("TICK_LIGHTNING_RUN_DIR", None)
    common = [a.replace("=fsdp2", f"={strategy}") if a.startswith("--trainer.strategy") else a for a in COMMON]
    return subprocess.run([sys.executable, str(REPO / "recipes" / f"{recipe}.py"), "fit", *common, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def checkpoint_weights(ckpt_dir: Path, tmp_path: Path) -> dict:
    """The model weights of a distributed (one file per rank) Lightning checkpoint, as one CPU state dict."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    assert sorted(p.name for p in ckpt_dir.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # 2 shards
    dcp_to_torch_save(ckpt_dir, tmp_path / "whole.pt")
    return torch.load(tmp_path / "whole.pt", weights_only=False)["state_dict"]


# CI: the FSDP2 fit (full fine-tuning, activation checkpointing, export, ticks); the same run under DDP for
# comparison is a second launch (~30 s) and one of the slow cases (the strategy matrix checks FSDP2's exactness in CI)
@pytest.mark.parametrize("against_ddp", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["fsdp2", "vs-ddp"])
def test_text_classification_fsdp2_with_activation_checkpointing(tmp_path, against_ddp):
    from torchmetrics.functional.classification import multiclass_accuracy
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipes import text_classification as tc

    run_dir = tmp_path / "run"
    proc = launch(tmp_path, "text_classification", *TEXT, f"--run_dir={run_dir}",
                  "--model.gradient_checkpointing=true")
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    # the export is the gathered state of the sharded model: the same weights as its (sharded) checkpoint
    sharded = checkpoint_weights(run_dir / "checkpoints" / "last.ckpt", tmp_path)
    for name, tensor in model.state_dict().items():
        if f"model.{name}" in sharded:
            torch.testing.assert_close(tensor, sharded[f"model.{name}"], rtol=0, atol=0)
    assert sum(f"model.{n}" in sharded for n in model.state_dict()) >= len(model.state_dict()) - 1
    # ... and it predicts what the sharded model measured (64 rows, 32 per rank, synced)
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    val = tc.demo_sentiment(64, seed=1)
    with torch.no_grad():
        logits = model(**tok(val["sentence"], padding=True, return_tensors="pt")).logits
    labels = torch.tensor(val["label"])
    acc = multiclass_accuracy(logits.argmax(-1), labels, num_classes=2, average="micro")
    assert metrics["validate"]["val_acc"] == pytest.approx(float(acc), abs=1e-6)
    loss = torch.nn.functional.cross_entropy(logits, labels)
    assert metrics["validate"]["val_loss"] == pytest.approx(float(loss), abs=1e-4)
    # ticks: every step once, every parameter; per-parameter statistics equal DDP's (unsharded) on the same run
    from tick_lightning.store import load_ticks

    ticks = load_ticks(run_dir / "ticks")
    weight = ticks[(ticks.state == "weight") & (ticks.stat == "norm")]
    assert sorted(weight.step.unique()) == [0, 1, 2]
    assert set(weight.name) == {f"model.{n}" for n, _ in model.named_parameters()}
    if not against_ddp:
        return
    ddp_dir = tmp_path / "ddp"
    proc = launch(tmp_path, "text_classification", *TEXT, f"--run_dir={ddp_dir}", "--model.gradient_checkpointing=true",
                  strategy="ddp")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ddp = load_ticks(ddp_dir / "ticks")
    for state, stat in [("weight", "norm"), ("weight", "std"), ("grad", "norm"), ("grad", "absmax"), ("update", "norm")]:
        keys = ["step", "name"]
        a = ticks[(ticks.state == state) & (ticks.stat == stat)].set_index(keys).value.sort_index()
        b = ddp[(ddp.state == state) & (ddp.stat == stat)].set_index(keys).value.sort_index()
        assert a.index.equals(b.index) and len(a) > 0, (state, stat)
        torch.testing.assert_close(torch.tensor(a.values), torch.tensor(b.values), rtol=1e-4, atol=1e-7,
                                   msg=f"{state}/{stat}")


# full fine-tuning under FSDP2 is the text classification test above in CI; the causal LM one with the slow cases
@pytest.mark.parametrize("peft", [pytest.param("none", marks=pytest.mark.slow), "lora"])
def test_causal_lm_fsdp2_full_and_lora_export_reloads(tmp_path, peft):
    from test_recipes_causal_lm import perplexity_fp64
    from transformers import AutoModelForCausalLM

    from recipes import causal_lm as clm

    run_dir = tmp_path / "run"
    extra = ["--model.peft=lora", "--model.lora_r=4", "--model.lr=1e-2"] if peft == "lora" else []
    proc = launch(tmp_path, "causal_lm", *CAUSAL, f"--run_dir={run_dir}", *extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 3
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    assert not any("lora" in n for n, _ in model.named_parameters())  # LoRA merged into the exported weights
    sharded = checkpoint_weights(run_dir / "checkpoints" / "last.ckpt", tmp_path)
    if peft == "lora":
        b = [v for k, v in sharded.items() if "lora_B" in k]
        assert b and any(v.abs().sum() > 0 for v in b)  # the adapters trained (B starts at zero)
    # the reloaded export reproduces the validation perplexity the sharded run measured (fp64 reference)
    data = clm.CausalLMData(demo_train_size=200, demo_val_size=60, block_size=16, max_eval_blocks=8,
                            tokenizer=str(run_dir / "model"))
    data.setup("fit")
    assert len(data.splits["validation"]) == 8
    assert metrics["validate"]["val_ppl"] == pytest.approx(perplexity_fp64(model, data.splits["validation"]), rel=1e-4)


def test_shard_model_shards_each_no_split_block_and_the_root(tmp_path):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule
    from transformers import LlamaConfig, LlamaForCausalLM

    from recipes._shared.sharding import full_state_dict, is_sharded, shard_model, unsharded_replica

    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=2, intermediate_size=32, tie_word_embeddings=True))
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = shard_model(model, mesh)
        assert shard_model(sharded, mesh) is sharded  # idempotent (configure_model runs again for validate)
        assert isinstance(sharded, FSDPModule) and is_sharded(sharded)
        assert [type(m).__name__ for m in sharded.modules() if isinstance(m, FSDPModule)] == \
            ["FSDPLlamaForCausalLM", "FSDPLlamaDecoderLayer", "FSDPLlamaDecoderLayer"]
        replica = unsharded_replica(sharded, full_state_dict(sharded))
    finally:
        dist.destroy_process_group()
    assert not is_sharded(replica)
    assert replica.lm_head.weight is replica.model.embed_tokens.weight  # ties restored
    for name, tensor in replica.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_each_block_in_backward(checkpointing):
    from recipes import text_classification as tc

    data = tc.TextClassificationData(demo_train_size=16, demo_val_size=8, batch_size=8)
    data.setup("fit")
    module = tc.TextClassifier(gradient_checkpointing=checkpointing)
    module.build(data)
    calls = []
    for layer in module.model.bert.encoder.layer:
        layer.intermediate.register_forward_hook(lambda *_: calls.append(1))  # HF checkpoints forward, not hooks
    module(next(iter(data.train_dataloader()))).loss.backward()
    assert len(calls) == (4 if checkpointing else 2)  # 2 blocks, run again in backward when checkpointed


def _rank0_weights_worker(rank: int, world: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    from recipes._shared.hub import load_pretrained_or_config
    from recipes._shared.sharding import shard_model

    ckpt = str(Path(out) / "ckpt")
    model = load_pretrained_or_config(AutoModelForCausalLM, ckpt, meta=rank != 0)  # what the CLI builds per rank
    built_on_meta = all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    model = shard_model(model, init_device_mesh("cpu", (world,)))
    reference = AutoModelForCausalLM.from_pretrained(ckpt)  # independent: every rank reads the checkpoint itself
    full = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t) for n, t in model.state_dict().items()}
    assert next(reference.parameters()).dtype == torch.bfloat16  # the case this test is about
    state = {n: full[n].dtype == t.dtype and bool(torch.equal(full[n], t)) for n, t in reference.state_dict().items()}
    buffers = {n: b.dtype == dict(reference.named_buffers())[n].dtype and bool(torch.equal(b, dict(reference.named_buffers())[n]))
               for n, b in model.named_buffers()}
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        same_logits = bool(torch.allclose(logits, reference(input_ids=ids).logits, atol=1e-6, rtol=0))
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    Path(out, f"rank{rank}.json").write_text(json.dumps(dict(built_on_meta=built_on_meta, state=state, buffers=buffers,
                                                            same_logits=same_logits, tied=tied)))


def test_fsdp2_ranks_above_zero_build_on_meta_and_receive_rank_zeros_weights(tmp_path):
    """Only rank 0 reads the checkpoint's weights; after sharding every rank holds exactly them, in rank 0's dtype
    (tied embeddings still tied, the rotary frequencies -- a buffer outside the state dict -- included)."""
    import tiny
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                 tie_word_embeddings=True)).to(torch.bfloat16).save_pretrained(tmp_path / "ckpt")
    # bf16 weights, a config naming no dtype: from_pretrained (rank 0) takes the weights' dtype, a meta build the
    # config's default (fp32) unless it follows rank 0
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config.pop("dtype", None), config.pop("torch_dtype", None)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    tiny.gloo_spawn(_rank0_weights_worker, tmp_path, str(tmp_path), world=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["built_on_meta"] for r in results] == [False, True]
    for r in results:
        assert r["state"] and all(r["state"].values()), r["state"]
        assert r["buffers"] and all(r["buffers"].values()), r["buffers"]
        assert r["same_logits"] and r["tied"]


def test_only_fsdp2_ranks_above_zero_build_on_meta(monkeypatch):
    from lightning.pytorch.utilities import rank_zero_only

    from recipes._shared.sharding import FSDP2Strategy, builds_on_meta

    for rank, strategy, expect in ((0, FSDP2Strategy(), False), (1, FSDP2Strategy(), True), (1, "ddp", False)):
        monkeypatch.setattr(rank_zero_only, "rank", rank)
        assert builds_on_meta(strategy) is expect, (rank, strategy)


def test_a_finished_run_ends_its_process_group_and_leaves_a_callers(tmp_path):
    """A gloo group left to the interpreter's shutdown can abort a finished run's exit (pytorch/pytorch#190489);
    Lightning ends it at exit under nccl only, so the recipe ends the group its run started (DDP on one CPU
    process here) once the run is over; a group the caller started before is the caller's."""
    import torch.distributed as dist

    from recipes import text_classification as tc

    args = [*TEXT, "--trainer.max_steps=1", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu", "--tick.ticks=0"]
    try:
        tc.cli(["fit", f"--run_dir={tmp_path / 'ddp'}", *args, "--trainer.strategy=ddp", "--trainer.devices=1"])
        assert (tmp_path / "ddp" / "metrics.json").exists() and not dist.is_initialized()
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        tc.cli(["fit", f"--run_dir={tmp_path / 'caller'}", *args])
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
