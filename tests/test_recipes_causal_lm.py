"""causal_lm recipe: full fine-tuning on a local text file, LoRA merged on export, perplexity vs a reference."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recipes import causal_lm as clm

QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.block_size=16",
         "--data.batch_size=8", "--model.model_config={model_type: llama, hidden_size: 32, num_hidden_layers: 2, "
         "num_attention_heads: 2, num_key_value_heads: 2, intermediate_size: 64, max_position_embeddings: 64}"]


def perplexity_fp64(model, blocks) -> float:
    """Reference perplexity: exp(mean next-token NLL) over every token of ``blocks``, computed in fp64."""
    model = model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in blocks["input_ids"]:
            logits = model(input_ids=ids[None]).logits[0, :-1].double()
            nll += torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
            count += ids.numel() - 1
    return math.exp(nll / count)


def test_text_file_full_finetune_and_perplexity(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(clm.demo_text(200, seed=5)["text"]) + "\n")
    run_dir = tmp_path / "run"
    cli = clm.cli(["fit", f"--run_dir={run_dir}", *QUICK, "--trainer.max_steps=4", "--tick.ticks=every:2",
                   f"--data.data_files={{train: {text}}}", "--data.val_split=null", "--data.val_fraction=0.2"])
    dm = cli.datamodule
    n_train, n_val = len(dm.splits["train"]), len(dm.splits["validation"])
    assert n_val == max(1, int((n_train + n_val) * 0.2))
    metrics = json.loads((run_dir / "metrics.json").read_text())["validate"]
    assert metrics["val_ppl"] == pytest.approx(perplexity_fp64(cli.model.model, dm.splits["validation"]), rel=1e-4)
    assert (run_dir / "model" / "tokenizer.json").exists() and list((run_dir / "ticks").glob("attempts/*/attempt.json"))


def test_lora_trains_adapters_only_and_merged_export_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = tmp_path / "lora"
    cli = clm.cli(["fit", f"--run_dir={run_dir}", *QUICK, "--trainer.max_steps=3", "--tick.enabled=false",
                   "--data.demo_train_size=200", "--data.demo_val_size=40", "--model.peft=lora", "--model.lora_r=4",
                   "--model.lr=1e-2", "--trainer.enable_checkpointing=false"])
    peft_model = cli.model.model
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)  # adapters moved
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    ids = tok(clm.demo_text(4, seed=9)["text"][0], return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, peft_model.eval()(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)


def test_val_fraction_needs_val_split_null(tmp_path):
    from recipes._shared.errors import RecipeError

    with pytest.raises(RecipeError, match=r"val_split=null"):
        clm.CausalLMData(val_fraction=0.1)
