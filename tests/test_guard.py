"""The gradient guard on real Lightning fits: what it does to a faulty step, against independent references.

Faults are planted by a callback that runs before ``TickCallback`` in ``on_before_optimizer_step`` (the
gradients are ready, the guard has not judged them yet). The references are independent of the guard's code:
the parameters and optimizer state around a skipped step (a skip must leave both as they were), the unguarded
twin (which the fault breaks), and each rule re-run in fp64 numpy on the series the fit recorded *before* the
guard acted (the dense loss and gradient norm, the flight recorder's per-tensor norms).
"""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import tiny
import torch

from tick_lightning import Guard, TickCallback, load_dense, load_flight, load_guard, load_ticks
from tick_lightning.guard import GuardError
from tick_lightning.store import read_manifest

pytestmark = pytest.mark.usefixtures("one_thread")

PLANTED = "model.bert.encoder.layer.0.intermediate.dense.weight"  # ~1e-3 of the global gradient norm
CLASSIFIER = "model.classifier.weight"  # ~0.6 of it


def _param(module, name):
    return dict(module.named_parameters())[name]


class Plant(L.Callback):
    """At each ``step -> fault``: ``"nan"`` (one gradient element NaN) or a number (that parameter's gradient times
    it). First in the callback list, so the guard sees the planted gradient."""

    def __init__(self, faults: dict, name: str = PLANTED):
        self.faults, self.name = faults, name

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        fault = self.faults.get(trainer.global_step)
        if fault is None:
            return
        grad = _param(pl_module, self.name).grad
        if fault == "nan":
            grad.view(-1)[0] = float("nan")
        else:
            grad.mul_(fault)


class Snapshots(L.Callback):
    """Parameters and optimizer state (clones) at the end of every step, keyed by the steps done."""

    def __init__(self):
        self.at = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        opt = trainer.optimizers[0]
        params = [p for g in opt.param_groups for p in g["params"]]
        self.at[trainer.global_step] = ([p.detach().clone() for p in params],
                                        [{k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
                                         for p in params])


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and \
        all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a[1], b[1]))


def optimizer_factory(kind: str):
    def make(module):
        if kind == "adamw":
            return torch.optim.AdamW(module.parameters(), lr=1e-3)
        if kind == "adamw_fused":
            return torch.optim.AdamW(module.parameters(), lr=1e-3, fused=True)
        return torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    return make


class Classifier(tiny.HFClassifier):
    def __init__(self, model, optimizer: str = "adamw"):
        super().__init__(model)
        self.make_optimizer = optimizer_factory(optimizer)

    def configure_optimizers(self):
        return self.make_optimizer(self)


def noise_dataset(n: int, seed: int = 0):
    """Random labels: nothing to learn, so the loss and gradient norms stay at one level (a fit of a learnable toy
    task drives its norms down by decades in 20 steps, and a rolling mean and std hide a spike behind them)."""
    ds = tiny.token_dataset(n, seed)
    labels = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed + 1))
    return torch.utils.data.TensorDataset(ds.tensors[0], ds.tensors[1], labels)


def fit(tmp_path, guard, faults=None, steps=60, optimizer="adamw", model=None, data=None, callbacks=(),
        tick_kwargs=None, planted=PLANTED, **trainer_kwargs):
    snaps = Snapshots()
    kwargs = {"ticks": "every:25", "states": ["loss", "grad"], **(tick_kwargs or {})}
    tick = TickCallback(dirpath=tmp_path / "ticks", guard=guard, **kwargs)
    module = model if model is not None else Classifier(tiny.tiny_bert(), optimizer)
    trainer = tiny.trainer(tmp_path, max_steps=steps, callbacks=[Plant(faults or {}, planted), tick, snaps, *callbacks],
                           **trainer_kwargs)
    batches = steps * trainer_kwargs.get("accumulate_grad_batches", 1)
    trainer.fit(module, data if data is not None else tiny.loader(noise_dataset(8 * batches)))
    return module, tick, snaps


# ------------------------------------------------------------------------------------------------ skip is exact
@pytest.mark.parametrize("optimizer,path", [("adamw", "copy"), ("adamw_fused", "fused"), ("sgd", "copy")])
def test_skip_leaves_parameters_and_optimizer_state_as_they_were(tmp_path, optimizer, path):
    """A NaN gradient at step 20 and a x1e4 spike at step 30: both steps change neither the parameters nor the
    optimizer state (moments, step counts), bit for bit; the fit ends finite. The unguarded twin goes NaN."""
    faults = {20: "nan", 30: 1e4}
    module, tick, snaps = fit(tmp_path / "guarded", Guard("skip", warmup=10), faults, optimizer=optimizer)
    assert same(snaps.at[20], snaps.at[21]) and same(snaps.at[30], snaps.at[31])
    assert not same(snaps.at[19], snaps.at[20]) and not same(snaps.at[31], snaps.at[32])  # the others move
    assert all(torch.isfinite(p).all() for p in module.parameters())
    acted = load_guard(tmp_path / "guarded" / "ticks").set_index("step")
    assert acted.loc[20, "trigger"] == "nonfinite" and acted.loc[30, "trigger"] == "grad_norm"
    assert (acted.action == "skip").all() and len(acted) <= 3  # (a noisy loss of random labels may add one)
    assert read_manifest(tmp_path / "guarded" / "ticks")["guard"]["skip_paths"] == [path]
    twin, _, _ = fit(tmp_path / "twin", None, faults, optimizer=optimizer)
    assert not all(torch.isfinite(p).all() for p in twin.parameters())


def test_a_zero_gradient_is_not_a_skip(tmp_path):
    """Why a skip restores the state instead of zeroing the gradient: AdamW moves the weights on a zero gradient
    (its momentum and decoupled weight decay), so the check above would fail for zeroing."""
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(3)
    opt.step()
    before = w.detach().clone()
    w.grad = torch.zeros(3)
    opt.step()
    assert not torch.equal(before, w.detach())


# ------------------------------------------------------------------------------------------------ rules vs references
def reference_skip(loss, norm, z, window, warmup):
    """OLMo-core's rule in numpy fp64 on the loss and the log of the norm: each series against the mean and sample
    std of its last ``window`` finite values (every finite value enters, skipped or not); non-finite steps are
    skipped and kept out."""
    hist = {"loss": [], "grad_norm": []}
    skipped = []
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.log(norm)
    for i, values in enumerate(zip(loss, norm)):
        if not all(math.isfinite(v) for v in values):
            skipped.append(i)
            continue
        out = False
        for key, v in zip(("loss", "grad_norm"), values):
            h = np.asarray(hist[key][-window:])
            if len(h) >= warmup and v - h.mean() > z * h.std(ddof=1):
                out = True
            hist[key].append(v)
        if out:
            skipped.append(i)
    return skipped


def test_skip_decisions_equal_the_reference_rule_on_the_recorded_series(tmp_path):
    """The steps skipped are those OLMo-core's rule picks on the dense loss and gradient norm the fit recorded
    before the guard acted (three planted spikes of different sizes, one NaN)."""
    faults = {22: 300.0, 31: "nan", 40: 1e3, 47: 2.0}
    fit(tmp_path, Guard("skip", warmup=12, window=16, z=4.0), faults, steps=56, planted=CLASSIFIER)
    dense = load_dense(tmp_path / "ticks")
    expected = reference_skip(dense.loss.to_numpy(), dense.grad_norm.to_numpy(), z=4.0, window=16, warmup=12)
    got = load_guard(tmp_path / "ticks")
    assert got.step.tolist() == [int(dense.index[i]) for i in expected]
    assert {22, 31, 40} <= set(got.step)
    np.testing.assert_allclose(got.grad_norm, dense.grad_norm.loc[got.step], rtol=1e-12)


def test_zclip_equals_the_independent_zclip_on_the_recorded_norms(tmp_path):
    """Every clipped step and its threshold, from the independent ZClip (``benchmarks/peers/zclip.py``, written from
    the paper) fed the log of the pre-guard global norms the fit recorded (shifted to stay positive: ZClip judges
    norms; a z-score does not see a shift): same steps, same thresholds to 1e-9."""
    peers = tiny.load_benchmark("peers/zclip")
    fit(tmp_path, Guard("zclip", warmup=10), {24: 1e3, 33: 1e4}, steps=48, planted=CLASSIFIER)
    norms = load_dense(tmp_path / "ticks").grad_norm
    shift = 50.0
    ref = peers.ZClip(alpha=0.97, z_thresh=3.0, warmup_steps=10, max_grad_norm=None)
    grad = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))  # a gradient whose norm is the recorded one
    expected = {}
    for step, norm in norms.items():
        grad.grad = torch.tensor([math.log(norm) + shift], dtype=torch.float64)
        ref.step([grad], step_index=int(step))
        if ref.spike_steps and ref.spike_steps[-1] == step:
            expected[int(step)] = math.exp(ref.last_threshold - shift)
    got = load_guard(tmp_path / "ticks")
    assert got.step.tolist() == sorted(expected) and {24, 33} <= set(expected)
    np.testing.assert_allclose(got.threshold, [expected[s] for s in got.step], rtol=1e-9)
    np.testing.assert_allclose(got.factor, got.threshold / got.grad_norm, rtol=1e-12)


def reference_clip(norms: np.ndarray, z_thr, alpha, warmup, eps=1e-6):
    """The per-tensor rule in numpy fp64: each column's log norm against the mean and population variance of its
    first ``warmup`` values, then their EMA (``alpha``) of the log norm after clipping; a column whose z-score
    exceeds ``z_thr`` is scaled to ``exp(mean + z_thr**2 * std / z)``. ``{(row, column): factor}`` of the clipped."""
    logs = np.log(np.maximum(norms, 1e-30))
    mean, var = np.zeros(norms.shape[1]), np.zeros(norms.shape[1])
    clipped = {}
    for t, x in enumerate(logs):
        if t < warmup:
            mean, var = logs[:t + 1].mean(0), logs[:t + 1].var(0)
            continue
        std = np.sqrt(var)
        z = (x - mean) / (std + eps)
        over = z > z_thr
        limit = mean + z_thr ** 2 * std / np.where(over, z, 1.0)
        clipped.update({(t, c): float(np.exp(limit[c] - x[c])) for c in np.flatnonzero(over)})
        effective = np.where(over, limit, x)
        mean = alpha * mean + (1 - alpha) * effective
        var = alpha * var + (1 - alpha) * (effective - mean) ** 2
    return clipped


@pytest.mark.parametrize("z", [4.0, 0.5])
def test_clip_equals_the_reference_per_tensor_rule_on_the_recorded_norms(tmp_path, z):
    """The tensors scaled and their factors, from the per-tensor rule re-run in fp64 on the flight recorder's
    pre-guard per-tensor norms (every step of a fit shorter than the ring); ``z=0.5`` clips many tensors on most
    steps, from the first step after the warm-up on."""
    fit(tmp_path, Guard("clip", warmup=10, z=z), {30: 1e4}, steps=48)
    flight = load_flight(tmp_path / "ticks").sort_index()
    assert flight.index.tolist() == list(range(48))
    expected = reference_clip(flight.to_numpy(), z_thr=z, alpha=0.97, warmup=10)
    if z < 1:
        assert min(step for step, _ in expected) == 10 and len(expected) > 100
    rows = load_ticks(tmp_path / "ticks")
    rows = rows[(rows.state == "guard") & (rows.name != "") & (rows.stat == "factor")]
    got = {(int(s), flight.columns.get_loc(n)): v for s, n, v in zip(rows.step, rows.name, rows.value)}
    assert got.keys() == expected.keys()
    assert (30, flight.columns.get_loc(PLANTED)) in got
    np.testing.assert_allclose([got[k] for k in sorted(got)], [expected[k] for k in sorted(got)], rtol=1e-9)


# ------------------------------------------------------------------------------------------------ the training loop
class GradsUsed(L.Callback):
    """The global norm of the gradients the optimizer stepped with (still in ``.grad`` at the batch's end)."""

    def __init__(self):
        self.norm, self._step = {}, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        stepped, self._step = trainer.global_step > self._step, trainer.global_step
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if stepped and grads:
            self.norm[trainer.global_step - 1] = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g.double()) for g in grads])))


@pytest.mark.parametrize("clip_val", [None, 0.05])
def test_guard_before_lightning_clipping_with_accumulation(tmp_path, clip_val):
    """Order: the guard judges the unclipped, accumulated gradient (and the loss summed over both micro-batches),
    scales it, then Lightning's ``gradient_clip_val`` clips what is left, then the optimizer steps. At the spike
    the optimizer's gradient norm is ``min(guard threshold, clip_val)``; elsewhere the guard leaves it alone."""
    used = GradsUsed()
    fit(tmp_path, Guard("zclip", warmup=8), {20: 1e3}, steps=30, callbacks=[used], accumulate_grad_batches=2,
        gradient_clip_val=clip_val)
    dense = load_dense(tmp_path / "ticks")
    got = load_guard(tmp_path / "ticks").set_index("step")
    assert 20 in got.index
    limit = clip_val or math.inf
    assert used.norm[20] == pytest.approx(min(got.threshold[20], limit), rel=1e-4)  # torch's clip: eps 1e-6
    assert got.grad_norm[20] == pytest.approx(dense.grad_norm[20], rel=1e-12)  # judged pre-guard, unclipped
    for step in set(range(30)) - set(got.index):
        assert used.norm[step] == pytest.approx(min(dense.grad_norm[step], limit), rel=1e-4)


def test_skip_judges_the_loss_summed_over_accumulation(tmp_path):
    """With accumulation the judged loss is the step's loss as the dense series records it (the sum of the
    micro-batch losses Lightning back-propagated); a step whose loss alone is an outlier is skipped."""

    class LossSpike(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * 50 if self.trainer.global_step == 25 else loss

    snaps_module = LossSpike(tiny.tiny_bert())
    _, _, snaps = fit(tmp_path, Guard("skip", warmup=10, on="loss"), model=snaps_module, steps=32,
                      accumulate_grad_batches=2)
    got = load_guard(tmp_path / "ticks").set_index("step")
    dense = load_dense(tmp_path / "ticks")
    assert list(got.index) == [25] and got.trigger[25] == "loss"
    assert got.loss[25] == pytest.approx(dense.loss[25], rel=1e-6)
    assert same(snaps.at[25], snaps.at[26])


class Manual(Classifier):
    """Manual optimization: the module calls ``manual_backward`` and ``opt.step()`` itself."""

    def __init__(self, model):
        super().__init__(model)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = self(batch).loss
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization(tmp_path):
    _, _, snaps = fit(tmp_path, Guard("skip", warmup=10), {20: "nan"}, model=Manual(tiny.tiny_bert()), steps=30)
    assert same(snaps.at[20], snaps.at[21]) and not same(snaps.at[21], snaps.at[22])
    assert load_guard(tmp_path / "ticks").step.tolist() == [20]


def test_fp16_scaler_path_skips_exactly(tmp_path):
    """Under a real fp16 ``GradScaler`` the guard folds its flag into the scaler's ``found_inf``: the scaler skips
    ``optimizer.step()`` (an exact skip) and backs its scale off, as after an overflow."""
    from lightning.pytorch.plugins import MixedPrecision

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    _, tick, snaps = fit(tmp_path, Guard("skip", warmup=10), {20: 1e4}, steps=30, plugins=[plugin],
                         planted=CLASSIFIER)
    got = load_guard(tmp_path / "ticks")
    assert got.step.tolist() == [20] and got.trigger.tolist() == ["grad_norm"]
    assert same(snaps.at[20], snaps.at[21])
    assert read_manifest(tmp_path / "ticks")["guard"]["skip_paths"] == ["scaler"]
    # the judged norm is unscaled: the dense series (unscaled) says the same
    assert got.grad_norm[0] == pytest.approx(load_dense(tmp_path / "ticks").grad_norm[20], rel=1e-9)


def test_bf16_mixed(tmp_path):
    _, _, snaps = fit(tmp_path, Guard("skip", warmup=10), {20: "nan"}, steps=26, precision="bf16-mixed")
    assert same(snaps.at[20], snaps.at[21])


def test_lora_judges_only_trainable_tensors(tmp_path):
    """PEFT/LoRA: the base weights are frozen; only the adapters are judged, clipped and named."""
    from peft import LoraConfig, get_peft_model

    class Lora(Classifier):
        def __init__(self):
            super().__init__(get_peft_model(tiny.tiny_bert(), LoraConfig(r=4, target_modules=["query", "value"])))

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-3)

    lora_b = "model.base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.default.weight"  # A: no grad yet
    module = Lora()
    _, tick, _ = fit(tmp_path, Guard("clip", warmup=5, z=2.0), model=module, steps=24,
                     callbacks=[Plant({15: 1e4}, name=lora_b)])
    rows = load_ticks(tmp_path / "ticks")
    named = set(rows[(rows.state == "guard") & (rows.name != "")].name)
    trainable = {n.removeprefix("model.") for n, p in module.named_parameters() if p.requires_grad}
    assert lora_b.removeprefix("model.") in {n.removeprefix("model.") for n in named}
    assert {n.removeprefix("model.") for n in named} <= trainable
    assert len(read_manifest(tmp_path / "ticks")["flight"]["parameters"]) == len(trainable)  # the columns judged


# ------------------------------------------------------------------------------------------------ records
def test_interventions_are_events_rows_and_logged(tmp_path):
    """Each intervention is a ``state="guard"`` row set written once, a flight-recorder event with a dump around
    it, and a counter in the loggers."""
    from lightning.pytorch.loggers import CSVLogger

    fit(tmp_path, Guard("skip", warmup=10), {20: "nan", 30: 1e4}, steps=50, planted=CLASSIFIER,
        logger=CSVLogger(tmp_path / "logs", name="", version=""))
    rows = load_ticks(tmp_path / "ticks")
    guard = rows[rows.state == "guard"]
    assert not guard.duplicated(["step", "name", "stat", "rank"]).any()
    events = load_flight(tmp_path / "ticks", "events")
    assert {20, 30} <= set(events[events.trigger == "guard"].step)
    flight = load_flight(tmp_path / "ticks")
    assert {19, 20, 21, 29, 30, 31} <= set(flight.index)  # dumped around them
    import pandas as pd

    logged = pd.read_csv(tmp_path / "logs" / "metrics.csv")
    assert logged["ticks/guard/skipped"].dropna().iloc[-1] == 2


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs,message", [
    (dict(mode="skipp"), "Guard mode 'skipp' is unknown; valid modes: clip, zclip, skip."),
    (dict(mode="zclip", z=0), "Guard z=0 is not valid; pass a number in (0, inf)."),
    (dict(mode="zclip", z=-1.0), "Guard z=-1.0 is not valid; pass a number in (0, inf)."),
    (dict(mode="zclip", alpha=1.0), "Guard alpha=1.0 is not valid; pass a number in (0, 1)."),
    (dict(mode="clip", z=0), "Guard z=0 is not valid; pass a number in (0, inf)."),
    (dict(mode="skip", window=10 ** 9), "Guard window=1000000000 is not valid; pass an integer in [3, 65536]."),
    (dict(mode="skip", on="acc"), "Guard on='acc' is not valid; pass one or both of loss, grad_norm."),
    (dict(mode="skip", warmup=0), "Guard warmup=0 is not valid; pass an integer >= 2."),
    (dict(mode="clip", window=3), "Guard('clip') takes no window (an argument of mode 'skip'); clip takes z, alpha, "
                                  "select, warmup, nonfinite."),
    (dict(mode="zclip", select="linear"), "Guard('zclip') takes no select (an argument of mode 'clip'); zclip takes z, "
                                          "alpha, warmup, nonfinite."),
    (dict(mode="skip", z=float("nan")), "Guard z=nan is not valid; pass a number in (0, inf)."),
])
def test_bad_guard_is_one_line(kwargs, message):
    with pytest.raises(GuardError) as err:
        Guard(**kwargs)
    assert str(err.value) == message


def test_guard_from_text_and_mappings():
    """YAML, command lines and ``TICK_LIGHTNING_CONFIG`` give a mode name or a mapping; both are checked alike."""
    from jsonargparse import ArgumentParser

    from tick_lightning.config import TickConfig, parse_error_line

    assert TickConfig(guard="zclip").guard == Guard("zclip")
    assert TickConfig(guard={"mode": "skip", "z": 5}).guard == Guard("skip", z=5)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(TickCallback, "tick")
    cfg = parser.parse_args(["--tick.guard={mode: clip, z: 3}"])
    assert parser.instantiate_classes(cfg).tick.guard == Guard("clip", z=3)
    with pytest.raises(Exception) as err:
        parser.parse_args(["--tick.guard={mode: clip, window: 3}"])
    assert parse_error_line(err.value, "tick").endswith(
        "Guard('clip') takes no window (an argument of mode 'skip'); clip takes z, alpha, select, warmup, nonfinite.")


def test_refused_at_fit_start_before_anything_is_written(tmp_path):
    """A warm-up as long as the run, or a select that matches nothing: one line at fit start, no records."""
    with pytest.raises(GuardError, match=r"Guard warmup=64 is not shorter than the run \(30 optimizer steps\)"):
        fit(tmp_path / "a", Guard("skip"), steps=30)
    assert not (tmp_path / "a" / "ticks").exists()
    with pytest.raises(GuardError, match="Guard select: .*'nomatch' matches nothing"):
        fit(tmp_path / "b", Guard("clip", select="nomatch"), steps=30)
    assert not (tmp_path / "b" / "ticks").exists()
    with pytest.raises(GuardError, match="Guard select"):
        TickCallback(guard=Guard("clip", select="nomatch")).check_selection(tiny.tiny_bert())


# ------------------------------------------------------------------------------------------------ resume
@pytest.mark.parametrize("mode", ["clip", "skip"])
def test_kill_9_and_resume_takes_the_decisions_of_the_uninterrupted_fit(tmp_path, mode):
    """A fit killed at step 13 and resumed from its step-8 checkpoint (an epoch boundary: the same batches follow)
    takes, bit for bit, the decisions of the fit that was never interrupted, each step's rows once. Low thresholds
    make the guard act often, so its running statistics decide; a resume that restarted them would differ (the
    warm-up would start again)."""
    from test_records_integrity import run

    run(tmp_path / "whole", "--guard", mode, "--ckpt-every", 8)
    run(tmp_path / "cut", "--guard", mode, "--ckpt-every", 8, "--exit-at", 13, expect=137)
    run(tmp_path / "cut", "--guard", mode, "--ckpt-every", 8, "--resume", tmp_path / "cut" / "ckpt" / "step=8.ckpt")
    whole = load_ticks(tmp_path / "whole" / "ticks")
    cut = load_ticks(tmp_path / "cut" / "ticks")
    key = ["step", "name", "stat"]
    whole, cut = (d[d.state == "guard"].sort_values(key).reset_index(drop=True) for d in (whole, cut))
    assert not cut.duplicated(key).any()
    assert (whole.step.unique() >= 8).sum() >= 3  # it acted after the checkpoint, on its running statistics
    assert (cut[key] == whole[key]).all().all()
    np.testing.assert_array_equal(cut.value.to_numpy(), whole.value.to_numpy())


# ------------------------------------------------------------------------------------------------ report
def test_report_lists_the_interventions_and_draws_them(tmp_path, monkeypatch):
    """The report lists each intervention (``guard_skip`` with its trigger, in anomalies.csv and the summary) and
    marks them on the loss / grad-norm figure at the pre-guard values; guard rows are not ticks."""
    import pandas as pd

    from tick_lightning.reporting import figures, load_run, report

    fit(tmp_path, Guard("skip", warmup=10), {20: "nan", 30: 1e3}, steps=50, planted=CLASSIFIER)
    run = load_run(tmp_path / "ticks")
    assert run.guard.index.tolist() == [20, 30]
    assert set(run.steps) == {0, 25, 49}  # the ticks only (49: the last step)
    drawn = []
    real = figures._save

    def keep(fig, path):
        drawn.extend((path.name, c.get_label(), np.asarray(c.get_offsets())[:, 0].tolist())
                     for ax in fig.axes for c in ax.collections)
        return real(fig, path)

    monkeypatch.setattr(figures, "_save", keep)
    html = report(tmp_path / "ticks")
    found = pd.read_csv(html.parent / "anomalies.csv")
    skips = found[found.kind == "guard_skip"]
    assert skips.step.tolist() == [20, 30]
    assert skips.detail.tolist()[0] == "non-finite loss or gradient" and skips.detail.tolist()[1].startswith(
        "grad_norm z ")
    marks = [(label, x) for name, label, x in drawn if name == "loss_lr.png" and label.startswith("guard")]
    assert ("guard: update skipped", [30.0]) in marks  # the loss panel (finite there) ...
    assert any(label == "guard: update skipped" and 20.0 in x for label, x in marks)  # ... and the NaN norm
    assert "guard_skip" in (html.parent / "anomalies.md").read_text() and "guard_skip" in html.read_text()


# ------------------------------------------------------------------------------------------------ other routes
def test_zero_code_environment_route(tmp_path):
    """``TICK_LIGHTNING_CONFIG='{guard: ...}'`` builds the guard; a bad one is the variable's one line."""
    from tick_lightning.plugin import PluginEnvironmentError, callbacks_from_environment

    (cb,) = callbacks_from_environment({"TICK_LIGHTNING": "every:5", "TICK_LIGHTNING_DIR": str(tmp_path / "t"),
                                        "TICK_LIGHTNING_CONFIG": "{guard: {mode: skip, warmup: 10}}"})
    assert cb.guard == Guard("skip", warmup=10)
    (by_name,) = callbacks_from_environment({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG": "{guard: zclip}"})
    assert by_name.guard == Guard("zclip")
    with pytest.raises(PluginEnvironmentError) as info:
        callbacks_from_environment({"TICK_LIGHTNING": "1", "TICK_LIGHTNING_CONFIG": "{guard: {mode: skipp}}"})
    assert str(info.value) == ("TICK_LIGHTNING_CONFIG='{guard: {mode: skipp}}' is not valid: guard: Guard mode 'skipp' is "
                               "unknown; valid modes: clip, zclip, skip.")
    trainer = tiny.trainer(tmp_path, callbacks=[Plant({12: "nan"}), cb], max_steps=20)
    trainer.fit(Classifier(tiny.tiny_bert()), tiny.loader(noise_dataset(160)))
    assert load_guard(tmp_path / "t").step.tolist() == [12]


def test_recipe_yaml_and_flags(tmp_path):
    """The recipes take the guard in their ``tick`` group (YAML or a flag), checked while parsing."""
    from test_recipes_text import QUICK

    from recipes import text_classification as tc
    from recipes._shared.errors import RecipeError

    config = tmp_path / "guard.yaml"
    config.write_text("tick:\n  guard: {mode: zclip, warmup: 3}\n")
    cli = tc.cli(["fit", f"--run_dir={tmp_path / 'run'}", *QUICK, "--trainer.max_steps=6", f"--config={config}"])
    tick = next(c for c in cli.trainer.callbacks if isinstance(c, TickCallback))
    assert tick.guard == Guard("zclip", warmup=3)
    assert read_manifest(tmp_path / "run" / "ticks")["guard"]["mode"] == "zclip"
    with pytest.raises(RecipeError, match=r"Guard\('clip'\) takes no window"):
        tc.cli(["fit", f"--run_dir={tmp_path / 'bad'}", *QUICK, "--trainer.max_steps=6",
                "--tick.guard={mode: clip, window: 9}"])
    assert not (tmp_path / "bad").exists()


def test_a_skipped_step_is_not_renormalized_either(tmp_path):
    """``Renorm(at="step")`` runs after real optimizer steps only: the guard's skip is not one (the weights stay
    bit for bit as they were, as under the fp16 scaler's own skip)."""
    from tick_lightning import Renorm

    _, _, snaps = fit(tmp_path, Guard("skip", warmup=10), {20: "nan"}, steps=26,
                      tick_kwargs={"renorm": [Renorm("*.attention.self.query.weight", method="unit", at="step")]})
    assert same(snaps.at[20], snaps.at[21])


def test_a_reused_callback_resumes_with_the_checkpoints_statistics(tmp_path):
    """A review found a callback object reused for the resume loading the checkpoint's statistics into the first
    fit's rules, then starting fresh ones (the warm-up again): its decisions after the resume must be those of the
    uninterrupted fit (the checkpoint at an epoch's end: the same batches follow)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(callback, steps, root, ckpt=None):
        trainer = tiny.trainer(root, callbacks=[Plant({26: 1e4}, CLASSIFIER), callback,
                                                ModelCheckpoint(dirpath=root / "ck", save_top_k=-1,
                                                                every_n_train_steps=20)],
                               max_steps=steps, enable_checkpointing=True)
        trainer.fit(Classifier(tiny.tiny_bert()), tiny.loader(noise_dataset(8 * 20)), ckpt_path=ckpt)

    def guard():
        return Guard("zclip", warmup=10, z=1.5)  # acts often: its statistics decide

    whole = TickCallback(ticks="every:10", states=["loss"], dirpath=tmp_path / "u" / "t", guard=guard())
    run(whole, 32, tmp_path / "u")
    reused = TickCallback(ticks="every:10", states=["loss"], dirpath=tmp_path / "r" / "t", guard=guard())
    run(reused, 20, tmp_path / "r")
    run(reused, 32, tmp_path / "r", ckpt=next((tmp_path / "r" / "ck").glob("*step=20*.ckpt")))
    a, b = load_guard(tmp_path / "r" / "t"), load_guard(tmp_path / "u" / "t")
    after_a, after_b = a[a.step >= 20], b[b.step >= 20]
    assert 26 in set(after_b.step)  # (the threshold there depends on every statistic since step 0)
    assert after_a.step.tolist() == after_b.step.tolist()
    np.testing.assert_array_equal(after_a.threshold.to_numpy(), after_b.threshold.to_numpy())
    assert reused._guard.state_dict()["rules"][0]["count"].item() > 0  # readable after the fit too


# ------------------------------------------------------------------------------------------------ review's findings
def test_fused_sgd_with_momentum_skips_its_first_step_exactly(tmp_path):
    """Fused SGD creates its momentum buffer with ``empty_like``; a skipped kernel left it uninitialised. It takes
    the ``copy`` path, whose put-back of a first step's state is exact for SGD without dampening."""
    from tick_lightning.guard.skip import skip_path

    w = torch.nn.Parameter(torch.ones(3))
    fused = torch.optim.SGD([w], lr=0.1, momentum=0.9, fused=True)
    assert skip_path(fused, None, torch.device("cpu")).kind == "copy"
    ref_w = torch.nn.Parameter(torch.ones(3))
    ref = torch.optim.SGD([ref_w], lr=0.1, momentum=0.9)
    path = skip_path(fused, None, torch.device("cpu"))
    w.grad = torch.full((3,), float("nan"))
    path.arm(torch.tensor(True))
    fused.step()
    for _ in range(3):
        w.grad = ref_w.grad = torch.ones(3)
        path.arm(torch.tensor(False))
        fused.step()
        ref.step()
    torch.testing.assert_close(w.detach(), ref_w.detach())


def test_a_zero_norm_stays_out_of_the_statistics():
    from tick_lightning.guard.rules import LogZRule, SkipRule

    rule = LogZRule(z=3.0, alpha=0.97, warmup=3, width=2, device=torch.device("cpu"))
    for x in ([1.0, 1.0], [1.1, 0.0], [0.9, 1.2]):
        rule.decide(torch.tensor(x, dtype=torch.float64), torch.tensor(False))
    assert rule.state["count"].tolist() == [3.0, 2.0]
    skip = SkipRule(z=5.0, window=8, on=("grad_norm",), warmup=2, device=torch.device("cpu"))
    skip.decide({"grad_norm": torch.tensor(-69.0)}, torch.tensor(False), missing={"grad_norm": torch.tensor(True)})
    assert int(skip.state["count_grad_norm"]) == 0


def test_a_warmup_longer_than_the_window_is_refused():
    with pytest.raises(GuardError, match=r"warmup=20 is longer than window=10"):
        Guard("skip", window=10, warmup=20)
    assert Guard("skip", window=3).warmup == 2


def test_an_fp16_overflow_is_the_scalers_skip_not_the_guards(tmp_path):
    """Under a GradScaler an overflow makes the unscaled gradients inf and the scaler skips the step itself: that
    is no intervention of the guard (no row, no event, no finding)."""
    from lightning.pytorch.plugins import MixedPrecision

    class Overflow(Classifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * 1e30 if self.trainer.global_step == 15 else loss  # inf in fp16 gradients

    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    fit(tmp_path, Guard("skip", warmup=10), model=Overflow(tiny.tiny_bert()), steps=20, plugins=[plugin],
        tick_kwargs={"states": ["loss", "amp"], "ticks": "15"})
    assert load_guard(tmp_path / "ticks").empty
    df = load_ticks(tmp_path / "ticks")
    assert df[(df.state == "amp") & (df.stat == "skipped") & (df.step == 15)].value.tolist() == [1.0]
