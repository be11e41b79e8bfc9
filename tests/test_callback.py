"""TickCallback in a real Trainer with tiny BERT / GPT-2 / ViT models, checked against independent math."""

import math
from pathlib import Path

import pytest
import tiny
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from tick_lightning import TickCallback, load_ticks
from tick_lightning.schedule import ScheduleError
from tick_lightning.select import SelectionError


class Recorder(Callback):
    """Independent record of every step: fp64 copies of weights and grads before the update, weights after."""

    def __init__(self):
        self.before, self.grads, self.after, self.loss, self.lr = {}, {}, {}, {}, {}
        self.inputs = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        s = trainer.global_step
        self.before[s] = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}
        self.grads[s] = {n: p.grad.detach().double().clone() for n, p in pl_module.named_parameters()
                         if p.grad is not None}
        self.lr[s] = [g["lr"] for g in optimizer.param_groups]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss[self._step] = self.loss.get(self._step, 0.0) + float(outputs["loss"])
        if trainer.global_step > self._step:
            self.after[self._step] = {n: p.detach().double().clone() for n, p in pl_module.named_parameters()}


def value(df, step, state, name, stat):
    rows = df[(df.step == step) & (df.state == state) & (df.name == name) & (df.stat == stat)]
    assert len(rows) == 1, (step, state, name, stat, len(rows))
    return float(rows.value.iloc[0])


def fit(tmp_path, model, data, ticks, callbacks=(), **kw):
    cb = ticks if isinstance(ticks, TickCallback) else TickCallback(ticks=ticks, dirpath=tmp_path / "ticks")
    batch_size = kw.pop("batch_size", 8)
    trainer = tiny.trainer(tmp_path, callbacks=[*callbacks, cb], **kw)
    trainer.fit(model, tiny.loader(data, batch_size))
    return cb, trainer


MODELS = {
    "bert": (tiny.tiny_bert, tiny.token_dataset),
    "gpt2": (tiny.tiny_gpt2, tiny.token_dataset),
    "vit": (tiny.tiny_vit, tiny.image_dataset),
}


@pytest.mark.parametrize("arch", list(MODELS))
def test_recorded_values_equal_independent_fp64_math(tmp_path, arch):
    build, data = MODELS[arch]
    rec = Recorder()
    fit(tmp_path, tiny.HFClassifier(build()), data(32), "0,2", callbacks=[rec], max_steps=3)
    df = load_ticks(tmp_path / "ticks")
    assert sorted(df.step.unique()) == [0, 2]
    for step in (0, 2):
        assert value(df, step, "loss", "", "value") == pytest.approx(rec.loss[step], rel=1e-5)
        assert value(df, step, "lr", "group0", "lr") == pytest.approx(rec.lr[step][0])
        total = math.sqrt(sum(float(g.square().sum()) for g in rec.grads[step].values()))
        assert value(df, step, "grad", "", "norm") == pytest.approx(total, rel=1e-4)
        for name, w in rec.before[step].items():
            assert value(df, step, "weight", name, "norm") == pytest.approx(float(torch.linalg.vector_norm(w)), rel=1e-5, abs=1e-6)
            assert value(df, step, "weight", name, "mean") == pytest.approx(float(w.mean()), rel=1e-4, abs=1e-6)
            assert value(df, step, "weight", name, "std") == pytest.approx(float(w.std(correction=0)), rel=1e-4, abs=1e-6)
            assert value(df, step, "weight", name, "absmax") == pytest.approx(float(w.abs().max()), rel=1e-6)
            assert value(df, step, "weight", name, "nonfinite") == 0
            g = rec.grads[step][name]
            assert value(df, step, "grad", name, "norm") == pytest.approx(float(g.norm()), rel=1e-4, abs=1e-8)
            assert value(df, step, "grad", name, "absmax") == pytest.approx(float(g.abs().max()), rel=1e-4, abs=1e-8)
            upd = rec.after[step][name] - w
            assert value(df, step, "update", name, "norm") == pytest.approx(float(upd.norm()), rel=1e-3, abs=1e-7)
            ratio = float(upd.norm() / w.norm()) if float(w.norm()) > 0 else float("inf")
            if math.isfinite(ratio):
                assert value(df, step, "update", name, "ratio") == pytest.approx(ratio, rel=1e-3, abs=1e-7)


@pytest.mark.parametrize("flight, always", [([], 0), (True, 1)], ids=["ring-only", "defaults"])
def test_norm_input_stats_match_hooks_and_hooks_exist_only_on_ticks(tmp_path, flight, always):
    """The norm_input state's hooks are attached for tick batches only; the default flight recorder keeps one
    pre-hook per norm layer for the whole fit (``input_absmax``), ``flight=[]`` none; all removed at fit end."""
    model = tiny.tiny_bert()
    norms = {f"model.{n}": m for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    seen, hook_counts = {}, {}

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.handles = [m.register_forward_hook(self._hook(n, trainer.global_step)) for n, m in norms.items()]

        def _hook(self, name, step):
            def hook(module, args, out):
                x = args[0].detach().double()
                seen[(step, name)] = (float(x.mean()), float(x.square().mean().sqrt()), float(x.abs().max()))
                hook_counts[step] = max(hook_counts.get(step, 0), len(module._forward_pre_hooks))
            return hook

        def on_train_batch_end(self, *args):
            for h in self.handles:
                h.remove()

    cb = TickCallback(ticks="1,3", dirpath=tmp_path / "ticks", flight=flight)
    trainer = tiny.trainer(tmp_path, callbacks=[cb, Probe()], max_steps=4)
    trainer.fit(tiny.HFClassifier(model), tiny.loader(tiny.token_dataset(32)))
    assert hook_counts == {0: always, 1: always + 1, 2: always, 3: always + 1}  # tick batches only, removed after
    assert all(len(m._forward_pre_hooks) == 0 for m in norms.values())
    df = load_ticks(tmp_path / "ticks")
    ni = df[df.state == "norm_input"]
    assert set(ni.name) == set(norms)
    for step in (1, 3):
        for name in norms:
            mean, rms, amax = seen[(step, name)]
            assert value(df, step, "norm_input", name, "mean") == pytest.approx(mean, rel=1e-4, abs=1e-6)
            assert value(df, step, "norm_input", name, "rms") == pytest.approx(rms, rel=1e-4)
            assert value(df, step, "norm_input", name, "absmax") == pytest.approx(amax, rel=1e-5)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    rec = Recorder()
    fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), tiny.token_dataset(64), "every:3",
        callbacks=[rec], max_steps=7, accumulate_grad_batches=3, batch_size=4)
    df = load_ticks(tmp_path / "ticks")
    assert sorted(df.step.unique()) == [0, 3, 6]
    for step in (0, 3, 6):
        # the sum of the three micro-batch losses Lightning back-propagated (each divided by 3)
        assert value(df, step, "loss", "", "value") == pytest.approx(rec.loss[step], rel=1e-5)
        total = math.sqrt(sum(float(g.square().sum()) for g in rec.grads[step].values()))
        assert value(df, step, "grad", "", "norm") == pytest.approx(total, rel=1e-4)


def test_epoch_ticks_are_the_last_step_of_each_epoch(tmp_path):
    # 5 batches per epoch, accumulation 2: optimizer steps per epoch are (0,1), (2,3), (4) -> 3 steps
    fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), tiny.token_dataset(40), "epoch",
        max_steps=-1, max_epochs=2, accumulate_grad_batches=2)
    assert sorted(load_ticks(tmp_path / "ticks").step.unique()) == [2, 5]


def test_per_state_schedules_and_selection(tmp_path):
    cb = TickCallback(ticks="every:2", state_ticks={"weight": "every:4"}, select=["norm", "classifier.*"],
                      dirpath=tmp_path / "ticks")
    fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), tiny.token_dataset(64), cb, max_steps=6)
    df = load_ticks(tmp_path / "ticks")
    assert sorted(df[df.state == "weight"].step.unique()) == [0, 4, 5]  # 5: the last step, always recorded
    assert sorted(df[df.state == "loss"].step.unique()) == [0, 2, 4, 5]
    names = set(df[df.state == "weight"].name)
    assert names and all(("LayerNorm" in n) or n.startswith("model.classifier") for n in names)


def test_momentum_and_lr_per_group(tmp_path):
    fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert(), lr=0.05, momentum_optimizer=True), tiny.token_dataset(32),
        "0", max_steps=1)
    df = load_ticks(tmp_path / "ticks")
    assert value(df, 0, "lr", "group0", "lr") == pytest.approx(0.05)
    assert value(df, 0, "lr", "group0", "momentum") == pytest.approx(0.9)


def test_loggers_receive_global_scalars(tmp_path):
    cb = TickCallback(ticks="every:2", dirpath=tmp_path / "ticks")
    trainer = tiny.trainer(tmp_path, callbacks=[cb], max_steps=3, logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(32)))
    import pandas as pd

    metrics = pd.read_csv(next((tmp_path / "csv").rglob("metrics.csv")))
    assert "ticks/loss/value" in metrics.columns and "ticks/grad/norm" in metrics.columns
    logged = metrics.dropna(subset=["ticks/loss/value"])
    df = load_ticks(tmp_path / "ticks")
    assert logged.step.tolist() == [0, 2]
    assert logged["ticks/loss/value"].tolist() == pytest.approx([value(df, s, "loss", "", "value") for s in (0, 2)])


def test_snapshots_are_weights_before_the_update(tmp_path):
    from safetensors.torch import load_file

    rec = Recorder()
    cb = TickCallback(ticks="1", states=["snapshot", "weight"], select="classifier.*", dirpath=tmp_path / "ticks")
    fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), tiny.token_dataset(32), cb, callbacks=[rec], max_steps=2)
    snap = load_file(next((tmp_path / "ticks").glob("attempts/*/snapshots/step00000001-rank0.safetensors")))
    assert set(snap) == {"model.classifier.weight", "model.classifier.bias"}
    for name, t in snap.items():
        torch.testing.assert_close(t.double(), rec.before[1][name])


def test_default_dirpath_is_under_log_dir(tmp_path):
    cb = TickCallback(ticks="0")
    trainer = tiny.trainer(tmp_path, callbacks=[cb], max_steps=1, logger=CSVLogger(tmp_path))
    trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(16)))
    assert cb.dirpath == f"{trainer.log_dir}/ticks"
    manifest = __import__("tick_lightning.store").store.read_manifest(cb.dirpath)
    assert manifest["model_class"].endswith("BertForSequenceClassification")
    assert manifest["parameters"]["model.classifier.weight"] == [2, 32]
    assert manifest["world_size"] == 1 and manifest["precision"] == "32-true"


class Crash(Callback):
    def __init__(self, at):
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("simulated crash")


def test_crash_keeps_every_record(tmp_path):
    cb = TickCallback(ticks="every:1", dirpath=tmp_path / "ticks")
    trainer = tiny.trainer(tmp_path, callbacks=[Crash(5), cb], max_steps=10)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(128)))
    assert sorted(load_ticks(tmp_path / "ticks").step.unique()) == [0, 1, 2, 3, 4]


def test_resume_neither_repeats_nor_drops_a_tick(tmp_path):
    data = tiny.token_dataset(128)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    cb = TickCallback(ticks="every:1", dirpath=tmp_path / "ticks")
    trainer = tiny.trainer(tmp_path, callbacks=[cb, ckpt, Crash(5)], max_steps=8, enable_checkpointing=True)
    with pytest.raises(RuntimeError):
        trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(data))
    resume_from = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    assert resume_from.exists()
    cb2 = TickCallback(ticks="every:1", dirpath=tmp_path / "ticks")
    trainer2 = tiny.trainer(tmp_path, callbacks=[cb2], max_steps=8, enable_checkpointing=True)
    trainer2.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(data), ckpt_path=resume_from)
    df = load_ticks(tmp_path / "ticks")
    loss = df[(df.state == "loss") & (df.stat == "value")]
    assert loss.step.tolist() == list(range(8))  # every step once: 0-2 from the first run, 3-7 from the resume
    first, second = loss.attempt.unique()
    assert (loss.attempt == first).sum() == 3 and loss.run.nunique() == 1
    both = load_ticks(tmp_path / "ticks", superseded=True)
    assert ((both.state == "loss") & (both.stat == "value")).sum() == 10  # steps 3 and 4 were recorded twice on disk, read once


class NaNAt(tiny.HFClassifier):
    def __init__(self, model, at):
        super().__init__(model)
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.trainer.global_step == self.at else loss


def test_nonfinite_ticks_only_on_bad_steps(tmp_path):
    fit(tmp_path, NaNAt(tiny.tiny_bert(), at=3), tiny.token_dataset(64), "nonfinite", max_steps=5)
    df = load_ticks(tmp_path / "ticks")
    steps = sorted(df.step.unique())
    assert steps[0] == 3  # nothing recorded while training was finite
    for step in steps:  # after the NaN step AdamW has made the weights NaN: every later step is non-finite too
        assert value(df, step, "loss", "", "nonfinite") == 1.0
    assert value(df, 3, "weight", "model.classifier.weight", "nonfinite") == 0  # weights before the bad update
    assert value(df, 3, "grad", "", "nonfinite") > 0


def test_bf16_mixed_and_bf16_true_on_cpu(tmp_path):
    for precision in ("bf16-mixed", "bf16-true"):
        rec = Recorder()
        d = tmp_path / precision
        fit(d, tiny.HFClassifier(tiny.tiny_bert()), tiny.token_dataset(32), "1", callbacks=[rec], max_steps=2,
            precision=precision)
        df = load_ticks(d / "ticks")
        name = "model.bert.encoder.layer.0.attention.self.query.weight"
        assert value(df, 1, "weight", name, "norm") == pytest.approx(float(rec.before[1][name].norm()), rel=1e-4)
        assert value(df, 1, "grad", name, "norm") == pytest.approx(float(rec.grads[1][name].norm()), rel=1e-2)


class InfGradAt(tiny.HFClassifier):
    def __init__(self, model, at):
        super().__init__(model)
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("inf") if self.trainer.global_step == self.at else loss


def test_fp16_skipped_step_is_marked_not_counted_as_update(tmp_path):
    # Lightning maps precision="16-mixed" to bf16 on CPU; an explicit plugin gives a real fp16 GradScaler
    from lightning.pytorch.plugins import MixedPrecision

    model = InfGradAt(tiny.tiny_bert(), at=1)
    rec = Recorder()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    fit(tmp_path, model, tiny.token_dataset(32), "0,1,2", callbacks=[rec], max_steps=3, plugins=[plugin])
    df = load_ticks(tmp_path / "ticks")
    assert value(df, 1, "amp", "", "skipped") == 1.0
    assert value(df, 0, "amp", "", "skipped") == 0.0 and value(df, 2, "amp", "", "skipped") == 0.0
    assert value(df, 2, "amp", "", "scale") < value(df, 1, "amp", "", "scale")  # the scaler backed off
    upd = df[(df.step == 1) & (df.state == "update")]
    assert upd.value.isna().all()  # no update was applied, none is reported
    for name, w in rec.before[1].items():
        torch.testing.assert_close(rec.after[1][name], w)  # and indeed the weights did not move
    # gradients are recorded unscaled: step 0's global norm is of the order of fp32 training's
    assert value(df, 0, "grad", "", "norm") < 100


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(ticks="every:0"), ScheduleError, "positive integer"),
        (dict(states=["loss", "weights"]), ValueError, r"Unknown tick state\(s\) \['weights'\]"),
        (dict(state_ticks={"gradient": "every:2"}), ValueError, "unknown state"),
        (dict(ranks="first"), ValueError, "ranks='first'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, match):
    with pytest.raises(error, match=match):
        TickCallback(**kwargs)


class CountSteps(tiny.HFClassifier):
    steps = 0

    def training_step(self, batch, batch_idx):
        CountSteps.steps += 1
        return super().training_step(batch, batch_idx)


def test_bad_selection_and_unknown_total_fail_before_the_first_step(tmp_path):
    CountSteps.steps = 0
    cb = TickCallback(select="encoder.layers.*.attention.*", dirpath=tmp_path / "t1")
    with pytest.raises(SelectionError, match=r"matches nothing.*bert\.encoder\.layer"):
        fit(tmp_path, CountSteps(tiny.tiny_bert()), tiny.token_dataset(16), cb, max_steps=2)

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(tiny.token_dataset(16))

    cb = TickCallback(ticks="log:10", dirpath=tmp_path / "t2")
    trainer = tiny.trainer(tmp_path, callbacks=[cb], max_steps=-1, max_epochs=1)
    with pytest.raises(ScheduleError, match="total number of steps"):
        trainer.fit(CountSteps(tiny.tiny_bert()), torch.utils.data.DataLoader(Stream(), batch_size=4))
    assert CountSteps.steps == 0


def test_log_schedule_uses_the_runs_total(tmp_path):
    cb = TickCallback(ticks="log:4", dirpath=tmp_path / "ticks")
    fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), tiny.token_dataset(160), cb, max_steps=-1, max_epochs=1)
    assert sorted(load_ticks(tmp_path / "ticks").step.unique()) == [0, 2, 6, 19]


def test_statistics_are_computed_on_tick_steps_only(tmp_path, monkeypatch):
    import tick_lightning.collect.params as params_module

    calls = []
    real = params_module.tensor_stats_deferred
    monkeypatch.setattr(params_module, "tensor_stats_deferred", lambda ts, gather: calls.append(1) or real(ts, gather))
    fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), tiny.token_dataset(64), "every:4", max_steps=5)
    assert len(calls) == 2 * 2  # weight + grad, at steps 0 and 4 (the last) only


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "bf16-true"])
def test_gpu_mixed_precision(tmp_path, precision):
    rec = Recorder()
    fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), tiny.token_dataset(32), "0,2", callbacks=[rec], max_steps=3,
        precision=precision, accelerator="gpu")
    df = load_ticks(tmp_path / "ticks")
    for step in (0, 2):
        total = math.sqrt(sum(float(g.square().sum()) for g in rec.grads[step].values()))
        assert value(df, step, "grad", "", "norm") == pytest.approx(total, rel=1e-3)  # unscaled under 16-mixed
        assert value(df, step, "loss", "", "value") == pytest.approx(rec.loss[step], rel=1e-5)
        assert value(df, step, "memory", "", "peak_bytes") > 0
    if precision == "16-mixed":
        assert value(df, 0, "amp", "", "scale") > 1


def test_patch_norms_feeds_norm_input_from_patched_layers(tmp_path):
    from tick_lightning.norms import iter_patched_norms

    results = {}
    for patch in (False, True):
        d = tmp_path / str(patch)
        cb = TickCallback(ticks="1", states=["norm_input", "loss"], patch_norms=patch, dirpath=d / "ticks")
        model = tiny.HFClassifier(tiny.tiny_bert())
        fit(d, model, tiny.token_dataset(32), cb, max_steps=2)
        df = load_ticks(d / "ticks")
        results[patch] = df[df.state == "norm_input"].set_index(["name", "stat"]).value
        if patch:
            patched = [n for n, _ in iter_patched_norms(model)]
            assert len(patched) == 5 and cb.norm_patch_report is not None
            # the observer was set for the tick batch only, and no forward hook was used
            assert all(m.tick_observer is None and not m._forward_pre_hooks for _, m in iter_patched_norms(model))
    assert len(results[True]) == 5 * 4  # mean, rms, absmax, kurtosis
    # same model, same data: the patched layers see the same inputs as the hooks did (fp32 patched math)
    import pandas as pd

    pd.testing.assert_series_equal(results[True].sort_index(), results[False].sort_index(), rtol=1e-4)


def test_renorm_through_tick_callback(tmp_path):
    from tick_lightning import Renorm

    class Rows(Callback):  # independent check after every optimizer step
        def __init__(self):
            self.norms = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            w = pl_module.model.classifier.weight.detach().double()
            q = pl_module.model.bert.encoder.layer[0].attention.self.query.weight.detach().double()
            self.norms[trainer.global_step - 1] = (w.norm(dim=-1), q.mean(dim=-1).abs().max(), q.std(dim=-1, correction=0))

    rows = Rows()
    cb = TickCallback(ticks="every:3", dirpath=tmp_path / "ticks", renorm=[
        Renorm("classifier.weight", method="unit", at="step"),
        Renorm("encoder.layer.0.attention.self.query.weight", method="layernorm", at="ticks", eps=1e-12),
    ])
    trainer = tiny.trainer(tmp_path, callbacks=[cb, rows], max_steps=5)  # rows checks after cb applied renorm
    trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(64)))
    for step in range(5):  # unit rows after every step
        torch.testing.assert_close(rows.norms[step][0], torch.ones(2, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    # layernorm rows only after the tick steps 0 and 3
    for step in (0, 3):
        assert rows.norms[step][1] < 1e-5
        torch.testing.assert_close(rows.norms[step][2], torch.ones(32, dtype=torch.float64), rtol=1e-3, atol=1e-3)
    assert rows.norms[1][1] > 1e-5 or (rows.norms[1][2] - 1).abs().max() > 1e-3  # Adam moved it off between ticks
    df = load_ticks(tmp_path / "ticks")
    rn = df[df.state == "renorm"]
    assert sorted(rn.step.unique()) == [0, 3]  # recorded at ticks
    assert value(df, 3, "renorm", "model.classifier.weight", "norm_after") == pytest.approx(math.sqrt(2), rel=1e-5)


# ----------------------------------------------------------------------- models built late, manual optimization
class BuiltInConfigureModel(tiny.HFClassifier):
    """The model does not exist in setup: Lightning calls configure_model after the callbacks' setup."""

    def __init__(self):
        super().__init__(None)

    def configure_model(self):
        if self.model is None:
            self.model = tiny.tiny_bert()


def test_model_built_in_configure_model_is_selected_and_patched(tmp_path):
    from tick_lightning.norms import iter_patched_norms

    rec = Recorder()
    cb = TickCallback(ticks="1", select="attention", patch_norms=True, dirpath=tmp_path / "ticks")
    module = BuiltInConfigureModel()
    fit(tmp_path, module, tiny.token_dataset(32), cb, callbacks=[rec], max_steps=2)
    assert len(list(iter_patched_norms(module))) == 5
    df = load_ticks(tmp_path / "ticks")
    names = set(df[df.state == "weight"].name)
    assert names and all(".attention." in n for n in names)
    for name in names:
        assert value(df, 1, "weight", name, "norm") == pytest.approx(float(rec.before[1][name].norm()), rel=1e-5)
    assert len(set(df[df.state == "norm_input"].name)) == 5
    # the global gradient norm covers every trainable parameter, not the selection
    total = math.sqrt(sum(float(g.square().sum()) for g in rec.grads[1].values()))
    assert value(df, 1, "grad", "", "norm") == pytest.approx(total, rel=1e-4)


class TwoOptimizers(tiny.HFClassifier):
    """Manual optimization: the encoder steps with SGD, then the classifier with Adam on a fresh backward."""

    def __init__(self):
        super().__init__(tiny.tiny_bert())
        self.automatic_optimization = False

    def configure_optimizers(self):
        head = [p for n, p in self.named_parameters() if "classifier" in n]
        body = [p for n, p in self.named_parameters() if "classifier" not in n]
        return [torch.optim.SGD(body, lr=0.1, momentum=0.5), torch.optim.AdamW(head, lr=0.01)]

    def training_step(self, batch, batch_idx):
        body, head = self.optimizers()
        for opt in (body, head):
            opt.zero_grad()
            loss = self(batch).loss
            self.manual_backward(loss)
            opt.step()
        return loss


class PerOptimizer(Callback):
    """Gradients as each optimizer sees them at its own step, and its learning rates."""

    def __init__(self):
        self.grads, self.lrs = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch_idx

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
        grads = self.grads.setdefault(self.batch, {})
        grads.update({n: p.grad.detach().double().clone() for n, p in pl_module.named_parameters() if id(p) in ids})
        self.lrs.setdefault(self.batch, []).append(optimizer.param_groups[0]["lr"])


def test_manual_optimization_with_two_optimizers(tmp_path):
    rec = PerOptimizer()
    cb = TickCallback(ticks="every:2", dirpath=tmp_path / "ticks")
    trainer = tiny.trainer(tmp_path, callbacks=[rec, cb], max_steps=6)  # global_step moves 2 per batch
    trainer.fit(TwoOptimizers(), tiny.loader(tiny.token_dataset(64)))
    assert trainer.global_step == 6
    df = load_ticks(tmp_path / "ticks")
    assert sorted(df.step.unique()) == [0, 2]  # a tick counts batches: 3 batches, every:2, the last (2)
    for step in (0, 2):
        for name, g in rec.grads[step].items():  # each optimizer's own gradients, at its own step
            assert value(df, step, "grad", name, "norm") == pytest.approx(float(g.norm()), rel=1e-4, abs=1e-8)
        total = math.sqrt(sum(float(g.square().sum()) for g in rec.grads[step].values()))
        assert value(df, step, "grad", "", "norm") == pytest.approx(total, rel=1e-4)
        assert value(df, step, "lr", "opt0.group0", "lr") == pytest.approx(0.1)
        assert value(df, step, "lr", "opt0.group0", "momentum") == pytest.approx(0.5)
        assert value(df, step, "lr", "opt1.group0", "lr") == pytest.approx(0.01)
    # the classifier's gradient was taken after the encoder's update: it differs from the first backward's
    assert rec.grads[0]["model.classifier.weight"].norm() > 0


def test_validation_inside_an_accumulation_window_does_not_feed_norm_input(tmp_path):
    model = tiny.tiny_bert()
    norms = {f"model.{n}": m for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    sums = {}

    class TrainOnly(Callback):  # independent fp64 sums over the tick's training micro-batches only
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step
            self.handles = [m.register_forward_pre_hook(self._hook(step, n)) for n, m in norms.items()]

        def _hook(self, step, name):
            def hook(module, args):
                x = args[0].detach().double()
                s = sums.setdefault((step, name), [0.0, 0.0, 0])
                s[0] += float(x.sum())
                s[1] += float(x.square().sum())
                s[2] += x.numel()
            return hook

        def on_train_batch_end(self, *args):
            for h in self.handles:
                h.remove()

    val = tiny.token_dataset(16, seed=1)
    val.tensors[0].mul_(0).add_(5)  # validation inputs unlike the training ones
    cb = TickCallback(ticks="0", states=["norm_input"], dirpath=tmp_path / "ticks")
    trainer = tiny.trainer(tmp_path, callbacks=[TrainOnly(), cb], max_steps=2, accumulate_grad_batches=2,
                           val_check_interval=1, num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(tiny.HFClassifier(model), tiny.loader(tiny.token_dataset(32)), tiny.loader(val))
    df = load_ticks(tmp_path / "ticks")
    for name in norms:
        total, squares, count = sums[(0, name)]
        assert count == 2 * 8 * tiny.SEQ * 32  # two micro-batches of 8 sequences
        assert value(df, 0, "norm_input", name, "mean") == pytest.approx(total / count, rel=1e-4, abs=1e-6)
        assert value(df, 0, "norm_input", name, "rms") == pytest.approx((squares / count) ** 0.5, rel=1e-4)


# ----------------------------------------------------------------------- argument errors, before the first step
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(states=["loss", "grad"], state_ticks={"weight": "every:2"}), r"state_ticks.*\['weight'\].*not recorded"),
        (dict(state_ticks={"snapshot": "every:2"}), r"\['snapshot'\].*Add them to states"),
    ],
)
def test_state_ticks_for_unrecorded_states_fail(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TickCallback(**kwargs)


def test_dirpath_that_is_a_file_or_unwritable_fails_naming_dirpath(tmp_path, monkeypatch):
    import os

    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ValueError, match=r"dirpath=.*file.* is a file"):
        TickCallback(dirpath=file)
    with pytest.raises(ValueError, match=r"dirpath=.*cannot be created.*is a file"):
        TickCallback(dirpath=file / "ticks")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: make the check see what another user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    try:
        with pytest.raises(ValueError, match=r"dirpath=.*locked/ticks.* is not writable"):
            TickCallback(dirpath=locked / "ticks")
    finally:
        locked.chmod(0o700)


def test_select_typo_of_a_kind_gets_a_hint(tmp_path):
    cb = TickCallback(select="attn", dirpath=tmp_path / "ticks")
    CountSteps.steps = 0
    with pytest.raises(SelectionError, match="Did you mean the kind 'attention'"):
        fit(tmp_path, CountSteps(tiny.tiny_bert()), tiny.token_dataset(16), cb, max_steps=2)
    assert CountSteps.steps == 0


class FlattenOne(Callback):
    """Simulates FSDP1 / DeepSpeed flat parameters: after setup a parameter becomes a 1-D slice."""

    def on_fit_start(self, trainer, pl_module):
        p = pl_module.model.classifier.weight
        p.data = p.data.reshape(-1)[: p.numel() // 2].clone()


def test_flattened_parameter_views_are_refused_at_fit_start(tmp_path):
    CountSteps.steps = 0
    cb = TickCallback(dirpath=tmp_path / "ticks")
    with pytest.raises(RuntimeError, match=r"model\.classifier\.weight.*shape \[32\] but \[2, 32\].*FSDP2"):
        fit(tmp_path, CountSteps(tiny.tiny_bert()), tiny.token_dataset(16), cb, callbacks=[FlattenOne()], max_steps=2)
    assert CountSteps.steps == 0


def test_torch_compile_norm_input_from_patched_layers_and_a_warning_otherwise(tmp_path):
    import warnings

    results = {}
    for compiled in (False, True):
        d = tmp_path / str(compiled)
        module = tiny.HFClassifier(tiny.tiny_bert())
        if compiled:  # aot_eager: dynamo tracing and functionalized mutation as inductor sees them, no C++ build
            module.model = torch.compile(module.model, backend="aot_eager")
        cb = TickCallback(ticks="1,3", states=["norm_input", "weight"], patch_norms=True, dirpath=d / "ticks")
        fit(d, module, tiny.token_dataset(64), cb, max_steps=4)
        df = load_ticks(d / "ticks")
        assert not any("_orig_mod" in n for n in df.name)  # names as the user's model has them
        results[compiled] = df[df.state == "norm_input"].set_index(["step", "name", "stat"]).value
    assert len(results[True]) == 2 * 5 * 4 and not results[True].isna().any()
    import pandas as pd

    pd.testing.assert_series_equal(results[True], results[False], rtol=1e-5)
    module = tiny.HFClassifier(tiny.tiny_bert())
    module.model = torch.compile(module.model, backend="aot_eager")
    cb = TickCallback(ticks="1", states=["norm_input"], dirpath=tmp_path / "unpatched")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path / "u", module, tiny.token_dataset(32), cb, max_steps=2)
    assert any("patch_norms=True" in str(w.message) for w in caught)
    # the unobserved layers are left out (no NaN rows that would read as a finding), named in the manifest
    # and on the report's summary
    from tick_lightning.reporting import report
    from tick_lightning.store import read_manifest

    assert "norm_input" not in set(load_ticks(tmp_path / "unpatched").state)
    unobserved = read_manifest(tmp_path / "unpatched")["norm_input_unobserved"]
    assert len(unobserved) == 5 and unobserved[0] == "model.bert.embeddings.LayerNorm"
    assert "norm inputs not recorded" in report(tmp_path / "unpatched").read_text()


@pytest.mark.gpu
def test_gpu_update_on_host_matches_the_device_copy(tmp_path):
    results = {}
    for on_host in (False, True):
        d = tmp_path / str(on_host)
        cb = TickCallback(ticks="0,2", states=["update"], update_on_host=on_host, dirpath=d / "ticks")
        fit(d, tiny.HFClassifier(tiny.tiny_bert()), tiny.token_dataset(32), cb, max_steps=3, accelerator="gpu")
        results[on_host] = load_ticks(d / "ticks").set_index(["step", "name", "stat"]).value
    import pandas as pd

    assert len(results[True]) and not results[True].isna().any()
    pd.testing.assert_series_equal(results[True], results[False], rtol=1e-4)


@pytest.mark.gpu
def test_gpu_peak_memory_is_recorded_without_resetting_the_counter(tmp_path):
    block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")  # a 64 MiB peak before training
    del block
    before = torch.cuda.max_memory_allocated()
    cb = TickCallback(ticks="every:1", states=["memory", "loss"], dirpath=tmp_path / "ticks")
    fit(tmp_path, tiny.HFClassifier(tiny.tiny_bert()), tiny.token_dataset(32), cb, max_steps=3, accelerator="gpu")
    assert torch.cuda.max_memory_allocated() >= before  # other readers of the counter see the process peak
    df = load_ticks(tmp_path / "ticks")
    assert (df[(df.state == "memory") & (df.stat == "peak_bytes")].value >= before).all()
    assert (df[(df.state == "memory") & (df.stat == "peak_increase_bytes")].value >= 0).all()


def test_activation_stats_of_chosen_module_outputs_equal_fp64_and_hooks_only_on_ticks(tmp_path):
    """``activations=`` glob: mean / rms / absmax / kurtosis of each chosen module's output over the tick's
    micro-batches equal an independent fp64 hook's; no hook of ours on the modules between ticks."""
    import numpy as np

    model = tiny.tiny_bert()
    chosen = {f"model.{n}": m for n, m in model.named_modules() if n.startswith("bert.encoder.layer.")
              and n.endswith(".output") and isinstance(m, type(model.bert.encoder.layer[0].output))}
    seen, hooks_between = {}, []

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step
            if step == 1:  # not a tick: only the probe's own hooks may be attached after TickCallback ran
                hooks_between.append(sum(len(m._forward_hooks) for m in chosen.values()))
            self.handles = [m.register_forward_hook(self._hook(n, step)) for n, m in chosen.items()]

        def _hook(self, name, step):
            def hook(module, args, out):
                seen.setdefault((step, name), []).append(out.detach().double().reshape(-1).numpy())
            return hook

        def on_train_batch_end(self, *args):
            for h in self.handles:
                h.remove()

    cb = TickCallback(ticks="0,2", states=["loss"], activations="model.bert.encoder.layer.?.output",
                      dirpath=tmp_path / "ticks", log_to_loggers=False, dense=False)
    trainer = tiny.trainer(tmp_path, callbacks=[cb, Probe()], max_steps=3, accumulate_grad_batches=2)
    trainer.fit(tiny.HFClassifier(model), tiny.loader(tiny.token_dataset(48)))
    df = load_ticks(tmp_path / "ticks")
    rows = df[df.state == "activation"]
    assert set(rows.name) == set(chosen) and sorted(rows.step.unique()) == [0, 2]
    for step in (0, 2):
        for name in chosen:
            x = np.concatenate(seen[(step, name)])  # both micro-batches
            d = x - x.mean()
            want = {"mean": x.mean(), "rms": np.sqrt(np.mean(x**2)), "absmax": np.abs(x).max(),
                    "kurtosis": np.mean(d**4) / np.mean(d**2) ** 2}
            for stat, w in want.items():
                assert value(df, step, "activation", name, stat) == pytest.approx(w, rel=1e-4, abs=1e-6), (stat, name)
    assert hooks_between == [0, 0]  # two micro-batches of step 1
    with pytest.raises(ValueError, match="activations=None"):
        TickCallback(states=["activation"])


class GradsElsewhere(tiny.HFClassifier):
    """Its gradients never reach ``.grad`` of the optimizer's parameters (as under FSDP2 with an output FSDP2
    cannot traverse, or under DeepSpeed by design): here, it drops them after each backward."""

    def on_after_backward(self):
        for p in self.parameters():
            p.grad = None


class DeepSpeedStrategy(__import__("lightning.pytorch.strategies", fromlist=["x"]).SingleDeviceStrategy):
    """Stands for Lightning's DeepSpeedStrategy (not installed here): TickCallback knows it by its name."""


@pytest.mark.parametrize("deepspeed", [False, True])
def test_an_optimizer_stepping_without_gradients_is_warned_about_once_except_under_deepspeed(tmp_path, deepspeed):
    import warnings

    cb = TickCallback(ticks="0,2", states=["grad"], dirpath=tmp_path / "ticks")
    strategy = DeepSpeedStrategy(torch.device("cpu")) if deepspeed else "auto"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, GradsElsewhere(tiny.tiny_bert()), tiny.token_dataset(32), cb, callbacks=[], max_steps=3,
            strategy=strategy)
    messages = [str(w.message) for w in caught if str(w.message).startswith("TickCallback")]
    no_grads = [m for m in messages if "trainable parameters has a gradient" in m]
    assert len(no_grads) == (0 if deepspeed else 1), messages  # once, not at every tick
    assert any("under DeepSpeed" in m for m in messages) == deepspeed
    assert "grad" not in set(load_ticks(tmp_path / "ticks").state)


def test_the_last_step_is_always_recorded_and_the_end_says_where(tmp_path, caplog):
    """``every:7`` over 10 steps recorded 0 and 7: the fit's end (step 9) was not a tick; and nothing said where the
    records went or what to run next."""
    import logging

    callback = TickCallback(ticks="every:7", state_ticks={"weight": "every:100"}, dirpath=tmp_path / "ticks")
    trainer = tiny.trainer(tmp_path, callbacks=[callback], max_steps=10)
    with caplog.at_level(logging.INFO):
        trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(80)))
    df = load_ticks(tmp_path / "ticks")
    assert sorted(df[df.state == "loss"].step.unique()) == [0, 7, 9]
    assert sorted(df[df.state == "weight"].step.unique()) == [0, 9]
    ticks = str(tmp_path / "ticks")
    assert f"tick-lightning: records in {ticks}; see them with: tick-lightning report {ticks}" in caplog.text


def test_validation_metrics_are_recorded_at_the_steps_done(tmp_path):
    """``val_loss`` (and any scalar the module logged) after each validation of the fit, never the sanity check's:
    the report drew none of them."""
    callback = TickCallback(ticks="every:50", states=["loss"], dirpath=tmp_path / "ticks")
    data = tiny.loader(tiny.token_dataset(64))
    seen = []

    class Seen(Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                seen.append((trainer.global_step, float(trainer.callback_metrics["val_loss"])))

    trainer = tiny.trainer(tmp_path, callbacks=[Seen(), callback], max_steps=12, val_check_interval=4,
                           num_sanity_val_steps=1, limit_val_batches=2)
    trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), data, data)
    df = load_ticks(tmp_path / "ticks")
    metric = df[(df.state == "metric") & (df.name == "val_loss")]
    assert metric.step.tolist() == [s for s, _ in seen] and len(seen) == 3
    assert metric.value.tolist() == pytest.approx([v for _, v in seen])
    from tick_lightning.reporting import load_run

    run = load_run(tmp_path / "ticks")
    assert run.metrics["val_loss"].dropna().to_dict() == pytest.approx(dict(seen))
    assert sorted(run.steps) == [0, 11]  # metric rows are not ticks
