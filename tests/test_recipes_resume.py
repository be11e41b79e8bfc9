"""Recipes resume after kill -9: checkpoints during training, ``--ckpt_path last`` continues the same run directory;
Lightning's ``--trainer.default_root_dir`` and ``--trainer.max_steps`` mean what they mean."""

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
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.demo_train_size=64",
         "--data.demo_val_size=32", "--data.batch_size=8", TINY_BERT]

# Runs the recipe exactly as `python recipes/text_classification.py` does, except that the process kills itself
# (os._exit: no cleanup, no flushing, like kill -9) in the training step that would make optimizer step KILL_AT.
KILLER = """
import os, sys
sys.path.insert(0, {repo!r})
from recipes import text_classification as tc
kill_at, step = int(os.environ["KILL_AT"]), tc.TextClassifier.training_step
def training_step(self, batch, batch_idx):
    if self.trainer.global_step == kill_at:
        os._exit(137)
    return step(self, batch, batch_idx)
tc.TextClassifier.training_step = training_step
tc.main(sys.argv[1:])
"""


def recipe_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}
    env.pop("LOCAL_RANK", None)
    env.pop("TICK_LIGHTNING_RUN_DIR", None)
    return env


def test_killed_run_resumes_from_its_last_checkpoint_with_ckpt_path_last(tmp_path):
    from transformers import AutoModelForSequenceClassification

    run_dir = tmp_path / "run"
    args = ["fit", f"--run_dir={run_dir}", *QUICK, "--trainer.max_steps=10", "--checkpoint.every_n_train_steps=4",
            "--tick.ticks=every:2", "--tick.states=[loss, weight]", "--tick.patch_norms=false"]
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO)))
    killed = subprocess.run([sys.executable, str(killer), *args], cwd=tmp_path, env=recipe_env(KILL_AT="6"),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-3000:]
    assert not (run_dir / "metrics.json").exists()
    ckpt_file = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4  # written during training (every 4 steps), not only at the end

    # the same command, plus --ckpt_path last
    resumed = subprocess.run([sys.executable, str(REPO / "recipes" / "text_classification.py"), *args,
                              "--ckpt_path=last"], cwd=tmp_path, env=recipe_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path at" in resumed.stderr + resumed.stdout
    assert str(ckpt_file) in resumed.stderr + resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 10
    final = torch.load(ckpt_file, map_location="cpu", weights_only=False)
    assert final["global_step"] == 10  # the end of training rewrites last.ckpt
    reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "model")
    name = "classifier.weight"
    torch.testing.assert_close(reloaded.state_dict()[name], final["state_dict"][f"model.{name}"])
    assert not (tmp_path / "runs").exists()  # nothing went to a new timestamped directory
    # each tick step exactly once: the killed attempt's rows after the checkpoint (step 4) are superseded
    from tick_lightning.store import load_ticks

    ticks = load_ticks(run_dir / "ticks")
    loss = ticks[(ticks.state == "loss") & (ticks.stat == "value")]
    assert sorted(loss.step) == [0, 2, 4, 6, 8, 9]  # 9: the last step
    weight = ticks[(ticks.state == "weight") & (ticks.name == f"model.{name}") & (ticks.stat == "norm")]
    assert sorted(weight.step) == [0, 2, 4, 6, 8, 9]
    at4 = weight[weight.step == 4]  # recorded by the resumed attempt, from the checkpoint's weights
    assert at4.attempt.iloc[0] == ticks.attempt.iloc[-1] and ticks.run.nunique() == 1
    assert at4.value.iloc[0] == pytest.approx(torch.linalg.vector_norm(
        saved["state_dict"][f"model.{name}"].double()).item(), rel=1e-5)


def test_ckpt_path_last_without_run_dir_continues_the_latest_run_under_default_root_dir(tmp_path):
    from recipes import text_classification as tc

    root = tmp_path / "root"
    first = tc.cli(["fit", f"--trainer.default_root_dir={root}", *QUICK, "--trainer.max_steps=2",
                    "--tick.enabled=false"])
    assert first.run_dir.parent == root and first.run_dir.name.startswith("text_classification-")
    assert (first.run_dir / "checkpoints" / "last.ckpt").exists() and (first.run_dir / "metrics.json").exists()
    again = tc.cli(["fit", f"--trainer.default_root_dir={root}", *QUICK, "--trainer.max_steps=4",
                    "--tick.enabled=false", "--ckpt_path=last"])
    assert again.run_dir == first.run_dir
    assert [p.name for p in root.iterdir()] == [first.run_dir.name]
    assert json.loads((first.run_dir / "metrics.json").read_text())["global_step"] == 4
    assert not (tmp_path / "runs").exists()


def test_explicit_max_steps_is_not_capped_by_the_recipe_default_epochs(tmp_path):
    from recipes import text_classification as tc

    # 64 rows / batch 8 = 8 steps per epoch; the recipe's default max_epochs=1 would stop at step 8
    cli = tc.cli(["fit", f"--run_dir={tmp_path / 'run'}", *QUICK, "--trainer.max_steps=12", "--tick.enabled=false",
                  "--trainer.enable_checkpointing=false"])
    assert cli.trainer.global_step == 12
    # without max_steps the recipe default applies; an explicit max_epochs wins over both
    cli = tc.cli(["fit", f"--run_dir={tmp_path / 'epochs'}", *QUICK, "--tick.enabled=false",
                  "--trainer.enable_checkpointing=false"])
    assert cli.trainer.global_step == 8
    cli = tc.cli(["fit", f"--run_dir={tmp_path / 'both'}", *QUICK, "--trainer.max_steps=12", "--trainer.max_epochs=1",
                  "--tick.enabled=false", "--trainer.enable_checkpointing=false"])
    assert cli.trainer.global_step == 8
