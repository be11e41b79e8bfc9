"""The tick-phase collectors (``tick_lightning.collect``) driven directly, without ``Trainer.fit``: the scalar
states (``loss``, ``lr``, ``amp``, ``time``, ``memory``, ``renorm``) and the ``nonfinite`` watch here, the
per-parameter and input states in tests/test_collectors_params.py (which imports the helpers below).

``Drive`` makes the calls ``TickCallback`` makes (``_open_tick`` .. ``_end_tick``): ``open`` at the tick's first
batch, ``micro_batch`` after each backward, ``before_step`` per optimizer (after ``tick.add_found_inf`` and
``tick.stepped_optimizers += 1``), the optimizer step itself (done by the test), ``after_step``, one
``tick.gather.run()``, ``blocks``, the one ``to_host``, ``host_blocks``, ``close``; it returns the tick's rows
(``tick_table``) as ``{(state, name, stat): value}``. Every expected value is computed here in fp64 from the
tensors themselves, never through ``tick_lightning.stats``.

Tolerances: device values here are fp32 numbers (a loss sum, a tensor lr, a loss scale: compared exactly
against their fp32 rounding where the reference is a Python float); float learning rates are host values
(fp64, exact). The sum of 2-3 fp32 losses: rtol 1e-6 (two fp32 additions, 2 ulp).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from tick_lightning import amp
from tick_lightning.collect import (
    AmpCollector,
    LossCollector,
    LrCollector,
    MemoryCollector,
    NonfiniteWatch,
    ParamSet,
    RenormCollector,
    Tick,
    TimeCollector,
    UpdateCollector,
)
from tick_lightning.records import Block, tick_table, to_host

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")


# ---------------------------------------------------------------- helpers (also used by test_collectors_params)
def tiny_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Sequential:
    """Linear(4, 8) -> LayerNorm(8) -> Linear(8, 3); the LayerNorm's gain / bias moved off their ones / zeros
    (a zero bias has update ratio inf and std 0: degenerate references)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.add_(0.1 * torch.randn(8))
        model[1].bias.normal_(0.0, 0.1)
    return model.to(dtype)


def inputs(n: int, dtype: torch.dtype = torch.float32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 4, generator=g) * 2.0 + 0.5).to(dtype) for _ in range(n)]


class Drive:
    """One tick of ``collectors``, driven in the callback's order (see the module docstring)."""

    def __init__(self, collectors, step: int = 0, due=None, optimizers: int = 1, trainer=None) -> None:
        self.collectors = list(collectors)
        due = frozenset(s for c in self.collectors for s in c.states) if due is None else frozenset(due)
        self.tick = Tick(step=step, due=due, device=CPU, trainer=trainer, optimizers=optimizers)
        for c in self.collectors:
            assert c.wants(self.tick)
            c.open(self.tick)
        self.host: list[Block] = []

    def batch(self, loss) -> None:
        """A training batch: its backward (Lightning's), then ``micro_batch`` with the loss it back-propagated."""
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        for c in self.collectors:
            c.micro_batch(self.tick, loss)

    def before_step(self, optimizer, index: int = 0, scaler=None) -> None:
        """``on_before_optimizer_step`` of optimizer ``index`` (gradients unscaled); the test steps it after."""
        self.tick.add_found_inf(amp.found_inf(scaler, optimizer))
        self.tick.stepped_optimizers += 1
        for c in self.collectors:
            c.before_step(self.tick, optimizer, index)

    def end(self, stepped: bool = True) -> dict:
        tick = self.tick
        try:
            tick.stepped = stepped
            if stepped:
                for c in self.collectors:
                    c.after_step(tick)
            tick.gather.run()
            host = to_host([b for c in self.collectors for b in c.blocks(tick)])
            host += [b for c in self.collectors for b in c.host_blocks(tick)]
        finally:
            for c in self.collectors:
                c.close(tick)
        self.host = host
        t = tick_table(tick.step, 3, host).to_pydict()
        assert set(t["step"]) <= {tick.step} and set(t["epoch"]) <= {3}
        rows = {(s, n, k): v for s, n, k, v in zip(t["state"], t["name"], t["stat"], t["value"])}
        assert len(rows) == len(t["value"]), "a (state, name, stat) recorded twice"
        return rows


def of(rows: dict, state: str, name: str) -> dict:
    """``{stat: value}`` of one (state, name)."""
    return {k: v for (s, n, k), v in rows.items() if s == state and n == name}


def names(rows: dict, state: str) -> list[str]:
    return list(dict.fromkeys(n for s, n, _ in rows if s == state))


def ref_stats(t: torch.Tensor) -> dict:
    """fp64 ``norm, mean, std (population), absmax, nonfinite`` of ``t``'s values (finite tensors)."""
    x = t.detach().double().reshape(-1)
    n = x.numel()
    mean = x.sum() / n
    return {"norm": float(torch.linalg.vector_norm(x)), "mean": float(mean),
            "std": math.sqrt(float(((x - mean) ** 2).sum()) / n), "absmax": float(x.abs().max()),
            "nonfinite": float((~torch.isfinite(x)).sum())}


def ref_moments(xs: list[torch.Tensor]) -> dict:
    """fp64 ``mean, rms, absmax, kurtosis`` (Pearson: E[(x - mean)^4] / var^2, population var) of all of ``xs``."""
    x = torch.cat([t.detach().double().reshape(-1) for t in xs])
    mean = x.mean()
    var = ((x - mean) ** 2).mean()
    return {"mean": float(mean), "rms": float(x.square().mean().sqrt()), "absmax": float(x.abs().max()),
            "kurtosis": float(((x - mean) ** 4).mean() / var**2)}


def assert_close(got: dict, want: dict, rtol: float, atol: float, exact=("absmax", "nonfinite"), what="") -> None:
    """``got`` and ``want`` have the same stats; ``exact`` ones equal, the others within ``rtol`` / ``atol``."""
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for k, w in want.items():
        if k in exact:
            assert got[k] == w, (what, k, got[k], w)
        else:
            assert math.isclose(got[k], w, rel_tol=rtol, abs_tol=atol), (what, k, got[k], w)


def f32(x: float) -> float:
    """``x`` rounded to fp32: what a device value (or any value through ``to_host``'s fp32 copy) can be."""
    return float(np.float32(x))


# ---------------------------------------------------------------- loss
def test_loss_is_the_sum_of_the_micro_batch_losses_and_each_tick_starts_afresh():
    model, loss_c = tiny_model(), LossCollector()
    for step, accumulation in ((0, 3), (1, 2)):
        drive = Drive([loss_c], step=step)
        losses = []
        for x in inputs(accumulation, seed=step):
            loss = model(x).square().mean() / accumulation  # what Lightning back-propagates under accumulation
            losses.append(float(loss.detach().double()))
            drive.batch(loss)
        rows = drive.end()
        assert set(rows) == {("loss", "", "value"), ("loss", "", "nonfinite")}
        assert rows[("loss", "", "value")] == pytest.approx(math.fsum(losses), rel=1e-6, abs=0)
        assert rows[("loss", "", "nonfinite")] == 0.0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_nonfinite_micro_batch_loss_sets_the_flag(bad):
    drive = Drive([LossCollector()])
    drive.batch(torch.tensor(0.25))
    drive.batch(torch.tensor(bad))
    drive.batch(torch.tensor(0.5))
    rows = drive.end()
    value = rows[("loss", "", "value")]
    assert (math.isnan(value) if math.isnan(bad) else value == bad)
    assert rows[("loss", "", "nonfinite")] == 1.0


def test_no_loss_gives_no_block():
    loss_c = LossCollector()
    drive = Drive([loss_c])
    drive.batch(None)
    drive.batch({"not": "a tensor"})  # what a training_step may return without "loss"
    assert loss_c.blocks(drive.tick) == []
    assert drive.end() == {}


# ---------------------------------------------------------------- lr
def test_lr_and_momentum_of_every_param_group():
    model = tiny_model()
    sgd = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1, "momentum": 0.9},
                           {"params": model[1].parameters(), "lr": 0.01, "momentum": 0.5},
                           {"params": model[2].parameters(), "lr": 0.2}], lr=0.3)  # SGD's default momentum: 0
    drive = Drive([LrCollector()])
    drive.before_step(sgd)
    rows = drive.end()
    assert names(rows, "lr") == ["group0", "group1", "group2"]
    # float hyper-parameters are host values: recorded in fp64, exactly
    assert of(rows, "lr", "group0") == {"lr": 0.1, "momentum": 0.9}
    assert of(rows, "lr", "group1") == {"lr": 0.01, "momentum": 0.5}
    assert of(rows, "lr", "group2") == {"lr": 0.2, "momentum": 0.0}

    adam = torch.optim.Adam(model.parameters(), lr=3e-4, betas=(0.8, 0.99))
    adagrad = torch.optim.Adagrad(model.parameters(), lr=0.05)  # neither momentum nor betas
    for opt, want in ((adam, {"lr": 3e-4, "momentum": 0.8}), (adagrad, {"lr": 0.05})):
        drive = Drive([LrCollector()])
        drive.before_step(opt)
        assert drive.end() == {("lr", "group0", k): v for k, v in want.items()}


def test_lr_names_with_two_optimizers():
    model = tiny_model()
    first = torch.optim.SGD([{"params": model[0].parameters(), "lr": 0.1},
                             {"params": model[1].parameters(), "lr": 0.02}], lr=1.0, momentum=0.7)
    second = torch.optim.AdamW(model[2].parameters(), lr=1e-3, betas=(0.85, 0.9))
    drive = Drive([LrCollector()], optimizers=2)
    drive.before_step(first, 0)
    drive.before_step(second, 1)
    rows = drive.end()
    assert names(rows, "lr") == ["opt0.group0", "opt0.group1", "opt1.group0"]
    assert of(rows, "lr", "opt0.group0") == {"lr": 0.1, "momentum": 0.7}
    assert of(rows, "lr", "opt0.group1") == {"lr": 0.02, "momentum": 0.7}
    assert of(rows, "lr", "opt1.group0") == {"lr": 1e-3, "momentum": 0.85}


def test_a_tensor_lr_is_cloned_on_the_device_at_the_step():
    model = tiny_model()
    adam = torch.optim.Adam(model.parameters(), lr=torch.tensor(3e-3), betas=(0.9, 0.999))
    drive = Drive([LrCollector()])
    drive.before_step(adam)
    adam.param_groups[0]["lr"].fill_(1.0)  # a capturable scheduler updates the tensor in place after the step
    rows = drive.end()
    # a device row: the lr tensor's fp32 value and beta1 as an fp32 number, exactly
    assert of(rows, "lr", "group0") == {"lr": f32(3e-3), "momentum": f32(0.9)}


# ---------------------------------------------------------------- amp
def test_amp_without_a_scaler_records_scale_one_not_skipped():
    disabled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False)))
    for trainer in (None, SimpleNamespace(), disabled):  # no trainer, no precision plugin, a disabled scaler
        drive = Drive([AmpCollector()], trainer=trainer)
        drive.before_step(torch.optim.SGD(tiny_model().parameters(), lr=0.1))
        assert drive.end() == {("amp", "", "scale"): 1.0, ("amp", "", "skipped"): 0.0}
    drive = Drive([AmpCollector()])
    assert drive.end(stepped=False) == {}  # no optimizer step (no before_step): no amp block


@pytest.mark.parametrize("inf_grad", [False, True])
def test_amp_with_a_cpu_grad_scaler(inf_grad):
    """A real ``torch.amp.GradScaler("cpu")``, behind a minimal fake trainer: ``amp.grad_scaler`` reads only
    ``trainer.precision_plugin.scaler`` (Lightning's ``MixedPrecision.scaler``). The order is Lightning's:
    scale(loss).backward, unscale_, on_before_optimizer_step, scaler.step, scaler.update, then the tick's end."""
    model, lr = tiny_model(), 0.5
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
    trainer = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=scaler))
    sgd = torch.optim.SGD(model.parameters(), lr=lr)
    params = ParamSet(list(model.named_parameters()))
    drive = Drive([AmpCollector(), UpdateCollector(params)], trainer=trainer)
    loss = model(inputs(1)[0]).square().mean()
    scaler.scale(loss).backward()
    drive.batch(loss.detach())  # Lightning passes the unscaled loss to on_train_batch_end
    if inf_grad:
        model[2].weight.grad[0, 0] = math.inf
    scaler.unscale_(sgd)
    grads = {n: p.grad.double().clone() for n, p in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    drive.before_step(sgd, scaler=scaler)
    scaler.step(sgd)
    scaler.update()
    # update() changed the scale in place (backoff x0.5 after an inf, growth x2 after a good step) before blocks
    assert scaler.get_scale() == (2.0**9 if inf_grad else 2.0**11)
    rows = drive.end()
    assert of(rows, "amp", "") == {"scale": 2.0**10, "skipped": float(inf_grad)}  # the scale of this step
    for n, p in model.named_parameters():
        update = of(rows, "update", n)
        if inf_grad:  # the scaler skipped optimizer.step(): nothing applied, the rows are NaN
            assert torch.equal(p.detach(), before[n]) and all(math.isnan(v) for v in update.values())
        else:  # the step applied, with the unscaled gradients (lr |g| to its fp32 rounding: test_update_*)
            exact = float(torch.linalg.vector_norm(p.detach().double() - before[n].double()))
            assert update["norm"] == pytest.approx(exact, rel=1e-6)
            assert update["norm"] == pytest.approx(lr * float(torch.linalg.vector_norm(grads[n])), rel=1e-3)
            assert update["ratio"] == pytest.approx(exact / float(torch.linalg.vector_norm(before[n].double())),
                                                    rel=1e-6)


# ---------------------------------------------------------------- time, memory
def test_time_is_positive_and_memory_is_absent_on_cpu():
    for stepped in (True, False):  # a tick that ended without an optimizer step is timed up to blocks()
        drive = Drive([TimeCollector(), MemoryCollector(reset_peak=True)])
        drive.before_step(torch.optim.SGD(tiny_model().parameters(), lr=0.1))
        rows = drive.end(stepped=stepped)
        assert set(rows) == {("time", "", "step_seconds")}  # MemoryCollector: CUDA only, no block on CPU
        assert 0.0 < rows[("time", "", "step_seconds")] < 60.0
        assert isinstance(drive.host[-1].values, np.ndarray)  # a host block, after the one copy


# ---------------------------------------------------------------- renorm (routing only; the engine: test_renorm*)
class FakeEngine:
    """The three calls RenormCollector makes of a ``RenormEngine``; applies at even steps, scheduled at step 4."""

    def __init__(self) -> None:
        self.applied = []

    def due(self, step, is_tick):
        return step % 2 == 0

    def due_scheduled(self, step, is_tick):
        return step == 4

    def apply(self, step, is_tick, found_inf, record=False):
        self.applied.append((step, is_tick, record))
        return [Block("renorm", ("w",), ("before", "after"), torch.tensor([[float(step), 1.0]]))] if record else []


def test_renorm_applies_after_real_steps_and_records_on_ticks():
    engine = FakeEngine()
    collector = RenormCollector(engine, is_tick=lambda step: step % 3 == 0)
    for step, due in ((0, {"renorm"}), (1, set()), (2, set()), (4, set()), (6, {"renorm"})):
        tick = Tick(step=step, due=frozenset(due), device=CPU)
        assert collector.wants(tick) == (step % 2 == 0)
        if not collector.wants(tick):
            continue
        drive = Drive([collector], step=step, due=due)
        rows = drive.end(stepped=True)
        recorded = "renorm" in due or step == 4
        assert rows == ({("renorm", "w", "before"): float(step), ("renorm", "w", "after"): 1.0} if recorded else {})
    assert engine.applied == [(0, True, True), (2, False, False), (4, False, True), (6, True, True)]
    drive = Drive([collector], step=8, due={"renorm"})
    assert drive.end(stepped=False) == {} and len(engine.applied) == 4  # no optimizer step: nothing applied


# ---------------------------------------------------------------- the one copy
def test_the_one_copy_keeps_fp64_counts_exact():
    """Histogram and non-finite counts are fp64 partials (exact to 2**53); the tick's copy must not round
    them through fp32, where 2**24 + 1 is 2**24 (a bin of a 128k x 4096 embedding holds more). fp32 blocks
    in the same copy widen exactly; host blocks pass through."""
    count = torch.tensor([[2.0**24 + 1, 2.0**40 + 3]], dtype=torch.float64)
    fp32 = torch.tensor([[0.1, 3e-8]])
    host = to_host([Block("grad_hist", ("w",), ("zero", "under"), count), Block("weight", ("w",), ("a", "b"), fp32),
                    Block.scalars("time", {"step_seconds": 0.1})])
    assert host[0].values.tolist() == [[2.0**24 + 1, 2.0**40 + 3]]
    assert host[1].values.tolist() == [[f32(0.1), f32(3e-8)]]
    assert host[2].values.tolist() == [[0.1]]
    assert to_host([Block("weight", ("w",), ("a", "b"), fp32)])[0].values.tolist() == [[f32(0.1), f32(3e-8)]]


# ---------------------------------------------------------------- nonfinite watch
def test_nonfinite_watch_flags_an_inf_or_nan_gradient_or_loss():
    model = tiny_model()
    model(inputs(1)[0]).square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    watch = NonfiniteWatch()
    assert watch.check(None, grads, sharded=False) is False
    assert watch.check(None, [], sharded=False) is False
    for bad in (math.inf, -math.inf, math.nan):
        g = [t.clone() for t in grads]
        g[3].view(-1)[2] = bad
        assert watch.check(None, g, sharded=False) is True
    watch.observe_loss(torch.tensor(1.0))
    watch.observe_loss(torch.tensor(math.inf))
    assert watch.check(None, grads, sharded=False) is True
    assert watch.check(None, grads, sharded=False) is False  # the loss flag was consumed by the check
    # with a GradScaler its found_inf is the gradients' verdict (its unscale_ already looked at every element)
    assert watch.check(torch.tensor([1.0]), grads, sharded=False) is True
    assert watch.check(torch.tensor([0.0]), grads, sharded=False) is False
