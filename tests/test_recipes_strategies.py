"""Recipes under Lightning's own strategies: DDP on 2 CPU processes; FSDP on a GPU; clear errors otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY_BERT = ("--model.model_config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
             "intermediate_size: 64, max_position_embeddings: 64}")
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.demo_train_size=128",
         "--data.demo_val_size=64", "--data.batch_size=16", "--data.eval_batch_size=32", TINY_BERT]


def launch(cwd: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python recipes/text_classification.py fit ...`` as a user runs it (Lightning launches the other ranks)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("LOCAL_RANK", None)
    env.pop("TICK_LIGHTNING_RUN_DIR", None)
    return subprocess.run([sys.executable, str(REPO / "recipes" / "text_classification.py"), "fit", *QUICK, *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_ddp_two_cpu_processes_share_one_run_directory_and_synced_metrics(tmp_path):
    from torchmetrics.functional.classification import multiclass_accuracy
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from recipes import text_classification as tc

    # no --run_dir: the rank Lightning starts seconds later must still write into rank 0's timestamped directory
    proc = launch(tmp_path, "--trainer.strategy=ddp", "--trainer.accelerator=cpu", "--trainer.devices=2",
                  "--trainer.max_steps=4", "--tick.ticks=every:2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    for part in ("config.yaml", "metrics.json", "checkpoints/last.ckpt", "model/config.json"):
        assert (run_dir / part).exists(), part
    assert [p.name for p in (run_dir / "ticks").glob("attempts/*/rank*")] == ["rank0"]  # ranks="zero" by default
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 4

    # the final validation ran on both ranks (32 rows each); the logged metrics cover all 64 rows
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    val = tc.demo_sentiment(64, seed=1)
    labels = torch.tensor(val["label"])
    with torch.no_grad():
        logits = model(**tok(val["sentence"], padding=True, return_tensors="pt")).logits
    acc = multiclass_accuracy(logits.argmax(-1), labels, num_classes=2, average="micro")
    loss = torch.nn.functional.cross_entropy(logits, labels)
    assert metrics["validate"]["val_acc"] == pytest.approx(float(acc), abs=1e-6)
    assert metrics["validate"]["val_loss"] == pytest.approx(float(loss), abs=1e-4)  # sync_dist: mean of both ranks


@pytest.mark.parametrize("strategy", ["fsdp", "deepspeed"])
def test_strategy_that_cannot_run_here_fails_before_anything_is_written(tmp_path, strategy):
    from recipes import text_classification as tc

    if strategy == "fsdp" and torch.cuda.is_available():
        pytest.skip("FSDP runs on this machine (see the GPU test)")
    if strategy == "deepspeed":
        try:
            import deepspeed  # noqa: F401
            pytest.skip("deepspeed is installed here")
        except ImportError:
            pass
    run_dir = tmp_path / "run"
    # Lightning's own message: FSDP needs a GPU accelerator; DeepSpeed needs the deepspeed package
    with pytest.raises(Exception) as err:
        tc.cli(["fit", f"--run_dir={run_dir}", *QUICK, f"--trainer.strategy={strategy}", "--trainer.max_steps=2"])
    message = str(err.value)
    assert strategy in message.lower() and ("GPU" in message or "install" in message), message
    assert not run_dir.exists()


@pytest.mark.gpu
def test_fsdp_on_one_gpu_runs_the_recipe(tmp_path):
    proc = launch(tmp_path, "--trainer.strategy=fsdp", "--trainer.accelerator=gpu", "--trainer.devices=1",
                  "--trainer.max_steps=4", "--tick.ticks=every:2", f"--run_dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    assert (tmp_path / "run" / "model" / "config.json").exists()
