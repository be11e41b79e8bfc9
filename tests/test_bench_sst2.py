"""benchmarks/sst2_minilm.py end to end on a tiny local checkpoint and SST-2-shaped TSVs (no download)."""

import json

import pytest
from tiny import load_benchmark, tiny_bert


@pytest.fixture
def sst2_like(tmp_path):
    """A tiny BERT checkpoint with its tokenizer, and train/dev TSVs with SST-2's headers."""
    from recipes._shared.tokenizer import train_tokenizer

    words = {0: ["bad", "dull", "awful"], 1: ["good", "fine", "great"]}
    rows = [(k % 2, f"a {words[k % 2][k % 3]} film") for k in range(64)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_text("label\tsentence\n" + "".join(f"{y}\t{x}\n" for y, x in rows))
    (tmp_path / "data" / "dev.tsv").write_text("label\tcontent\n" + "".join(f"{y}\t{x}\n" for y, x in rows[:16]))
    tok = train_tokenizer([x for _, x in rows], vocab_size=30)
    model = tiny_bert(hidden_size=16, intermediate_size=16, vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    return tmp_path


def test_sst2_benchmark_runs_the_recipe_with_llrd_and_ema(sst2_like, capsys):
    run_dir = sst2_like / "run"
    result = load_benchmark("sst2_minilm").main(["--data", str(sst2_like / "data"), "--checkpoint", str(sst2_like / "ckpt"),
                            "--max-steps", "4", "--batch-size", "8", "--layer-lr-decay", "0.8", "--ema-decay", "0.9",
                            "--run-dir", str(run_dir), "--trainer.precision=32-true"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert result["steps"] == 4 and result["train_examples"] == 64
    assert result["dev_accuracy"] == metrics["validate"]["val_acc"]
    assert (result["layer_lr_decay"], result["ema_decay"], result["seed"]) == (0.8, 0.9, 42)
    config = (run_dir / "config.yaml").read_text()
    assert "EMAWeightAveraging" in config and "layer_lr_decay: 0.8" in config


def test_sst2_benchmark_seeds_run_apart_and_summarize(sst2_like):
    run_dir = sst2_like / "seeds"
    result = load_benchmark("sst2_minilm").main(["--data", str(sst2_like / "data"), "--checkpoint", str(sst2_like / "ckpt"),
                            "--max-steps", "3", "--batch-size", "8", "--seeds", "5", "6", "--run-dir", str(run_dir),
                            "--trainer.precision=32-true"])
    acc = [json.loads((run_dir / f"seed{s}" / "metrics.json").read_text())["validate"]["val_acc"] for s in (5, 6)]
    assert result["seeds"] == [5, 6] and [r["seed"] for r in result["runs"]] == [5, 6]
    assert "seed_everything: 6" in (run_dir / "seed6" / "config.yaml").read_text()
    assert result["dev_accuracy"] == acc
    mean = (acc[0] + acc[1]) / 2
    assert result["mean"] == pytest.approx(mean)
    assert result["sd"] == pytest.approx(abs(acc[0] - acc[1]) / 2 ** 0.5)  # sample sd of two values
    assert (result["min"], result["max"]) == (min(acc), max(acc))
    assert result["runs_at_target"] == sum(a >= 0.90 for a in acc)


def test_sst2_summary_counts_runs_at_target():
    summarize = load_benchmark("sst2_minilm").summarize
    runs = [{"seed": s, "dev_accuracy": a} for s, a in ((1, 0.8968), (3, 0.9002), (4, 0.90))]
    out = summarize(runs, target=0.90)
    assert out["runs_at_target"] == 2 and out["seeds"] == [1, 3, 4]
    assert out["mean"] == pytest.approx((0.8968 + 0.9002 + 0.90) / 3)
    assert summarize(runs[:1], target=0.90)["sd"] == 0.0
