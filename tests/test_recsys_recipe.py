"""The sequential_recommendation recipe end to end: default (synthetic) run, run directory, reload, bad input."""

import json

import numpy as np
import pytest
import torch

from recipes._shared.errors import RecipeError
from recipes.recsys.model import SeqRecModel
from recipes.sequential_recommendation import SequentialRecommendationData, SequentialRecommender, cli

QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
SMALL = ["--data.synthetic_users=400", "--data.synthetic_items=150", "--data.max_len=12", "--model.hidden_size=32"]


def _evaluate(module, dm):
    module.eval()
    sums, n = {}, 0
    for batch in dm.test_dataloader():
        for k, v in module.evaluate(batch).items():
            sums[k] = sums.get(k, 0.0) + v.double().sum().item()
        n += len(batch["target"])
    return {k: v / n for k, v in sums.items()}


def test_default_run_learns_the_planted_structure_and_reloads(tmp_path):
    run = tmp_path / "run"
    cli(["fit", f"--run_dir={run}", "--trainer.max_epochs=8", "--tick.ticks=every:10", *SMALL, *QUIET])
    for f in ("config.yaml", "metrics.json", "model/recsys.json", "checkpoints/last.ckpt"):
        assert (run / f).exists(), f
    from tick_lightning.store import read_manifest

    # the ticks' attempt layout (manifest per attempt) names the recipe's model
    assert read_manifest(run / "ticks")["model_class"] == "recipes.recsys.model.SeqRecModel"
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["test"]
    # chance: HR@10 = 10/101 (100 negatives), 10/150 (full ranking); the planted successor is followed 80%
    assert test["test/hr@10"] > 0.4 and test["test/full_hr@10"] > 0.3, test
    assert test["test/ndcg@10"] <= test["test/hr@10"]
    assert test["test/full_hr@10"] <= test["test/hr@10"] + 1e-6  # 100 negatives are a subset of all items

    # the exported model and the Lightning checkpoint both reproduce the recorded test metrics
    dm = SequentialRecommendationData(synthetic_users=400, synthetic_items=150, max_len=12)
    dm.setup("test")
    ckpt = SequentialRecommender.load_from_checkpoint(run / "checkpoints/last.ckpt", map_location="cpu")
    got = _evaluate(ckpt, dm)
    for k in ("hr@10", "ndcg@10", "full_hr@10", "full_ndcg@10"):
        assert got[k] == pytest.approx(test[f"test/{k}"], abs=1e-5), k
    exported = SeqRecModel.from_pretrained(run / "model")
    seq = dm.test_dataloader().__iter__().__next__()["seq"]
    with torch.no_grad():
        assert torch.allclose(exported.scores(seq), ckpt.model.scores(seq), atol=1e-5)


def test_csv_bert_sampled_softmax_run(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["userId,movieId,timestamp"]
    for u in range(40):
        for t in range(int(rng.integers(3, 9))):
            rows.append(f"u{u},m{int(rng.integers(0, 200))},{1000 - t}")  # timestamps decreasing in file order
    (tmp_path / "ratings.csv").write_text("\n".join(rows) + "\n")
    run = tmp_path / "run"
    cli(["fit", f"--run_dir={run}", f"--data.path={tmp_path / 'ratings.csv'}", "--data.user_col=userId",
          "--data.item_col=movieId", "--data.num_eval_negatives=20", "--model.backbone=bert",
          "--model.loss=sampled_softmax", "--model.num_negatives=16", "--model.ks=[5,10]", "--trainer.max_steps=3",
          "--tick.enabled=false", "--data.batch_size=16", *QUIET])
    test = json.loads((run / "metrics.json").read_text())["test"]
    assert set(test) == {f"test/{p}{m}@{k}" for p in ("", "full_") for m in ("hr", "ndcg") for k in (5, 10)}
    assert all(0.0 <= v <= 1.0 for v in test.values())
    assert json.loads((run / "model/recsys.json").read_text())["causal"] is False


def test_bad_input_fails_before_anything_is_written(tmp_path):
    bad = tmp_path / "inter.txt"
    bad.write_text("1 1\n1 2\n1 3\n2 five\n")
    run = tmp_path / "run"
    with pytest.raises(RecipeError, match=r"inter\.txt:4: user and item ids must be integers"):
        cli(["fit", f"--run_dir={run}", f"--data.path={bad}", *QUIET])
    assert not run.exists()
    few = tmp_path / "few.txt"
    few.write_text("1 1\n1 2\n2 1\n")
    with pytest.raises(RecipeError, match="no user has at least 3 interactions"):
        cli(["fit", f"--run_dir={run}", f"--data.path={few}", *QUIET])
    dense = tmp_path / "dense.txt"
    dense.write_text("".join(f"1 {i}\n" for i in range(1, 30)))
    with pytest.raises(RecipeError, match="leaving 0 < 100 unseen items"):
        cli(["fit", f"--run_dir={run}", f"--data.path={dense}", *QUIET])
    assert not run.exists()
    with pytest.raises(RecipeError, match=r"--model.loss='hinge' is not supported; choose one of \['bce'"):
        SequentialRecommender(loss="hinge")
    with pytest.raises(RecipeError, match=r"--model.init='he' is not supported; choose one of \['backbone', 'xavier'\]"):
        SequentialRecommender(init="he")
    with pytest.raises(RecipeError, match="--model.init=xavier would overwrite the weights of --model.checkpoint"):
        SequentialRecommender(init="xavier", checkpoint="some/dir")
    with pytest.raises(RecipeError, match="--data.path='/nope.txt' does not exist"):
        SequentialRecommendationData(path="/nope.txt")
    with pytest.raises(RecipeError, match=r"--data.format='xml' is not supported"):
        SequentialRecommendationData(format="xml")


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule_recorded_by_the_ticks_follows_the_formula(tmp_path, schedule):
    import math

    from tick_lightning import load_ticks

    run = tmp_path / "run"
    cli(["fit", f"--run_dir={run}", f"--model.lr_schedule={schedule}", "--model.lr=0.002", "--trainer.max_steps=6",
          "--tick.ticks=every:1", "--tick.states=[lr]", "--data.batch_size=64", *SMALL, *QUIET])
    ticks = load_ticks(run / "ticks")
    lr = ticks[(ticks.state == "lr") & (ticks.stat == "lr")].sort_values("step")
    expected = [0.002 * (0.5 * (1 + math.cos(math.pi * k / 6)) if schedule == "cosine" else 1.0) for k in range(6)]
    assert lr.step.tolist() == list(range(6))
    assert lr.value.tolist() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(RecipeError, match=r"--model.lr_schedule='linear' is not supported; choose one of"):
        SequentialRecommender(lr_schedule="linear")


@pytest.mark.parametrize("name", ["sequential_recommendation", "sequential_recommendation_games",
                                  "sequential_recommendation_games_ce", "sequential_recommendation_games_sampled",
                                  "sequential_recommendation_bert4rec"])
def test_shipped_configs_parse(name, capsys):
    from pathlib import Path

    cfg = Path(__file__).parents[1] / "recipes" / "configs" / f"{name}.yaml"
    assert cfg.read_text().startswith("# "), "each config starts with a comment header giving its launch command"
    assert "tick-lightning run sequential_recommendation" in cfg.read_text().split("\ntrainer:")[0]
    with pytest.raises(SystemExit) as exit_info:
        cli(["fit", f"--config={cfg}", "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "backbone:" in capsys.readouterr().out
