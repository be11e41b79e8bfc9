"""text_classification recipe: default run, run directory, reload, local TSVs, resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from recipes import text_classification as tc
from recipes._shared.errors import RecipeError

QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
         "--data.demo_train_size=96", "--data.demo_val_size=32", "--data.batch_size=16",
         "--model.model_config={model_type: bert, hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 2, "
         "intermediate_size: 64, max_position_embeddings: 64}"]


def run(tmp_path, *extra, name="run"):
    run_dir = tmp_path / name
    return tc.cli(["fit", f"--run_dir={run_dir}", *QUICK, *extra]), run_dir


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """One short default run (ticks + patched norms on) shared by the checks below."""
    tmp = tmp_path_factory.mktemp("text")
    cli, run_dir = run(tmp, "--trainer.max_steps=6", "--tick.ticks=every:2")
    return cli, run_dir


def test_default_run_writes_the_run_directory(default_run):
    from tick_lightning.store import load_ticks, read_manifest

    cli, run_dir = default_run
    for part in ("config.yaml", "metrics.json", "checkpoints/last.ckpt", "model/config.json", "model/tokenizer.json"):
        assert (run_dir / part).exists(), part
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 6
    assert set(metrics["validate"]) == {"val_loss", "val_acc", "val_f1"}
    ticks = load_ticks(run_dir / "ticks")
    loss_steps = sorted(ticks[(ticks.state == "loss") & (ticks.stat == "value")].step.unique())
    assert loss_steps == [0, 2, 4, 5]  # 5: the last step
    manifest = read_manifest(run_dir / "ticks")
    assert manifest["precision"] in ("32-true", "32")  # automatic precision on CPU
    assert "trainer:\n" in (run_dir / "config.yaml").read_text()


def test_saved_model_reloads_with_same_predictions_and_metrics(default_run):
    from torchmetrics.functional.classification import multiclass_accuracy
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cli, run_dir = default_run
    reloaded = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    val = tc.demo_sentiment(32, seed=1)  # the validation split of the default data
    enc = tok(val["sentence"], padding=True, return_tensors="pt")
    original = cli.model.model.eval()
    with torch.no_grad():
        logits = reloaded(**enc).logits
        expected = original(**enc).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # the final val_acc in metrics.json is the accuracy of exactly these predictions
    acc = multiclass_accuracy(logits.argmax(-1), torch.tensor(val["label"]), num_classes=2, average="micro")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["validate"]["val_acc"] == pytest.approx(float(acc), abs=1e-6)


def test_saved_config_reparses(default_run, capsys):
    cli, run_dir = default_run
    with pytest.raises(SystemExit) as exit_info:
        tc.cli(["fit", "--config", str(run_dir / "config.yaml"), "--print_config"])
    assert exit_info.value.code == 0
    assert "demo_train_size: 96" in capsys.readouterr().out


def test_default_learns_above_chance(tmp_path):
    """The offline default is learnable: a short run is well above 50% on held-out data."""
    _, run_dir = run(tmp_path, "--trainer.max_steps=40", "--trainer.max_epochs=2", "--tick.enabled=false",
                     "--data.demo_train_size=640", "--data.demo_val_size=200", "--data.batch_size=32",
                     "--model.lr=5e-3", "--trainer.enable_checkpointing=false")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["validate"]["val_acc"] > 0.75


def test_demo_default_learns_and_its_report_is_clean(tmp_path):
    """What `make demo` runs, unchanged: it learns, and the anomaly summary of this healthy run is empty.

    The demo's attention switches on mid-run (loss leaves 0.69, Q/K gradients grow ~1000x and stay): a
    learning phase that the gradient rule used to report as 25 exploding gradients.
    """
    tc.cli(["fit", f"--run_dir={tmp_path / 'demo'}", "--trainer.enable_progress_bar=false"])
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["validate"]["val_acc"] > 0.85
    import pandas as pd

    from tick_lightning.reporting import find_anomalies, load_run

    run = load_run(tmp_path / "demo" / "ticks")
    assert len(run.steps) >= 10 and run.has("grad", "norm") and run.has("loss", "value")
    assert find_anomalies(run) == []
    assert pd.read_csv(tmp_path / "demo" / "report" / "anomalies.csv").empty


def write_sst2_like(dir_, n=40, dev_text_column="content"):
    """SST-2 layout: train header label/sentence, dev header label/content."""
    data = tc.demo_sentiment(n, seed=3)
    dir_.mkdir(parents=True, exist_ok=True)
    train = "label\tsentence\n" + "".join(f"{lab}\t{s}\n" for s, lab in zip(data["sentence"], data["label"]))
    dev = f"label\t{dev_text_column}\n" + "".join(
        f"{lab}\t{s}\n" for s, lab in zip(data["sentence"][:12], data["label"][:12]))
    (dir_ / "train.tsv").write_text(train)
    (dir_ / "dev.tsv").write_text(dev)
    return dir_ / "train.tsv", dir_ / "dev.tsv"


def test_local_tsv_with_per_split_columns(tmp_path):
    train, dev = write_sst2_like(tmp_path / "data")
    cli, run_dir = run(tmp_path, "--trainer.max_steps=2", "--tick.enabled=false",
                       f"--data.data_files={{train: {train}, validation: {dev}}}",
                       "--data.column_map={validation: {content: sentence}}")
    assert len(cli.datamodule.splits["train"]) == 40 and len(cli.datamodule.splits["validation"]) == 12
    # val_acc is the accuracy of the exported model on the 12 dev rows (their column renamed content -> sentence)
    from torchmetrics.functional.classification import multiclass_accuracy
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    dev_rows = [line.split("\t") for line in dev.read_text().splitlines()[1:]]
    with torch.no_grad():
        logits = model(**tok([t for _, t in dev_rows], padding=True, return_tensors="pt")).logits
    acc = multiclass_accuracy(logits.argmax(-1), torch.tensor([int(lab) for lab, _ in dev_rows]), num_classes=2,
                              average="micro")
    val_acc = json.loads((run_dir / "metrics.json").read_text())["validate"]["val_acc"]
    assert val_acc == pytest.approx(float(acc), abs=1e-6)


def test_resume_from_checkpoint_continues_from_saved_weights(tmp_path):
    from tick_lightning.store import load_ticks

    steps = ["--trainer.max_epochs=5", "--tick.ticks=every:2", "--tick.patch_norms=false", "--data.demo_train_size=32"]
    _, run_dir = run(tmp_path, "--trainer.max_steps=4", *steps)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 4
    run(tmp_path, "--trainer.max_steps=6", *steps, f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}")
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 6
    ticks = load_ticks(run_dir / "ticks")
    name = "model.classifier.weight"
    row = ticks[(ticks.state == "weight") & (ticks.name == name) & (ticks.stat == "norm") & (ticks.step == 4)]
    assert len(row) == 1 and row.attempt.iloc[0] == ticks.attempt.iloc[-1]  # step 4: recorded by the resumed fit
    expected = torch.linalg.vector_norm(ckpt["state_dict"][name].double()).item()
    assert row.value.iloc[0] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------ bad input
def expect_error(tmp_path, match, *extra):
    run_dir = tmp_path / "bad"
    with pytest.raises(RecipeError, match=match):
        tc.cli(["fit", f"--run_dir={run_dir}", *QUICK, "--trainer.max_steps=1", *extra])
    assert not run_dir.exists(), "nothing may be left in the run directory on bad input"


def test_unreachable_hub_checkpoint_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expect_error(tmp_path, r"hub is not reachable.*--model.checkpoint=/path/to", "--model.checkpoint=bert-base-uncased")


def test_unreachable_hub_dataset_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    expect_error(tmp_path, r"hub is not reachable.*data_files", "--data.dataset=stanfordnlp/sst2-not-cached")


def test_missing_column_lists_available(tmp_path):
    train, dev = write_sst2_like(tmp_path / "data")
    expect_error(tmp_path, r"no column\(s\) \['sentence'\]; available columns: \['label', 'content'\]",
                 f"--data.data_files={{train: {train}, validation: {dev}}}")


def test_label_count_mismatch(tmp_path):
    expect_error(tmp_path, r"num_labels=3 but the data has 2 labels", "--model.num_labels=3")


def test_empty_split(tmp_path):
    train, _ = write_sst2_like(tmp_path / "data")
    empty = tmp_path / "data" / "empty.tsv"
    empty.write_text("label\tsentence\n")
    expect_error(tmp_path, r"split 'validation' is empty", f"--data.data_files={{train: {train}, validation: {empty}}}")


def test_unknown_config_key_and_bad_peft(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        tc.main(["fit", f"--run_dir={tmp_path / 'bad'}", "--model.no_such_key=1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip() == "error: bad value in the config: unrecognized arguments: --model.no_such_key=1"
    with pytest.raises(RecipeError, match="unrecognized arguments: --model.no_such_key=1"):  # in process: an exception
        tc.cli(["fit", f"--run_dir={tmp_path / 'bad'}", "--model.no_such_key=1"])
    with pytest.raises(RecipeError, match=r"peft='dora'.*\['none', 'lora', 'ln_tuning'\]"):
        tc.TextClassifier(peft="dora")
    assert not (tmp_path / "bad").exists()


def test_default_run_uses_the_fused_optimizer_on_cpu(default_run):
    cli, _ = default_run
    assert cli.trainer.optimizers[0].defaults["fused"] is True  # as the HF Trainer's adamw_torch_fused


@pytest.mark.parametrize(("precision", "clip", "strategy", "requested", "expected"), [
    ("32-true", 1.0, "SingleDeviceStrategy", None, True),
    ("bf16-mixed", None, "DDPStrategy", None, True),
    ("bf16-mixed", 1.0, "SingleDeviceStrategy", None, False),  # Lightning's AMP plugin refuses to clip then
    ("16-mixed", None, "SingleDeviceStrategy", None, False),  # the scaler must unscale before clipping and ticks
    ("32-true", None, "DeepSpeedStrategy", None, False),
    ("32-true", None, "SingleDeviceStrategy", False, False),
])
def test_fused_optimizer_choice(precision, clip, strategy, requested, expected):
    from types import SimpleNamespace

    from recipes._shared.optim import use_fused_optimizer

    module = torch.nn.Module()
    module.layer = torch.nn.Linear(2, 2)
    module._trainer = SimpleNamespace(precision=precision, gradient_clip_val=clip, strategy=type(strategy, (), {})())
    assert use_fused_optimizer(module, requested) is expected


def test_bf16_mixed_with_clipping_trains_with_the_automatic_optimizer(tmp_path):
    # fused + clipping under bf16-mixed is refused by Lightning's AMP plugin: the automatic choice avoids it
    cli, _ = run(tmp_path, "--trainer.max_steps=2", "--trainer.precision=bf16-mixed", "--trainer.gradient_clip_val=1.0",
                 "--tick.enabled=false")
    assert cli.trainer.optimizers[0].defaults["fused"] is not True
    assert cli.trainer.global_step == 2


@pytest.mark.parametrize(("precision", "clip"), [("16-mixed", None), ("bf16-mixed", 1.0)])
def test_fused_optimizer_refused_where_lightning_cannot_use_it(precision, clip):
    from types import SimpleNamespace

    from recipes._shared.optim import use_fused_optimizer

    module = torch.nn.Linear(2, 2)
    module._trainer = SimpleNamespace(precision=precision, gradient_clip_val=clip, strategy=object())
    with pytest.raises(RecipeError, match=precision):
        use_fused_optimizer(module, True)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_log_step_metric_gives_the_loggers_the_same_rows_as_self_log(tmp_path, accumulate):
    import csv

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from recipes._shared.module import RecipeModule

    class Tiny(RecipeModule):
        def __init__(self, skip: bool):
            super().__init__(lr=0.1)
            self.model, self.skip = torch.nn.Linear(3, 1), skip

        def training_step(self, batch, batch_idx):
            loss = self.model(batch[0]).pow(2).mean()
            (self.log_step_metric if self.skip else self.log)("train_loss", loss, prog_bar=True)
            return loss

    rows = {}
    for skip in (False, True):
        L.seed_everything(0)
        data = DataLoader(TensorDataset(torch.randn(40, 3)), batch_size=2)
        logger = L.pytorch.loggers.CSVLogger(tmp_path, name=f"skip{skip}")
        trainer = L.Trainer(max_steps=9, log_every_n_steps=3, accumulate_grad_batches=accumulate, logger=logger,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(Tiny(skip), data)
        with open(f"{logger.log_dir}/metrics.csv") as f:
            rows[skip] = [(r["step"], r["train_loss"]) for r in csv.DictReader(f) if r.get("train_loss")]
    assert len(rows[False]) == 3  # steps 2, 5, 8: Lightning writes every log_every_n_steps
    assert rows[True] == rows[False]


def test_warmup_cosine_over_the_run_and_none_for_an_unbounded_run():
    import math
    from types import SimpleNamespace

    from recipes._shared.schedule import with_warmup_cosine

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    unbounded = SimpleNamespace(estimated_stepping_batches=float("inf"))  # no max_steps / max_epochs
    assert with_warmup_cosine(unbounded, opt, 0.2) is opt
    sched = with_warmup_cosine(SimpleNamespace(estimated_stepping_batches=10), opt, 0.2)["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [k / 2 if k < 2 else 0.5 * (1 + math.cos(math.pi * (k - 2) / 8)) for k in range(10)]
    assert lrs == pytest.approx(expected, abs=1e-9)
