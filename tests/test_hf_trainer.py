"""``tick_lightning.hf.TickTrainerCallback``: the same records from a Hugging Face ``Trainer`` as from Lightning.

The reference is the same fit through Lightning with ``TickCallback``: the same tiny model (a copy of one
initialisation), the same batches in the same order, the same optimizer (AdamW, constant lr, no weight decay),
the same accumulation and clipping. Every per-parameter statistic at every tick, the dense loss and gradient norm
of every step and the flight recorder's rows must agree to 1e-6.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import tiny
import torch

from tick_lightning import TickCallback, load_dense, load_flight, load_ticks
from tick_lightning.select import clean_name

transformers = pytest.importorskip("transformers")

STEPS, BATCH = 8, 4


class Module(tiny.HFClassifier):
    def configure_optimizers(self):  # the Trainer's AdamW: no weight decay (it would skip biases and norms)
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)


def lightning_fit(tmp_path, model, data, acc, clip, **tick):
    cb = TickCallback(dirpath=tmp_path / "pl", log_to_loggers=False, **tick)
    trainer = tiny.trainer(tmp_path, callbacks=[cb], max_steps=STEPS, accumulate_grad_batches=acc,
                           gradient_clip_val=clip or None)
    trainer.fit(Module(model), tiny.loader(data, batch_size=BATCH))
    return tmp_path / "pl"


def trainer_fit(tmp_path, model, data, acc, clip, **tick):
    from tick_lightning.hf import TickTrainerCallback

    args = tiny.hf_args(tmp_path / "hf", max_steps=STEPS, per_device_train_batch_size=BATCH,
                        gradient_accumulation_steps=acc, max_grad_norm=clip)
    cb = TickTrainerCallback(log_to_loggers=False, **tick)
    tiny.hf_trainer(model=model, args=args, train_dataset=tiny.TokenDicts(data), callbacks=[cb]).train()
    return cb.dirpath


def strip(frame):
    """Lightning's names carry the LightningModule's attribute (``model.``); the Trainer's are the model's own."""
    return frame.assign(name=frame.name.str.removeprefix("model."))


def lora(model):
    """A PEFT LoRA model: adapters on the attention's query and value, the classifier trained in full."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                            modules_to_save=["classifier"], lora_dropout=0.0))


@pytest.mark.parametrize("acc, clip, peft", [(1, 0.0, False), (2, 0.0, False), (2, 0.05, False), (2, 0.0, True)],
                         ids=["plain", "accumulate", "accumulate+clip", "peft-lora"])
def test_the_trainer_records_what_lightning_records_for_the_same_fit(tmp_path, acc, clip, peft):
    """Ticks every 2 steps with the parameter states, the dense series every step and the flight ring: the same rows
    from both, to 1e-6. With ``max_grad_norm`` (Lightning: ``gradient_clip_val``) the statistics are pre-clip on both
    sides (the recorded global norm is above the clip value at every step). A PEFT model: its trainable parameters
    only (the LoRA adapters, the classifier's trained copy)."""
    model = lora(tiny.tiny_bert()) if peft else tiny.tiny_bert()
    data = tiny.token_dataset(BATCH * acc * STEPS)
    tick = dict(ticks="every:2", states=["loss", "lr", "grad", "weight", "update"])
    pl_dir = lightning_fit(tmp_path, copy.deepcopy(model), data, acc, clip, **tick)
    hf_dir = trainer_fit(tmp_path, copy.deepcopy(model), data, acc, clip, **tick)

    cols = ["step", "state", "name", "stat"]
    pl = strip(load_ticks(pl_dir)).set_index(cols).value.sort_index()
    hf = load_ticks(hf_dir).set_index(cols).value.sort_index()
    # the Trainer's AdamW has two parameter groups (with and without weight decay, here both 0): group1's lr too
    group1 = hf.index.get_level_values("name") == "group1"
    assert (hf[group1 & (hf.index.get_level_values("stat") == "lr")] == 1e-3).all()
    hf = hf[~group1]
    assert set(pl.index.get_level_values("step")) == {0, 2, 4, 6, 7}
    trainable = {clean_name(n) for n, p in model.named_parameters() if p.requires_grad}
    assert set(hf[hf.index.get_level_values("state") == "grad"].index.get_level_values("name")) - {""} == trainable
    assert not peft or len(trainable) == 10  # 8 LoRA matrices, the classifier's trained copy
    assert pl.index.equals(hf.index), (pl.index.difference(hf.index), hf.index.difference(pl.index))
    np.testing.assert_allclose(hf.to_numpy(), pl.to_numpy(), rtol=1e-6, atol=1e-9)

    dense_pl, dense_hf = load_dense(pl_dir), load_dense(hf_dir)
    assert list(dense_hf.index) == list(range(STEPS)) == list(dense_pl.index)
    for series in ("loss", "grad_norm", "lr/group0"):
        np.testing.assert_allclose(dense_hf[series], dense_pl[series], rtol=1e-6)
    if clip:
        assert (dense_hf["grad_norm"] > clip).all(), dense_hf["grad_norm"]  # pre-clip: clipping changes nothing here

    flight_pl, flight_hf = load_flight(pl_dir), load_flight(hf_dir)
    flight_pl.columns = [c.removeprefix("model.") for c in flight_pl.columns]
    # columns in each optimizer's parameter order: the Trainer's groups put the weight-decay ones first
    assert list(flight_hf.index) == list(range(STEPS)) and sorted(flight_hf.columns) == sorted(flight_pl.columns)
    np.testing.assert_allclose(flight_hf[flight_pl.columns].to_numpy(), flight_pl.to_numpy(), rtol=1e-6)


def test_a_resume_from_a_checkpoint_saved_without_the_callback_is_refused_in_one_line(tmp_path):
    """Its records could not be exactly-once (no state says which ticks are on disk): refused at ``on_train_begin``,
    naming the checkpoint, before any record is written."""
    from tick_lightning.hf import TickTrainerCallback

    model, data = tiny.tiny_bert(), tiny.token_dataset(BATCH * 4)
    args = tiny.hf_args(tmp_path / "hf", max_steps=4, per_device_train_batch_size=BATCH, save_strategy="steps",
                        save_steps=2)
    tiny.hf_trainer(model=model, args=args, train_dataset=tiny.TokenDicts(data)).train()
    cb = TickTrainerCallback(ticks="every:1", dirpath=tmp_path / "ticks")
    trainer = tiny.hf_trainer(model=model, args=args, train_dataset=tiny.TokenDicts(data), callbacks=[cb])
    with pytest.raises(RuntimeError, match=r"^TickTrainerCallback: the Trainer resumes at step 2 from '.*checkpoint-2', "
                                           r"which holds no tick_lightning.pt .*$"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-2"))
    assert not (tmp_path / "ticks").exists()


def run_script(out, *args, expect=0):
    """``tests/hf_crash_script.py`` in its own process (a kill -9 there is that process's)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "hf_crash_script.py"
    done = subprocess.run([sys.executable, str(script), str(out), *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == expect, done.stderr[-3000:]


def test_kill_9_and_resume_records_every_tick_once_as_the_uninterrupted_fit(tmp_path):
    """The Trainer killed (``os._exit(137)``) at step 19 with checkpoints every 8 steps, resumed with
    ``resume_from_checkpoint=True`` (its last, step 16): every tick, every dense step and every flight step once, with
    the values of the uninterrupted fit (the same batches and optimizer state: to 1e-6); what the killed attempt
    wrote after its checkpoint is superseded."""
    run_script(tmp_path / "whole")
    run_script(tmp_path / "cut", "--exit-at", 19, expect=137)
    assert (tmp_path / "cut" / "checkpoint-16" / "tick_lightning.pt").is_file()
    run_script(tmp_path / "cut", "--resume")
    cols = ["step", "state", "name", "stat"]
    whole = load_ticks(tmp_path / "whole" / "ticks").set_index(cols).value.sort_index()
    cut = load_ticks(tmp_path / "cut" / "ticks").set_index(cols).value.sort_index()
    assert sorted(set(cut.index.get_level_values("step"))) == [0, 4, 8, 12, 16, 20, 23]
    assert cut.index.equals(whole.index) and not cut.index.duplicated().any()
    np.testing.assert_allclose(cut.to_numpy(), whole.to_numpy(), rtol=1e-6, atol=1e-9)
    dense_whole, dense_cut = load_dense(tmp_path / "whole" / "ticks"), load_dense(tmp_path / "cut" / "ticks")
    assert list(dense_cut.index) == list(range(24))
    np.testing.assert_allclose(dense_cut[["loss", "grad_norm"]], dense_whole[["loss", "grad_norm"]], rtol=1e-6)
    flight = load_ticks(tmp_path / "cut" / "ticks", flight=True).query("state == 'flight' and stat == 'grad_norm'")
    assert not flight.duplicated(["step", "name"]).any() and sorted(flight.step.unique()) == list(range(24))


def test_under_accelerate_launch_two_cpu_processes_the_records_equal_one_process(tmp_path):
    """``accelerate launch --multi_gpu --num_processes 2`` on CPU (DDP over gloo; ``--cpu`` alone starts one process),
    per-device batch 4, against one process with batch 8 (the same global batch, accumulation 2, clipping 0.05):
    every rank's (``ranks="all"``) per-parameter statistics at every tick equal the one-process records, to 1e-6
    (1e-7 absolute: a mean over a gradient of +-1e-2 elements is a cancellation), and so does the dense gradient
    norm; the loss is each rank's own half of the batch, as under Lightning's DDP. The key biases are left out: their
    gradient is zero in exact arithmetic (softmax ignores a shift of every key), so their weights stay at ~1e-9 of
    rounding and their update ratio is noise over noise."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parent / "hf_ddp_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    accelerate = Path(sys.executable).parent / "accelerate"
    two = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                          str(script), str(tmp_path / "two")], capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0 and two.stdout.count("done 2") == 2, (two.stdout[-2000:], two.stderr[-3000:])

    cols = ["step", "state", "name", "stat"]
    ref = load_ticks(tmp_path / "one" / "ticks")
    ref = ref[(ref.state != "loss") & ~ref.name.str.endswith("key.bias")].set_index(cols).value.sort_index()
    ranks = load_ticks(tmp_path / "two" / "ticks")
    assert sorted(ranks["rank"].unique()) == [0, 1] and sorted(ref.index.get_level_values("step").unique()) == [0, 2, 4, 5]
    for rank in (0, 1):
        got = ranks[(ranks["rank"] == rank) & (ranks.state != "loss") & ~ranks.name.str.endswith("key.bias")]
        got = got.set_index(cols).value.sort_index()
        assert got.index.equals(ref.index)
        np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), rtol=1e-6, atol=1e-7)
        dense = load_dense(tmp_path / "two" / "ticks", rank=rank)
        np.testing.assert_allclose(dense["grad_norm"], load_dense(tmp_path / "one" / "ticks")["grad_norm"], rtol=1e-6)


def test_report_to_tensorboard_gets_the_tags_lightnings_tensorboard_logger_gets(tmp_path, monkeypatch):
    """``report_to=["tensorboard"]``: the Trainer's own event file holds, per tick, the histograms over layers and the
    selected layers' grouped scalars, equal to the tick records -- the same ``ticks/`` tags as a Lightning fit with
    ``TensorBoardLogger`` (names without the LightningModule's ``model.``)."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from test_loggers import read_events

    from tick_lightning.hf import TickTrainerCallback

    tick = dict(ticks="0,2", states=["loss", "grad", "update", "weight"])
    logger = TensorBoardLogger(tmp_path, name="pl", version=0)
    cb = TickCallback(dirpath=tmp_path / "pl_ticks", log_select="model.classifier.*", **tick)
    tiny.trainer(tmp_path, callbacks=[cb], max_steps=3, logger=logger).fit(
        Module(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(24)))
    logger.experiment.flush()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))  # transformers 5's place for it
    args = tiny.hf_args(tmp_path / "hf", max_steps=3, report_to=["tensorboard"])
    hf = TickTrainerCallback(dirpath=tmp_path / "hf_ticks", log_select="classifier.*", **tick)
    tiny.hf_trainer(model=tiny.tiny_bert(), args=args, train_dataset=tiny.TokenDicts(tiny.token_dataset(24)),
                    callbacks=[hf]).train()

    pl_events, hf_events = read_events(logger.log_dir), read_events(tmp_path / "tb")
    tags = {kind: {t.replace("/model.", "/") for t in pl_events.Tags()[kind] if t.startswith("ticks/")}
            for kind in ("histograms", "scalars")}
    assert tags["histograms"] >= {"ticks/layers/grad_norm", "ticks/layers/update_ratio", "ticks/layers/weight_norm"}
    for kind in ("histograms", "scalars"):
        assert {t for t in hf_events.Tags()[kind] if t.startswith("ticks/")} == tags[kind], kind
    df = load_ticks(tmp_path / "hf_ticks")
    grads = df[(df.state == "grad") & (df.stat == "norm") & (df.name != "")]
    events = hf_events.Histograms("ticks/layers/grad_norm")
    assert [e.step for e in events] == [0, 2]
    for event in events:
        want = np.log10(grads[grads.step == event.step].value.to_numpy())
        h = event.histogram_value
        np.testing.assert_allclose([h.num, h.min, h.max, h.sum], [len(want), want.min(), want.max(), want.sum()],
                                   rtol=1e-5)
    got = {e.step: e.value for e in hf_events.Scalars("ticks/grad_norm/classifier.weight")}
    want = grads[grads.name == "classifier.weight"].set_index("step").value
    assert got == pytest.approx(want.to_dict(), rel=1e-6)


def test_report_to_wandb_gets_one_row_per_tick_with_the_histograms(tmp_path, monkeypatch):
    """``report_to=["wandb"]`` offline: the Trainer's W&B run holds one row per tick at ``train/global_step`` with the
    histogram over layers of the recorded gradient norms and the selected layers' scalars, equal to the records."""
    pytest.importorskip("wandb")
    from test_loggers import read_wandb_history

    from tick_lightning.hf import TickTrainerCallback

    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path),
                       "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path / "config"),
                       "WANDB_DATA_DIR": str(tmp_path / "data"), "WANDB_CONSOLE": "off", "WANDB_PROJECT": "tick-test",
                       "WANDB_DISABLE_GIT": "true", "WANDB_X_DISABLE_STATS": "true"}.items():
        monkeypatch.setenv(var, value)
    args = tiny.hf_args(tmp_path / "hf", max_steps=3, report_to=["wandb"])
    hf = TickTrainerCallback(ticks="0,2", states=["loss", "grad", "update", "weight"], dirpath=tmp_path / "ticks",
                             log_select="classifier.*")
    try:
        tiny.hf_trainer(model=tiny.tiny_bert(), args=args, train_dataset=tiny.TokenDicts(tiny.token_dataset(24)),
                        callbacks=[hf]).train()
    finally:
        import wandb

        wandb.finish()
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = [r for r in read_wandb_history(run_file) if "ticks/layers/grad_norm" in r]
    assert [r["train/global_step"] for r in rows] == [0, 2]
    df = load_ticks(tmp_path / "ticks")
    grads = df[(df.state == "grad") & (df.stat == "norm") & (df.name != "")]
    for row in rows:
        at = grads[grads.step == row["train/global_step"]]
        want = np.log10(at.value.to_numpy())
        hist = row["ticks/layers/grad_norm"]
        assert hist["_type"] == "histogram" and sum(hist["values"]) == len(want)
        np.testing.assert_allclose([hist["bins"][0], hist["bins"][-1]], [want.min(), want.max()], rtol=1e-5)
        assert row["ticks/grad_norm/classifier.weight"] == pytest.approx(
            at[at.name == "classifier.weight"].value.item(), rel=1e-6)


@pytest.mark.parametrize("flag, named", [("is_deepspeed_enabled", "DeepSpeed"), ("is_fsdp_enabled", "FSDP")])
def test_a_setup_it_cannot_measure_exactly_is_refused_in_one_line_naming_it(flag, named):
    """DeepSpeed (ZeRO's partitioned gradients are no whole parameters) and FSDP through the Trainer: refused by name
    (the decision ``on_train_begin`` takes before anything is written; DeepSpeed is not installed here, so the
    Trainer is a stand-in with the flag the real one sets)."""
    from types import SimpleNamespace

    from tick_lightning.hf import TickTrainerCallback

    cb = TickTrainerCallback()
    trainer = SimpleNamespace(is_deepspeed_enabled=False, is_fsdp_enabled=False, args=None)
    setattr(trainer, flag, True)
    with pytest.raises(RuntimeError, match=rf"^TickTrainerCallback does not support {named} [^\n]*$"):
        cb._refuse(trainer)
    with pytest.raises(RuntimeError, match=r"^TickTrainerCallback does not support guard= / renorm="):
        TickTrainerCallback(guard="skip")._refuse(SimpleNamespace())


def test_the_trainers_evaluation_metrics_are_metric_rows_at_their_steps(tmp_path):
    """``eval_strategy="steps"``: each evaluation's metrics (``eval_loss``, ...) are rows ``state="metric"`` at the
    optimizer steps done, equal to the Trainer's own log history -- as a Lightning validation's are."""
    from tick_lightning.hf import TickTrainerCallback

    data = tiny.TokenDicts(tiny.token_dataset(BATCH * 6))
    args = tiny.hf_args(tmp_path / "hf", max_steps=6, per_device_train_batch_size=BATCH, eval_strategy="steps",
                        eval_steps=3, per_device_eval_batch_size=BATCH)
    cb = TickTrainerCallback(ticks="every:2", states=["loss"], log_to_loggers=False)
    trainer = tiny.hf_trainer(model=tiny.tiny_bert(), args=args, train_dataset=data, eval_dataset=data, callbacks=[cb])
    trainer.train()
    df = load_ticks(cb.dirpath)
    got = df[(df.state == "metric") & (df.name == "eval_loss")].set_index("step").value
    want = {h["step"]: h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h}
    assert sorted(want) == [3, 6] and got.to_dict() == pytest.approx(want, rel=1e-6)


def test_epoch_ticks_fall_on_each_epochs_last_step_as_under_lightning(tmp_path):
    """``ticks="epoch"`` over 2 epochs of 5 micro-batches with accumulation 2 (the last step of an epoch has one
    micro-batch): the Trainer's ticks are Lightning's steps (the last optimizer step of each epoch), epoch column
    included."""
    from tick_lightning.hf import TickTrainerCallback

    data = tiny.token_dataset(BATCH * 5)
    cb = TickCallback(ticks="epoch", states=["loss"], dirpath=tmp_path / "pl", log_to_loggers=False, dense=False)
    tiny.trainer(tmp_path, callbacks=[cb], max_epochs=2, max_steps=-1, accumulate_grad_batches=2).fit(
        Module(tiny.tiny_bert()), tiny.loader(data, batch_size=BATCH))
    args = tiny.hf_args(tmp_path / "hf", max_steps=-1, num_train_epochs=2, per_device_train_batch_size=BATCH,
                        gradient_accumulation_steps=2)
    hf = TickTrainerCallback(ticks="epoch", states=["loss"], log_to_loggers=False, dense=False)
    tiny.hf_trainer(model=tiny.tiny_bert(), args=args, train_dataset=tiny.TokenDicts(data), callbacks=[hf]).train()
    pl, got = load_ticks(tmp_path / "pl"), load_ticks(hf.dirpath)
    assert sorted(set(zip(pl.step, pl.epoch))) == sorted(set(zip(got.step, got.epoch))) == [(2, 0), (5, 1)]


def test_a_second_train_into_the_same_output_dir_is_a_run_of_its_own(tmp_path):
    """Rerun into the same ``output_dir``: one warning that the folder already holds a run, the first run's records
    kept and apart, the latest run read by default with each tick once."""
    from tick_lightning import list_runs
    from tick_lightning.hf import TickTrainerCallback

    dirs = []
    for attempt in range(2):
        args = tiny.hf_args(tmp_path / "hf", max_steps=4, per_device_train_batch_size=BATCH)
        cb = TickTrainerCallback(ticks="every:2", states=["loss"], log_to_loggers=False)
        trainer = tiny.hf_trainer(model=tiny.tiny_bert(), args=args, callbacks=[cb],
                                  train_dataset=tiny.TokenDicts(tiny.token_dataset(BATCH * 4)))
        if attempt:
            with pytest.warns(UserWarning, match="already holds tick records"):
                trainer.train()
        else:
            trainer.train()
        dirs.append(cb.dirpath)
    assert dirs[0] == dirs[1] and len(list_runs(dirs[0])) == 2
    latest, every = load_ticks(dirs[0]), load_ticks(dirs[0], run="all")
    assert sorted(set(latest.step)) == [0, 2, 3] and not latest.duplicated(["step", "state", "name", "stat"]).any()
    assert len(every) == 2 * len(latest)
