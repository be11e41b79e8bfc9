"""Dense series (every optimizer step's loss, global gradient norm, update norm) in a real Trainer.

Checked against an independent fp64 record of every step, across flushes of every kind (a tick, a full
buffer, the end of fit, a checkpoint), and through a kill -9 and a resume (tests/crash_script.py --dense).
"""

import math

import numpy as np
import pytest
import tiny
import torch
from lightning.pytorch.callbacks import Callback
from test_records_integrity import run

from tick_lightning import TickCallback, load_dense, load_ticks
from tick_lightning.spikes import detect_spikes
from tick_lightning.triggers import SpikeWatch


class Every(Callback):
    """Independent fp64 record of each optimizer step: loss (summed over micro-batches), grad and update norm."""

    def __init__(self):
        self.loss, self.grad, self.update, self._before = {}, {}, {}, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.double() for p in pl_module.parameters() if p.grad is not None]
        self.grad[self._step] = math.sqrt(sum(float(g.square().sum()) for g in grads))
        self._before = [p.detach().double().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.loss[self._step] = self.loss.get(self._step, 0.0) + float(outputs["loss"])
        if trainer.global_step > self._step:
            after = [p.detach().double() for p in pl_module.parameters()]
            self.update[self._step] = math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(after, self._before)))


def dense_rows(path, **kw):
    df = load_ticks(path, dense=True, **kw)
    assert set(df.state) - {"dense"} == set(load_ticks(path, **kw).state)  # the default leaves them out
    return df[df.state == "dense"]


def series(df, name):
    rows = df[df.name == name].sort_values("step")
    assert rows.step.is_unique, rows.step.tolist()
    return dict(zip(rows.step.tolist(), rows.value.tolist()))


@pytest.mark.parametrize("flush_every", [2, 256])
def test_every_step_equals_independent_fp64_math(tmp_path, flush_every):
    """Accumulation 2, ticks at 0 and 3 only, 7 steps: every step's three values, through every kind of flush."""
    every = Every()
    cb = TickCallback(ticks="0,3", states=["loss", "grad"], dirpath=tmp_path / "ticks", log_to_loggers=False,
                      dense=["loss", "grad_norm", "update_norm"], dense_flush_every=flush_every)
    trainer = tiny.trainer(tmp_path, callbacks=[every, cb], max_steps=7, accumulate_grad_batches=2)
    trainer.fit(tiny.HFClassifier(tiny.tiny_bert()), tiny.loader(tiny.token_dataset(8 * 14)))
    df = dense_rows(tmp_path / "ticks")
    assert series(df, "loss") == pytest.approx(every.loss, rel=1e-5)
    assert series(df, "grad_norm") == pytest.approx(every.grad, rel=1e-4)
    assert series(df, "update_norm") == pytest.approx(every.update, rel=1e-3)
    assert sorted(series(df, "loss")) == list(range(7))
    ticks = load_ticks(tmp_path / "ticks").query("state == 'grad' and name == '' and stat == 'norm'")
    # 6: the fit's last step, always recorded
    assert dict(zip(ticks.step, ticks.value)) == pytest.approx({s: every.grad[s] for s in (0, 3, 6)}, rel=1e-4)


def test_default_is_loss_and_grad_norm_and_false_records_none(tmp_path):
    for dense, names in ((True, {"loss", "grad_norm", "lr/group0"}), (False, set())):
        d = tmp_path / str(dense)
        cb = TickCallback(ticks="0", states=["loss"], dirpath=d / "ticks", log_to_loggers=False, dense=dense)
        tiny.trainer(d, callbacks=[cb], max_steps=3).fit(tiny.HFClassifier(tiny.tiny_bert()),
                                                         tiny.loader(tiny.token_dataset(24)))
        df = dense_rows(d / "ticks")
        assert set(df.name) == names
        if names:
            assert sorted(series(df, "loss")) == [0, 1, 2]


class Scheduled(tiny.HFClassifier):
    """Two param groups, a warm-up then linear decay stepped every optimizer step."""

    def configure_optimizers(self):
        head = [p for n, p in self.named_parameters() if "classifier" in n]
        body = [p for n, p in self.named_parameters() if "classifier" not in n]
        opt = torch.optim.AdamW([{"params": body}, {"params": head, "lr": 5e-3}], lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4) * max(0.0, 1 - s / 12))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class LearningRates(Callback):
    def __init__(self):
        self.lr = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lr[trainer.global_step] = [g["lr"] for g in optimizer.param_groups]


def test_the_learning_rate_of_every_step_is_a_dense_series(tmp_path):
    """The lr panel joined four tick values with straight lines; the schedule's real peak and end were between and
    after them. Every step's lr of every param group is recorded (a host float) with the dense series."""
    seen = LearningRates()
    cb = TickCallback(ticks="every:5", states=["loss", "lr"], dirpath=tmp_path / "ticks", log_to_loggers=False)
    tiny.trainer(tmp_path, callbacks=[seen, cb], max_steps=12).fit(Scheduled(tiny.tiny_bert()),
                                                                   tiny.loader(tiny.token_dataset(96)))
    dense = load_dense(tmp_path / "ticks")
    assert dense["lr/group0"].to_dict() == {s: v[0] for s, v in seen.lr.items()}
    assert dense["lr/group1"].to_dict() == {s: v[1] for s, v in seen.lr.items()}
    assert dense["lr/group0"].idxmax() == 3 and dense["lr/group0"].iloc[-1] < dense["lr/group0"].max() / 4


@pytest.mark.parametrize("kw", [{"dense": "loss"}, {"dense": ["loss", "weights"]}, {"dense_flush_every": 0},
                                {"dense_flush_every": True}])
def test_bad_dense_arguments_name_the_argument(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        TickCallback(**kw)


class Snapshot(Callback):
    """At the end of step 4, calls the callback's ``state_dict`` (what a checkpoint does) and reads the disk."""

    def __init__(self, cb, path):
        self.cb, self.path, self.seen = cb, path, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 5 and self.seen is None:
            self.cb.state_dict()
            self.seen = sorted(series(dense_rows(self.path), "loss"))


def test_a_checkpoint_flushes_every_finished_step_first(tmp_path):
    cb = TickCallback(ticks="0", states=["loss"], dirpath=tmp_path / "ticks", log_to_loggers=False)
    snap = Snapshot(cb, tmp_path / "ticks")
    tiny.trainer(tmp_path, callbacks=[cb, snap], max_steps=7).fit(tiny.HFClassifier(tiny.tiny_bert()),
                                                                   tiny.loader(tiny.token_dataset(56)))
    assert snap.seen == [0, 1, 2, 3, 4]


def test_kill_9_then_resume_keeps_each_step_once(tmp_path):
    """Killed at step 17 (dense rows 11..15 go to disk with tick 15), resumed from the step-10 checkpoint:
    every step once, steps >= 10 from the resumed attempt, the killed attempt's later rows superseded."""
    run(tmp_path, "--dense", "--exit-at", 17, "--step-sleep", 0.2, expect=137)  # time for the writer thread
    run(tmp_path, "--dense", "--resume", tmp_path / "ckpt" / "step=10.ckpt")
    df = dense_rows(tmp_path / "ticks")
    for name in ("loss", "grad_norm"):
        assert sorted(series(df, name)) == list(range(30))
    first, resumed = sorted(df.attempt.unique(), key=lambda a: df[df.attempt == a].step.min())
    assert sorted(df[df.attempt == first].step.unique()) == list(range(10))
    old = load_ticks(tmp_path / "ticks", superseded=True, dense=True)
    old = old[(old.state == "dense") & old.superseded]
    # what the killed attempt got onto disk after its checkpoint (ticks 10 and 15 carry rows 10..15; the
    # writer thread may lose the last one to the kill) is superseded, never read twice
    assert set(old.attempt) == {first} and 10 in set(old.step) and set(old.step) <= set(range(10, 16))
    # the flight recorder's rows (dumped at each checkpoint and the end of fit): each step once as well,
    # steps before the checkpoint from the killed attempt (its step-10 checkpoint dumped 0..9)
    flight = load_ticks(tmp_path / "ticks", flight=True).query("state == 'flight' and stat == 'grad_norm'")
    assert not flight.duplicated(["step", "name"]).any()
    assert sorted(flight.step.unique()) == list(range(30))
    assert sorted(flight[flight.attempt == first].step.unique()) == list(range(10))


def test_spike_watch_online_equals_detect_spikes_on_the_whole_series():
    """Flushes of 7 steps at a time find exactly the spikes of one pass over the whole series."""
    rng = np.random.default_rng(1)
    x = np.exp(0.05 * rng.standard_normal(300))
    x[[40, 41, 200]] *= 100.0
    x[250] = np.nan
    watch, found = SpikeWatch(window=32), []
    for start in range(0, 300, 7):
        steps = list(range(start, min(start + 7, 300)))
        values = x[steps]
        found += [s.step for _, s in watch.observe(steps, {"loss": (values, np.ones(len(steps), bool))})]
    assert found == [s.step for s in detect_spikes(np.arange(300), x, window=32)] == [40, 41, 200, 250]


def test_no_verdict_on_absent_values():
    watch = SpikeWatch(window=16)
    values = np.r_[np.ones(20), np.nan]
    present = np.r_[np.ones(20, bool), False]
    assert watch.observe(list(range(21)), {"grad_norm": (values, present)}) == []
    assert torch.isfinite(torch.tensor(watch._values["grad_norm"])).all()


class Spiky(tiny.HFClassifier):
    """The loss (and so every gradient) x1000 at one optimizer step, between ticks."""

    def __init__(self, model, at: int):
        super().__init__(model)
        self.at = at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1000.0 if self.trainer.global_step == self.at else loss


def test_a_spike_between_ticks_is_a_finding_and_makes_spike_ticks_after_the_flush_that_saw_it(tmp_path):
    """Ticks at 0 and every 50, ``spike:3``, buffer flushed every 5 steps: the x1000 step 22 reaches the
    host at the end of step 25 (rows 21..25), so steps 26, 27, 28 are deep ticks; the report finds step 22."""
    from tick_lightning.reporting import find_anomalies, load_run

    cb = TickCallback(ticks="0,every:50,spike:3", states=["loss", "grad"], dirpath=tmp_path / "ticks",
                      log_to_loggers=False, dense_flush_every=5)
    trainer = tiny.trainer(tmp_path, callbacks=[cb], max_steps=32)
    trainer.fit(Spiky(tiny.tiny_bert(), at=22), tiny.loader(tiny.token_dataset(8 * 32)))
    assert cb.spike_detected_at == 25
    assert {(name, s.step) for name, s in cb.spikes} == {("loss", 22), ("grad_norm", 22)}
    ticks = load_ticks(tmp_path / "ticks").query("state == 'grad' and name == '' and stat == 'norm'")
    assert sorted(ticks.step) == [0, 26, 27, 28, 31]  # 31: the last step
    found = find_anomalies(load_run(tmp_path / "ticks"))
    assert ("loss_spike", 22) in {(f.kind, f.step) for f in found}, found


def test_without_a_spike_term_a_spike_makes_no_ticks(tmp_path):
    cb = TickCallback(ticks="0", states=["loss"], dirpath=tmp_path / "ticks", log_to_loggers=False,
                      dense_flush_every=5)
    tiny.trainer(tmp_path, callbacks=[cb], max_steps=28).fit(Spiky(tiny.tiny_bert(), at=22),
                                                              tiny.loader(tiny.token_dataset(8 * 28)))
    assert [s.step for _, s in cb.spikes if _ == "loss"] == [22]
    assert sorted(load_ticks(tmp_path / "ticks").query("state == 'loss'").step.unique()) == [0, 27]  # 27: the last


def test_a_resumed_fit_keeps_the_spike_window_and_the_pending_spike_ticks(tmp_path):
    """Killed and resumed twice -- before the x1000 step 22 and between its detection and its ``spike:3``
    ticks -- a fit decides the same ticks as the uninterrupted one: the spike watch's trailing window and
    the step it last saw a spike at are in the checkpoint (a fresh window would need 8 steps of history
    again, and the pending ticks would be forgotten)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(name, max_steps, ckpt_path=None, save=None):
        cb = TickCallback(ticks="0,every:50,spike:3", states=["loss", "grad"], dirpath=tmp_path / name,
                          log_to_loggers=False, dense_flush_every=5)
        periodic = ModelCheckpoint(dirpath=tmp_path / f"{name}-ckpt", every_n_train_steps=20, save_top_k=-1)
        trainer = tiny.trainer(tmp_path, callbacks=[cb, periodic], max_steps=max_steps, enable_checkpointing=True)
        trainer.fit(Spiky(tiny.tiny_bert(), at=22), tiny.loader(tiny.token_dataset(8 * 32)), ckpt_path=ckpt_path)
        if save:
            trainer.save_checkpoint(save)
        return cb

    def grad_ticks(name):
        df = load_ticks(tmp_path / name).query("state == 'grad' and name == '' and stat == 'norm'")
        return sorted(df.step)

    whole = fit("whole", 32)
    assert whole.spike_detected_at == 24 and grad_ticks("whole") == [0, 25, 26, 27, 31]
    fit("chain", 20)  # the periodic checkpoint at step 20, before the spike
    middle = fit("chain", 26, ckpt_path=next((tmp_path / "chain-ckpt").glob("*.ckpt")), save=tmp_path / "26.ckpt")
    assert ("loss", 22) in {(name, s.step) for name, s in middle.spikes}  # found with the restored window
    last = fit("chain", 32, ckpt_path=tmp_path / "26.ckpt")  # ticks 26 and 27 are still due
    assert last.spike_detected_at == 24
    # the same ticks, and the last steps of the fits that ended at 20 and 26 (19, 25: one of them a spike tick)
    assert grad_ticks("chain") == sorted(set(grad_ticks("whole")) | {19})


def test_a_validate_from_a_checkpoint_leaves_no_spike_state_for_the_next_fresh_fit(tmp_path):
    """``validate(ckpt_path=...)`` restores the callback's state too; a fresh ``fit`` afterwards (no checkpoint)
    must start with an empty spike watch, not the checkpoint's pending spike ticks."""
    cb = TickCallback(ticks="0,every:50,spike:3", states=["loss", "grad"], dirpath=tmp_path / "ticks",
                      log_to_loggers=False, dense_flush_every=5)
    trainer = tiny.trainer(tmp_path, callbacks=[cb], max_steps=26)
    trainer.fit(Spiky(tiny.tiny_bert(), at=22), tiny.loader(tiny.token_dataset(8 * 26)))
    assert cb.spike_detected_at == 25  # the flush of rows 21..25
    trainer.save_checkpoint(tmp_path / "26.ckpt")
    module = Spiky(tiny.tiny_bert(), at=-1)
    tiny.trainer(tmp_path, callbacks=[cb]).validate(module, tiny.loader(tiny.token_dataset(16)),
                                                    ckpt_path=tmp_path / "26.ckpt")
    tiny.trainer(tmp_path, callbacks=[cb], max_steps=29).fit(module, tiny.loader(tiny.token_dataset(8 * 29)))
    assert cb.spike_detected_at is None and cb.spikes == []
    ticks = load_ticks(tmp_path / "ticks").query("state == 'grad' and name == '' and stat == 'norm'")
    assert sorted(ticks.step) == [0, 28]  # the latest run: its last step (28), no spike:3 ticks at 26-28
